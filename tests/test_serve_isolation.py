"""One request cannot break another: each defect the fuzzer found as a regression test, faults injected
into one row of a shared batch, and the poisoned neighbour (a normal stream beside each kind of bad
request completes with exactly the tokens it produces alone)."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
from helpers import tiny_model_dir
from serve_helpers import running_server, wait_for

from pocketlm.checkpoint import load_model
from pocketlm.engine import SamplingParams, generate_tokens
from pocketlm.streaming import TextAssembler, chat_prompt
from pocketlm.serve.app import create_app
from pocketlm.serve.config import load_serve_config
from pocketlm.serve.scheduler import Finished, Job, Scheduler, TokenEvent

# prompts that start with these token ids trip the faults injected below (no other prompt starts so)
DECODE_FAULT = [250, 251, 252]
PREFILL_FAULT = [247, 248, 249]
NAN_FAULT = [244, 245, 246]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("isolation") / "tiny", seed=11, max_position_embeddings=4096)


def inject_faults(model, scheduler_of, delay: float = 0.0) -> None:
    """Make `model` fail the rows of jobs whose prompt starts with a fault marker, the way a real fault in
    one sequence would: a decode step that raises, a prefill that raises, logits that come out NaN.
    `scheduler_of()` gives the scheduler, whose running rows are the decode step's rows; `delay` slows
    each step so a test can overlap requests."""
    decode, forward = model.decode_step, model.forward

    def starts(ids: list[int], marker: list[int]) -> bool:
        return ids[:len(marker)] == marker

    def faulty_decode(ids, pos, mask=None):
        time.sleep(delay)
        jobs = scheduler_of().running[:ids.shape[0]]
        if any(starts(job.prompt_ids, DECODE_FAULT) for job in jobs):
            raise RuntimeError("injected decode fault")
        logits = decode(ids, pos, mask)
        for row, job in enumerate(jobs):
            if starts(job.prompt_ids, NAN_FAULT):
                logits[row] = float("nan")
        return logits

    def faulty_forward(input_ids, *args, **kwargs):
        if any(starts(row, PREFILL_FAULT) for row in input_ids.tolist()):
            raise RuntimeError("injected prefill fault")
        return forward(input_ids, *args, **kwargs)

    model.decode_step, model.forward = faulty_decode, faulty_forward


def greedy(model, prompt: list[int], n: int) -> list[int]:
    return list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=n, ignore_eos=True)))


# ---- the scheduler: faults in one row of a batch --------------------------------------------------
def test_a_failing_row_ends_alone_and_its_neighbours_get_their_own_tokens(tiny, caplog):
    model, _ = load_model(tiny)
    normal = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18]]
    expected = [greedy(model, p, 24) for p in normal]
    bad = {
        "decode fault": Job(DECODE_FAULT + [3], 24, SamplingParams(ignore_eos=True), request_id="req-decode"),
        "prefill fault": Job(PREFILL_FAULT + [3, 4], 24, SamplingParams(ignore_eos=True), request_id="req-prefill"),
        "NaN logits": Job(NAN_FAULT + [3], 24, SamplingParams(temperature=0.8, ignore_eos=True), request_id="req-nan"),
        "NaN logits, greedy": Job(NAN_FAULT + [4], 24, SamplingParams(ignore_eos=True), request_id="req-nan-2"),
    }
    # extremes the API accepts: tiny temperature and top_p are greedy, any seed works
    extreme = {
        "temperature 1e-60": Job([5, 6, 7], 24, SamplingParams(temperature=1e-60, ignore_eos=True)),
        "top_p 1e-300": Job([8, 9, 10, 11, 12, 13], 24, SamplingParams(temperature=1.0, top_p=1e-300, ignore_eos=True)),
        "seed 2**70": Job([14], 24, SamplingParams(temperature=1.0, seed=2**70, ignore_eos=True)),
        "bias +100": Job([15, 16], 24, SamplingParams(temperature=2.0, ignore_eos=True), logit_bias={42: 100.0},
                         presence_penalty=-2.0, frequency_penalty=-2.0, logprobs=20),
        "penalties": Job([15, 16], 24, SamplingParams(temperature=2.0, top_k=3, ignore_eos=True),
                         presence_penalty=2.0, frequency_penalty=2.0, logprobs=0),
    }
    scheduler = Scheduler(model, max_batch=16, queue_size=16, prefill_chunk=64)
    inject_faults(model, lambda: scheduler)
    jobs = [Job(p, 24, SamplingParams(ignore_eos=True)) for p in normal] + list(bad.values()) + list(extreme.values())
    # interleaved, so faulty rows sit between good ones in the same prefill batch and decode step
    order = [jobs[0], bad["decode fault"], jobs[1], bad["prefill fault"], extreme["temperature 1e-60"], jobs[2],
             bad["NaN logits"], extreme["top_p 1e-300"], bad["NaN logits, greedy"], extreme["seed 2**70"], jobs[3],
             extreme["bias +100"], extreme["penalties"]]
    results = {id(job): ([], None) for job in order}
    done = threading.Semaphore(0)

    def emitter(job):
        def emit(event):
            if isinstance(event, TokenEvent):
                results[id(job)][0].append(event.token)
            elif isinstance(event, Finished):
                results[id(job)] = (results[id(job)][0], event)
                done.release()
        return emit

    with caplog.at_level(logging.ERROR, logger="pocketlm.serve"):
        try:
            for job in order:
                scheduler.submit(job, emitter(job))
            for _ in order:
                assert done.acquire(timeout=60)
            assert scheduler.active == 0  # every row is free again
        finally:
            scheduler.close()
    for job, want in zip(jobs, expected):
        tokens, end = results[id(job)]
        assert (tokens, end.reason) == (want, "length")
    for name, job in bad.items():
        tokens, end = results[id(job)]
        assert (end.reason, end.status) == ("error", 500), name
        assert "internal error while" in end.message and tokens == [], name
        assert any(job.request_id in record.getMessage() for record in caplog.records), name
    for name, job in extreme.items():
        tokens, end = results[id(job)]
        assert end.reason == "length" and len(tokens) == 24 and all(0 <= t < 300 for t in tokens), name
    assert results[id(extreme["temperature 1e-60"])][0] == expected[0]
    assert results[id(extreme["top_p 1e-300"])][0] == expected[1]
    assert set(results[id(extreme["bias +100"])][0]) == {42}


def test_a_prompt_with_an_unknown_token_id_is_refused_at_submission(tiny):
    from pocketlm.errors import ConfigError

    model, _ = load_model(tiny)
    scheduler = Scheduler(model, max_batch=2)
    try:
        with pytest.raises(ConfigError, match="prompt token id 300 is outside the vocabulary"):
            scheduler.submit(Job([1, 300], 4), lambda e: None)
        with pytest.raises(ConfigError, match="logit_bias token id -1 is outside"):
            scheduler.submit(Job([1, 2], 4, logit_bias={-1: 5.0}), lambda e: None)
    finally:
        scheduler.close()


# ---- the server --------------------------------------------------------------------------------------
def serve(tiny, tmp_path, **options):
    options.setdefault("database", str(tmp_path / "log.db"))
    return create_app(load_serve_config(None, [str(tiny)], **options))


def test_fuzzer_findings_each_answer_as_they_should(tiny, tmp_path):
    """The defects found on main: tiny temperature or top_p (a 500, and the batch with it), a seed past 64
    bits (a 500), a large body from a client that writes before it reads (a reset, not the 413), and
    /metrics documented as JSON."""
    model, tokenizer = load_model(tiny)
    messages = [{"role": "user", "content": "the cat sat"}]
    prompt = chat_prompt(tokenizer, messages)
    assembler = TextAssembler(tokenizer, prompt)
    expected = "".join(assembler.add(token) for token in greedy(model, prompt, 16))
    chat = {"model": "tiny", "messages": messages, "max_tokens": 16, "ignore_eos": True}
    app = serve(tiny, tmp_path, max_body_bytes=1 << 20)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for extreme in ({"temperature": 1e-60}, {"temperature": 5e-324}, {"top_p": 1e-300, "temperature": 1.0},
                        {"top_p": 5e-324, "temperature": 2.0, "seed": 3}):
            reply = client.post("/v1/chat/completions", json={**chat, **extreme})
            assert reply.status_code == 200, (extreme, reply.text)
            assert reply.json()["choices"][0]["message"]["content"] == expected, extreme
        sampled = {}
        for seed in (2**70, 2**70 % 2**64, -1, 10**40):
            reply = client.post("/v1/chat/completions", json={**chat, "temperature": 1.0, "seed": seed})
            assert reply.status_code == 200, (seed, reply.text)
            sampled[seed] = reply.json()["choices"][0]["message"]["content"]
        assert sampled[2**70] == sampled[2**70 % 2**64]  # folded into the generator's range
        for bias in ({"42": 100}, {str(t): -100 for t in range(300)}, {"7": 100, "8": -100, "0009": 55.5}):
            reply = client.post("/v1/chat/completions", json={**chat, "temperature": 0.5, "logit_bias": bias})
            assert reply.status_code == 200, (bias, reply.text)
        for bias, needle in (({"300": 1}, "outside the vocabulary"), ({"x": 1}, "is not a token id"), ({"1": 101}, "100")):
            reply = client.post("/v1/chat/completions", json={**chat, "logit_bias": bias})
            assert reply.status_code == 400 and needle in reply.json()["error"]["message"], (bias, reply.text)

        # a 64 MB body from urllib, which writes it all before reading the answer
        big = json.dumps({**chat, "messages": [{"role": "user", "content": "x" * (64 << 20)}]}).encode()
        request = urllib.request.Request(url + "/v1/chat/completions", data=big,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 413
        assert json.loads(refused.value.read())["error"]["code"] == "request_too_large"

        schema = client.get("/openapi.json").json()
        documented = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        answered = client.get("/metrics").headers["content-type"]
        assert list(documented) == ["text/plain"] and answered.startswith("text/plain")
        assert client.get("/health").json()["active_sequences"] == 0


def test_poisoned_neighbour_a_normal_stream_beside_every_kind_of_bad_request(tiny, tmp_path, caplog):
    """A greedy stream decodes while each kind of bad request arrives (each in the same batch as the stream,
    or refused before it reaches one): the stream ends with exactly the tokens it gives alone."""
    model, tokenizer = load_model(tiny)
    messages = [{"role": "user", "content": "tell me a long story"}]
    length = 600
    prompt = chat_prompt(tokenizer, messages)
    assembler = TextAssembler(tokenizer, prompt)  # the text a stream of these tokens shows, piece by piece
    alone = "".join(assembler.add(token) for token in greedy(model, prompt, length))
    app = serve(tiny, tmp_path, max_body_bytes=100_000, max_context=4096, max_tokens_cap=length)
    scheduler = app.state.server.variants["tiny"].scheduler
    inject_faults(scheduler.model, lambda: scheduler, delay=0.004)  # ~2.4 s of stream to overlap

    chat, completions = "/v1/chat/completions", "/v1/completions"
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "ignore_eos": True}
    bad = [
        ("temperature 1e-60", chat, {**ok, "temperature": 1e-60}, 200),
        ("top_p 1e-300", chat, {**ok, "temperature": 1.0, "top_p": 1e-300}, 200),
        ("seed 2**70", chat, {**ok, "temperature": 1.0, "seed": 2**70}, 200),
        ("extreme penalties and bias", chat, {**ok, "temperature": 2.0, "presence_penalty": -2, "frequency_penalty": 2,
                                              "logit_bias": {"5": 100, "6": -100}, "logprobs": True,
                                              "top_logprobs": 20, "n": 16}, 200),
        ("streamed extremes", chat, {**ok, "temperature": 1e-60, "stream": True, "stop": ["a", "e", " ", "t"]}, 200),
        ("logit_bias outside the vocabulary", chat, {**ok, "logit_bias": {"99999": 1}}, 400),
        ("prompt over the context", completions, {"model": "tiny", "prompt": "word " * 5000}, 400),
        ("token id outside the vocabulary", completions, {"model": "tiny", "prompt": [1, 2, 300]}, 400),
        ("malformed JSON", chat, b'{"model": "tiny", "messages": [', 400),
        ("wrong type", chat, {**ok, "temperature": "hot"}, 400),
        ("oversized body", chat, {**ok, "messages": [{"role": "user", "content": "x" * 200_000}]}, 413),
        ("a fault while decoding", completions, {"model": "tiny", "prompt": DECODE_FAULT + [7], "max_tokens": 4}, 500),
        ("a fault while prefilling", completions, {"model": "tiny", "prompt": PREFILL_FAULT + [7, 8], "max_tokens": 4},
         500),
        ("NaN logits", completions, {"model": "tiny", "prompt": NAN_FAULT + [7], "max_tokens": 4, "temperature": 0.7},
         500),
        ("a streamed fault", completions, {"model": "tiny", "prompt": DECODE_FAULT + [8], "max_tokens": 4,
                                           "stream": True}, 200),
    ]
    streamed: dict = {}

    def read_stream(url):
        body = {"model": "tiny", "messages": messages, "max_tokens": length, "ignore_eos": True, "stream": True,
                "temperature": 0}
        pieces = []
        with httpx.stream("POST", url + chat, json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    pieces += [c["delta"].get("content") or "" for c in event.get("choices", [])]
                    streamed.setdefault("error", event.get("error"))
        streamed["text"] = "".join(pieces)

    with caplog.at_level(logging.ERROR, logger="pocketlm.serve"), running_server(app) as url:
        reader = threading.Thread(target=read_stream, args=(url,))
        reader.start()
        with httpx.Client(base_url=url, timeout=60) as client:
            assert wait_for(lambda: scheduler.active == 1)
            failed_ids = []
            for name, path, body, status in bad:
                if isinstance(body, bytes):
                    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
                else:
                    response = client.post(path, json=body)
                assert response.status_code == status, (name, response.text[:300])
                if status >= 400:
                    assert response.json()["error"]["message"], name
                if status == 500:
                    assert response.json()["error"]["type"] == "server_error", name
                    failed_ids.append(response.headers["x-request-id"])
                if name == "a streamed fault":  # a 200 stream that ends in an error event
                    assert '"type": "server_error"' in response.text and response.text.rstrip().endswith("[DONE]")
                    failed_ids.append(response.headers["x-request-id"])
            # a stream whose client goes away after two chunks
            with client.stream("POST", chat, json={**ok, "max_tokens": 200, "stream": True}) as dropped:
                lines = dropped.iter_lines()
                next(lines), next(lines)
            assert reader.is_alive(), "the stream ended before the bad requests were all in: it did not overlap them"
            reader.join(timeout=120)
            assert wait_for(lambda: scheduler.active == 0)
            assert client.get("/health").json()["status"] == "ok"
    assert streamed.get("error") is None and streamed["text"] == alone
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert all(request_id in logged for request_id in failed_ids)

