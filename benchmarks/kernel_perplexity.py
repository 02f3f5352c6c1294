"""Perplexity through the decode step: what the kernels' numerics cost, for BENCHMARKS.md.

`pocketlm eval` and benchmarks/quant_perplexity.py score text with the prompt path (many rows at once,
the dequantized weights in fp32), which never runs the decoding kernels. This scores WikiText-2 one token
at a time through `decode_step`, as generation and the server run it, so each kernel family is measured:

    exact   fp32 activations, exact products of the quantized weights (POCKETLM_CPU_KERNELS=exact)
    qdot    activations quantized to int8 per block of 32, integer dot products (the default)

Each variant runs in its own process (the family is chosen once per process), on the same `--windows`
windows of `--window` tokens, decoded side by side as a batch (teacher forcing: each step is fed the
text's next token and scored on the one after).

    .venv/bin/python benchmarks/kernel_perplexity.py [--model smollm2-135m-instruct] [--windows 16] [--window 256]
        [--text FILE [--lowercase]]

A model pocketlm trained (weights never on a 4-bit grid, unlike SmolLM2's, which came from a Q4_1 file):
    pocketlm train recipes/tinystories.yaml out_dir=runs/ts704 model.intermediate_size=704
    .venv/bin/python benchmarks/kernel_perplexity.py --model runs/ts704/model --windows 32 --lowercase \
        --text ../shared/data/tinystories/tinystories_val_head.txt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.load_and_decode import machine  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "test.txt"
VARIANTS = ["fp32", "int8-exact", "int8-qdot", "int4-exact", "int4-qdot"]


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from pocketlm.checkpoint import load_model
    from pocketlm.evaluate.perplexity import decoded_perplexity
    from pocketlm.kernels import cpu_ops, decode_step, qdot

    model, tokenizer = load_model(args.path)
    text = Path(args.text).read_text(encoding="utf-8")
    ids = tokenizer.encode(text.lower() if args.lowercase else text, add_special_tokens=False)
    need = args.windows * args.window
    windows = torch.tensor(ids[:need]).reshape(args.windows, args.window)
    started = time.perf_counter()
    ppl = decoded_perplexity(model, windows)
    kernels = "python step"
    if decode_step.serves(model):
        kernels = f"whole-step kernel, {cpu_ops.mode()}" + (f" ({qdot.active()})" if cpu_ops.mode() == "qdot" else "")
    return {"token_perplexity": ppl, "tokens": args.windows * (args.window - 1), "seconds": time.perf_counter() - started,
            "kernels": kernels}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--text", default=str(DATA))
    ap.add_argument("--lowercase", action="store_true", help="lowercase the text (models trained on lowercased text, "
                    "as recipes/tinystories.yaml's)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from pocketlm.hub import resolve_model
    from pocketlm.quant import QuantScheme
    from pocketlm.quantize import quantize_dir

    base = resolve_model(args.model)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": base}
        for name in args.only.split(","):
            weights, _, family = name.partition("-")
            if weights not in paths:
                scheme = QuantScheme("int8") if weights == "int8" else QuantScheme("int4", 32)
                paths[weights] = quantize_dir(base, Path(tmp) / weights, scheme)
            env = {**os.environ, "POCKETLM_CPU_KERNELS": "exact" if family == "exact" else "1"}
            command = [sys.executable, __file__, "--worker", "--path", str(paths[weights]), "--text", args.text,
                       "--windows", str(args.windows), "--window", str(args.window), "--threads", str(args.threads),
                       *(["--lowercase"] if args.lowercase else [])]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name}: {rows[name]['token_perplexity']:.4f} ({rows[name]['kernels']}, "
                  f"{rows[name]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    ref = rows.get("fp32", {}).get("token_perplexity")
    print(f"\nmachine: {machine()}\n{args.model}, {Path(args.text).name}{' lowercased' if args.lowercase else ''}, "
          f"{args.windows} windows of {args.window} tokens decoded one token at a time\n")
    print("| variant | kernels | token ppl | vs fp32 |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        change = f"{100 * (r['token_perplexity'] / ref - 1):+.2f}%" if ref else "-"
        print(f"| {name} | {r['kernels']} | {r['token_perplexity']:.3f} | {change} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "model": args.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
