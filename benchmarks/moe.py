"""A mixture of experts against the dense model with the same active parameters, same data, tokens and steps.

Trains recipes/tinystories-moe.yaml (8 experts of intermediate 352 in every layer, top 2) and
recipes/tinystories.yaml (dense, intermediate 704: the parameters each token runs are the same), one after the
other on the same machine, each with `pocketlm train` in its own process, and reports each one's validation
loss at the end, its median step time after the first 50 steps (compilation and warm-up), and its parameters.

    .venv/bin/python benchmarks/moe.py [--steps 800] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from load_and_decode import machine  # noqa: E402

RUNS = {"moe (8 experts, top 2)": "recipes/tinystories-moe.yaml", "dense (same active)": "recipes/tinystories.yaml"}


def train(recipe: str, out: Path, steps: int) -> dict:
    """Train one recipe for `steps` steps; (val loss, median ms a step, parameters) from its log and model."""
    cmd = [str(REPO / ".venv" / "bin" / "pocketlm"), "train", recipe, f"out_dir={out}", f"train.max_steps={steps}",
           f"eval.interval={steps}", "log.progress=false"]
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((out / "model" / "config.json").read_text())
    from pocketlm.checkpoint import load_model

    model, _ = load_model(out / "model")
    total = sum(p.numel() for p in model.parameters())
    experts, top_k = config.get("num_local_experts"), config.get("num_experts_per_tok")
    per_expert = 3 * config["hidden_size"] * config["intermediate_size"] * config["num_hidden_layers"]
    active = total - (experts - top_k) * per_expert if experts else total
    return {"val_loss": next(r["val_loss"] for r in reversed(records) if "val_loss" in r),
            "ms_per_step": statistics.median(r["ms"] for r in records if r["step"] > 50),
            "router_loss": records[-1].get("router_loss"), "parameters": total, "active_parameters": active}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in RUNS.items():
            results[name] = train(recipe, Path(tmp) / Path(recipe).stem, args.steps)
    print(f"{machine()}")
    print(f"TinyStories (lowercased 4M), {args.steps} steps of 16 x 256 tokens, each recipe's own settings:")
    print(f"{'model':24} {'parameters':>11} {'active':>11} {'val loss':>9} {'ms/step':>8} {'router loss':>12}")
    for name, r in results.items():
        router = f"{r['router_loss']:.3f}" if r["router_loss"] is not None else "-"
        print(f"{name:24} {r['parameters']:>11,} {r['active_parameters']:>11,} {r['val_loss']:9.4f} "
              f"{r['ms_per_step']:8.1f} {router:>12}")
    moe, dense = results.values()
    print(f"step time ratio (moe / dense): {moe['ms_per_step'] / dense['ms_per_step']:.2f}x; "
          f"val loss difference: {moe['val_loss'] - dense['val_loss']:+.4f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
