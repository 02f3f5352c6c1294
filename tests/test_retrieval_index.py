"""Indexes of local documents, answering from them, and the cloze question set, checked against references
nobody here wrote: sentence-transformers' own vectors for every stored row (also after updates and a
compaction), pypdf reading a PDF, the embedder's tokenizer for chunk lengths, pytrec_eval for the measures
over an index, and the engine's greedy answer on the prompt `pocketlm ask` builds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
from helpers import write_text_pdf

from pocketlm.errors import ConfigError
from pocketlm.retrieval.chunking import Chunking, chunk_spans, untruncated
from pocketlm.retrieval.index import Index, passage_text
from pocketlm.retrieval.readers import UnreadableDocument, find_files, read_documents
from pocketlm.retrieval.search import Searcher

REPO = Path(__file__).resolve().parent.parent
DOCS = {
    "boiler.md": "# Boiler B-2\n\nThe boiler B-2 was installed in 1998 in the east wing. It is rated for 40 bar "
                 "and is serviced every spring by the plant engineer.\n",
    "pumps/p7.txt": "Pump P-7 moves cooling water from the river intake to the condenser. Its seals are replaced "
                    "every 14 months.\n",
    "canteen.html": "<html><head><title>Canteen</title><style>p {color: red}</style></head><body><h1>Canteen</h1>"
                    "<p>The canteen opens at 11:30 &amp; serves lentil soup on Fridays.</p><script>var x = 1;</script>"
                    "</body></html>",
    "faq.jsonl": '{"_id": "faq-1", "title": "Visitors", "text": "Visitors must wear helmets beyond the gate."}\n'
                 '{"_id": "faq-2", "text": "The night shift starts at 22:00."}\n',
}


def write_docs(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    write_text_pdf(root / "manual.pdf", ["The compressor C-5 has three stages.", "Change its oil every 4000 hours."])
    return root


@pytest.fixture(scope="module")
def embedder():
    from pocketlm.retrieval.dense import load_embedder

    return load_embedder("all-minilm-l6-v2")


def reference_vectors(embedder, texts: list[str]) -> np.ndarray:
    return embedder.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)


def assert_rows_are_the_embedders(index: Index, embedder) -> None:
    chunks = index.chunks()
    stored = index.vectors()[[c["row"] for c in chunks]]
    expected = reference_vectors(embedder, [passage_text(c["title"], c["text"]) for c in chunks])
    assert np.abs(stored - expected).max() < 1e-5


# ---------------------------------------------------------------------------------------------
# reading and chunking
# ---------------------------------------------------------------------------------------------
def test_each_kind_of_file_is_read(tmp_path):
    docs = write_docs(tmp_path / "docs")
    files = dict((doc_id, path) for path, doc_id in find_files([docs]))
    assert sorted(files) == ["boiler.md", "canteen.html", "faq.jsonl", "manual.pdf", "pumps/p7.txt"]
    read = {d.doc_id: d for doc_id, path in files.items() for d in read_documents(path, doc_id)}
    assert read["boiler.md"].title == "Boiler B-2"
    assert read["canteen.html"].title == "Canteen"
    assert read["canteen.html"].text == "Canteen\nThe canteen opens at 11:30 & serves lentil soup on Fridays."
    assert read["faq-1"].title == "Visitors" and read["faq-2"].text == "The night shift starts at 22:00."
    from pypdf import PdfReader  # the reference: pypdf's own reading of the file

    pages = [page.extract_text() for page in PdfReader(files["manual.pdf"]).pages]
    assert read["manual.pdf"].text == "\n\n".join(pages) and "4000 hours" in read["manual.pdf"].text


@pytest.mark.parametrize("name, content, message", [
    ("broken.pdf", b"%PDF-1.4 not really", "not a readable PDF"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8 text"),
    ("bad.jsonl", b'{"_id": "a", "text": "x"}\nnot json\n', "line 2 is not JSON"),
    ("notext.jsonl", b'{"_id": "a", "body": "x"}\n', 'line 1 has no "text" string'),
    ("twice.jsonl", b'{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n', "repeats the id 'a'"),
    ("empty.md", b"  \n", "no text in it"),
])
def test_an_unreadable_file_is_named_with_its_reason(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UnreadableDocument, match=re.escape(message)) as info:
        read_documents(tmp_path / name, name)
    assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)


def test_chunks_are_token_windows_cut_between_words_with_overlap(embedder, shared_data):
    """On a real WikiText article: every chunk has at most `tokens` of the embedder's tokens, no chunk
    starts or ends inside a word, neighbours overlap, and together they cover the document."""
    from pocketlm.retrieval.cloze import wikitext_articles

    title, text = wikitext_articles(shared_data / "wikitext2" / "test.txt")[1]  # Du Fu: a long article
    stock = embedder.tokenizer.backend_tokenizer
    assert len(stock.encode(text).ids) == 128  # the file as shipped truncates (and pads): why untruncated exists
    tokenizer = untruncated(stock)
    chunking = Chunking(64, 16)
    spans = chunk_spans(text, tokenizer, chunking)
    assert len(spans) > 20 and spans[0][0] == 0 and spans[-1][1] == len(text.rstrip())
    for (start, end), (next_start, _) in zip(spans, spans[1:]):
        assert start < next_start < end  # overlap, and progress
    for start, end in spans:
        assert len(tokenizer.encode(text[start:end], add_special_tokens=False).ids) <= chunking.tokens
        assert not (start > 0 and text[start - 1].isalnum() and text[start].isalnum())
        assert not (end < len(text) and text[end - 1].isalnum() and text[end].isalnum())
    words = {m.start() for m in re.finditer(r"\S+", text)}
    assert all(any(s <= w < e for s, e in spans) for w in words)  # every word is in some chunk
    with pytest.raises(ConfigError, match="under half a chunk"):
        Chunking(64, 32).check()


# ---------------------------------------------------------------------------------------------
# the index
# ---------------------------------------------------------------------------------------------
def test_build_update_remove_and_compact_keep_every_row_the_embedders(tmp_path, embedder):
    docs = write_docs(tmp_path / "docs")
    index = Index.create(tmp_path / "index", chunking=Chunking(24, 4))
    index.share_embedder(embedder)
    report = index.update([docs], prune=True)
    assert len(report.added) == 5 and not report.skipped and report.chunks == index.stats()["chunks"] > 6
    assert index.stats()["documents"] == 6  # the jsonl holds two
    for c in index.chunks():  # each chunk is its document's text between its offsets
        document = next(d for path, doc_id in find_files([docs]) for d in read_documents(path, doc_id)
                        if d.doc_id == c["doc_id"])
        assert document.text[c["start"]:c["end"]] == c["text"]
    assert_rows_are_the_embedders(index, embedder)
    index.close()

    reopened = Index.open(tmp_path / "index")  # a rebuild of unchanged files embeds nothing, loads no model
    again = reopened.update([docs], prune=True)
    assert len(again.unchanged) == 5 and again.chunks == 0 and reopened._embedder is None

    reopened.share_embedder(embedder)
    (docs / "boiler.md").write_text("# Boiler B-2\n\nThe boiler B-2 was replaced in 2021 by a heat pump.\n")
    (docs / "new.txt").write_text("The car park closes at midnight.")
    changed = reopened.update([docs / "boiler.md", docs / "new.txt"])  # `index add`: the others stay
    assert [Path(p).name for p in changed.updated] == ["boiler.md"] and [Path(p).name for p in changed.added] == ["new.txt"]
    assert reopened.stats()["documents"] == 7
    found = Searcher(reopened, "bm25").search("when was the boiler replaced", 3)
    assert found[0].doc_id == "boiler.md" and "2021" in found[0].text
    assert_rows_are_the_embedders(reopened, embedder)

    before = reopened.meta["vectors"]
    removed = reopened.remove([docs / "pumps", docs / "manual.pdf", docs / "faq.jsonl", docs / "canteen.html"])
    assert len(removed) == 4 and reopened.stats()["documents"] == 2
    assert reopened.meta["vectors"] != before and not (tmp_path / "index" / before).exists()  # compacted
    assert reopened.meta["rows"] == reopened.stats()["chunks"]
    assert_rows_are_the_embedders(reopened, embedder)
    for retriever in ("bm25", "dense", "hybrid"):
        assert {p.doc_id for p in Searcher(reopened, retriever).search("pump seals", 5)} <= {"boiler.md", "new.txt"}
    with pytest.raises(ConfigError, match="not in the index"):
        reopened.remove([docs / "pumps"])
    pruned = reopened.update([docs / "new.txt"], prune=True)  # `index build` drops what it was not given
    assert [Path(p).name for p in pruned.removed] == ["boiler.md"]


def test_each_retriever_finds_the_passage(tmp_path, embedder):
    index = Index.create(tmp_path / "index")
    index.share_embedder(embedder)
    index.update([write_docs(tmp_path / "docs")])
    for retriever in ("bm25", "dense", "hybrid"):
        passages = Searcher(index, retriever).search("How often must the compressor's oil be changed?", 3)
        assert passages[0].doc_id == "manual.pdf" and [p.number for p in passages] == list(range(1, len(passages) + 1))
        assert passages[0].score >= passages[-1].score


def test_an_index_refuses_what_it_cannot_do(tmp_path, embedder):
    with pytest.raises(ConfigError, match="no index there"):
        Index.open(tmp_path / "nowhere")
    index = Index.create(tmp_path / "index")
    index.share_embedder(embedder)
    with pytest.raises(ConfigError, match="the index is empty"):
        Searcher(index)
    index.update([write_docs(tmp_path / "docs")])
    with pytest.raises(ConfigError, match="built with the embedder 'all-minilm-l6-v2', not 'other/model'"):
        Index.open(tmp_path / "index", "other/model")
    with pytest.raises(ConfigError, match="cuts chunks of 128 tokens"):
        Index.open_or_create(tmp_path / "index", None, Chunking(64, 8))
    with pytest.raises(ConfigError, match="an index is already there"):
        Index.create(tmp_path / "index")
    with pytest.raises(ConfigError, match="no documents under"):
        index.update([tmp_path / "index"])  # index.sqlite and vectors: nothing it reads
    with pytest.raises(ConfigError, match="unknown retriever 'colbert'"):
        Searcher(index, "colbert")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pocketlm", *args], capture_output=True, text=True, cwd=REPO)


def test_index_commands_name_and_count_unreadable_files(tmp_path):
    docs = write_docs(tmp_path / "docs")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 truncated")
    done = run_cli("index", "build", str(docs), "--out", str(tmp_path / "index"), "--chunk-tokens", "48", "--overlap", "8")
    assert done.returncode == 0, done.stderr
    assert "5 added, 0 updated, 0 unchanged, 0 removed, 1 skipped" in done.stdout
    assert re.search(r"skipped: \S+broken\.pdf: not a readable PDF", done.stderr.replace("\n", ""))
    info = json.loads(run_cli("index", "info", str(tmp_path / "index")).stdout)
    assert info["documents"] == 6 and info["chunk_tokens"] == 48 and info["embedder"] == "all-minilm-l6-v2"
    strict = run_cli("index", "add", str(tmp_path / "index"), str(docs), "--strict")
    assert strict.returncode == 1 and strict.stderr.count("\n") == 1 and "broken.pdf: not a readable PDF" in strict.stderr
    (tmp_path / "empty").mkdir()
    empty = run_cli("index", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "index2"))
    assert empty.returncode == 1 and "error: no documents under" in empty.stderr and empty.stderr.count("\n") == 1
    assert not (tmp_path / "index2").exists()  # no empty index left behind
    missing = run_cli("ask", str(tmp_path / "nowhere"), "smollm2-135m-instruct", "why?")
    assert missing.returncode == 1 and "no index there" in missing.stderr and "Traceback" not in missing.stderr
    other = run_cli("index", "search", str(tmp_path / "index"), "oil", "--embedder", "other/model")
    assert other.returncode == 1 and "built with the embedder 'all-minilm-l6-v2', not 'other/model'" in other.stderr
    removed = run_cli("index", "remove", str(tmp_path / "index"), str(docs / "pumps"))
    assert removed.returncode == 0 and removed.stdout.strip().endswith("p7.txt")


def test_citations_are_read_whatever_their_form():
    from pocketlm.retrieval.answer import cited
    from pocketlm.retrieval.search import Passage

    passages = [Passage(n, n, f"d{n}", "s", "", 0, 1, "x", 1.0) for n in (1, 2, 3)]
    assert cited("It was 1998 [2]. Also [1, 3] and [1][3], never [9] or [0].", passages) == [1, 2, 3]
    assert cited("No citation here, only [a] and (1).", passages) == []


# ---------------------------------------------------------------------------------------------
# evaluation over an index
# ---------------------------------------------------------------------------------------------
def test_eval_retrieval_over_an_index_equals_pytrec_eval(tmp_path, shared_data, embedder, monkeypatch):
    """A Cranfield slice indexed from its corpus.jsonl, scored through the command's code against qrels in
    TREC's format; pytrec_eval measures the run file it writes; a document scores as its best passage."""
    from pocketlm.retrieval.collection import read_cranfield
    from pocketlm.retrieval.evaluate import evaluate_index

    cranfield = read_cranfield(shared_data / "cranfield")
    queries = {q: cranfield.queries[q] for q in list(cranfield.queries)[:15]}
    docs = sorted({d for q in queries for d in cranfield.qrels[q]} | {str(i) for i in range(1, 41)}, key=int)
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"_id": d, **cranfield.corpus[d]}) + "\n")
    (tmp_path / "queries.tsv").write_text("".join(f"{q}\t{text}\n" for q, text in queries.items()))
    (tmp_path / "qrels.txt").write_text("".join(f"{q} 0 {d} {g}\n" for q in queries for d, g in cranfield.qrels[q].items()))
    index = Index.create(tmp_path / "index", chunking=Chunking(64, 16))
    index.share_embedder(embedder)
    index.update([tmp_path / "corpus.jsonl"])
    monkeypatch.setattr("pocketlm.retrieval.dense.load_embedder", lambda name: embedder)
    results = evaluate_index(tmp_path / "index", tmp_path / "queries.tsv", tmp_path / "qrels.txt",
                             ["bm25", "dense", "hybrid"], k=20, run_dir=tmp_path / "runs")["results"]
    qrels = {q: dict(cranfield.qrels[q]) for q in queries}
    for name, measured in results.items():
        run: dict[str, dict[str, float]] = {}
        for line in Path(measured["run"]).read_text().splitlines():
            query, _, doc, _, score, _ = line.split()
            run.setdefault(query, {})[doc] = float(score)
        # 20 distinct documents per query (BM25: those sharing a term with it)
        assert all(len(r) == 20 if name == "dense" else 0 < len(r) <= 20 for r in run.values())
        theirs = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "map", "recip_rank"}).evaluate(run)
        for ours, their in (("ndcg@10", "ndcg_cut_10"), ("map", "map"), ("mrr", "recip_rank")):
            assert measured[ours] == pytest.approx(sum(t[their] for t in theirs.values()) / len(theirs), abs=1e-6)
    searcher = Searcher(Index.open(tmp_path / "index"), "bm25")
    query = next(iter(queries.values()))
    best = {}
    for chunk_id, score in searcher._runs([query], 10_000)[0].items():
        doc = searcher.doc_of[chunk_id]
        best[doc] = max(best.get(doc, 0.0), score)
    top = searcher.search_documents([query], k=5)[0]
    assert all(top[d] == pytest.approx(best[d]) for d in top)  # MaxP
    with pytest.raises(ConfigError, match="no such qrels file"):
        evaluate_index(tmp_path / "index", tmp_path / "queries.tsv", tmp_path / "nothing.txt")


