"""Federated LoRA SFT against central LoRA SFT on the same examples: SmolLM2-135M-Instruct on ARC-Easy.

1. `pocketlm split-task arc_easy` holds out 20% of ARC-Easy (test.yaml) and writes the rest as SFT records, each
   with its answer letter (skipped when --split already holds them).
2. Central: recipes/lora-sft-arc-easy.yaml, `pocketlm train` (54 steps of 16 examples).
3. Federated: recipes/federated-lora-arc-easy.yaml, `pocketlm federate` (Flower's deployment engine: a SuperLink and 4
   SuperNodes on this machine): the same records dealt to 4 clients by a Dirichlet(0.5) draw over the answer
   letters, FedAvg over the LoRA adapter, 7 rounds of 2 local steps per client (56 steps of 16 examples).
4. Both models, and the base model, are scored on the held-out split with pocketlm's evaluator (acc, acc_norm).

Bytes per round are the packed float32 adapter each way (server to every client, every client back), as the
round log records them; Flower's own count of the run's traffic (its HTTP bodies) is printed beside them.

    .venv/bin/python benchmarks/federated.py [--split runs/arc_easy_split] [--work runs/bench-federated] [--json out.json]
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
CENTRAL = REPO / "recipes" / "lora-sft-arc-easy.yaml"
FEDERATED = REPO / "recipes" / "federated-lora-arc-easy.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def pocketlm(*args: str) -> None:
    subprocess.run([POCKETLM, *args], cwd=REPO, check=True, env=ENV)


def accuracy(model: Path | str, split: Path, out: Path, limit: int | None) -> dict:
    pocketlm("eval", str(model), "--tasks", str(split / "test.yaml"), "--output", str(out),
             *(["--limit", str(limit)] if limit else []))
    document = json.loads(out.read_text())
    (task,) = document["results"].values()
    return {k: task[k] for k in ("acc", "acc_norm") if k in task}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", type=Path, default=REPO / "runs" / "arc_easy_split")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-federated")
    parser.add_argument("--central-steps", type=int, default=54, help="the central recipe's steps (54)")
    parser.add_argument("--rounds", type=int, help="federated rounds (the recipe's 7)")
    parser.add_argument("--local-steps", type=int, help="each client's steps per round (the recipe's 2)")
    parser.add_argument("--client-lr", type=float, help="each client's peak lr (the recipe's); min_lr follows at 1/10")
    parser.add_argument("--limit", type=int, help="score only the first N held-out questions")
    parser.add_argument("--reuse-central", action="store_true", help="keep an earlier run's central model in --work")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    print(machine(), flush=True)
    split, work = args.split.resolve(), args.work.resolve()
    train_file = split / "train.jsonl"
    if not train_file.is_file() or '"answer"' not in train_file.open().readline():
        pocketlm("split-task", "arc_easy", str(split))
    reuse = args.reuse_central and (work / "central" / "model" / "config.json").is_file()
    for stale in ("federated",) if reuse else ("central", "federated"):  # both refuse a directory with an earlier run
        shutil.rmtree(work / stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    data = f"data.source={train_file}"

    started = time.perf_counter()
    if reuse:
        print(f"central: reusing {work / 'central' / 'model'}", flush=True)
    # a shorter run keeps the schedule's shape: warmup 10 of 54 steps, evaluation and checkpoints a third of the way
    third = max(1, args.central_steps // 3)
    if not reuse:
        pocketlm("train", str(CENTRAL), f"out_dir={work / 'central'}", data, f"train.max_steps={args.central_steps}",
                 f"optim.warmup_steps={round(10 * args.central_steps / 54)}", f"eval.interval={third}",
                 f"checkpoint.interval={third}")
    central_s = None if reuse else time.perf_counter() - started

    started = time.perf_counter()
    fed_work = work / "federated" / "work"
    shape = [f"federated.rounds={args.rounds}"] if args.rounds else []
    shape += [f"federated.local_steps={args.local_steps}"] if args.local_steps else []
    if shape:  # each client's warmup: 10/54 of its steps, as the central run's
        steps = (args.rounds or 7) * (args.local_steps or 2)
        shape += [f"train.max_steps={steps}", f"optim.warmup_steps={round(10 * steps / 54)}"]
    if args.client_lr:
        shape += [f"optim.lr={args.client_lr}", f"optim.min_lr={args.client_lr / 10}"]
    pocketlm("federate", str(FEDERATED), "--work", str(fed_work), f"out_dir={work / 'federated'}", data, *shape)
    federated_s = time.perf_counter() - started
    summary = json.loads((fed_work / "result.json").read_text())
    rounds = [json.loads(line) for line in (fed_work / "rounds" / "log.jsonl").read_text().splitlines()]
    sizes = json.loads((fed_work / "clients" / "data" / "partition.json").read_text())
    spec = json.loads((fed_work / "plan.json").read_text())["recipe"]["federated"]

    scores = {name: accuracy(model, split, work / f"eval-{name}.json", args.limit) for name, model in
              (("base", "smollm2-135m-instruct"), ("central", work / "central" / "model"),
               ("federated", Path(summary["model_dir"])))}
    flower_bytes = sum((s.get("inbound_bytes") or 0) + (s.get("outbound_bytes") or 0) for s in summary["submissions"])
    report = {
        "machine": machine(),
        "accuracy": scores,
        "central": {"steps": args.central_steps, "batch_size": 16, "wall_s": central_s and round(central_s, 1)},
        "questions": args.limit or "all",
        "federated": {"clients": spec["clients"], "rounds": len(rounds), "local_steps": spec["local_steps"],
                      "strategy": spec["strategy"], "client_lr": args.client_lr,
                      "client_examples": sizes["sizes"], "client_labels": sizes["labels"],
                      "bytes_per_round_down": rounds[0]["bytes_down"], "bytes_per_round_up": rounds[0]["bytes_up"],
                      "flower_traffic_bytes": flower_bytes, "wall_s": round(federated_s, 1),
                      "round_s": [r["seconds"] for r in rounds]},
    }
    print()
    print(f"{'model':10} {'acc':>7} {'acc_norm':>9}")
    for name, s in scores.items():
        print(f"{name:10} {s.get('acc', float('nan')):7.4f} {s.get('acc_norm', float('nan')):9.4f}")
    f = report["federated"]
    print(f"\ncentral: {args.central_steps} steps x 16 examples"
          + (f" in {central_s:.0f} s" if central_s else " (an earlier run's model)"))
    print(f"federated: {f['clients']} clients ({', '.join(map(str, f['client_examples']))} examples; answer letters "
          f"{'; '.join(' '.join(f'{k}:{v}' for k, v in h.items()) for h in f['client_labels'])}), {f['rounds']} rounds "
          f"x {f['local_steps']} local steps, {f['strategy']}, in {federated_s:.0f} s")
    print(f"bytes per round: {f['bytes_per_round_down'] / 1e6:.2f} MB server->clients, {f['bytes_per_round_up'] / 1e6:.2f} "
          f"MB clients->server (the packed float32 adapter); Flower counted {flower_bytes / 1e6:.1f} MB over the run")
    print(f"accuracy, federated - central: {100 * (scores['federated']['acc'] - scores['central']['acc']):+.1f} points")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
