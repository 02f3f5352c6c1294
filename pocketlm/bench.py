"""Efficiency measurements of one model, and of its peers on the same weights.

`bench_pocketlm` measures a model directory: load time, prefill tokens/s, time to first token, batch-1
decode tokens/s, aggregate decode tokens/s at larger batches, peak memory, file size and the weight
bytes read per decoded token (for the fraction of the memory-bandwidth limit). `bench_transformers`
and `bench_llama_cpp` measure the same things for the peers, in the same process, so a `pocketlm
bench --vs ...` run prints ratios taken minutes apart at most on a noisy machine.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import WEIGHTS, read_quant_scheme
from .engine import SamplingParams, compile_decoder, generate_batch, generate_tokens
from .kernels import decode_step
from .llamacpp import open_llama
from .loading import open_model

PROMPT_TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
               "salt, grain and cloth. Over the centuries it grew into a market town, then a port, and finally ")


@dataclass
class BenchResult:
    name: str
    weights: str
    file_mb: float
    load_s: float
    prefill_tokens_per_s: float
    ttft_ms: float  # time to first token for the benchmark prompt
    decode_tokens_per_s: float  # batch 1, median over repeats
    batch_tokens_per_s: dict[int, float] = field(default_factory=dict)  # aggregate, per batch size
    peak_rss_mb: float = 0.0  # resident memory growth while loading and running
    bytes_per_token: int | None = None  # weight bytes read per decoded token
    macs_per_token: int | None = None  # matrix multiply-adds per decoded token
    threads: int = 0
    notes: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class PeakRSS:
    """Samples this process's resident memory every few ms; `.peak_mb` is the growth over the start."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def read_bandwidth_gbs(megabytes: int = 512) -> float:
    """Memory read bandwidth with torch's threads (as the decode kernels read the weights): one pass summing
    a large array (best of 3), in GB/s. One thread alone reads about a quarter less on 2-core EPYCs."""
    data = torch.ones(megabytes * 2**20 // 8, dtype=torch.int64)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 8 / best / 1e9


def integer_peak_gmacs() -> float | None:
    """The CPU's int8 multiply-add peak on torch's threads with the instruction set the qdot kernels use
    (best of 3), in G multiply-adds/s: the limit batched decoding of quantized models is set against. None
    where pocketlm's kernels are not in use."""
    from .kernels import cpu_ops

    if not cpu_ops.available() or cpu_ops.mode() != "qdot":
        return None
    return max(torch.ops.pocketlm.qdot_peak(2_000_000) for _ in range(3))


def macs_per_token(model) -> int:
    """Multiply-adds of a decode step's matrix products per row (every linear layer, the head included;
    attention's, which grow with the context, left out)."""
    return sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "in_features")
               and hasattr(m, "out_features") and not isinstance(m, torch.nn.Embedding))


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a batch-1 decode step reads: every matrix once (a tied head once), plus one
    embedding row."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen or ".cache." in name:  # a tied head counted once; no KV cache
            continue
        seen.add(t.data_ptr())
        if name.startswith("model.embed_tokens.") and not model.config.tie_word_embeddings:
            total += t[0].numel() * t.element_size()  # one row is looked up
        else:
            total += t.numel() * t.element_size()
    return total


