"""Retrieval evaluation against references nobody here wrote: trec_eval's measures through pytrec_eval, on
random graded runs with ties and on a real BM25 run over Cranfield; Cranfield read with its known traps."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import pytrec_eval

from pocketlm.errors import ConfigError
from pocketlm.retrieval.bm25 import BM25
from pocketlm.retrieval.collection import Collection, judged, read_beir, read_cranfield, read_qrels, write_beir
from pocketlm.retrieval.evaluate import evaluate_retrieval
from pocketlm.retrieval.measures import MEASURES, evaluate_run, write_run

REPO = Path(__file__).resolve().parent.parent
TREC_NAMES = {"ndcg@10": "ndcg_cut_10", "recall@10": "recall_10", "recall@100": "recall_100", "map": "map",
              "mrr": "recip_rank"}


def assert_equals_pytrec_eval(qrels, run) -> None:
    ours = evaluate_run(qrels, run)
    theirs = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10", "recall.100", "map",
                                                    "recip_rank"}).evaluate(run)
    assert set(theirs) == set(ours) - {"all"}
    for query, measures in theirs.items():
        for ours_name, their_name in TREC_NAMES.items():
            assert ours[query][ours_name] == pytest.approx(measures[their_name], abs=1e-6), (query, ours_name)


def test_measures_equal_pytrec_eval_on_random_graded_runs_with_ties():
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(300)]
    qrels, run = {}, {}
    for q in range(40):
        judged = rng.sample(docs, rng.randint(1, 30))
        qrels[f"q{q}"] = {d: rng.choice([-1, 0, 1, 2, 3, 4]) for d in judged}
        qrels[f"q{q}"][judged[0]] = rng.randint(1, 4)  # at least one relevant
        retrieved = rng.sample(docs, rng.randint(0, 150))
        run[f"q{q}"] = {d: float(rng.randint(0, 20)) for d in retrieved}  # few distinct scores: many ties
    assert_equals_pytrec_eval(qrels, run)


@pytest.fixture(scope="module")
def cranfield(shared_data) -> Collection:
    return read_cranfield(shared_data / "cranfield")


def test_cranfield_is_read_with_its_traps_handled(cranfield, shared_data):
    assert (len(cranfield.corpus), len(cranfield.queries)) == (1400, 225)
    assert sum(len(j) for j in cranfield.qrels.values()) == 1837
    # cran.qry's third query is `.I 004`; cranqrel calls it 3 (numbered by position)
    assert cranfield.queries["3"].startswith("what problems of heat conduction in composite slabs")
    assert cranfield.qrels["1"]["184"] == 5 - 2 and cranfield.qrels["1"]["12"] == 5 - 3  # cranqrel: `1 184 2`, `1 12 3`
    grades = [g for judged in cranfield.qrels.values() for g in judged.values()]
    assert grades.count(0) == 225 and set(grades) == {0, 1, 2, 3, 4}  # each query's -1, read as not relevant
    assert all("\r" not in d["text"] for d in cranfield.corpus.values())  # CRLF lines read as LF


def test_beir_layout_round_trip_and_trec_qrels(cranfield, tmp_path):
    again = read_beir(write_beir(cranfield, tmp_path / "cranfield"))
    assert again == cranfield
    (tmp_path / "q.trec").write_text("1 0 d1 2\n1 0 d2 0\n2 0 d3 1\n")
    assert read_qrels(tmp_path / "q.trec") == {"1": {"d1": 2, "d2": 0}, "2": {"d3": 1}}


def test_bm25_on_cranfield_equals_pytrec_eval_and_finds_documents(cranfield, tmp_path):
    ids = list(cranfield.corpus)
    bm25 = BM25(ids, [cranfield.corpus[i]["title"] + "\n" + cranfield.corpus[i]["text"] for i in ids])
    queries = judged(cranfield.queries, cranfield.qrels)
    run = dict(zip(queries, bm25.search(list(queries.values()), k=100)))
    assert_equals_pytrec_eval(cranfield.qrels, run)
    # a document's own title finds it first
    titles = bm25.search([cranfield.corpus[d]["title"] for d in ("1", "500", "1400")], k=3)
    assert [max(t, key=t.get) for t in titles] == ["1", "500", "1400"]
    lines = write_run(run, tmp_path / "bm25.trec").read_text().splitlines()
    assert lines[0].split()[:4] == ["1", "Q0", max(run["1"], key=run["1"].get), "1"]


def test_eval_retrieval_from_the_command_line(shared_data, tmp_path):
    beir = tmp_path / "cranfield"
    done = subprocess.run([sys.executable, "-m", "pocketlm", "data", "cranfield", str(shared_data / "cranfield"), str(beir)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "1400 documents, 225 queries, 1837 judgements" in done.stdout
    done = subprocess.run([sys.executable, "-m", "pocketlm", "eval-retrieval", str(beir), "--runs", str(tmp_path / "runs")],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    row = [line for line in done.stdout.splitlines() if line.startswith("| bm25 |")][0].split("|")
    expected = evaluate_retrieval(beir)["results"]["bm25"]
    assert [float(c) for c in row[2:7]] == [round(expected[m], 4) for m in MEASURES]
    assert (tmp_path / "runs" / "bm25.trec").is_file()


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no such dataset directory"),
    (lambda d: (d.mkdir(), (d / "corpus.jsonl").write_text("")), "corpus.jsonl: empty"),
    (lambda d: (d.mkdir(), (d / "corpus.jsonl").write_text('{"_id": "1"}\n')), "line 1 lacks text"),
    (lambda d: (d.mkdir(), (d / "corpus.jsonl").write_text('{"_id": "1", "text": "a"}\n'),
                (d / "queries.jsonl").write_text('{"_id": "q", "text": "a"}\n'), (d / "qrels").mkdir(),
                (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\t1\thigh\n")),
     "the grade 'high' is not an integer"),
])
def test_bad_collections_are_one_clear_error(tmp_path, make, message):
    make(tmp_path / "data")
    with pytest.raises(ConfigError, match=message) as info:
        evaluate_retrieval(tmp_path / "data")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="the corpus is empty"):
        BM25([], [])


# ---------------------------------------------------------------------------------------------
# dense and hybrid
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedder():
    from pocketlm.retrieval.dense import load_embedder

    return load_embedder("all-minilm-l6-v2")


def test_dense_vectors_equal_mean_pooled_transformers_embeddings(embedder, cranfield):
    """The reference: transformers' own BertModel, mean pooling over the attention mask, L2 normalisation
    (the model card's recipe for all-MiniLM-L6-v2), computed here without sentence-transformers."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from pocketlm.hub import fetch_embedder
    from pocketlm.retrieval.dense import Dense

    texts = [cranfield.corpus[d]["text"] for d in ("1", "2", "3")] + ["what is the lift of a wing ?"]
    dense = Dense(["1", "2", "3", "q"], texts, model=embedder)
    path = fetch_embedder("all-minilm-l6-v2")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(dense.vectors, reference, atol=1e-5)
    found = dense.search([texts[1]], k=4)[0]
    assert max(found, key=found.get) == "2"


def test_reciprocal_rank_fusion():
    from pocketlm.retrieval.dense import reciprocal_rank_fusion

    fused = reciprocal_rank_fusion([{"a": 3.0, "b": 2.0, "c": 1.0}, {"c": 0.9, "a": 0.5}], k=10)
    assert fused == pytest.approx({"a": 1 / 61 + 1 / 62, "c": 1 / 63 + 1 / 61, "b": 1 / 62})
    assert list(fused) == ["a", "c", "b"]
    assert list(reciprocal_rank_fusion([{"a": 1.0, "b": 0.5}], k=1)) == ["a"]


def test_hybrid_on_a_cranfield_slice_equals_pytrec_eval(cranfield, tmp_path, embedder, monkeypatch):
    """Twenty queries over the documents judged for them: all three retrievers, measured as pytrec_eval
    measures their run files."""
    queries = {q: cranfield.queries[q] for q in list(cranfield.queries)[:20]}
    docs = {d for q in queries for d in cranfield.qrels[q]} | {str(i) for i in range(1, 101)}
    piece = Collection({d: cranfield.corpus[d] for d in sorted(docs, key=int)}, queries,
                       {q: cranfield.qrels[q] for q in queries})
    monkeypatch.setattr("pocketlm.retrieval.dense.load_embedder", lambda name: embedder)
    result = evaluate_retrieval(write_beir(piece, tmp_path / "slice"), ["bm25", "dense", "hybrid"], k=50,
                                run_dir=tmp_path / "runs")["results"]
    for name, measured in result.items():
        run: dict[str, dict[str, float]] = {}
        for line in Path(measured["run"]).read_text().splitlines():
            query, _, doc, _, score, _ = line.split()
            run.setdefault(query, {})[doc] = float(score)
        theirs = pytrec_eval.RelevanceEvaluator(piece.qrels, {"ndcg_cut.10", "map"}).evaluate(run)
        assert measured["ndcg@10"] == pytest.approx(sum(t["ndcg_cut_10"] for t in theirs.values()) / len(theirs), abs=1e-6)
        assert measured["map"] == pytest.approx(sum(t["map"] for t in theirs.values()) / len(theirs), abs=1e-6)
    assert result["hybrid"]["ndcg@10"] > min(result["bm25"]["ndcg@10"], result["dense"]["ndcg@10"])


def test_an_embedder_that_cannot_be_loaded_is_one_line(tmp_path):
    from pocketlm.retrieval.dense import load_embedder

    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ConfigError, match="not a sentence-transformers model directory"):
        load_embedder(str(tmp_path / "notamodel"))
    with pytest.raises(ConfigError, match="cannot load the embedding model 'no-such-org/no-such-model'") as info:
        load_embedder("no-such-org/no-such-model")  # HF_HUB_OFFLINE: nothing is fetched
    assert "\n" not in str(info.value)


@pytest.fixture
def cached_embedder():
    from pocketlm.hub import fetch_embedder

    return fetch_embedder("all-minilm-l6-v2")  # cached by the tests above (or fetched now, before the sockets close)


def test_nothing_reaches_the_network_once_the_embedder_is_cached(cranfield, cached_embedder, no_network):
    """With HF_HUB_OFFLINE unset and every socket connection refused, a cached embedder loads and retrieves."""
    from pocketlm.retrieval.dense import Dense

    ids = ["1", "2", "3"]
    dense = Dense(ids, [cranfield.corpus[d]["text"] for d in ids], "all-minilm-l6-v2")
    found = dense.search([cranfield.corpus["2"]["text"]], k=3)[0]
    assert max(found, key=found.get) == "2" and no_network == []
