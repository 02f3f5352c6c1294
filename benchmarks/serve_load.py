"""Serving under load: pocketlm's HTTP server against llama-cpp-python's OpenAI server, SmolLM2-135M-Instruct.

Each server is started as a subprocess on a free port with the same thread count, warmed up with one
request, then loaded over its OpenAI-compatible streaming chat API (SSE) in two phases of --duration
seconds each:

1. single client: one streaming client sending chat requests back to back;
2. concurrent: --clients streaming clients doing the same; one request in --drop-every is abandoned by
   its client after 3 content chunks (the response is closed) and the client carries on with a new one.

Requests are short chat questions drawn (seeded) from a fixed list, greedy (temperature 0), --max-tokens
new tokens. pocketlm is sent `ignore_eos: true` and `stream_options.include_usage`, and its tokens are
counted from the final `usage` chunk; llama-cpp-python's server takes neither (unknown fields are
ignored, it sends no usage when streaming), so its tokens are the streamed chunks with non-empty content
and a request may stop early at end-of-sequence. llama-cpp-python runs with `--interrupt_requests False`:
its default lets each new request cut the running stream short, which is no service at all under load.

A phase ends at --duration: clients start nothing new, requests in flight run to their end (so none is
cut by the benchmark) and aggregate tokens/s counts only the tokens streamed inside the window.
Reported per server and phase: requests completed, errors (non-200, an error event in the stream, a
stream ending without [DONE]; should be zero), aggregate tokens/s, p50/p99 time to first token (request
sent to first content chunk), p50 per-request decode tokens/s ((tokens - 1) / (last chunk - first
chunk)); the concurrent/single ratio per server and pocketlm/llama.cpp at the same concurrency.
After the concurrent phase: how long pocketlm's /health took to show 0 active sequences, and whether its
request log (SQLite, table `requests`) holds each dropped request (matched by X-Request-Id) as status 499.
Memory: the server's resident set (VmRSS, children included) sampled every second during the
concurrent phase: after warm-up, max, end, and whether it stayed within 10% of the value at --settle s.

    .venv/bin/python benchmarks/serve_load.py [--duration 60] [--clients 32] [--max-tokens 64] [--drop-every 8]
        [--servers pocketlm,llama.cpp] [--threads 2] [--json out.json]

Smoke run: --duration 8 --clients 8 --max-tokens 16. The client runs on the same machine as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "pocketlm"
DEFAULT_MODEL = CACHE / "models" / "smollm2-135m-instruct"
DEFAULT_GGUF = CACHE / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVERS = ["pocketlm", "llama.cpp"]
DROP_AFTER_CHUNKS = 3

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in simple terms.",
    "Give me three tips for learning a new language.",
    "How does a refrigerator keep food cold?",
    "Write a short poem about the sea.",
    "What are the main causes of climate change?",
    "How do I make a cup of green tea?",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet.",
    "What is the difference between a virus and a bacterium?",
    "Suggest a name for a small coffee shop.",
    "How many legs does a spider have, and why?",
    "What should I pack for a weekend hiking trip?",
    "Explain what a prime number is.",
    "Describe how a bicycle works.",
    "What is machine learning?",
    "Give me a simple recipe for pancakes.",
    "Why do cats purr?",
    "How can I improve my sleep?",
    "What happened during the French Revolution?",
    "Translate 'good morning' into Spanish and German.",
    "What is the tallest mountain in the world?",
    "How do vaccines work?",
    "Write a haiku about autumn leaves.",
]


# ---------------------------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    ready_path: str
    log_path: Path
    db: Path | None = None
    proc: subprocess.Popen | None = None
    model: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        log.close()

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + self.ready_path, timeout=2)
                if r.status_code == 200:
                    self.model = httpx.get(self.url + "/v1/models", timeout=5).json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def rss_bytes(self) -> int:
        """VmRSS of the server process and its children."""
        procs = [psutil.Process(self.proc.pid)]
        try:
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            pass
        total = 0
        for p in procs:
            try:
                for line in open(f"/proc/{p.pid}/status"):
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total


def make_server(name: str, args, tmp: Path) -> Server:
    port = free_port()
    if name == "pocketlm":
        db = tmp / "log.db"
        cmd = [sys.executable, "-m", "pocketlm", "serve", str(args.model), "--port", str(port), "--db", str(db),
               "--max-batch", str(args.max_batch), "--max-context", str(args.max_context),
               "--threads", str(args.threads), "--dtype", args.dtype]
        return Server(name, cmd, port, "/health", tmp / "pocketlm.log", db=db)
    if name == "llama.cpp":
        cmd = [sys.executable, "-m", "pocketlm.llamacpp", "--model", str(args.gguf), "--port", str(port),
               "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", "2048",
               "--interrupt_requests", "False"]
        return Server(name, cmd, port, "/v1/models", tmp / "llama_cpp.log")
    raise SystemExit(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")


# ---------------------------------------------------------------------------------------------
# one streamed request
# ---------------------------------------------------------------------------------------------
@dataclass
class Result:
    sent: float
    first: float | None = None  # first content chunk
    last: float | None = None  # last content chunk
    chunk_times: list[float] = field(default_factory=list)
    usage_tokens: int | None = None
    finish: str | None = None
    done: bool = False  # saw data: [DONE]
    dropped: bool = False
    error: str | None = None
    request_id: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunk_times)

    def tokens_before(self, t: float) -> int:
        """Tokens streamed before time t: all of them if the request ended by then, else the chunks."""
        if self.last is not None and self.last <= t:
            return self.tokens
        return sum(1 for c in self.chunk_times if c <= t)


def request_body(server: Server, question: str, max_tokens: int) -> dict:
    body = {"model": server.model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    if server.name == "pocketlm":
        body.update(ignore_eos=True, stream_options={"include_usage": True})
    return body


def read_event(result: Result, data: str, now: float) -> None:
    event = json.loads(data)
    if "error" in event:
        result.error = f"error event: {json.dumps(event['error'])[:300]}"
        return
    if event.get("usage"):
        result.usage_tokens = event["usage"].get("completion_tokens")
    for choice in event.get("choices") or []:
        if (choice.get("delta") or {}).get("content"):
            result.first = result.first or now
            result.last = now
            result.chunk_times.append(now)
        result.finish = choice.get("finish_reason") or result.finish


async def one_request(client: httpx.AsyncClient, server: Server, body: dict, drop: bool) -> Result:
    result = Result(sent=time.perf_counter())
    try:
        async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
            result.request_id = response.headers.get("x-request-id")
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    result.done = True
                    break
                read_event(result, data, time.perf_counter())
                if result.error:
                    break
                if drop and len(result.chunk_times) >= DROP_AFTER_CHUNKS:
                    result.dropped = True
                    break  # leaving the block closes the response and its connection
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    if not (result.error or result.dropped or result.done):
        result.error = "stream ended without [DONE]"
    return result


# ---------------------------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------------------------
class DropCounter:
    """Every `every`-th request started in the phase (over all clients) is dropped; 0: none."""

    def __init__(self, every: int):
        self.every, self.n = every, 0

    def next(self) -> bool:
        self.n += 1
        return self.every > 0 and self.n % self.every == 0


async def client_loop(client, server: Server, args, seed: int, stop_at: float, drops: DropCounter, out: list):
    rng = random.Random(seed)
    while time.perf_counter() < stop_at:
        body = request_body(server, rng.choice(QUESTIONS), args.max_tokens)
        out.append(await one_request(client, server, body, drops.next()))


async def run_phase(server: Server, args, clients: int, drop_every: int, seed: int) -> tuple:
    """Returns the results, the phase start and the window end (start + duration)."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(connect=10, read=600, write=10, pool=600)
    results: list[Result] = []
    drops = DropCounter(drop_every)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        stop_at = start + args.duration
        await asyncio.gather(*(client_loop(client, server, args, seed * 1000 + i, stop_at, drops, results)
                               for i in range(clients)))
    return results, start, stop_at


