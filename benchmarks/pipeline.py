"""The factory's overhead and its caching, on recipes/pipelines/quickstart.yaml:

1. a cold `pocketlm run` (every stage runs, then the report);
2. the same run again with nothing changed (nothing runs);
3. an evaluation setting changed (only the evaluations and the report run);
4. the peer: the cold run's own commands, as the lock file records them, run one after another by hand into a
   second directory, the way a user chains them without the pipeline.

The pipeline's cost over the bare commands is (1) - (4): its bookkeeping, hashing and the report.

    .venv/bin/python benchmarks/pipeline.py [--work runs/bench-pipeline] [--json out.json]
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from load_and_decode import machine  # noqa: E402

POCKETLM = str(REPO / ".venv" / "bin" / "pocketlm")
PIPELINE = REPO / "recipes" / "pipelines" / "quickstart.yaml"


def timed(args: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stderr


def ran(stderr: str) -> list[str]:
    return [line.split(":")[0] for line in stderr.splitlines() if ": done in " in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-pipeline")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.setdefault("POCKETLM_DATASETS", str(REPO.parent / "shared" / "data"))
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    piped, by_hand = work / "pipeline", work / "by-hand"
    print(machine(), flush=True)

    run = [POCKETLM, "run", str(PIPELINE), "--dir", str(piped)]
    cold, log = timed(run, env)
    (work / "cold.log").write_text(log)  # the output docs/pipeline.md quotes
    cold_ran = ran(log)
    print(f"cold run: {cold:.1f} s, {len(cold_ran)} stages ran", flush=True)
    again, log = timed(run, env)
    (work / "again.log").write_text(log)
    print(f"nothing changed: {again:.2f} s, {len(ran(log))} stages ran", flush=True)
    changed, log = timed([*run, "stages.eval.max_tokens=5000"], env)
    (work / "changed.log").write_text(log)
    changed_ran = ran(log)
    print(f"eval.max_tokens changed: {changed:.1f} s, ran {', '.join(changed_ran)}", flush=True)

    lock = json.loads((piped / "pipeline.lock").read_text())
    order = [name for name in cold_ran if name in lock["stages"]]
    started = time.perf_counter()
    stage_sum = 0.0
    for name in order:  # the lock's commands, in the order they ran, written into the second directory
        command = [part.replace(str(piped), str(by_hand)) for part in lock["stages"][name]["command"]]
        if name == order[0]:
            by_hand.mkdir(parents=True)
        for part in command:
            if str(by_hand) in part and ("/" in part):
                target = Path(part.split("=", 1)[-1].strip('"'))
                target.parent.mkdir(parents=True, exist_ok=True)
        timed([POCKETLM, *command[1:]], env)
        stage_sum += lock["stages"][name]["wall_s"]
    manual = time.perf_counter() - started
    print(f"the same {len(order)} commands by hand: {manual:.1f} s (the pipeline's stages took {stage_sum:.1f} s of "
          f"its {cold:.1f} s)", flush=True)
    report = {"machine": machine(), "pipeline": str(PIPELINE.relative_to(REPO)), "stages": len(cold_ran),
              "cold_s": round(cold, 1), "nothing_changed_s": round(again, 2), "eval_changed_s": round(changed, 1),
              "eval_changed_ran": changed_ran, "by_hand_s": round(manual, 1), "stage_sum_s": round(stage_sum, 1),
              "overhead_s": round(cold - manual, 1),
              "stage_wall_s": {n: lock["stages"][n]["wall_s"] for n in order},
              "stage_peak_mb": {n: lock["stages"][n]["peak_rss_mb"] for n in order}}
    print(f"\npipeline {cold:.1f} s vs by hand {manual:.1f} s: {cold / manual:.3f}x; a re-run with nothing changed "
          f"{again:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
