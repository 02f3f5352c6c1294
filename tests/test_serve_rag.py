"""Answering from documents through the server, checked with the official `openai` client: a variant with an
index puts exactly the passages a separate Searcher finds before the question (in exactly the prompt
`rag_messages` builds: the greedy answer is the one the engine gives on that prompt), answers with them
as `sources` and the passage numbers each answer cites (whole and streamed), keeps the event loop free
while it retrieves, and refuses what it cannot do with one line; /v1/embeddings gives sentence-transformers'
own normalized vectors (floats and base64); a bad index is one line at startup; schemathesis finds no
server error on the new routes and fields."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import yaml
from helpers import tiny_model_dir
from serve_helpers import running_server

from pocketlm.checkpoint import load_model
from pocketlm.engine import SamplingParams, generate_tokens
from pocketlm.errors import ConfigError
from pocketlm.retrieval.answer import rag_messages
from pocketlm.retrieval.index import Index
from pocketlm.retrieval.search import Searcher
from pocketlm.serve.app import create_app
from pocketlm.serve.config import load_serve_config
from pocketlm.streaming import chat_prompt

DOCS = {
    "boiler.md": "# Boiler B-2\n\nThe boiler B-2 was installed in 1998 in the east wing. It is rated for 40 bar "
                 "and is serviced every spring by the plant engineer.\n",
    "pumps.md": "# Pumps\n\nPump P-7 moves cooling water from the river intake to the condenser. Its seals are "
                "replaced every 14 months.\n",
    "valves.txt": "Safety valves are tested each quarter. Valve V-12 opens at 42 bar and protects the boiler B-2 "
                  "against overpressure.\n",
    "canteen.txt": "The canteen opens at 11:30 on weekdays and serves lentil soup on Fridays.\n",
}
QUESTION = "When was the boiler B-2 installed?"
EMBEDDER = "all-minilm-l6-v2"
OPEN_BRACKET, ONE, CLOSE_BRACKET, EOS = 58, 16, 60, 260  # "[", "1", "]" and "</s>" in the tiny byte-level vocabulary


def build_index(root: Path) -> Path:
    """A folder of DOCS and an index of it (all-MiniLM-L6-v2, the default embedder)."""
    docs = root / "docs"
    docs.mkdir(parents=True)
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    index = Index.create(root / "index")
    index.update([docs])
    index.close()
    return root / "index"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    return build_index(tmp_path_factory.mktemp("rag"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    # a byte-level tokenizer spends a token per character: the passages need a long context
    return tiny_model_dir(tmp_path_factory.mktemp("rag-model") / "tiny", seed=3, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir)


@pytest.fixture(scope="module")
def embedder_dir():
    from pocketlm.hub import fetch_embedder

    return fetch_embedder(EMBEDDER)


def write_config(path: Path, **config) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def served(tiny_dir, index_dir, embedder_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rag-serve")
    # `embedder:` names the folder of the model the index names by its registry name: served once
    config = write_config(root / "serve.yaml", database=str(root / "log.db"), max_context=2048, max_batch=8,
                          log_prompts=True, embedder=str(embedder_dir), models=[
                              {"name": "docs", "model": str(tiny_dir), "index": str(index_dir), "k": 3},
                              {"name": "docs-bm25", "model": str(tiny_dir), "index": str(index_dir),
                               "retriever": "bm25", "k": 2},
                              {"name": "plain", "model": str(tiny_dir)}])
    app = create_app(load_serve_config(config))
    with running_server(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def url(served) -> str:
    return served[1]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def searchers(index_dir):
    """Searchers of our own over the same index: what the server should have retrieved."""
    index = Index.open(index_dir)
    yield {"hybrid": Searcher(index, "hybrid"), "bm25": Searcher(index, "bm25")}
    index.close()


def greedy(tiny, prompt: list[int], tokens: int) -> str:
    model, tokenizer = tiny
    return tokenizer.decode(list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=tokens, ignore_eos=True))))


def cited_numbers(text: str, count: int) -> list[int]:
    """The [n] in a text of single bracketed numbers, for n a passage number."""
    return sorted({int(n) for n in re.findall(r"\[(\d+)\]", text)} & set(range(1, count + 1)))


# ---------------------------------------------------------------------------------------------
# chat from an index
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, retriever, k", [("docs", "hybrid", 3), ("docs-bm25", "bm25", 2)])
def test_the_answer_is_the_greedy_one_on_the_passages_a_searcher_finds(client, tiny, searchers, variant, retriever, k):
    passages = searchers[retriever].search(QUESTION, k)
    assert passages[0].doc_id == "boiler.md"
    prompt = chat_prompt(tiny[1], rag_messages(QUESTION, passages))
    completion = client.chat.completions.create(model=variant, messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert completion.model_extra["sources"] == [p.as_dict() for p in passages]
    assert completion.usage.prompt_tokens == len(prompt)
    choice = completion.choices[0]
    assert choice.message.content == greedy(tiny, prompt, 12)
    assert choice.model_extra["cited"] == cited_numbers(choice.message.content, k)
    assert completion.model_extra["variant"] == variant


def test_earlier_turns_are_history_and_the_system_message_gives_way(client, tiny, searchers):
    question = "How often are the seals of pump P-7 replaced?"
    earlier = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "In 1998 [1]."}]
    messages = [{"role": "system", "content": "You are a pirate."}, *earlier, {"role": "user", "content": question}]
    passages = searchers["hybrid"].search(question, 3)
    assert passages[0].doc_id == "pumps.md"
    prompt = chat_prompt(tiny[1], rag_messages(question, passages, earlier))
    completion = client.chat.completions.create(model="docs", messages=messages, max_tokens=10, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert completion.model_extra["sources"] == [p.as_dict() for p in passages]
    assert completion.usage.prompt_tokens == len(prompt)
    assert completion.choices[0].message.content == greedy(tiny, prompt, 10)


def test_citations_whole_and_streamed(client, searchers):
    """Biased towards "[", "1" and "]", sampled answers cite passage 1; each choice says which it cites,
    the stream gives the same text, its sources in the first chunk and the citations with finish_reason."""
    request = dict(model="docs", messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=1,
                   seed=5, n=2, logit_bias={str(t): 100 for t in (OPEN_BRACKET, ONE, CLOSE_BRACKET)})
    whole = client.chat.completions.create(**request)
    passages = [p.as_dict() for p in searchers["hybrid"].search(QUESTION, 3)]
    assert whole.model_extra["sources"] == passages
    texts = {c.index: c.message.content for c in whole.choices}
    for choice in whole.choices:
        assert set(choice.message.content) <= set("[1]")
        assert choice.model_extra["cited"] == cited_numbers(choice.message.content, 3)
    assert any(c.model_extra["cited"] == [1] for c in whole.choices)

    chunks = list(client.chat.completions.create(**request, stream=True))
    with_sources = [i for i, c in enumerate(chunks) if "sources" in (c.model_extra or {})]
    assert with_sources == [0] and chunks[0].model_extra["sources"] == passages
    streamed, cites = {0: "", 1: ""}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                cites[choice.index] = choice.model_extra["cited"]
            else:
                assert "cited" not in (choice.model_extra or {})
    assert streamed == texts
    assert cites == {i: cited_numbers(t, 3) for i, t in texts.items()}


def test_passages_that_do_not_fit_beside_the_answer_are_left_out(client, tiny, searchers):
    """With room for one passage beside max_tokens, the prompt holds the best one and `sources` names it alone."""
    tokenizer = tiny[1]
    question = "Which valve protects the boiler B-2?"
    earlier = [{"role": "user", "content": "Tell me about the plant. " * 40}, {"role": "assistant", "content": "Yes."}]
    passages = searchers["hybrid"].search(question, 3)
    sizes = [len(chat_prompt(tokenizer, rag_messages(question, passages[:j], earlier))) for j in range(4)]
    assert sizes[1] >= 1024 and sizes[1] < sizes[2]  # max_tokens below half the context is reserved whole
    completion = client.chat.completions.create(
        model="docs", messages=[*earlier, {"role": "user", "content": question}], max_tokens=2048 - sizes[1],
        temperature=0, logit_bias={str(EOS): 100})  # ends at once
    assert completion.model_extra["sources"] == [passages[0].as_dict()]
    assert completion.usage.prompt_tokens == sizes[1]
    assert completion.choices[0].finish_reason == "stop" and completion.choices[0].model_extra["cited"] == []


def test_a_variant_without_an_index_is_unchanged(url):
    body = {"model": "plain", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "temperature": 0}
    whole = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    assert "sources" not in whole and "cited" not in whole["choices"][0]
    assert whole["usage"]["prompt_tokens"] < 100  # the question alone, no passages
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        text = "".join(r.iter_text())
    assert '"sources"' not in text and '"cited"' not in text and text.endswith("data: [DONE]\n\n")


def test_models_lists_the_index_and_the_embedder_once(url, index_dir):
    models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
    assert models["docs"]["index"] == str(index_dir) and "index" not in models["plain"]
    embedders = [m for m in models.values() if m.get("task") == "embedding"]
    assert [(m["id"], m["dimensions"], m["max_input_tokens"]) for m in embedders] == [(EMBEDDER, 384, 256)]


@pytest.mark.parametrize("body, status, message", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools: docs answers from documents"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format: docs answers from documents"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}, 400,
     "the last message is the question: it must be the user's, not 'assistant'"),
    ({"messages": [{"role": "user", "content": " \n "}]}, 400, "the last user message is empty"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}, {"role": "user", "content": "hi"}]}, 400,
     "takes no tool calls or results"),
    ({"messages": [{"role": "user", "content": "why? " * 500}]}, 400, "does not fit the model's context of 2048"),
    ({"max_tokens": 100_000}, 400, "max_tokens is 100000 but this server allows at most 2048"),
])
def test_what_a_variant_with_an_index_cannot_do_is_one_line(url, body, status, message):
    request = {"model": "docs", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, **body}
    for stream in (False, True):
        reply = httpx.post(url + "/v1/chat/completions", json={**request, "stream": stream}, timeout=60)
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert message in error["message"] and "\n" not in error["message"]


def test_retrieval_does_not_block_the_event_loop(served, url, monkeypatch):
    """While one request's retrieval is held up, the server answers others."""
    app, _ = served
    searcher = app.state.server.library.shelves["docs"].searcher
    release, entered = threading.Event(), threading.Event()
    search = searcher.search

    def held(query, k):
        entered.set()
        assert release.wait(30)
        return search(query, k)

    monkeypatch.setattr(searcher, "search", held)
    result = {}
    body = {"model": "docs", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}
    worker = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/v1/chat/completions", json=body,
                                                                         timeout=60)))
    worker.start()
    try:
        assert entered.wait(30)
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).json()["status"] == "ok"
        plain = httpx.post(url + "/v1/chat/completions", timeout=30, json={**body, "model": "plain"})
        assert plain.status_code == 200 and time.monotonic() - started < 10
        assert worker.is_alive()  # still held
    finally:
        release.set()
        worker.join(60)
    assert result["r"].status_code == 200 and result["r"].json()["sources"][0]["doc_id"] == "boiler.md"