async def sample_memory(server: Server, samples: list[tuple[float, int]], start: float) -> None:
    while True:
        samples.append((time.perf_counter() - start, server.rss_bytes()))
        await asyncio.sleep(1)


async def concurrent_phase(server: Server, args) -> tuple[tuple, list[tuple[float, int]]]:
    samples: list[tuple[float, int]] = []
    sampler = asyncio.create_task(sample_memory(server, samples, time.perf_counter()))
    try:
        phase = await run_phase(server, args, args.clients, args.drop_every, args.seed + 1)
    finally:
        sampler.cancel()
    samples.append((samples[-1][0] + 1 if samples else 0.0, server.rss_bytes()))
    return phase, samples


# ---------------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarise(results: list[Result], start: float, window_end: float, duration: float) -> dict:
    ok = [r for r in results if not r.error and not r.dropped]
    errors = [r for r in results if r.error]
    ttft = [r.first - r.sent for r in results if r.first is not None and not r.error]
    decode = [(r.tokens - 1) / (r.last - r.first) for r in ok if r.tokens > 1 and r.last > r.first]
    in_window = sum(r.tokens_before(window_end) for r in results if not r.error)
    ended = max((r.last or r.sent for r in results), default=window_end)
    return {
        "requests_completed": len(ok),
        "requests_dropped": sum(r.dropped for r in results),
        "errors": len(errors),
        "error_samples": sorted({r.error for r in errors})[:5],
        "no_finish_reason": sum(1 for r in ok if r.finish is None),
        "tokens_in_window": in_window,
        "aggregate_tokens_per_s": in_window / duration,
        "mean_tokens_per_request": statistics.mean(r.tokens for r in ok) if ok else None,
        "token_count": "usage" if ok and all(r.usage_tokens is not None for r in ok) else "content chunks",
        "usage_vs_chunks": [sum(r.tokens for r in ok), sum(len(r.chunk_times) for r in ok)],
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "decode_tokens_per_s_p50": percentile(decode, 0.5),
        "drain_s": max(0.0, ended - window_end),
        "dropped_request_ids": [r.request_id for r in results if r.dropped],
    }


