"""Does distillation pay for itself? recipes/pipelines/tinystories-from-scratch.yaml's distilled student against the
same student trained from scratch for as long as the teacher's stage and the distilled student took together.

1. The fastest teacher variant on this machine: one batch of the recipe's shape (batch_size x block_size) through
   SmolLM2-135M-Instruct in fp32, int8 and int4, forward only, as the teacher stage runs it.
2. `pocketlm run --only student`: the data, the teacher's top-k logits for N steps (that variant) and the distilled
   student's N steps.
3. The scratch student's steps: the teacher's and the student's wall time together, less the student's fixed cost
   (start, final evaluation, save: its wall time less its steps' own time, from its log), over the student's time
   per step. Both students evaluate once, at the end, so neither pays for more evaluations than the other.
4. The whole pipeline with that step count: scratch, int8, the evaluations, the export and the report.

    .venv/bin/python benchmarks/distill_pays.py [--steps 60] [--dir runs/distill-pays] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from load_and_decode import machine  # noqa: E402

POCKETLM = str(REPO / ".venv" / "bin" / "pocketlm")
PIPELINE = REPO / "recipes" / "pipelines" / "tinystories-from-scratch.yaml"
RECIPE = REPO / "recipes" / "distill-smollm2-tinystories.yaml"


def fastest_teacher(variants: list[str]) -> tuple[str, dict[str, float]]:
    """The variant (fp32, int8, int4) whose forward pass over one batch of the recipe's shape is quickest."""
    import torch
    import yaml

    from pocketlm.train.distill import load_teacher

    train = yaml.safe_load(RECIPE.read_text())["train"]
    batch = torch.randint(0, 49152, (train["batch_size"], train["block_size"]), generator=torch.Generator().manual_seed(0))
    seconds = {}
    for variant in variants:
        model, _, _ = load_teacher("smollm2-135m-instruct", None if variant == "fp32" else variant, torch.device("cpu"))
        with torch.inference_mode():
            model(batch[:1, :32])  # first-call setup out of the timing
            started = time.perf_counter()
            model(batch)
            seconds[variant] = round(time.perf_counter() - started, 2)
        print(f"teacher {variant}: {seconds[variant]:.2f} s a batch ({batch.numel() / seconds[variant]:.0f} tokens/s)",
              flush=True)
        del model
    return min(seconds, key=seconds.get), seconds


def run(args: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run([POCKETLM, "run", str(PIPELINE), *args], cwd=REPO, env=env)
    if done.returncode != 0:
        sys.exit(f"pocketlm run {' '.join(args)} failed")
    return time.perf_counter() - started


def step_seconds(log: Path) -> tuple[float, int]:
    """Mean time per training step and the steps logged, from a run's log.jsonl (each record: the mean over its
    log interval, in ms)."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    timed = [r for r in records if "ms" in r]
    steps = [r["step"] for r in timed]
    spans = [b - a for a, b in zip([0, *steps], steps)]
    total_ms = sum(r["ms"] * span for r, span in zip(timed, spans))
    return total_ms / 1000 / steps[-1], steps[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="the teacher's and the distilled student's steps")
    parser.add_argument("--dir", type=Path, default=REPO / "runs" / "distill-pays")
    parser.add_argument("--teacher", choices=["fp32", "int8", "int4"], help="skip step 1 and use this variant")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.setdefault("POCKETLM_DATASETS", str(REPO.parent / "shared" / "data"))
    print(machine(), flush=True)

    timings = {}
    variant = args.teacher
    if variant is None:
        variant, timings = fastest_teacher(["fp32", "int8", "int4"])
    quantize = "null" if variant == "fp32" else variant
    n = args.steps
    common = ["--dir", str(args.dir),
              *(f"stages.{s}.set.distill.teacher_quantize={quantize}" for s in ("teacher", "student")),
              *(f"stages.{s}.set.train.max_steps={n}" for s in ("teacher", "student")),
              f"stages.student.set.eval.interval={n}"]
    run([*common, "--only", "student"], env)
    lock = json.loads((args.dir / "pipeline.lock").read_text())["stages"]
    teacher_s, student_s = lock["teacher"]["wall_s"], lock["student"]["wall_s"]
    per_step, logged = step_seconds(Path(lock["student"]["output"]).parent / "log.jsonl")
    fixed = student_s - per_step * logged
    budget = teacher_s + student_s
    scratch_steps = round((budget - fixed) / per_step)
    print(f"teacher {teacher_s:.1f} s + student {student_s:.1f} s = {budget:.1f} s; a student step {per_step:.2f} s, "
          f"fixed cost {fixed:.1f} s: the scratch student gets {scratch_steps} steps", flush=True)

    run([*common, f"stages.scratch.set.train.max_steps={scratch_steps}",
         f"stages.scratch.set.eval.interval={scratch_steps}"], env)
    lock = json.loads((args.dir / "pipeline.lock").read_text())["stages"]
    scratch_s = lock["scratch"]["wall_s"]

    def scores(name: str) -> dict:
        evaluated = lock[f"eval@{name}"]["metrics"]
        return {"token_perplexity": evaluated["tinystories.token_perplexity"],
                "bits_per_byte": evaluated["tinystories.bits_per_byte"]}

    report = {
        "machine": machine(), "pipeline": str(PIPELINE.relative_to(REPO)), "teacher_variant": variant,
        "teacher_batch_s": timings, "distill_steps": n, "scratch_steps": scratch_steps,
        "teacher_s": teacher_s, "student_s": student_s, "distilled_total_s": round(budget, 1), "scratch_s": scratch_s,
        "distilled": {"val_loss": lock["student"]["metrics"]["val_loss"], **scores("student"),
                      "int8": scores("quant-student")},
        "scratch": {"val_loss": lock["scratch"]["metrics"]["val_loss"], **scores("scratch"),
                    "int8": scores("quant-scratch")},
        "stage_wall_s": {name: entry["wall_s"] for name, entry in lock.items()},
    }
    d, s = report["distilled"], report["scratch"]
    verdict = "distilled lower" if d["val_loss"] < s["val_loss"] else "scratch lower: distillation did not pay"
    print(f"\nequal wall time: distilled (teacher + student) {budget:.1f} s vs scratch {scratch_s:.1f} s "
          f"({scratch_s / budget:.3f}x)\n"
          f"validation loss: distilled {d['val_loss']:.4f} ({n} steps) vs scratch {s['val_loss']:.4f} "
          f"({scratch_steps} steps): {verdict}\n"
          f"TinyStories token perplexity: distilled {d['token_perplexity']:.1f} vs scratch {s['token_perplexity']:.1f}; "
          f"int8: {d['int8']['token_perplexity']:.1f} vs {s['int8']['token_perplexity']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
