"""Decode speed of SmolLM2-135M-Instruct: pocketlm's variants against llama.cpp and transformers.

Each contender runs in a fresh Python process with the same thread count, prompt (128 tokens) and
number of new tokens (128, greedy, EOS ignored). Reported per contender: prefill tokens/s, time to
first token, batch-1 decode tokens/s, aggregate tokens/s at batch 8 and 32 (pocketlm), peak memory,
file size, the decode speed as a fraction of the memory-bandwidth limit (weight bytes read per
token against the read bandwidth measured in the same run, on the same threads), and the largest batch's
speed as a fraction of the integer limit (multiply-adds per token against the int8 dot-product peak of the
instruction set the kernels use, measured in the same run).

    .venv/bin/python benchmarks/decode.py [--threads 2] [--tokens 128] [--only int8,llama.cpp-q4_1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pocketlm.llamacpp import cpu_has_amx  # noqa: E402

# llama.cpp-q4_1-amx: llama.cpp with its AMX buffers, on CPUs that have AMX (see pocketlm.llamacpp)
CONTENDERS = ["fp32", "fp32-compiled", "int8-compiled", "int4-compiled", "llama.cpp-q4_1", "llama.cpp-q8_0",
              "transformers-fp32"]


def worker(name: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from pocketlm import bench
    from pocketlm.convert.gguf_export import export_gguf
    from pocketlm.hub import fetch_gguf, pull
    from pocketlm.quant import QuantScheme
    from pocketlm.quantize import quantize_dir
    from pocketlm.tokenizer import Tokenizer

    base = pull("smollm2-135m-instruct")
    common = dict(new_tokens=args.tokens, prompt_tokens=args.prompt_tokens, repeats=args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        if name in ("fp32", "fp32-compiled"):
            r = bench.bench_pocketlm(base, batches=tuple(args.batch), compile=name.endswith("compiled"), name=name, **common)
        elif name in ("int8-compiled", "int4-compiled"):
            scheme = QuantScheme("int8") if name.startswith("int8") else QuantScheme("int4", 32)
            path = quantize_dir(base, Path(tmp) / name, scheme)
            r = bench.bench_pocketlm(path, batches=tuple(args.batch), compile=True, name=name, **common)
        elif name in ("llama.cpp-q4_1", "llama.cpp-q4_1-amx"):
            r = bench.bench_llama_cpp(fetch_gguf("smollm2-135m-instruct"), threads=args.threads,
                                      tokenizer=Tokenizer.load(base), amx=name.endswith("amx"), **common)
        elif name == "llama.cpp-q8_0":
            path = quantize_dir(base, Path(tmp) / "int8", QuantScheme("int8"))
            r = bench.bench_llama_cpp(export_gguf(path, Path(tmp) / "int8.gguf"), threads=args.threads, tokenizer=Tokenizer.load(base), **common)
        elif name == "transformers-fp32":
            r = bench.bench_transformers(base, **common)
        else:
            raise SystemExit(f"unknown contender {name}")
    r.name = name
    return r.to_dict()


def rounds(results: list) -> list[list]:
    """The runs split where a contender comes back: `--only a,b,a,b` is two rounds, and each round's
    ratios compare runs made minutes apart, not the fastest run of one round with a peer of another."""
    out: list[list] = [[]]
    for r in results:
        if any(r.name == seen.name for seen in out[-1]):
            out.append([])
        out[-1].append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, action="append", default=None)
    ap.add_argument("--only", default=",".join(CONTENDERS + (["llama.cpp-q4_1-amx"] if cpu_has_amx() else [])))
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch = args.batch or [8, 32]
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    from benchmarks.load_and_decode import machine
    import torch

    from pocketlm.bench import BenchResult, format_table, integer_peak_gmacs, ratios, read_bandwidth_gbs

    torch.set_num_threads(args.threads)

    results = []
    for name in args.only.split(","):
        cmd = [sys.executable, __file__, "--worker", name, "--threads", str(args.threads), "--tokens", str(args.tokens),
               "--prompt-tokens", str(args.prompt_tokens), "--repeats", str(args.repeats)]
        for b in args.batch:
            cmd += ["--batch", str(b)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        data = json.loads(done.stdout.strip().splitlines()[-1])
        data["batch_tokens_per_s"] = {int(k): v for k, v in data["batch_tokens_per_s"].items()}
        results.append(BenchResult(**data))
        print(f"{name}: {results[-1].decode_tokens_per_s:.1f} tokens/s", file=sys.stderr, flush=True)
    bandwidth, peak = read_bandwidth_gbs(), integer_peak_gmacs()
    print(f"machine: {machine()}; {args.threads} threads; memory read bandwidth {bandwidth:.1f} GB/s"
          + (f"; int8 multiply-add peak {peak:.0f} G/s" if peak else ""))
    print(f"SmolLM2-135M-Instruct, prompt {args.prompt_tokens} tokens, {args.tokens} new tokens, greedy, "
          f"median of {args.repeats}\n")
    print(format_table(results, bandwidth, peak))
    for round_results in rounds(results):
        ours = [r for r in round_results if not r.name.startswith(("llama.cpp", "transformers"))]
        peers = [r for r in round_results if r not in ours]
        if ours and peers:
            best = max(ours, key=lambda r: r.decode_tokens_per_s)
            print()
            for line in ratios(best, peers):
                print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "bandwidth_gbs": bandwidth, "int8_peak_gmacs": peak,
                                               "results": [r.to_dict() for r in results]}, indent=2))


if __name__ == "__main__":
    main()