def memory_summary(samples: list[tuple[float, int]], start_rss: int, settle: float) -> dict:
    ref_t, ref = next(((t, m) for t, m in samples if t >= settle), samples[-1])
    after = [m for t, m in samples if t >= ref_t]
    return {
        "rss_after_warmup_mb": start_rss / 2**20,
        "rss_at_settle_mb": ref / 2**20,
        "settle_s": ref_t,
        "rss_max_mb": max(m for _, m in samples) / 2**20,
        "rss_end_mb": samples[-1][1] / 2**20,
        "flat_within_10pct": all(abs(m - ref) <= 0.10 * ref for m in after),
        "samples": [(round(t, 1), round(m / 2**20, 1)) for t, m in samples],
    }


async def wait_idle(server: Server, timeout: float = 60) -> float | None:
    """Seconds until pocketlm's /health shows no active sequence and an empty queue; None on timeout."""
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=5) as client:
        while time.perf_counter() - start < timeout:
            health = (await client.get(server.url + "/health")).json()
            if health["active_sequences"] == 0 and health["queue_depth"] == 0:
                return time.perf_counter() - start
            await asyncio.sleep(0.05)
    return None


def logged_statuses(db: Path, ids: list[str], wait: float = 10) -> dict[str, int | None]:
    """Status of each request id in pocketlm's request log (the log is written by a background thread)."""
    deadline = time.monotonic() + wait
    while True:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            rows = dict(conn.execute(f"SELECT id, status FROM requests WHERE id IN ({','.join('?' * len(ids))})", ids))
        if len(rows) == len(ids) or time.monotonic() > deadline:
            return {i: rows.get(i) for i in ids}
        time.sleep(0.25)


# ---------------------------------------------------------------------------------------------
# one server, start to stop
# ---------------------------------------------------------------------------------------------
async def bench_server(server: Server, args) -> dict:
    async with httpx.AsyncClient(timeout=120) as client:
        warm = await one_request(client, server, request_body(server, QUESTIONS[0], args.max_tokens), False)
    if warm.error:
        raise RuntimeError(f"{server.name} warm-up failed: {warm.error}\n{server.log_tail()}")
    rss0 = server.rss_bytes()
    print(f"{server.name}: single client, {args.duration:g} s", file=sys.stderr, flush=True)
    single = summarise(*(await run_phase(server, args, 1, 0, args.seed)), args.duration)
    print(f"{server.name}: {args.clients} clients, {args.duration:g} s", file=sys.stderr, flush=True)
    (results, start, end), samples = await concurrent_phase(server, args)
    conc = summarise(results, start, end, args.duration)
    memory = memory_summary(samples, rss0, min(args.settle, args.duration / 2))
    out = {"single": single, "concurrent": conc, "memory": memory}
    if server.name == "pocketlm":
        out["freed"] = await check_freed(server, conc["dropped_request_ids"])
    return out