def _prompt_ids(tokenizer, tokens: int) -> list[int]:
    ids = tokenizer.encode(PROMPT_TEXT * (tokens // 20 + 2), add_special_tokens=False)
    return ids[:tokens]


def bench_pocketlm(model_dir: str | Path, new_tokens: int = 128, prompt_tokens: int = 128, batches=(8,),
                   repeats: int = 3, compile: bool = True, name: str = "pocketlm") -> BenchResult:
    model_dir = Path(model_dir)
    with PeakRSS() as mem:
        started = time.perf_counter()
        model, tokenizer = open_model(model_dir)
        load_s = time.perf_counter() - started
        if compile:
            compile_decoder(model)
        ids = _prompt_ids(tokenizer, prompt_tokens)
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        list(generate_tokens(model, ids, SamplingParams(max_new_tokens=4)))  # warm-up (and compile)
        prefill, ttft, decode = [], [], []
        with torch.inference_mode():
            for _ in range(repeats):
                model.setup_cache(1, prompt_tokens)
                started = time.perf_counter()
                model(torch.tensor([ids]), last_only=True)
                prefill.append(len(ids) / (time.perf_counter() - started))
                model.clear_cache()
        for _ in range(repeats):
            started = time.perf_counter()
            first = None
            count = 0
            for _token in generate_tokens(model, ids, params):
                count += 1
                if first is None:
                    first = time.perf_counter()
            end = time.perf_counter()
            ttft.append((first - started) * 1e3)
            decode.append((count - 1) / (end - first))
        batch_speed = {}
        for b in batches:
            prompts = [ids[: max(8, len(ids) - 7 * i)] for i in range(b)]  # different lengths
            generate_batch(model, prompts, SamplingParams(max_new_tokens=4))  # warm-up (and compile)
            started = time.perf_counter()
            outs = generate_batch(model, prompts, params)
            batch_speed[b] = sum(len(o) for o in outs) / (time.perf_counter() - started)
    scheme = read_quant_scheme(model_dir)
    native = decode_step.serves(model)  # the whole-step kernel decodes (see pocketlm.kernels.decode_step)
    weights = scheme.describe() if scheme else str(model.compute_dtype).removeprefix("torch.").replace("float32", "fp32")
    return BenchResult(
        name=name, weights=weights + (" native step" if native else " compiled" if compile else ""),
        file_mb=(model_dir / WEIGHTS).stat().st_size / 2**20, load_s=load_s,
        prefill_tokens_per_s=statistics.median(prefill), ttft_ms=statistics.median(ttft),
        decode_tokens_per_s=statistics.median(decode), batch_tokens_per_s=batch_speed, peak_rss_mb=mem.peak_mb,
        bytes_per_token=weight_bytes_per_token(model), macs_per_token=macs_per_token(model),
        threads=torch.get_num_threads(),
    )


def bench_transformers(model_dir: str | Path, new_tokens: int = 128, prompt_tokens: int = 128,
                       repeats: int = 3, dtype: torch.dtype = torch.float32) -> BenchResult:
    """transformers on the same (float) model directory, greedy via `generate`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    with PeakRSS() as mem:
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        load_s = time.perf_counter() - started
        ids = torch.tensor([tokenizer(PROMPT_TEXT * (prompt_tokens // 20 + 2), add_special_tokens=False).input_ids[:prompt_tokens]])
        kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))

        def timed(n: int) -> float:
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
            return time.perf_counter() - started

        timed(4)
        ttft, decode, prefill = [], [], []
        with torch.inference_mode():
            for _ in range(repeats):
                started = time.perf_counter()
                model(ids)
                prefill.append(ids.shape[1] / (time.perf_counter() - started))
        for _ in range(repeats):
            first = timed(1)
            total = timed(new_tokens)
            ttft.append(first * 1e3)
            decode.append((new_tokens - 1) / max(total - first, 1e-9))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return BenchResult(
        name="transformers", weights=str(dtype).removeprefix("torch."), file_mb=_dir_weights_mb(model_dir),
        load_s=load_s, prefill_tokens_per_s=statistics.median(prefill), ttft_ms=statistics.median(ttft),
        decode_tokens_per_s=statistics.median(decode), peak_rss_mb=mem.peak_mb, bytes_per_token=nbytes,
        threads=torch.get_num_threads(),
    )


def _dir_weights_mb(model_dir: Path) -> float:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20


def bench_llama_cpp(gguf_path: str | Path, new_tokens: int = 128, prompt_tokens: int = 128, repeats: int = 3,
                    threads: int | None = None, tokenizer=None, amx: bool = False) -> BenchResult:
    """llama-cpp-python on a GGUF file: the same prompt tokens, greedy, EOS suppressed.

    `amx` runs llama.cpp with its AMX buffers on a CPU that has AMX, where they crash on batched prompts
    (see pocketlm.llamacpp): the prompt is then fed one token at a time, which makes the prefill figure
    slow, but the decode figure is llama.cpp's fastest on that machine."""
    from llama_cpp import Llama

    threads = threads or torch.get_num_threads()
    gguf_path = Path(gguf_path)
    with PeakRSS() as mem:
        started = time.perf_counter()
        opener = Llama if amx else open_llama
        llm = opener(model_path=str(gguf_path), n_threads=threads, n_ctx=max(512, prompt_tokens + new_tokens + 8),
                     n_batch=512, verbose=False)
        load_s = time.perf_counter() - started
        text = PROMPT_TEXT * (prompt_tokens // 20 + 2)
        ids = (tokenizer.encode(text, add_special_tokens=False) if tokenizer is not None
               else llm.tokenize(text.encode(), add_bos=False))[:prompt_tokens]

        def feed(tokens):
            if amx:
                for token in tokens:
                    llm.eval([token])
            else:
                llm.eval(tokens)

        def run(n: int):
            llm.reset()
            stamps = []
            started = time.perf_counter()
            if amx:  # a greedy loop of one-token evaluations (generate() would evaluate a batch)
                feed(ids)
                for _ in range(n):
                    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                    stamps.append(time.perf_counter())
                    llm.eval([token])
                return started, stamps
            for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True, logits_processor=None):
                stamps.append(time.perf_counter())
                if len(stamps) >= n:
                    break
            return started, stamps

        run(4)
        ttft, decode, prefill = [], [], []
        for _ in range(repeats):
            llm.reset()
            started = time.perf_counter()
            feed(ids)
            prefill.append(len(ids) / (time.perf_counter() - started))
        for _ in range(repeats):
            started, stamps = run(new_tokens)
            ttft.append((stamps[0] - started) * 1e3)
            decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return BenchResult(
        name="llama.cpp", weights=_gguf_type(gguf_path) + (" AMX, prompt token by token" if amx else ""),
        file_mb=gguf_path.stat().st_size / 2**20, load_s=load_s,
        prefill_tokens_per_s=statistics.median(prefill), ttft_ms=statistics.median(ttft),
        decode_tokens_per_s=statistics.median(decode), peak_rss_mb=mem.peak_mb,
        bytes_per_token=_gguf_tensor_bytes(gguf_path), threads=threads,
    )


def _gguf_type(path: Path) -> str:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return "GGUF " + max(counts, key=counts.get)


def _gguf_tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def format_table(results: list[BenchResult], bandwidth_gbs: float | None = None, peak_gmacs: float | None = None) -> str:
    """The results as a Markdown table; with the machine's limits, decode speed as a share of the bandwidth
    limit (batch 1) and the largest batch's speed as a share of the integer multiply-add peak."""
    batches = sorted({b for r in results for b in r.batch_tokens_per_s})
    head = ["", "weights", "file MB", "load s", "prefill tok/s", "TTFT ms", "decode tok/s"]
    head += [f"batch {b} tok/s" for b in batches] + ["peak MB"]
    if bandwidth_gbs:
        head.append("of bandwidth limit")
    if peak_gmacs and batches:
        head.append(f"batch {batches[-1]} of int8 peak")
    rows = []
    for r in results:
        row = [r.name, r.weights, f"{r.file_mb:.0f}", f"{r.load_s:.2f}", f"{r.prefill_tokens_per_s:.0f}",
               f"{r.ttft_ms:.0f}", f"{r.decode_tokens_per_s:.1f}"]
        row += [f"{r.batch_tokens_per_s[b]:.0f}" if b in r.batch_tokens_per_s else "-" for b in batches]
        row.append(f"{r.peak_rss_mb:.0f}")
        if bandwidth_gbs:
            limit = bandwidth_gbs * 1e9 / r.bytes_per_token if r.bytes_per_token else None
            row.append(f"{100 * r.decode_tokens_per_s / limit:.0f}% of {limit:.0f} tok/s" if limit else "-")
        if peak_gmacs and batches:
            speed = r.batch_tokens_per_s.get(batches[-1])
            limit = peak_gmacs * 1e9 / r.macs_per_token if r.macs_per_token else None
            row.append(f"{100 * speed / limit:.0f}% of {limit:.0f} tok/s" if speed and limit else "-")
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratios(ours: BenchResult, peers: list[BenchResult]) -> list[str]:
    return [f"{ours.name} / {p.name}: decode {ours.decode_tokens_per_s / p.decode_tokens_per_s:.2f}x, "
            f"prefill {ours.prefill_tokens_per_s / p.prefill_tokens_per_s:.2f}x, "
            f"time to first token {ours.ttft_ms / p.ttft_ms:.2f}x" for p in peers]
