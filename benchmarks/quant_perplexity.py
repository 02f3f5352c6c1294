"""WikiText-2 test perplexity of SmolLM2-135M-Instruct in fp32, int8 and int4, for BENCHMARKS.md.

    .venv/bin/python benchmarks/quant_perplexity.py [--max-tokens N] [--window 1024] [--stride 512]

Quantizes the pulled model into temporary directories, scores the same tokens with each, and prints
a Markdown table and a JSON line with the change against fp32 (goals: int8 <= +1%, int4 g32 <= +6%).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.load_and_decode import machine  # noqa: E402
from pocketlm.checkpoint import load_model  # noqa: E402
from pocketlm.hub import resolve_model  # noqa: E402
from pocketlm.evaluate.perplexity import perplexity  # noqa: E402
from pocketlm.quant import QuantScheme  # noqa: E402
from pocketlm.quantize import quantize_dir

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "test.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--text", default=str(DATA))
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--schemes", default="fp32,int8,int4-g32,int4-g64,int4-g128,int4-g32-sym")
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    base = resolve_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.schemes.split(","):
            if name == "fp32":
                path = base
            else:
                parts = name.split("-")
                scheme = QuantScheme(parts[0], int(parts[1][1:]) if len(parts) > 1 else None, symmetric="sym" in parts)
                path = quantize_dir(base, Path(tmp) / name, scheme)
            model, tok = load_model(path)
            r = perplexity(model, tok, text, window=args.window, stride=args.stride, max_tokens=args.max_tokens)
            rows.append((name, r))
            print(f"{name}: {r.token_perplexity:.4f} ({r.tokens} tokens, {r.seconds:.0f} s)", file=sys.stderr, flush=True)
    ref = dict(rows)["fp32"].token_perplexity if "fp32" in dict(rows) else None  # the change needs the fp32 row
    print(f"\nmachine: {machine()}\n")
    print("| variant | token ppl | vs fp32 | word ppl | bits/byte | tokens | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        change = f"{100 * (r.token_perplexity / ref - 1):+.2f}%" if ref else "-"
        print(f"| {name} | {r.token_perplexity:.3f} | {change} | "
              f"{r.word_perplexity:.2f} | {r.bits_per_byte:.4f} | {r.tokens} | {r.seconds:.0f} |")
    print(json.dumps({name: r.to_dict() for name, r in rows}))


if __name__ == "__main__":
    main()
