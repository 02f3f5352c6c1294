"""The server: continuous batching against plain decoding, the OpenAI client, lm-eval's local-completions,
hostile input, limits, cancellation, A/B assignment with feedback, metrics and the CLI."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from helpers import tiny_model_dir
from serve_helpers import running_server, wait_for

from pocketlm.checkpoint import load_model
from pocketlm.engine import SamplingParams, generate_tokens
from pocketlm.loading import open_model
from pocketlm.serve.app import create_app
from pocketlm.serve.config import load_serve_config
from pocketlm.serve.scheduler import Finished, Job, Scheduler, TokenEvent
from pocketlm.streaming import chat_prompt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("serve") / "tiny", seed=3, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_b(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("serve") / "tiny-b", seed=4, max_position_embeddings=256)


def serve(models, tmp_path, **options):
    options.setdefault("database", str(tmp_path / "log.db"))
    config_file = options.pop("config_file", None)
    return create_app(load_serve_config(config_file, [str(m) for m in models], **options))


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


# ---- the scheduler ------------------------------------------------------------------------------
def run_jobs(scheduler: Scheduler, jobs: list[Job]) -> list[tuple[list[int], str]]:
    results = [([], None) for _ in jobs]
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(event):
            if isinstance(event, TokenEvent):
                results[i][0].append(event.token)
            elif isinstance(event, Finished):
                results[i] = (results[i][0], event.reason)
                done.release()
        return emit

    for i, job in enumerate(jobs):
        scheduler.submit(job, emitter(i))
    for _ in jobs:
        assert done.acquire(timeout=60)
    return results


def test_continuous_batching_gives_each_request_its_own_greedy_decoding(tiny):
    """Requests of different lengths join and leave a batch of 3 rows (prompts prefilled in chunks of 3,
    some finishing early so rows are compacted) and each gets exactly what decoding it alone gives."""
    model, _ = load_model(tiny)
    prompts = [[5 + i, 6, 7, 8, 9, 10, 11][: 1 + i % 7] + [12] * i for i in range(9)]
    lengths = [20, 3, 12, 1, 20, 7, 16, 2, 9]
    expected = [list(generate_tokens(model, p, SamplingParams(max_new_tokens=n, ignore_eos=True)))
                for p, n in zip(prompts, lengths)]
    scheduler = Scheduler(model, max_batch=3, queue_size=16, prefill_chunk=3)
    try:
        jobs = [Job(p, n, SamplingParams(ignore_eos=True)) for p, n in zip(prompts, lengths)]
        results = run_jobs(scheduler, jobs)
    finally:
        scheduler.close()
    assert [tokens for tokens, _ in results] == expected
    assert all(reason == "length" for _, reason in results)
    assert scheduler.steps < sum(lengths)  # decoded together, not one after another


def test_scheduler_queue_bound_and_context(tiny):
    from pocketlm.errors import ContextLengthError
    from pocketlm.serve.scheduler import QueueFullError

    model, _ = load_model(tiny)
    scheduler = Scheduler(model, max_batch=1, queue_size=1, max_context=64)
    try:
        with pytest.raises(ContextLengthError, match="the prompt has 64 tokens but this server's context .* is 64"):
            scheduler.submit(Job([1] * 64, 4), lambda e: None)
        first = scheduler.submit(Job([1, 2], 10_000, SamplingParams(ignore_eos=True)), lambda e: None)
        assert first.max_new_tokens == 62  # clipped to the room the context leaves
        assert wait_for(lambda: scheduler.active == 1 and scheduler.queue_depth == 0)
        scheduler.submit(Job([1, 2], 4), lambda e: None)
        with pytest.raises(QueueFullError, match="1 requests are waiting .the queue holds 1."):
            scheduler.submit(Job([1, 2], 4), lambda e: None)
        scheduler.cancel(first)
        assert wait_for(lambda: scheduler.active == 0 and scheduler.queue_depth == 0)
    finally:
        scheduler.close()


# ---- the OpenAI client ----------------------------------------------------------------------------
def test_openai_client_chat_and_completions_streamed_and_not(tiny, tmp_path):
    import openai

    model, tokenizer = load_model(tiny)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    prompt = chat_prompt(tokenizer, messages)
    greedy = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=12, ignore_eos=True)))
    with running_server(serve([tiny], tmp_path, log_prompts=True)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["tiny"]
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                               extra_body={"ignore_eos": True}, logprobs=True, top_logprobs=3)
        choice = reply.choices[0]
        assert choice.message.content == tokenizer.decode(greedy) and choice.finish_reason == "length"
        assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 12
        assert reply.variant == "tiny" and reply.id.startswith("chatcmpl-")
        # log-probs: the chosen token is the top one (greedy), and they are the model's own distribution
        first = choice.logprobs.content[0]
        assert first.logprob == pytest.approx(first.top_logprobs[0].logprob) and len(first.top_logprobs) == 3
        with torch.inference_mode():
            reference = torch.log_softmax(model(torch.tensor([prompt]))[0, -1].float(), -1)
        assert first.logprob == pytest.approx(float(reference[greedy[0]]), abs=1e-4)

        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True},
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == choice.message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 12 and len({c.id for c in chunks}) == 1

        completion = client.completions.create(model="tiny", prompt="the cat", max_tokens=6, temperature=0,
                                               extra_body={"ignore_eos": True})
        ids = tokenizer.encode("the cat")
        assert completion.choices[0].text == tokenizer.decode(
            list(generate_tokens(model, ids, SamplingParams(max_new_tokens=6, ignore_eos=True))))
        streamed = client.completions.create(model="tiny", prompt="the cat", max_tokens=6, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text

        # seeded sampling repeats; stop strings cut the text
        sampled = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=1.0,
                                                  seed=7).choices[0].message.content for _ in range(2)]
        assert sampled[0] == sampled[1]
        full = choice.message.content
        stop = full[3:5]
        cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stop=[stop],
                                             extra_body={"ignore_eos": True})
        assert cut.choices[0].message.content == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    logged = rows(tmp_path / "log.db", "select endpoint, status, completion_tokens, prompt_text from requests")
    assert len(logged) == 7 and all(status == 200 for _, status, _, _ in logged)
    assert logged[0][:3] == ("chat", 200, 12) and logged[0][3] == "be brief\nthe cat"


def test_completion_echo_logprobs_match_transformers(tiny, tmp_path):
    """`echo` + `logprobs` (what lm-eval's local-completions asks for) score every prompt token with the
    model's log-probs, checked against transformers on the same weights; token-id prompts work too."""
    from transformers import AutoModelForCausalLM

    _, tokenizer = load_model(tiny)
    hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    texts = ["the cat sat on the mat", "a much longer prompt " * 8]
    with running_server(serve([tiny], tmp_path, prefill_chunk=16)) as url:
        body = {"model": "tiny", "prompt": [tokenizer.encode(t) for t in texts], "max_tokens": 1, "echo": True,
                "logprobs": 2, "temperature": 0}
        reply = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert len(reply["choices"]) == 2
    for choice, text in zip(sorted(reply["choices"], key=lambda c: c["index"]), texts):
        ids = tokenizer.encode(text)
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        expected = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
        got = choice["logprobs"]["token_logprobs"]
        assert got[0] is None and len(got) == len(ids) + 1  # the prompt, then one generated token
        assert got[1:len(ids)] == pytest.approx(expected, abs=1e-4)
        assert choice["logprobs"]["tokens"][: len(ids)] == [tokenizer.decode([i]) for i in ids]
        assert choice["text"].startswith(text)
        assert got[-1] == pytest.approx(max(choice["logprobs"]["top_logprobs"][-1].values()))  # greedy


def test_lm_eval_local_completions_matches_pocketlm_eval(tiny, tmp_path, monkeypatch):
    """lm-evaluation-harness's `local-completions` model, pointed at the server, gives the same
    accuracy and per-choice log-likelihoods as `pocketlm eval` on the same multiple-choice file."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    sys.path.insert(0, str(REPO))
    from benchmarks.eval_vs_lm_eval import PIQA_YAML
    from pocketlm.evaluate.runner import evaluate_dir

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    records = [{"goal": f"goal number {i}", "sol1": "do it with a spoon" * (i % 3 + 1), "sol2": "a fork", "label": i % 2}
               for i in range(10)]
    data = tmp_path / "piqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_piqa.yaml").write_text(PIQA_YAML.format(name="tiny_piqa", data=data))
    with running_server(serve([tiny], tmp_path)) as url:
        args = (f"base_url={url}/v1/completions,model=tiny,tokenizer={tiny},tokenizer_backend=huggingface,"
                "num_concurrent=4,max_retries=1")
        out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["tiny_piqa"],
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=True)
    ours = evaluate_dir(tiny, [f"piqa={data}"], log_samples=True)
    metrics = out["results"]["tiny_piqa"]
    assert metrics["acc,none"] == pytest.approx(ours["results"]["piqa"]["acc"])
    assert metrics["acc_norm,none"] == pytest.approx(ours["results"]["piqa"]["acc_norm"])
    samples = sorted(out["samples"]["tiny_piqa"], key=lambda s: s["doc_id"])
    theirs = torch.tensor([[r[0] for r in s["filtered_resps"]] for s in samples])
    assert torch.allclose(theirs, torch.tensor([s["loglikelihoods"] for s in ours["samples"]["piqa"]]), atol=1e-4)


# ---- bad input and limits -------------------------------------------------------------------------
def test_hostile_input_gets_4xx_json_and_the_server_keeps_serving(tiny, tmp_path):
    chat = "/v1/chat/completions"
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    auth = {"Authorization": "Bearer sekret"}
    cases = [
        ("malformed JSON", chat, b'{"model": "tiny", "messages": [', auth, 400, "not valid JSON"),
        ("not an object", chat, b"[1, 2, 3]", auth, 400, ""),
        ("wrong type", chat, {**ok, "messages": "hi"}, auth, 400, "messages"),
        ("wrong type (max_tokens)", chat, {**ok, "max_tokens": "many"}, auth, 400, "max_tokens"),
        ("huge max_tokens", chat, {**ok, "max_tokens": 10**12}, auth, 400, "allows at most 64"),
        ("negative temperature", chat, {**ok, "temperature": -1}, auth, 400, "temperature"),
        ("top_p zero", chat, {**ok, "top_p": 0}, auth, 400, "top_p"),
        ("empty messages", chat, {**ok, "messages": []}, auth, 400, "messages"),
        ("unknown role", chat, {**ok, "messages": [{"role": "wizard", "content": "x"}]}, auth, 400, "role"),
        ("invalid UTF-8", chat, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', auth,
         400, ""),
        ("oversized body", chat, {**ok, "messages": [{"role": "user", "content": "x" * 50_000}]}, auth, 413,
         "limit of 20000 bytes"),
        ("unknown model", chat, {**ok, "model": "gpt-9"}, auth, 404, "does not exist"),
        ("missing API key", chat, ok, {}, 401, "missing API key"),
        ("wrong API key", chat, ok, {"Authorization": "Bearer nope"}, 401, "not valid"),
        ("prompt over the context", "/v1/completions", {"model": "tiny", "prompt": "word " * 300}, auth, 400,
         "tokens but this server's context for tiny is 256 tokens"),
        ("token id out of range", "/v1/completions", {"model": "tiny", "prompt": [1, 2, 99999]}, auth, 400,
         "outside the vocabulary"),
        ("too many stops", chat, {**ok, "stop": ["a", "b", "c", "d", "e"]}, auth, 400, "at most 4"),
        ("n too large", chat, {**ok, "n": 1000}, auth, 400, "n"),
        ("feedback for nothing", "/v1/feedback", {"id": "chatcmpl-nope", "rating": "up"}, auth, 404, "no response"),
        ("bad rating", "/v1/feedback", {"id": "x", "rating": "meh"}, auth, 400, "rating"),
        ("unknown route", "/v1/engines", {}, auth, 404, ""),
    ]
    app = serve([tiny], tmp_path, api_keys=["sekret"], max_body_bytes=20_000, max_tokens_cap=64)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for name, path, body, headers, status, needle in cases:
            if isinstance(body, bytes):
                response = client.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
            else:
                response = client.post(path, json=body, headers=headers)
            assert response.status_code == status, (name, response.status_code, response.text)
            error = response.json()["error"]
            assert needle in error["message"] and error["type"], (name, error)
        # a chunked upload without Content-Length is held to the same limit
        response = client.post(chat, content=iter([b"x" * 15_000, b"y" * 15_000]), headers=auth)
        assert response.status_code == 413
        assert client.get("/health").json()["status"] == "ok"
        assert client.post(chat, json=ok, headers=auth).status_code == 200
        assert client.get("/v1/models").status_code == 401  # keys guard every /v1 route


def test_queue_full_answers_429_and_a_dropped_stream_frees_its_place(tmp_path):
    db = tmp_path / "log.db"
    # room for a stream that outlasts the test: 8,000 tokens of the tiny model took about a second on a fast CPU,
    # and a busy event loop once answered the second request after the stream had ended
    tiny = tiny_model_dir(tmp_path / "tiny", max_position_embeddings=65536)
    app = serve([tiny], tmp_path, max_batch=1, queue_size=0, max_context=65536, max_tokens_cap=64000)
    long = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64000, "ignore_eos": True,
            "stream": True}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        scheduler = app.state.server.variants["tiny"].scheduler
        with client.stream("POST", "/v1/chat/completions", json=long) as stream:
            first = next(stream.iter_lines())
            assert first.startswith("data: ")
            busy = client.post("/v1/chat/completions", json={**long, "stream": False, "max_tokens": 2})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "rate_limit_error"
        # the client hung up mid-stream: its sequence is cancelled and the row is free again
        assert wait_for(lambda: scheduler.active == 0)
        after = client.post("/v1/chat/completions", json={**long, "stream": False, "max_tokens": 2})
        assert after.status_code == 200
        assert wait_for(lambda: len(rows(db, "select 1 from requests")) == 3)
    statuses = sorted(s for (s,) in rows(db, "select status from requests"))
    assert statuses == [200, 429, 499]


def test_request_timeout_answers_504(tiny, tmp_path):
    app = serve([tiny], tmp_path, request_timeout=0.05, max_tokens_cap=4000)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 250, "ignore_eos": True}
    with running_server(app) as url:
        response = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        stream = httpx.post(url + "/v1/completions", json={**body, "stream": True}, timeout=30).text
        assert '"code": "timeout"' in stream and stream.rstrip().endswith("data: [DONE]")


# ---- variants, A/B and feedback ------------------------------------------------------------------
def test_ab_split_stickiness_feedback_and_report_against_scipy(tiny, tiny_b, tmp_path):
    from scipy.stats import chi2_contingency, mannwhitneyu

    from pocketlm.serve.report import ab_report

    config = tmp_path / "serve.yaml"
    config.write_text(f"""
experiment:
  name: assistant
  variants:
    - {{name: control, model: {tiny}, weight: 0.7}}
    - {{name: treatment, model: {tiny_b}, weight: 0.3}}
log_prompts: true
""")
    db = tmp_path / "log.db"
    app = serve([], tmp_path, config_file=config, database=str(db))
    n_users = 300
    assigned: dict[str, str] = {}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models["assistant"]["variants"] == ["control", "treatment"]
        for i in range(n_users):
            user = f"user-{i}"
            reply = client.post("/v1/completions", json={"model": "assistant", "prompt": f"hello {i}", "max_tokens": 1,
                                                         "user": user})
            assert reply.status_code == 200
            variant = reply.json()["variant"]
            assert reply.headers["x-pocketlm-variant"] == variant
            assigned[user] = variant
            # scripted feedback: control users like it 3 times in 4, treatment users 1 time in 3
            up = i % 4 != 0 if variant == "control" else i % 3 == 0
            vote = client.post("/v1/feedback", json={"id": reply.json()["id"], "rating": "up" if up else "down"})
            assert vote.status_code == 200 and vote.json()["variant"] == variant
        for i in range(0, n_users, 25):  # sticky: the same user gets the same variant (header or field)
            again = client.post("/v1/chat/completions", headers={"X-User": f"user-{i}"},
                                json={"model": "assistant", "messages": [{"role": "user", "content": "again"}],
                                      "max_tokens": 1})
            assert again.json()["variant"] == assigned[f"user-{i}"]
        forced = client.post("/v1/completions", json={"model": "treatment", "prompt": "x", "max_tokens": 1})
        assert forced.json()["variant"] == "treatment"
        metrics = client.get("/metrics").text
        assert 'pocketlm_feedback_total{model="%s",rating="up",variant="control"}' % tiny in metrics
        assert wait_for(lambda: len(rows(db, "select 1 from requests")) == n_users + 13)
        stats = client.get("/api/stats").json()
        assert stats["experiment"] == "assistant" and set(stats["live"]) == {"control", "treatment"}
    share = sum(v == "control" for v in assigned.values()) / n_users
    sigma = (0.7 * 0.3 / n_users) ** 0.5
    assert abs(share - 0.7) < 4 * sigma, share

    report = ab_report(db, experiment="assistant")
    votes = {name: rows(db, f"select sum(f.rating > 0), count(*) from feedback f join requests r on r.id = f.request_id "
                            f"where r.variant = '{name}'")[0] for name in ("control", "treatment")}
    table = [[votes[v][0], votes[v][1] - votes[v][0]] for v in ("treatment", "control")]
    expected_p = chi2_contingency(table, correction=False)[1]
    comparison = report["comparisons"][0]
    assert comparison["thumbs_up_rate"]["p"] == pytest.approx(expected_p, rel=1e-9)
    latency = {name: [r[0] for r in rows(db, f"select latency_ms from requests where variant = '{name}' "
                                             f"and experiment = 'assistant' and status = 200")]
               for name in ("control", "treatment")}
    expected_u = mannwhitneyu(latency["treatment"], latency["control"], alternative="two-sided", method="asymptotic")
    assert comparison["latency"]["p"] == pytest.approx(expected_u.pvalue, rel=1e-9)


def test_lora_adapter_variant_serves_the_adapted_model(tiny, tmp_path):
    from pocketlm.adapt.adapters import attach, lora_config, save_adapter

    model, tokenizer = load_model(tiny)
    attach(model, lora_config(4, 8, 0.0, ["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = save_adapter(model, tmp_path / "adapter", tiny)
    config = tmp_path / "serve.yaml"
    config.write_text(f"models:\n  - {{name: base, model: {tiny}}}\n  - {{name: tuned, model: {tiny}, adapter: {adapter}}}\n")
    adapted, _ = open_model(adapter)
    ids = tokenizer.encode("the cat")
    expected = tokenizer.decode(list(generate_tokens(adapted, ids, SamplingParams(max_new_tokens=8, ignore_eos=True))))
    with running_server(serve([], tmp_path, config_file=config)) as url:
        texts = {name: httpx.post(url + "/v1/completions", json={"model": name, "prompt": "the cat", "max_tokens": 8,
                                                                 "temperature": 0, "ignore_eos": True}).json()
                 ["choices"][0]["text"] for name in ("base", "tuned")}
    assert texts["tuned"] == expected and texts["base"] != texts["tuned"]


def test_config_errors_are_one_line():
    from pocketlm.errors import ConfigError

    with pytest.raises(ConfigError, match="max_batchh: unknown key; did you mean 'max_batch'"):
        load_serve_config(None, ["m"], **{"max_batchh": 3})
    with pytest.raises(ConfigError, match="nothing to serve"):
        load_serve_config(None, [])
    with pytest.raises(ConfigError, match="repeated: m"):
        load_serve_config(None, ["a/m", "b/m"])


# ---- the command line ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_answers_and_ab_report_and_drift_read_its_log(tiny, tmp_path):
    port, db = free_port(), tmp_path / "cli.db"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "pocketlm", "serve", str(tiny), "--port", str(port), "--db", str(db),
                             "--log-prompts", "--threads", "1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _healthy(url), timeout=60), proc.stderr.read() if proc.poll() is not None else ""
        for i in range(24):  # 6 recent requests against 18: enough for drift's permutation test to reach p < 0.01
            prompt = "the cat sat on the mat" if i < 18 else "1234 5678 9012 3456 7890 " * 4
            reply = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2})
            assert reply.status_code == 200
            httpx.post(url + "/v1/feedback", json={"id": reply.json()["id"], "rating": 1 if i % 2 else -1})
        assert "pocketlm_requests_total" in httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0 or proc.returncode == -15
    report = subprocess.run([sys.executable, "-m", "pocketlm", "ab", "report", "--db", str(db), "--plot",
                             str(tmp_path / "ab.png")], capture_output=True, text=True, env=env, cwd=REPO)
    assert report.returncode == 0, report.stderr
    assert "tiny" in report.stdout and (tmp_path / "ab.png").read_bytes()[:4] == b"\x89PNG"
    drift = subprocess.run([sys.executable, "-m", "pocketlm", "drift", "--db", str(db), "--model", str(tiny),
                            "--metrics-file", str(tmp_path / "drift.prom")], capture_output=True, text=True, env=env,
                           cwd=REPO)
    assert drift.returncode == 1, drift.stderr  # the last quarter of prompts are digits: drift
    assert "pocketlm_drift_flag 1.0" in (tmp_path / "drift.prom").read_text()
    bad = subprocess.run([sys.executable, "-m", "pocketlm", "serve", "--config", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 1 and "no such serve config file" in bad.stderr and "Traceback" not in bad.stderr


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
