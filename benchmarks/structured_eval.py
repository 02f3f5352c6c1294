"""What constrained decoding is worth on real tasks: SmolLM2-135M-Instruct's answers with and without a
constraint, through `pocketlm eval` (the same prompts, greedy, in one process).

- GSM8K (5-shot, ../shared/data/gsm8k/test.jsonl): free, and under the Lark grammar
  docs/structured/gsm8k_answer.lark (reasoning of at most 200 tokens, then "#### " and an integer).
  Parsed: a strict "#### N" answer was found.
- ARC-Challenge as a generation task (docs/tasks/arc_challenge_label.yaml over ../shared/data/arc_raw):
  the model writes the answer's label after "Answer:", free, and under the choice list of the labels.
  Parsed: the answer is one of the labels.

    .venv/bin/python benchmarks/structured_eval.py [--gsm8k 100] [--arc 500] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GSM8K_FORMAT = Path(__file__).resolve().parents[1] / "docs" / "structured" / "gsm8k_answer.lark"
LABELS = ["A", "B", "C", "D", "E", "1", "2", "3", "4", "5"]
ARC_TASK = Path(__file__).resolve().parents[1] / "docs" / "tasks" / "arc_challenge_label.yaml"


def run(model, tokenizer, task, limit: int, constraint) -> tuple[dict, list[dict]]:
    from pocketlm.evaluate.runner import evaluate

    document = evaluate(model, tokenizer, [task], limit=limit, log_samples=True, constraint=constraint)
    name = next(iter(document["results"]))
    return document["results"][name], document["samples"][name]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gsm8k", type=int, default=100, help="GSM8K questions")
    ap.add_argument("--arc", type=int, default=500, help="ARC-Challenge questions")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from pocketlm.constrain import Constraint
    from pocketlm.evaluate.tasks import INVALID
    from pocketlm.loading import open_model

    torch.set_num_threads(args.threads)
    model, tokenizer = open_model(args.model)
    rows = []

    def measure(name, task, limit, constraint, parsed):
        for label, given in (("free", None), ("constrained", constraint)):
            started = time.perf_counter()
            metrics, samples = run(model, tokenizer, task, limit, given)
            rows.append({"task": name, "decoding": label, "n": metrics["n"],
                         "parsed": sum(map(parsed, samples)) / len(samples),
                         "accuracy": metrics["exact_match_strict" if name == "gsm8k" else "exact_match"],
                         "cut_by_length": sum(s["finish"] == "length" for s in samples) / len(samples),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)

    if args.gsm8k:
        measure("gsm8k", "gsm8k", args.gsm8k, Constraint("grammar", GSM8K_FORMAT.read_text()), lambda s: s["strict"] != INVALID)
    if args.arc:
        measure("arc_challenge_label", str(ARC_TASK), args.arc, Constraint("choice", [" " + x for x in LABELS]),
                lambda s: s["completion"].strip() in LABELS)
    print("\n| task | decoding | n | parsed | accuracy | cut by max tokens | s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['decoding']} | {r['n']} | {100 * r['parsed']:.1f}% | {100 * r['accuracy']:.1f}% | "
              f"{100 * r['cut_by_length']:.1f}% | {r['seconds']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
