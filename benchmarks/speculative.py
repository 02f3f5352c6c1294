"""Speculative decoding of SmolLM2-135M-Instruct: an int4 copy drafts, the fp32 model decides.

For each chat prompt the fp32 model's plain greedy decoding (`generate_tokens`) and its speculative decoding
with an int4 group-32 draft (`speculative_generate`, k draft tokens per target pass) produce the same tokens
(checked here); the figures are the tokens per second of each, the draft's acceptance rate and the tokens
each target pass yields. Plain and speculative runs alternate prompt by prompt, so drift on a shared
machine touches both alike. With --temperature above 0 both sample (seeded); their tokens then differ,
and that sampled speculative tokens follow the target's distribution is checked by tests/test_quant.py.

    python benchmarks/speculative.py [--tokens 96] [--k 3,4,6] [--repeats 2] [--temperature 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_and_decode import machine  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
           "List three fruits and their colours.", "How do airplanes fly?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per prompt (EOS ignored)")
    ap.add_argument("--k", default="3,4,6", help="draft tokens per target pass, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pocketlm.checkpoint import load_model
    from pocketlm.engine import SamplingParams, generate_tokens
    from pocketlm.streaming import chat_prompt
    from pocketlm.hub import pull
    from pocketlm.quant import QuantScheme
    from pocketlm.quantize import quantize_dir
    from pocketlm.speculative import speculative_generate

    base = pull("smollm2-135m-instruct")
    target, tokenizer = load_model(base)
    with tempfile.TemporaryDirectory() as tmp:
        draft, _ = load_model(quantize_dir(base, Path(tmp) / "int4", QuantScheme("int4", 32)))
    ks = [int(k) for k in args.k.split(",")]
    prompts = [chat_prompt(tokenizer, [{"role": "user", "content": q}]) for q in PROMPTS]
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True, temperature=args.temperature,
                            top_p=args.top_p, seed=0)
    greedy = args.temperature == 0

    def plain(ids):
        return list(generate_tokens(target, ids, params))

    generate_tokens(draft, prompts[0], SamplingParams(max_new_tokens=8))  # warm-up: kernels built and loaded
    plain(prompts[0][:8])
    rates: dict[str, list[float]] = {"plain fp32": []} | {f"k={k}": [] for k in ks}
    drafted = {k: 0 for k in ks}
    accepted = {k: 0 for k in ks}
    passes = {k: 0 for k in ks}
    for _ in range(args.repeats):
        for ids in prompts:
            started = time.perf_counter()
            reference = plain(ids)
            rates["plain fp32"].append(len(reference) / (time.perf_counter() - started))
            for k in ks:
                started = time.perf_counter()
                tokens, stats = speculative_generate(target, draft, ids, args.tokens, k=k, sampling=params)
                rates[f"k={k}"].append(len(tokens) / (time.perf_counter() - started))
                if greedy and tokens != reference:
                    raise SystemExit(f"speculative decoding (k={k}) left the target's greedy tokens")
                drafted[k] += stats.drafted
                accepted[k] += stats.accepted
                passes[k] += stats.target_passes

    base_rate = statistics.median(rates["plain fp32"])
    rows = []
    for name, values in rates.items():
        k = None if name == "plain fp32" else int(name[2:])
        rate = statistics.median(values)
        rows.append({"decoding": name if k is None else f"speculative, int4 draft, {name}",
                     "tokens_per_s": round(rate, 1), "speed_up": round(rate / base_rate, 2),
                     "acceptance": None if k is None else round(accepted[k] / drafted[k], 3),
                     "tokens_per_target_pass": None if k is None else round((accepted[k] + passes[k]) / passes[k], 2)})
    how = ("greedy; every speculative run gave exactly the plain run's tokens" if greedy else
           f"sampled at temperature {args.temperature}, top-p {args.top_p}")
    print(f"machine: {machine()}; {args.threads} threads; {len(PROMPTS)} chat prompts x {args.repeats}, "
          f"{args.tokens} new tokens each, {how}")
    print(f"{'decoding':40} {'tokens/s':>9} {'vs plain':>9} {'accepted':>9} {'tokens/pass':>12}")
    for row in rows:
        acc = "" if row["acceptance"] is None else f"{row['acceptance']:.0%}"
        per = "" if row["tokens_per_target_pass"] is None else f"{row['tokens_per_target_pass']:.2f}"
        print(f"{row['decoding']:40} {row['tokens_per_s']:9.1f} {row['speed_up']:8.2f}x {acc:>9} {per:>12}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "temperature": args.temperature, "top_p": args.top_p,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
