"""Soak: a server under 32 clients for minutes, each request's parameters drawn from the whole range the
API accepts, with hostile bodies and dropped streams mixed in. pocketlm's server and llama-cpp-python's
OpenAI server (the peer) take the same mix in the same run, one after the other, each started as in
serve_load.py (a subprocess on a free port, the same thread count).

Each client sends, back to back until --duration is up, one of (weights in KINDS):
- canary: a greedy chat question (non-streamed, 24 tokens); its answer must equal the answer the same
  server gave to it alone before the load started: a neighbour in the batch changed nothing;
- sampled chat / sampled completion: temperature in [0, 2] with its extremes (0, 5e-324, 1e-60, 2),
  top_p in (0, 1] with 1e-300 and 5e-324, top_k up to 10**6, any integer seed (2**70, negative ones),
  penalties in [-2, 2], logit_bias of +-100 on random token ids, n up to 4, logprobs and top_logprobs
  up to 20, stop strings, echo, text or token-id prompts, streamed or not;
- hostile: malformed JSON, invalid UTF-8, wrong types, values out of range, an unknown model, a prompt
  over the context, token ids outside the vocabulary, a body over the size limit (sent whole, and
  chunked), a logit_bias key that is no token id;
- dropped: a streamed chat its client closes after 1-5 chunks.

Reported per server: requests served, by status class; 5xx answers and transport failures (a reset,
a stream cut without [DONE]); canary mismatches; hostile requests answered 4xx; /health polled every
2 s (failures); resident memory (VmRSS) every second, flat within 10% after --settle s or not; after the
load, how long until /health showed no active sequence, and (pocketlm) whether the request log holds
every dropped stream as 499.

    .venv/bin/python benchmarks/serve_soak.py [--duration 300] [--clients 32] [--servers pocketlm,llama.cpp]
        [--model DIR] [--gguf FILE] [--json out.json]

The default pocketlm model is SmolLM2-135M-Instruct quantized to int4 (made from the pulled model on
first use); the peer serves the Q4_1 GGUF it came from. Smoke run: --duration 20 --clients 8.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import (CACHE, QUESTIONS, Server, logged_statuses, memory_summary, run_servers,  # noqa: E402
                        server_arguments, wait_idle)

DEFAULT_MODEL = CACHE / "models" / "smollm2-135m-instruct-int4"
KINDS = {"canary": 10, "sampled chat": 35, "sampled completion": 20, "hostile": 20, "dropped": 15}
CANARIES = QUESTIONS[:6]
CANARY_TOKENS = 24
WORDS = ["the", "cat", "and", "stop", "\n", "Paris", ".", "a", "é", "日本", "🙂", ""]


@dataclass
class Outcome:
    kind: str
    status: int | None = None  # None: no HTTP answer
    # "server error" (a 5xx), "server error event" (a 200 stream ending in one), "error event" (another error in
    # a stream), "transport" (no answer: a reset, a timeout), "stream cut" (no [DONE]) or "canary changed"
    problem: str | None = None
    detail: str = ""
    seconds: float = 0.0
    request_id: str | None = None

    def fail(self, problem: str, detail: str) -> None:
        self.problem, self.detail = problem, detail[:300]


# ---------------------------------------------------------------------------------------------
# what the clients send
# ---------------------------------------------------------------------------------------------
def temperature(rng: random.Random) -> float:
    return rng.choice([0.0, 5e-324, 1e-60, 1e-5, 2.0, rng.uniform(0, 2), rng.uniform(0, 2)])


def sampling(rng: random.Random, vocab: int) -> dict:
    body = {"temperature": temperature(rng),
            "top_p": rng.choice([1.0, 1e-300, 5e-324, rng.uniform(0, 1) or 1.0]),
            "max_tokens": rng.randint(1, 48)}
    if rng.random() < 0.5:
        body["top_k"] = rng.choice([0, 1, 40, 10**6])
    if rng.random() < 0.5:
        body["seed"] = rng.choice([0, 2**70, -1, -(2**80), rng.getrandbits(64)])
    if rng.random() < 0.4:
        body["presence_penalty"], body["frequency_penalty"] = rng.uniform(-2, 2), rng.choice([-2.0, 2.0, 0.5])
    if rng.random() < 0.3:
        body["logit_bias"] = {str(rng.randrange(vocab)): rng.choice([-100, 100, 7.5]) for _ in range(rng.randint(1, 8))}
    if rng.random() < 0.3:
        body["stop"] = rng.sample(WORDS, rng.randint(1, 4))
    if rng.random() < 0.3:
        body["n"] = rng.randint(1, 4)
    return body


def sampled_chat(rng: random.Random, model: str, vocab: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], **sampling(rng, vocab),
            "stream": rng.random() < 0.5}
    if rng.random() < 0.3:
        body["messages"].insert(0, {"role": "system", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))})
    if rng.random() < 0.3:
        body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 20)
    return body


def sampled_completion(rng: random.Random, model: str, vocab: int) -> dict:
    prompt = rng.choice(QUESTIONS) if rng.random() < 0.7 else [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
    body = {"model": model, "prompt": prompt, **sampling(rng, vocab), "stream": rng.random() < 0.4}
    if rng.random() < 0.3:
        body["logprobs"] = rng.randint(0, 5)
        body["echo"] = not body["stream"] and rng.random() < 0.5
    return body


def hostile(rng: random.Random, model: str, max_body: int, vocab: int) -> tuple[str, bytes | dict | list]:
    """(path, body): bytes are sent as they are, anything else as JSON; a body over the limit is bytes,
    sent half the time without a Content-Length (chunked)."""
    ok = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    big = "x" * (max_body + rng.randint(1, 3 * max_body))
    cases = [
        ("/v1/chat/completions", b'{"model": "' + model.encode() + b'", "messages": ['),
        ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe\x80"}]}'),
        ("/v1/chat/completions", [1, 2, 3]),
        ("/v1/chat/completions", {**ok, "messages": "hi"}),
        ("/v1/chat/completions", {**ok, "temperature": rng.choice([-1, 2.5, "hot", None, [1]])}),
        ("/v1/chat/completions", {**ok, "top_p": rng.choice([0, -0.5, 1.5])}),
        ("/v1/chat/completions", {**ok, "max_tokens": rng.choice([-5, 0, 10**12, 2**70])}),
        ("/v1/chat/completions", {**ok, "model": "gpt-9"}),
        ("/v1/chat/completions", {**ok, "messages": [{"role": "wizard", "content": "x"}]}),
        ("/v1/chat/completions", {**ok, "logit_bias": {"not-a-token": 5}}),
        ("/v1/chat/completions", json.dumps({**ok, "messages": [{"role": "user", "content": big}]}).encode()),
        ("/v1/completions", {"model": model, "prompt": "word " * 3000, "max_tokens": 4}),
        ("/v1/completions", {"model": model, "prompt": [1, 2, vocab + rng.randrange(10**6)], "max_tokens": 4}),
        ("/v1/completions", {"model": model, "prompt": [], "max_tokens": 4}),
        ("/v1/completions", {"model": model, "prompt": {"nested": ["x"]}}),
    ]
    return rng.choice(cases)


def canary_body(model: str, question: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": CANARY_TOKENS,
            "temperature": 0}


# ---------------------------------------------------------------------------------------------
# sending
# ---------------------------------------------------------------------------------------------
async def post(client: httpx.AsyncClient, url: str, body, outcome: Outcome, drop_after: int | None = None) -> str:
    """Send one request, read the whole answer (or drop a stream after `drop_after` chunks); fills `outcome`
    and returns the text of the first choice of a non-streamed chat answer."""
    if isinstance(body, bytes):
        request = client.build_request("POST", url, content=body, headers={"Content-Type": "application/json"})
    else:
        request = client.build_request("POST", url, json=body)
    response = await client.send(request, stream=True)
    try:
        outcome.status = response.status_code
        outcome.request_id = response.headers.get("x-request-id")
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
        if not streamed:
            payload = await response.aread()
            if response.status_code >= 500:
                outcome.fail("server error", payload.decode(errors="replace"))
            if response.status_code == 200 and isinstance(body, dict) and "messages" in body:
                return json.loads(payload)["choices"][0]["message"]["content"]
            return ""
        chunks, done = 0, False
        async for line in response.aiter_lines():
            if line.startswith("data: [DONE]"):
                done = True
            elif line.startswith("data: {"):
                chunks += 1
                if line.startswith('data: {"error"'):
                    server_side = '"server_error"' in line
                    outcome.fail("server error event" if server_side else "error event", line[6:])
                if drop_after is not None and chunks >= drop_after:
                    return ""  # closing the response here drops the stream
        if not done:
            outcome.fail("stream cut", "the stream ended without [DONE]")
        return ""
    finally:
        await response.aclose()


async def one(client, server: Server, rng: random.Random, kind: str, args, canaries: dict[str, str]) -> Outcome:
    outcome = Outcome(kind)
    started = time.perf_counter()
    url = server.url
    try:
        if kind == "canary":
            question = rng.choice(CANARIES)
            text = await post(client, url + "/v1/chat/completions", canary_body(server.model, question), outcome)
            if outcome.status == 200 and text != canaries[question]:
                outcome.fail("canary changed", f"{text[:80]!r} != {canaries[question][:80]!r}")
        elif kind == "sampled chat":
            await post(client, url + "/v1/chat/completions", sampled_chat(rng, server.model, args.vocab), outcome)
        elif kind == "sampled completion":
            await post(client, url + "/v1/completions", sampled_completion(rng, server.model, args.vocab), outcome)
        elif kind == "hostile":
            path, body = hostile(rng, server.model, args.max_body, args.vocab)
            if isinstance(body, bytes) and len(body) > args.max_body and rng.random() < 0.5:
                request = client.build_request("POST", url + path, content=chunked(body),
                                               headers={"Content-Type": "application/json"})
                response = await client.send(request)
                outcome.status = response.status_code
                if response.status_code >= 500:
                    outcome.fail("server error", response.text)
            else:
                await post(client, url + path, body, outcome)
        else:  # dropped
            body = {**sampled_chat(rng, server.model, args.vocab), "stream": True, "max_tokens": 200, "n": 1}
            await post(client, url + "/v1/chat/completions", body, outcome, drop_after=rng.randint(1, 5))
    except httpx.HTTPError as exc:
        outcome.fail("transport", f"{type(exc).__name__}: {exc}")
    outcome.seconds = time.perf_counter() - started
    return outcome


async def chunked(data: bytes, size: int = 65536):
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def client_loop(server: Server, args, seed: int, stop_at: float, canaries: dict, out: list) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items())
    timeout = httpx.Timeout(connect=10, read=args.request_timeout, write=60, pool=60)
    async with httpx.AsyncClient(timeout=timeout) as client:
        while time.perf_counter() < stop_at:
            out.append(await one(client, server, rng, rng.choices(kinds, weights)[0], args, canaries))


async def poll_health(server: Server, failures: list, every: float = 2.0) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            try:
                response = await client.get(server.url + "/health" if server.name == "pocketlm" else
                                            server.url + "/v1/models")
                if response.status_code != 200:
                    failures.append(f"HTTP {response.status_code}")
            except httpx.HTTPError as exc:
                failures.append(type(exc).__name__)
            await asyncio.sleep(every)


async def sample_memory(server: Server, samples: list, start: float) -> None:
    while True:
        samples.append((time.perf_counter() - start, server.rss_bytes()))
        await asyncio.sleep(1)


async def soak(server: Server, args) -> dict:
    canaries = {}
    async with httpx.AsyncClient(timeout=300) as client:
        for question in CANARIES:  # each alone, before any load: the answers the load must not change
            outcome = Outcome("canary")
            canaries[question] = await post(client, server.url + "/v1/chat/completions",
                                            canary_body(server.model, question), outcome)
            if outcome.status != 200:
                raise RuntimeError(f"{server.name}: the canary question failed alone: {outcome}")
    rss0 = server.rss_bytes()
    print(f"{server.name}: {args.clients} clients for {args.duration:g} s", file=sys.stderr, flush=True)
    outcomes: list[Outcome] = []
    samples: list = []
    health_failures: list = []
    start = time.perf_counter()
    watchers = [asyncio.create_task(sample_memory(server, samples, start)),
                asyncio.create_task(poll_health(server, health_failures))]
    try:
        await asyncio.gather(*(client_loop(server, args, args.seed * 1000 + i, start + args.duration, canaries,
                                           outcomes) for i in range(args.clients)))
    finally:
        for watcher in watchers:
            watcher.cancel()
    wall = time.perf_counter() - start
    samples.append((wall, server.rss_bytes()))
    result = summarise(outcomes, wall)
    result["memory"] = memory_summary(samples, rss0, min(args.settle, args.duration / 2))
    result["health_failures"] = len(health_failures)
    dropped = [o.request_id for o in outcomes if o.kind == "dropped" and o.request_id and o.status == 200]
    if server.name == "pocketlm":
        result["idle_after_s"] = await wait_idle(server)
        statuses = logged_statuses(server.db, dropped) if dropped else {}
        result["dropped_logged_499"] = sum(s == 499 for s in statuses.values())
        result["dropped_logged_other"] = collections.Counter(str(s) for s in statuses.values() if s != 499)
    result["dropped_streams"] = sum(o.kind == "dropped" for o in outcomes)
    return result


def summarise(outcomes: list[Outcome], wall: float) -> dict:
    by_class = collections.Counter("none" if o.status is None else f"{o.status // 100}xx" for o in outcomes)
    by_kind = {kind: collections.Counter("none" if o.status is None else str(o.status)
                                         for o in outcomes if o.kind == kind) for kind in KINDS}
    problems = collections.Counter(o.problem for o in outcomes if o.problem)
    canaries = [o for o in outcomes if o.kind == "canary"]
    hostile = [o for o in outcomes if o.kind == "hostile"]
    return {
        "requests": len(outcomes), "wall_s": wall, "requests_per_s": len(outcomes) / wall,
        "by_class": dict(by_class), "by_kind": {k: dict(v) for k, v in by_kind.items()},
        # a 5xx answer, or a 200 stream that ended in a server error event
        "server_errors_5xx": problems["server error"] + problems["server error event"],
        "transport_failures": problems["transport"] + problems["stream cut"],
        "problems": dict(problems),
        "canaries": len(canaries), "canary_mismatches": problems["canary changed"],
        "hostile": len(hostile), "hostile_4xx": sum(1 for o in hostile if o.status and 400 <= o.status < 500),
        "problem_samples": sorted({f"{o.kind}: {o.status}: {o.problem}: {o.detail}" for o in outcomes if o.problem})[:8],
        "latency_p50_s": statistics.median(o.seconds for o in outcomes) if outcomes else None,
    }


def ensure_int4(model: Path) -> None:
    """The default model: SmolLM2-135M-Instruct in int4, quantized once from the pulled model."""
    if model.exists() or model != DEFAULT_MODEL:
        return
    from pocketlm.hub import pull
    from pocketlm.quant import QuantScheme
    from pocketlm.quantize import quantize_dir

    print(f"quantizing SmolLM2-135M-Instruct to int4 into {model}", file=sys.stderr, flush=True)
    quantize_dir(pull("smollm2-135m-instruct"), model, QuantScheme("int4", 32))


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def table(results: dict) -> str:
    rows = ["| server | requests | req/s | 2xx | 4xx | 5xx | transport failures | canaries changed | hostile answered 4xx "
            "| dropped streams | /health failures | RSS MB at --settle s / max / end | flat within 10% |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        c, m = r["by_class"], r["memory"]
        rows.append(f"| {name} | {r['requests']} | {r['requests_per_s']:.1f} | {c.get('2xx', 0)} | {c.get('4xx', 0)} "
                    f"| {r['server_errors_5xx']} | {r['transport_failures']} | {r['canary_mismatches']}/{r['canaries']} "
                    f"| {r['hostile_4xx']}/{r['hostile']} | {r['dropped_streams']} | {r['health_failures']} "
                    f"| {m['rss_at_settle_mb']:.0f} / {m['rss_max_mb']:.0f} / {m['rss_end_mb']:.0f} "
                    f"| {'yes' if m['flat_within_10pct'] else 'NO'} |")
    return "\n".join(rows)


def findings(results: dict) -> list[str]:
    lines = []
    for name, r in results.items():
        lines.append(f"- {name}: statuses by kind: " + "; ".join(
            f"{kind} {dict(sorted(counts.items()))}" for kind, counts in r["by_kind"].items()))
        if "idle_after_s" in r:
            idle = r["idle_after_s"]
            lines.append(f"- {name}: /health showed 0 active sequences "
                         + (f"{idle:.2f} s after the load" if idle is not None else "NOT within 60 s")
                         + f"; dropped streams in the request log as 499: {r['dropped_logged_499']}"
                         + (f", otherwise {dict(r['dropped_logged_other'])}" if r["dropped_logged_other"] else ""))
        for sample in r["problem_samples"]:
            lines.append(f"- {name}: {sample}")
        for line in r["errors_in_server_log"]:
            lines.append(f"- {name} server log: {line[:200]}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server_arguments(ap, DEFAULT_MODEL, 300, 2048, "seconds of load per server")
    ap.add_argument("--max-body", type=int, default=1 << 20, help="the server's body limit (pocketlm's default)")
    ap.add_argument("--vocab", type=int, default=49152, help="the model's vocabulary (SmolLM2's): token ids drawn below it")
    ap.add_argument("--request-timeout", type=float, default=300, help="seconds a client waits for an answer")
    ap.add_argument("--settle", type=float, default=30, help="memory reference time into the load")
    args = ap.parse_args()
    ensure_int4(args.model)
    results, info = run_servers(args, soak)
    print(f"pocketlm: {args.model.name} ({args.dtype}); llama.cpp: {args.gguf.name}; {args.clients} clients for "
          f"{args.duration:g} s each; mix {KINDS}\n")
    print(table(results))
    print()
    print("\n".join(findings(results)))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                               "results": results}, indent=2, default=str))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted; servers stopped")