# ---------------------------------------------------------------------------------------------
# the cloze question set
# ---------------------------------------------------------------------------------------------
def test_the_cloze_set_is_rebuilt_exactly_and_each_question_is_sound(tmp_path, shared_data):
    from pocketlm.retrieval.cloze import BLANK, write_cloze

    wikitext = shared_data / "wikitext2"
    made = write_cloze([wikitext / "test.txt", wikitext / "valid.txt"], wikitext / "test.txt", tmp_path)
    shipped = (REPO / "docs" / "tasks" / "wikitext_cloze.jsonl").read_text()
    assert Path(made["questions_file"]).read_text() == shipped  # deterministic, and the shipped file is its output
    corpus = {json.loads(line)["_id"]: json.loads(line)["text"] for line in open(made["corpus"])}
    questions = [json.loads(line) for line in shipped.splitlines()]
    assert made["questions"] == len(questions) == 210
    for q in questions:
        assert q["question"].count(BLANK) == 1 and "<unk>" not in q["sentence"]
        assert q["question"].replace(BLANK, q["answer"]) == q["sentence"]
        assert q["sentence"] in corpus[q["article"]]  # answerable from the corpus
        before, after = q["question"].split(BLANK)
        assert before.rstrip() == q["prefix"] and (after.startswith(q["stop"]) or q["stop"] == "\n")
        assert re.fullmatch(r"[\d.,]+|[A-Z][a-z]+(?: (?:of |de |von |the )?[A-Z][a-z]+)+", q["answer"])


