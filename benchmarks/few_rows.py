"""fp32 projections of a few rows: x @ W^T (torch's F.linear) against W @ x^T (pocketlm's Linear for 2-6 rows).

Batched decoding and the target's check in speculative decoding multiply a few rows by every weight matrix.
For those MKL's x @ W^T copies the whole weight matrix on each call, so two rows cost twice one row's time;
W @ x^T reads each matrix once. This measures, in one process and alternating:

1. every projection of SmolLM2-135M-Instruct (30 layers and the head) for 1-8 rows, both ways;
2. eager batched greedy decoding (`generate_batch`, as the server runs it) at batch 2, 4 and 6, with
   pocketlm's choice switched off (`FEW_ROWS` empty) and on.

    python benchmarks/few_rows.py [--tokens 32] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_and_decode import machine  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per row in the batched decoding runs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import pocketlm.model as pocketlm_model
    from pocketlm.checkpoint import load_model
    from pocketlm.engine import SamplingParams, generate_batch
    from pocketlm.streaming import chat_prompt
    from pocketlm.hub import pull

    model, tokenizer = load_model(pull("smollm2-135m-instruct"))
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    print(f"{machine()}; {args.threads} threads")
    print(f"all {len(weights)} projections of SmolLM2-135M-Instruct (fp32), median of {args.repeats}:")
    print(f"{'rows':>4}  {'x @ W^T ms':>10}  {'W @ x^T ms':>10}  ratio")
    results: dict = {"machine": machine(), "matmuls": {}, "batched_decode": {}}
    with torch.no_grad():
        for rows in range(1, 9):
            xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
            linear = median_ms(lambda: [F.linear(xs[w.shape[1]], w) for w in weights], args.repeats)
            streamed = median_ms(lambda: [(w @ xs[w.shape[1]].t()).t() for w in weights], args.repeats)
            results["matmuls"][rows] = {"x_wt_ms": linear, "w_xt_ms": streamed}
            print(f"{rows:>4}  {linear:>10.1f}  {streamed:>10.1f}  {linear / streamed:.2f}x", flush=True)

    questions = ["What is the capital of France?", "Write a haiku about the sea.", "How do airplanes fly?",
                 "List three fruits.", "Explain photosynthesis briefly.", "Who wrote Hamlet?"]
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    chosen = pocketlm_model.FEW_ROWS
    print(f"\neager batched greedy decoding, {args.tokens} new tokens a row, aggregate tokens/s (median of "
          f"{args.repeats}, the two ways alternating):")
    print(f"{'batch':>5}  {'x @ W^T':>8}  {'pocketlm':>8}  ratio  same tokens")
    for batch in (2, 4, 6):
        prompts = [chat_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions[:batch]]
        speeds: dict[str, list[float]] = {"off": [], "on": []}
        outputs = {}
        for _ in range(args.repeats):
            for name, rows in (("off", range(0)), ("on", chosen)):
                pocketlm_model.FEW_ROWS = rows
                started = time.perf_counter()
                outputs[name] = generate_batch(model, prompts, params)
                speeds[name].append(sum(map(len, outputs[name])) / (time.perf_counter() - started))
        pocketlm_model.FEW_ROWS = chosen
        off, on = statistics.median(speeds["off"]), statistics.median(speeds["on"])
        same = outputs["off"] == outputs["on"]
        results["batched_decode"][batch] = {"off_tokens_per_s": off, "on_tokens_per_s": on, "same_tokens": same}
        print(f"{batch:>5}  {off:>8.1f}  {on:>8.1f}  {on / off:.2f}x  {'yes' if same else 'no'}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
