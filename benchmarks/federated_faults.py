"""Federated training through failures, on the real model: SmolLM2-135M-Instruct, LoRA SFT on ARC-Easy's training
split (recipes/federated-lora-arc-easy.yaml cut to --rounds rounds of 1 step of --batch examples a client), on
Flower's deployment engine (a SuperLink and 4 SuperNodes on this machine).

1. A client killed mid-round: once client 2 has started training in round 1, its SuperNode and everything it
   started are killed (SIGKILL). Expected: round 1 completes with the other three once Flower gives up on the
   missing reply, every later round runs with three, and the run finishes with a model.
2. The SuperLink killed: after round 1's checkpoint, the SuperLink and its ServerApp are killed. Expected: the
   launcher restarts it on the same port, the live SuperNodes reconnect, the run is submitted again and
   resumes after round 1 (round 1 is not run twice), and the run finishes.

For each: the rounds' clients and failures, the SuperLink restarts, the wall time, and the run's end.

    .venv/bin/python benchmarks/federated_faults.py [--split runs/arc_easy_split] [--rounds 3] [--batch 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from load_and_decode import machine  # noqa: E402

RECIPE = REPO / "recipes" / "federated-lora-arc-easy.yaml"


def kill_a_client_once_it_trains(client: int):
    def start(federation) -> None:
        def watch() -> None:
            log = federation.work / "clients" / f"client-{client}" / "log.jsonl"  # opened before its first step
            while not log.exists() and federation.alive(f"supernode-{client}"):
                time.sleep(0.05)
            federation.kill(f"supernode-{client}")
            print(f"  killed client {client + 1}'s SuperNode at {time.strftime('%H:%M:%S')}", flush=True)
        threading.Thread(target=watch, daemon=True).start()
    return start


def kill_the_superlink_after_round_1(federation) -> None:
    from pocketlm.train.federated.checkpoints import read_log

    def watch() -> None:
        while not read_log(federation.work):
            time.sleep(0.05)
        federation.kill("superlink")
        print(f"  killed the SuperLink at {time.strftime('%H:%M:%S')}", flush=True)
    threading.Thread(target=watch, daemon=True).start()


def run(name: str, on_started, split: Path, out: Path, rounds: int, batch: int) -> dict:
    from pocketlm.train import load_recipe
    from pocketlm.train.federated import federate

    recipe = load_recipe(RECIPE, [f"out_dir={out}", f"data.source={split / 'train.jsonl'}",
                                  f"federated.rounds={rounds}", "federated.local_steps=1", f"train.max_steps={rounds}",
                                  f"train.batch_size={batch}", "train.grad_accum=1", "optim.warmup_steps=0",
                                  "eval.iters=2"])
    print(f"{name}:", flush=True)
    started = time.perf_counter()
    result = federate(recipe, on_round=lambda r: print(
        f"  round {r['round']}: clients {[c + 1 for c in r['clients']]}, failed {r['failed']}, {r['seconds']:.0f} s",
        flush=True), on_started=on_started)
    found = {"rounds": [{k: r[k] for k in ("round", "clients", "failed", "seconds")} for r in result.rounds],
             "superlink_restarts": result.restarts, "submissions": [s["status"] for s in result.submissions],
             "finished": (Path(result.model_dir) / "config.json").is_file(),
             "wall_s": round(time.perf_counter() - started, 1)}
    print(f"  finished: {found['finished']} ({result.model_dir}); SuperLink restarts {found['superlink_restarts']}; "
          f"Flower runs: {', '.join(found['submissions'])}; {found['wall_s']:.0f} s", flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", type=Path, default=REPO / "runs" / "arc_easy_split")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="examples a client step (the recipe's 16 is slow here)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    print(machine(), flush=True)
    split = args.split.resolve()
    if not (split / "train.jsonl").is_file():
        subprocess.run([str(REPO / ".venv" / "bin" / "pocketlm"), "split-task", "arc_easy", str(split)], check=True)
    report = {"machine": machine(), "rounds": args.rounds, "batch": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        report["client_killed"] = run("a client killed mid-round 1", kill_a_client_once_it_trains(1), split,
                                      Path(tmp) / "client", args.rounds, args.batch)
        report["superlink_killed"] = run("the SuperLink killed after round 1", kill_the_superlink_after_round_1, split,
                                         Path(tmp) / "superlink", args.rounds, args.batch)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