# ---------------------------------------------------------------------------------------------
# answering, with the real SmolLM2 and no network
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ask_index_and_serve_from_the_cache_alone(smollm2_dir, tmp_path, embedder, no_network):
    """With every socket refused: an index is built, `ask` answers from it with exactly the engine's greedy
    output on the prompt of numbered passages, and a server with an index-backed variant answers and embeds."""
    from fastapi.testclient import TestClient

    from pocketlm.engine import SamplingParams
    from pocketlm.loading import open_model
    from pocketlm.retrieval.answer import ask, rag_messages
    from pocketlm.serve.app import create_app
    from pocketlm.serve.config import load_serve_config
    from pocketlm.streaming import chat_prompt, generate

    docs = write_docs(tmp_path / "docs")
    index = Index.create(tmp_path / "index")  # loads the embedder from the cache, sockets refused
    index.update([docs])
    lm, tokenizer = open_model(smollm2_dir)
    searcher = Searcher(index)
    question = "How many stages does the compressor C-5 have?"
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    answer = ask(searcher, lm, tokenizer, question, k=3, params=params)
    assert answer.passages[0].doc_id == "manual.pdf"
    expected = generate(lm, tokenizer, chat_prompt(tokenizer, rag_messages(question, answer.passages)), params).text
    assert answer.text == expected and re.search(r"\b(3|three)\b", answer.text.lower())

    (tmp_path / "serve.yaml").write_text(
        f"models:\n  - name: docs\n    model: {smollm2_dir}\n    index: {tmp_path / 'index'}\n    k: 3\n"
        f"database: {tmp_path / 'serve.db'}\n")
    with TestClient(create_app(load_serve_config(tmp_path / "serve.yaml", []))) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "docs", "max_tokens": 40, "temperature": 0,
            "messages": [{"role": "user", "content": question}]}).json()
        assert reply["choices"][0]["message"]["content"] == answer.text
        assert [s["doc_id"] for s in reply["sources"]] == [p.doc_id for p in answer.passages]
        vectors = client.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": [question],
                                                      "encoding_format": "float"}).json()
        assert np.abs(np.array(vectors["data"][0]["embedding"]) - reference_vectors(embedder, [question])[0]).max() < 1e-5
    assert no_network == []