async def check_freed(server: Server, dropped: list[str]) -> dict:
    idle_s = await wait_idle(server)
    statuses = logged_statuses(server.db, dropped) if dropped else {}
    return {"idle_after_s": idle_s, "dropped": len(dropped),
            "logged_499": sum(s == 499 for s in statuses.values()),
            "logged_other": {i: s for i, s in statuses.items() if s != 499}}


def run_server(name: str, args, tmp: Path, bench=None) -> dict:
    """Start a server, run `bench(server, args)` (a coroutine function; default: this script's phases)
    against it, stop it; the result carries the command and the errors in the server's log."""
    server = make_server(name, args, tmp)
    print(f"{name}: starting: {' '.join(server.cmd)}", file=sys.stderr, flush=True)
    server.start()
    try:
        server.wait_ready()
        result = asyncio.run((bench or bench_server)(server, args))
        result["command"] = server.cmd
        result["errors_in_server_log"] = [line for line in server.log_tail(200_000).splitlines()
                                          if "Traceback" in line or "ERROR" in line][:10]
        return result
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or "cpu"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "pocketlm"], cwd=ROOT).returncode != 0
    return {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
            "pocketlm_commit": git.stdout.strip() + (" (pocketlm/ modified)" if dirty else ""),
            "llama_cpp_python": version("llama_cpp_python"), "torch": version("torch"), "httpx": version("httpx")}


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict, args) -> str:
    rows = ["| server | phase | requests | dropped | errors | tokens/s (aggregate) | TTFT p50 s | TTFT p99 s "
            "| decode tok/s p50 (per request) | tokens/request | tokens counted by |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for phase, label in (("single", "1 client"), ("concurrent", f"{args.clients} clients")):
            p = r[phase]
            rows.append(f"| {name} | {label} | {p['requests_completed']} | {p['requests_dropped']} | {p['errors']} "
                        f"| {fmt(p['aggregate_tokens_per_s'])} | {fmt(p['ttft_p50_s'], '.3f')} "
                        f"| {fmt(p['ttft_p99_s'], '.3f')} | {fmt(p['decode_tokens_per_s_p50'])} "
                        f"| {fmt(p['mean_tokens_per_request'])} | {p['token_count']} |")
    return "\n".join(rows)


def engine_decode(args) -> float | None:
    """The engine's batch-1 decode tokens/s on the same model and threads, in this run (`pocketlm bench`):
    what one stream through the server is held to."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        command = [sys.executable, "-m", "pocketlm", "bench", str(args.model), "--tokens", str(args.max_tokens),
                   "--batch", "1", "--repeats", "3", "--threads", str(args.threads), "--json", str(out)]
        print("pocketlm: the engine's batch-1 decode speed", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"engine measurement failed: {done.stderr[-2000:]}", file=sys.stderr)
            return None
        return json.loads(out.read_text())["results"][0]["decode_tokens_per_s"]


def findings(results: dict, args) -> list[str]:
    lines = []
    ours = results.get("pocketlm", {})
    if ours.get("engine_decode_tokens_per_s") and "single" in ours:
        engine, stream = ours["engine_decode_tokens_per_s"], ours["single"]["decode_tokens_per_s_p50"]
        lines.append(f"- pocketlm: one stream decodes at {fmt(stream)} tokens/s (p50), the engine at batch 1 at "
                     f"{engine:.1f} in this run: {fmt(100 * stream / engine if stream else None, '.0f')}% "
                     "(goal >= 90%)")
    if "concurrent" in ours:
        c = ours["concurrent"]
        lines.append(f"- pocketlm: {args.clients} clients: {fmt(c['aggregate_tokens_per_s'])} tokens/s, time to first "
                     f"token p99 {fmt(c['ttft_p99_s'], '.2f')} s (goal <= 1 s), errors {c['errors']} (goal 0)")
    for name, r in results.items():
        single, conc = r["single"]["aggregate_tokens_per_s"], r["concurrent"]["aggregate_tokens_per_s"]
        mem = r["memory"]
        ratio = conc / single if single else None
        r["concurrent_over_single"] = ratio
        goal = " (goal >= 8x: " + ("met" if ratio and ratio >= 8 else "not met") + ")" if name == "pocketlm" else ""
        lines.append(f"- {name}: {args.clients} clients / 1 client aggregate tokens/s = {fmt(ratio, '.2f')}x{goal}")
        lines.append(f"- {name}: resident memory after warm-up {mem['rss_after_warmup_mb']:.0f} MB, at "
                     f"{mem['settle_s']:.0f} s of load {mem['rss_at_settle_mb']:.0f} MB, "
                     f"max {mem['rss_max_mb']:.0f} MB, "
                     f"end {mem['rss_end_mb']:.0f} MB; flat within 10% after {mem['settle_s']:.0f} s: "
                     f"{'yes' if mem['flat_within_10pct'] else 'NO'}")
        if r["concurrent"]["no_finish_reason"]:
            lines.append(f"- {name}: {r['concurrent']['no_finish_reason']} requests ended with [DONE] "
                         "but no finish_reason")
    if "freed" in results.get("pocketlm", {}):
        f = results["pocketlm"]["freed"]
        lines.append(f"- pocketlm: {f['dropped']} requests dropped after {DROP_AFTER_CHUNKS} chunks; /health showed 0 "
                     f"active sequences {fmt(f['idle_after_s'], '.2f')} s after the phase"
                     f"{'' if f['idle_after_s'] is not None else ' (NOT within 60 s)'}; request log: "
                     f"{f['logged_499']}/{f['dropped']} recorded as 499"
                     + (f", others: {f['logged_other']}" if f["logged_other"] else ""))
    if len(results) == 2:
        ours, peer = (results[n]["concurrent"]["aggregate_tokens_per_s"] for n in SERVERS)
        ours1, peer1 = (results[n]["single"]["aggregate_tokens_per_s"] for n in SERVERS)
        lines.append(f"- pocketlm / llama.cpp aggregate tokens/s: {fmt(ours / peer if peer else None, '.2f')}x at "
                     f"{args.clients} clients, {fmt(ours1 / peer1 if peer1 else None, '.2f')}x at 1 client")
    return lines


def run_servers(args, bench=None) -> tuple[dict, dict]:
    """Run `bench` (see run_server) against each server of --servers in turn; one that fails is reported and
    skipped, and none left is exit 1. Prints the machine's line; returns the results and the machine."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started with SIGINT ignored
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # either way the finally blocks stop the servers
    results = {}
    with tempfile.TemporaryDirectory(prefix="pocketlm-serve-bench-") as tmp:
        for name in args.servers.split(","):
            try:
                results[name] = run_server(name, args, Path(tmp), bench)
            except RuntimeError as exc:
                print(f"{name}: failed: {exc}", file=sys.stderr)
    if not results:
        raise SystemExit(1)
    info = machine()
    print(f"machine: {info['cpu']}, {info['nproc']} cores; server threads {args.threads}; pocketlm "
          f"{info['pocketlm_commit']}, llama-cpp-python {info['llama_cpp_python']}, torch {info['torch']}")
    return results, info


def server_arguments(ap: argparse.ArgumentParser, model: Path, duration: float, max_context: int,
                     duration_help: str) -> None:
    """The options of a run against the servers (this script's and serve_soak.py's): which servers and
    models, how they are started, how long and how many clients."""
    ap.add_argument("--model", type=Path, default=model, help="pocketlm model directory")
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="GGUF file for llama-cpp-python's server")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--duration", type=float, default=duration, help=duration_help)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=32, help="pocketlm --max-batch")
    ap.add_argument("--max-context", type=int, default=max_context, help="pocketlm --max-context")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="pocketlm --dtype")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server_arguments(ap, DEFAULT_MODEL, 60, 1024, "seconds per phase")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--drop-every", type=int, default=8, help="drop one request in N in the concurrent phase (0: none)")
    ap.add_argument("--settle", type=float, default=10, help="memory reference time into the concurrent phase")
    args = ap.parse_args()
    engine = engine_decode(args) if "pocketlm" in args.servers.split(",") else None
    results, info = run_servers(args)
    if engine and "pocketlm" in results:
        results["pocketlm"]["engine_decode_tokens_per_s"] = engine
    print(f"SmolLM2-135M-Instruct (pocketlm in {args.dtype}, llama.cpp the Q4_1 GGUF); streaming chat, greedy, max_tokens {args.max_tokens}; "
          f"{args.duration:g} s per phase; {args.clients} clients, 1 request in {args.drop_every} dropped "
          f"after {DROP_AFTER_CHUNKS} chunks\n")
    print(table(results, args))
    print()
    print("\n".join(findings(results, args)))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                               "results": results}, indent=2))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted; servers stopped")
