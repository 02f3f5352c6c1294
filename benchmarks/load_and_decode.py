"""Load time and batch-1 greedy decode speed of SmolLM2-135M-Instruct: pocketlm vs transformers vs llama.cpp.

Each contender runs in its own fresh Python process (so one's threads, caches and imports don't touch
another's), on the same prompt, 2 threads, batch 1, greedy, a fixed number of new tokens.

    python benchmarks/load_and_decode.py [--tokens 128] [--repeats 3] [--skip transformers] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f" {f}" in flags]
    return f"{cpu} ({' '.join(isa) or 'no AVX-512'}), {os.cpu_count()} cores, {mem:.0f} GiB, torch {torch.__version__}, Python {platform.python_version()}"


# ---- workers: each prints one JSON line ------------------------------------------------------
def run_pocketlm(tokens: int, repeats: int) -> dict:
    import torch

    from pocketlm.checkpoint import load_model
    from pocketlm.engine import SamplingParams, generate_tokens
    from pocketlm.hub import pull

    model_dir = pull("smollm2-135m-instruct")
    started = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    load_s = time.perf_counter() - started
    ids = tokenizer.encode(PROMPT)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    list(generate_tokens(model, ids, SamplingParams(max_new_tokens=8)))  # warm-up
    speeds = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = list(generate_tokens(model, ids, params))
        speeds.append(len(out) / (time.perf_counter() - started))
    return {"load_s": load_s, "tokens_per_s": speeds, "threads": torch.get_num_threads(), "weights": "fp32"}


def run_transformers(tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pocketlm.hub import fetch_gguf

    gguf = fetch_gguf("smollm2-135m-instruct")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - started
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=2, attention_mask=torch.ones_like(ids))
    model.generate(ids, max_new_tokens=8, **kwargs)
    speeds = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
        speeds.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - started))
    return {"load_s": load_s, "tokens_per_s": speeds, "threads": torch.get_num_threads(), "weights": "fp32 (dequantized GGUF)"}


def run_llama_cpp(tokens: int, repeats: int) -> dict:
    from pocketlm.hub import fetch_gguf
    from pocketlm.llamacpp import open_llama

    gguf = fetch_gguf("smollm2-135m-instruct")
    started = time.perf_counter()
    llm = open_llama(gguf, n_threads=2, n_ctx=512, verbose=False)
    load_s = time.perf_counter() - started
    llm(PROMPT, max_tokens=8, temperature=0.0)
    speeds = []
    for _ in range(repeats):
        llm.reset()
        started = time.perf_counter()
        out = llm(PROMPT, max_tokens=tokens, temperature=0.0, top_k=1, logit_bias={2: -1e9})  # never stop early
        speeds.append(out["usage"]["completion_tokens"] / (time.perf_counter() - started))
    return {"load_s": load_s, "tokens_per_s": speeds, "threads": 2, "weights": "Q4_1 GGUF"}


WORKERS = {"pocketlm": run_pocketlm, "transformers": run_transformers, "llama.cpp": run_llama_cpp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", action="append", default=[], choices=list(WORKERS))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.tokens, args.repeats)))
        return

    results = {}
    for name in WORKERS:
        if name in args.skip:
            continue
        cmd = [sys.executable, __file__, "--worker", name, "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        results[name]["median_tokens_per_s"] = statistics.median(results[name]["tokens_per_s"])

    print(f"machine: {machine()}")
    print(f"SmolLM2-135M-Instruct, batch 1, greedy, {args.tokens} new tokens, median of {args.repeats}")
    print(f"{'':14}{'weights':>26}{'load s':>9}{'tokens/s':>10}")
    for name, r in results.items():
        print(f"{name:14}{r['weights']:>26}{r['load_s']:>9.2f}{r['median_tokens_per_s']:>10.1f}")
    if "pocketlm" in results:
        ours = results["pocketlm"]
        for peer in ("transformers", "llama.cpp"):
            if peer in results:
                speed = ours["median_tokens_per_s"] / results[peer]["median_tokens_per_s"]
                load = ours["load_s"] / results[peer]["load_s"]
                print(f"pocketlm / {peer}: decode speed {speed:.2f}x, load time {load:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "tokens": args.tokens, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