@pytest.mark.slow
def test_ask_and_eval_with_retrieval_from_the_command_line(smollm2_dir, tmp_path):
    docs = write_docs(tmp_path / "docs")
    assert run_cli("index", "build", str(docs), "--out", str(tmp_path / "index")).returncode == 0
    done = run_cli("ask", str(tmp_path / "index"), str(smollm2_dir), "How many stages does the compressor C-5 have?",
                   "-k", "3", "-n", "40", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["sources"][0]["doc_id"] == "manual.pdf" and re.search(r"\b(3|three)\b", answer["answer"].lower())
    cited = json.loads(run_cli("ask", str(tmp_path / "index"), str(smollm2_dir), "When was the boiler B-2 installed?",
                               "--cite", "--json").stdout)  # one sentence, then its citations, by the grammar
    assert re.fullmatch(r"[^\[\]\n.]+\. (\[\d\])+", cited["answer"]) and cited["cited"]
    assert cited["sources"][cited["cited"][0] - 1]["doc_id"] == "boiler.md" and "1998" in cited["answer"]
    plain = run_cli("ask", str(tmp_path / "index"), str(smollm2_dir), "How many stages does the compressor C-5 have?",
                    "-k", "3", "-n", "40")
    assert plain.stdout.startswith(answer["answer"]) and "\n\nSources:\n[1] manual.pdf" in plain.stdout

    # the cloze task's first questions, answered from an index of their own articles
    from pocketlm.retrieval.cloze import wikitext_articles

    questions = [json.loads(line) for line in (REPO / "docs" / "tasks" / "wikitext_cloze.jsonl").read_text().splitlines()[:3]]
    articles = dict(wikitext_articles(REPO.parent / "shared" / "data" / "wikitext2" / "test.txt"))
    with open(tmp_path / "articles.jsonl", "w") as f:
        for title in dict.fromkeys(q["article"] for q in questions):
            f.write(json.dumps({"_id": title, "title": title, "text": articles[title]}) + "\n")
    assert run_cli("index", "build", str(tmp_path / "articles.jsonl"), "--out", str(tmp_path / "wiki")).returncode == 0
    task = str(REPO / "docs" / "tasks" / "wikitext_cloze.yaml")
    for extra, name in ((["--index", str(tmp_path / "wiki"), "--retrieve-k", "2"], "rag"), ([], "closed")):
        done = run_cli("eval", str(smollm2_dir), "-t", task, "--limit", "3", "--log-samples",
                       "-o", str(tmp_path / f"{name}.json"), *extra)
        assert done.returncode == 0, done.stderr
    rag = json.loads((tmp_path / "rag.json").read_text())
    closed = json.loads((tmp_path / "closed.json").read_text())
    samples, result = rag["samples"]["wikitext_cloze"], rag["results"]["wikitext_cloze"]
    assert result["retrieval"] == {"index": str(tmp_path / "wiki"), "k": 2, "retriever": "hybrid"}
    for sample, question in zip(samples, questions):  # the measures, recomputed from what was logged
        assert sample["gold"] == question["answer"].lower() and len(sample["passages"]) == 2
        assert question["stop"] not in sample["completion"]  # it stopped where the sentence goes on
    assert result["exact_match"] == pytest.approx(np.mean([s["completion"].strip().lower() == s["gold"] for s in samples]))
    assert result["retrieved_holds_answer"] == pytest.approx(np.mean([bool(s["holding"]) for s in samples]))
    assert "retrieved_holds_answer" not in closed["results"]["wikitext_cloze"]
    assert closed["settings"]["retrieval"] is None
