"""Issue 6's figures, each run end to end through the command line, for BENCHMARKS.md.

    .venv/bin/python benchmarks/adapt.py distill    # distilled student vs the same student from scratch
    .venv/bin/python benchmarks/adapt.py lora-sft   # LoRA SFT of SmolLM2 on ARC-Easy's 80% vs the base, on the 20%
    .venv/bin/python benchmarks/adapt.py dpo        # LoRA DPO on pairs from the same 80%, on the same 20%

distill: `pocketlm train recipes/distill-smollm2-tinystories.yaml`, then the same recipe with
`train.objective=pretrain distill=null` (same student, data, steps, batches and tokens). Reports each
run's final validation loss (cross-entropy on the recipe's TinyStories validation split) and both
students' perplexity on the first 50k tokens of the TinyStories validation slice through `pocketlm eval --tasks tinystories`.

lora-sft / dpo: `pocketlm split-task arc_easy` (seed 0), `pocketlm eval` of the base on the held-out 20%,
`pocketlm train recipes/{lora-sft,dpo}-arc-easy.yaml`, `pocketlm eval` of the adapter on the same 20%.
A run already trained is reused unless --fresh.
Both print a Markdown table and write runs/adapt_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.load_and_decode import machine  # noqa: E402

POCKETLM = [sys.executable, "-m", "pocketlm"]


def run(args: list[str]) -> float:
    started = time.perf_counter()
    print("$ pocketlm " + " ".join(args), flush=True)
    subprocess.run(POCKETLM + args, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - started


def last_record(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "val_loss" in r][-1]


def evaluate(model: str, task: str, out: Path, extra: list[str] = ()) -> dict:
    seconds = run(["eval", model, "--tasks", task, "-o", str(out), *extra])
    result = json.loads(out.read_text())
    return {**next(iter(result["results"].values())), "eval_seconds": round(seconds, 1)}


def distill(fresh: bool) -> dict:
    recipe = "recipes/distill-smollm2-tinystories.yaml"
    runs = {"distilled": ROOT / "runs" / "distill-smollm2-tinystories",
            "scratch": ROOT / "runs" / "tinystories-student-scratch"}
    extra = {"distilled": [], "scratch": ["train.objective=pretrain", "distill=null", f"out_dir={runs['scratch']}"]}
    rows = {}
    for name, out_dir in runs.items():
        if fresh and out_dir.exists():
            shutil.rmtree(out_dir)
        seconds = run(["train", recipe, *extra[name]]) if not (out_dir / "model").is_dir() else None
        record = last_record(out_dir)
        ppl = evaluate(str(out_dir / "model"), "tinystories", ROOT / "runs" / f"adapt_{name}_tinystories.json",
                       ["--max-tokens", "50000"])
        rows[name] = {"val_loss": record["val_loss"], "train_loss": record["loss"], "steps": record["step"],
                      "tokens": record["tokens"], "train_seconds": None if seconds is None else round(seconds, 1),
                      "tinystories_val_token_ppl": ppl.get("token_perplexity"), "sample": record.get("sample")}
    print("\n| student | steps | tokens | val loss | TinyStories val token ppl | train s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['steps']} | {r['tokens']} | {r['val_loss']:.4f} | {r['tinystories_val_token_ppl']:.2f} "
              f"| {r['train_seconds']} |")
    return rows


def held_out(recipe_name: str, fresh: bool) -> dict:
    """The base and the recipe's adapter on ARC-Easy's held-out 20%."""
    split = ROOT / "runs" / "arc_easy_split"
    out_dir = ROOT / "runs" / recipe_name
    if fresh:
        shutil.rmtree(out_dir, ignore_errors=True)
    run(["split-task", "arc_easy", str(split), "--test-fraction", "0.2", "--seed", "0"])
    task = str(split / "test.yaml")
    base = evaluate("smollm2-135m-instruct", task, ROOT / "runs" / "adapt_arc_easy_base.json")
    seconds = run(["train", f"recipes/{recipe_name}.yaml"]) if not (out_dir / "adapter").is_dir() else None
    tuned = evaluate(str(out_dir / "adapter"), task, ROOT / "runs" / f"adapt_arc_easy_{recipe_name}.json")
    rows = {"base": base, recipe_name: tuned, "train_seconds": None if seconds is None else round(seconds, 1),
            "last_record": last_record(out_dir), "split": json.loads((split / "split.json").read_text())}
    print("\n| model | held-out acc | acc_norm | n |")
    print("|---|---|---|---|")
    for name in ("base", recipe_name):
        r = rows[name]
        print(f"| {name} | {100 * r['acc']:.2f} ± {100 * r['acc_stderr']:.2f} | {100 * r['acc_norm']:.2f} | {r['n']} |")
    gain, gain_norm = 100 * (tuned["acc"] - base["acc"]), 100 * (tuned["acc_norm"] - base["acc_norm"])
    print(f"gain: {gain:+.2f} points acc, {gain_norm:+.2f} acc_norm")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["distill", "lora-sft", "dpo"])
    ap.add_argument("--fresh", action="store_true", help="delete earlier runs first instead of reusing them")
    args = ap.parse_args()
    if args.which == "distill":
        rows = distill(args.fresh)
    else:
        rows = held_out({"lora-sft": "lora-sft-arc-easy", "dpo": "dpo-arc-easy"}[args.which], args.fresh)
    result = {"benchmark": args.which, "machine": machine(), "results": rows}
    out = ROOT / "runs" / f"adapt_{args.which}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