# ---------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------
TEXTS = ["The boiler B-2 was installed in 1998.", "lentil soup", "Ünïcödé, emoji 🚀 and\nnew lines", "a"]


@pytest.fixture(scope="module")
def reference(embedder_dir):
    """sentence-transformers itself, loaded here, and the model's own tokenizer."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    return SentenceTransformer(str(embedder_dir), device="cpu"), AutoTokenizer.from_pretrained(str(embedder_dir))


def test_embeddings_equal_sentence_transformers_through_the_openai_client(client, url, reference):
    model, tokenizer = reference
    expected = model.encode(TEXTS, normalize_embeddings=True)
    tokens = sum(len(ids) for ids in tokenizer(TEXTS)["input_ids"])
    for encoding in ("base64", "float"):  # the client asks for base64 unless told otherwise, and decodes it
        kwargs = {} if encoding == "base64" else {"encoding_format": "float"}
        reply = client.embeddings.create(model=EMBEDDER, input=TEXTS, **kwargs)
        assert [d.index for d in reply.data] == [0, 1, 2, 3] and reply.model == EMBEDDER
        got = np.array([d.embedding for d in reply.data])
        assert got.shape == (4, 384)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (tokens, tokens)
    one = client.embeddings.create(model=EMBEDDER, input=TEXTS[1], dimensions=384)
    np.testing.assert_allclose(one.data[0].embedding, expected[1], atol=1e-5)
    raw = httpx.post(url + "/v1/embeddings", json={"model": EMBEDDER, "input": "x"}).json()
    assert isinstance(raw["data"][0]["embedding"], list) and raw["object"] == "list"  # float is the API's default
    assert raw["data"][0]["object"] == "embedding"


def test_embedding_refusals_are_one_line(client, url):
    with pytest.raises(openai.BadRequestError, match="384-dimensional"):
        client.embeddings.create(model=EMBEDDER, input="x", dimensions=256)
    with pytest.raises(openai.NotFoundError, match="not an embedding model of this server; it serves: all-minilm"):
        client.embeddings.create(model="docs", input="x")
    cases = [({"input": []}, "input is an empty list"), ({"input": ""}, "input is an empty string"),
             ({"input": ["a", ""]}, "input[1] is an empty string"),
             ({"input": [101, 102]}, "input as token ids is not supported"),
             ({"input": [[101], [102]]}, "input as token ids is not supported"),
             ({"input": ["x"] * 2049}, "input has 2049 items; at most 2048"),
             ({"input": ["short", "word " * 300]}, "input[1] has 302 tokens; all-minilm-l6-v2 reads at most 256"),
             ({"input": [1, "a"]}, "input: should be a string or a list of strings"),
             ({"input": {"text": "a"}}, "input: should be a string or a list of strings"),
             ({"input": "a", "encoding_format": "int8"}, "encoding_format: Input should be 'float' or 'base64'"),
             ({"input": "a", "dimensions": 0}, "dimensions: Input should be greater than or equal to 1"),
             ({"input": "a", "model": ""}, "model: String should have at least 1 character"),
             ({}, "input: Field required")]
    for body, message in cases:
        reply = httpx.post(url + "/v1/embeddings", json={"model": EMBEDDER, **body}, timeout=60)
        assert reply.status_code == 400, (body, reply.text)
        error = reply.json()["error"]
        assert error["message"].startswith(message) and "\n" not in error["message"], (body, error)


def test_a_server_without_embedders_refuses_embeddings_with_404(tiny_dir, tmp_path):
    app = create_app(load_serve_config(None, [str(tiny_dir)], database=str(tmp_path / "log.db")))
    assert app.state.server.library.embedders == {}
    with running_server(app) as url:
        reply = httpx.post(url + "/v1/embeddings", json={"model": EMBEDDER, "input": "x"})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
    assert "name one as `embedder:` in serve.yaml" in reply.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------
# startup
# ---------------------------------------------------------------------------------------------
def test_an_index_that_cannot_be_opened_is_one_line_at_startup(tiny_dir, index_dir, tmp_path):
    def start(**variant):
        config = write_config(tmp_path / "serve.yaml", database=str(tmp_path / "log.db"),
                              models=[{"name": "docs", "model": str(tiny_dir), **variant}])
        with pytest.raises(ConfigError) as caught:
            create_app(load_serve_config(config))
        assert "\n" not in str(caught.value)
        return str(caught.value)

    missing = tmp_path / "no-index"
    assert start(index=str(missing)).startswith(f"variant docs: {missing}: no index there")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "index.sqlite").write_bytes(b"not a database" * 100)
    assert start(index=str(garbage)).startswith(f"variant docs: {garbage}/index.sqlite: not a pocketlm index")
    Index.create(tmp_path / "empty").close()
    assert "the index is empty" in start(index=str(tmp_path / "empty"))
    assert "retriever: Input should be 'hybrid', 'bm25' or 'dense'" in start(index=str(index_dir), retriever="bm24")
    assert "`retriever` and `k` need an `index`" in start(k=3)


# ---------------------------------------------------------------------------------------------
# fuzzing the new routes and fields
# ---------------------------------------------------------------------------------------------
def test_schemathesis_finds_no_server_error_on_chat_from_an_index(served, url):
    """The fuzzer's conversations get a question put last (a variant with an index refuses others, which
    schemathesis reports as the API being stricter than its schema: expected here, and the only warning).
    /v1/embeddings is fuzzed by test_serve_fuzz.py."""
    from test_serve_fuzz import CHECKS, HOOKS, schemathesis

    database = served[0].state.server.config.database
    before = dict(sqlite3_rows(database, "select status, count(*) from requests group by status"))
    run = schemathesis(url, "--phases", "coverage,fuzzing", "--checks", CHECKS, "--max-examples", "60",
                       "--seed", "29", "--generation-database", "none", "--workers", "1", "--request-timeout", "60",
                       "--no-color", "--include-path", "/v1/chat/completions",
                       env={"SCHEMATHESIS_HOOKS": HOOKS, "POCKETLM_FUZZ_MODEL": "docs", "POCKETLM_FUZZ_QUESTION": QUESTION})
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    warnings = run.stdout.partition("Warnings:")[2].partition("Test cases:")[0]
    assert set(re.findall(r"⚠️ ([^:]+):", warnings)) <= {"Missing test data", "Schema validation mismatch"}, warnings
    after = dict(sqlite3_rows(database, "select status, count(*) from requests group by status"))
    assert after.get(200, 0) - before.get(200, 0) >= 15, (before, after)  # generated conversations got answers
    assert not [s for s in after if s >= 500], after


def sqlite3_rows(database: str, sql: str) -> list[tuple]:
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(database)) as conn:
        return conn.execute(sql).fetchall()


# ---------------------------------------------------------------------------------------------
# the real model
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_answers_from_the_index_as_pocketlm_ask_does(smollm2_dir, index_dir, searchers, tmp_path):
    """The server's answer, sources and citations are those of `pocketlm ask` (retrieval.answer.ask, the
    engine's own decoding loop) on the same index and question."""
    from pocketlm.loading import open_model
    from pocketlm.retrieval.answer import ask

    question = "What pressure is the boiler B-2 rated for?"
    model, tokenizer = open_model(str(smollm2_dir))
    expected = ask(searchers["hybrid"], model, tokenizer, question, 3, SamplingParams(max_new_tokens=48, temperature=0))
    config = write_config(tmp_path / "serve.yaml", database=str(tmp_path / "log.db"), max_context=1024,
                          models=[{"name": "docs", "model": str(smollm2_dir), "index": str(index_dir), "k": 3}])
    with running_server(create_app(load_serve_config(config))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        completion = client.chat.completions.create(model="docs", messages=[{"role": "user", "content": question}],
                                                    max_tokens=48, temperature=0)
    answer = completion.choices[0].message.content
    assert completion.model_extra["sources"] == [p.as_dict() for p in expected.passages]
    assert expected.passages[0].doc_id == "boiler.md"
    assert answer == expected.text and "40 bar" in answer
    assert completion.choices[0].model_extra["cited"] == expected.cited
