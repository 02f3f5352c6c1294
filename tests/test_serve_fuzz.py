"""Fuzzing the server as an attacker would: schemathesis reads the OpenAPI schema the server publishes and
sends what it describes and what it does not (its coverage phase: boundaries and wrong types; its fuzzing
phase: generated bodies), checking that no answer is a server error and that every status, content type
and body (each event of a stream included) is the one the schema documents. Bounded: a fixed seed and
a fixed number of cases per operation (POCKETLM_FUZZ_SEED and POCKETLM_FUZZ_EXAMPLES change them)."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
HOOKS = "test_serve_fuzz"  # SCHEMATHESIS_HOOKS: this module, which loads schemathesis_hooks and adds map_more

# What the hooks of schemathesis_hooks leave to this module: /v1/embeddings requests name the server's
# embedding model and send few inputs, and, for a model that answers from an index (it takes the last
# message as the question and refuses a conversation that ends otherwise), every generated conversation
# gets a question put last.
EMBEDDER = os.environ.get("POCKETLM_FUZZ_EMBEDDER")
ANSWERS = os.environ.get("POCKETLM_FUZZ_ANSWERS", "")  # two logged response ids: arena votes name real answers
QUESTION = os.environ.get("POCKETLM_FUZZ_QUESTION")
FEW_INPUTS = 16


def map_more(ctx, body):
    if not isinstance(body, dict) or ctx.operation is None:
        return body
    if ctx.operation.path == "/v1/embeddings":
        if EMBEDDER and isinstance(body.get("model"), str):
            body["model"] = EMBEDDER
        if isinstance(body.get("input"), list):
            body["input"] = body["input"][:FEW_INPUTS]
    elif ctx.operation.path == "/v1/chat/completions" and QUESTION and isinstance(body.get("messages"), list):
        body["messages"] = [*body["messages"], {"role": "user", "content": QUESTION}]
    elif ctx.operation.path == "/v1/arena/votes" and ANSWERS:
        # both sides name real answers, so that the fuzzer's cases reach the vote's handling; an id's own
        # checks (type, length, unknown, the same on both sides) are test_arena_feedback's
        for side, answer in zip(("left", "right"), ANSWERS.split(",")):
            if side in body:
                body[side] = answer
    return body


if os.environ.get("SCHEMATHESIS_HOOKS") == HOOKS:  # loaded by schemathesis, in its own process
    import schemathesis
    import schemathesis_hooks  # noqa: F401  (its hooks: the model's name, few tokens and sequences)

    schemathesis.hook("map_body")(map_more)


def schemathesis(url: str, *options: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()", "run",
               url + "/openapi.json", *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(TESTS), **env})


def test_schemathesis_finds_no_server_error_and_nothing_off_schema(tmp_path):
    import httpx
    from helpers import tiny_model_dir
    from serve_helpers import running_server

    from pocketlm.serve.app import create_app
    from pocketlm.serve.config import load_serve_config

    tiny = tiny_model_dir(tmp_path / "tiny", seed=3, max_position_embeddings=256)
    db = tmp_path / "log.db"
    app = create_app(load_serve_config(None, [str(tiny)], database=str(db), max_tokens_cap=64,
                                       max_body_bytes=200_000, max_batch=8, embedder="all-minilm-l6-v2"))
    seed = os.environ.get("POCKETLM_FUZZ_SEED", "26")
    examples = os.environ.get("POCKETLM_FUZZ_EXAMPLES", "300")
    with running_server(app) as url:
        answers = [httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                              timeout=60).json()["id"] for _ in range(2)]
        run = schemathesis(url, "--phases", "coverage,fuzzing", "--checks", CHECKS, "--max-examples", examples,
                           "--seed", seed, "--generation-database", "none", "--workers", "1",
                           "--request-timeout", "60", "--no-color",
                           env={"SCHEMATHESIS_HOOKS": HOOKS, "POCKETLM_FUZZ_MODEL": "tiny",
                                "POCKETLM_FUZZ_EMBEDDER": "all-minilm-l6-v2", "POCKETLM_FUZZ_ANSWERS": ",".join(answers)})
        health = httpx.get(url + "/health", timeout=30).json()
        metrics = httpx.get(url + "/metrics", timeout=30).text
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Warnings:" not in run.stdout, run.stdout[-3000:]  # nothing in the schema was skipped
    assert health["status"] == "ok" and health["active_sequences"] == 0
    # the fuzzer got past routing and validation into decoding, with every sampling value it drew
    with sqlite3.connect(db) as conn:
        decoded = dict(conn.execute("select endpoint, count(*) from requests where status = 200 group by endpoint"))
        failed = conn.execute("select count(*) from requests where status >= 500").fetchone()[0]
    assert decoded.get("chat", 0) >= 50 and decoded.get("completions", 0) >= 50, decoded
    assert failed == 0
    # and /v1/embeddings got inputs it embedded
    embedded = re.search(r'^pocketlm_embedded_inputs_total\{model="all-minilm-l6-v2"\} (\S+)$', metrics, re.M)
    assert embedded and float(embedded.group(1)) >= 50, metrics
