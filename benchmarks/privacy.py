"""What differential privacy protects, measured: canary exposure and membership inference on TinyStories models
trained without privacy and with DP-SGD at epsilon 8 and epsilon 1, beside the validation loss each reaches.

1. --held-out documents drawn at random from the first 90% of the TinyStories training text are set aside
   (the non-members), and `pocketlm audit canaries` plants random 6-digit secrets in the rest: --count canaries
   for each insertion count (1, 4 and 16 copies) and as many controls never planted (chance).
2. recipes/tinystories.yaml trains on that text (de-duplication off, or the copies collapse to one) for --steps
   steps, once as it is and once per epsilon with a privacy section (float32, no compile: what a private run is).
3. `pocketlm audit privacy` ranks every canary among all 10^6 candidates of its format (exposure, bits) and runs
   the loss attack: documents from the first 90% of the trained text (the recipe holds out the tail of its
   token stream) against the documents set aside, AUC of "lower loss => member". Both sides come from the same
   part of the file: its later documents are shorter (179 characters against 209), and a document's mean loss
   depends on its length, so a tail drawn as non-members gave models that remember nothing an AUC of 0.60.

Every run is its own process, one after the other on the same machine.

    .venv/bin/python benchmarks/privacy.py [--steps 800] [--epsilons 8 1] [--count 20] [--work DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from load_and_decode import machine  # noqa: E402
from moe import train  # noqa: E402

POCKETLM = str(REPO / ".venv" / "bin" / "pocketlm")
SOURCE = REPO.parent / "shared" / "data" / "tinystories" / "tinystories_train_lowercased_4M.txt"
RECIPE = "recipes/tinystories.yaml"


def pocketlm(*args: str) -> None:
    subprocess.run([POCKETLM, *args], cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                   stdout=subprocess.DEVNULL)


def set_aside(source: Path, work: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    """(the source's documents less `count` drawn at random from its first 90%, those documents)."""
    docs = [d for d in source.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    out = set(random.Random(seed).sample(range(int(len(docs) * 0.9)), count))
    kept, held = work / "source.txt", work / "held-out.txt"
    kept.write_text("\n\n".join(d for i, d in enumerate(docs) if i not in out) + "\n", encoding="utf-8")
    held.write_text("\n\n".join(docs[i] for i in sorted(out)) + "\n", encoding="utf-8")
    return kept, held


def audit(model: Path, canaries: Path, members: Path, non_members: Path, out: Path, examples: int) -> dict:
    pocketlm("audit", "privacy", str(model), "--canaries", str(canaries), "--members", str(members), "--members-head",
             "0.9", "--non-members", str(non_members), "--examples", str(examples), "--json", str(out))
    return json.loads(out.read_text())


def row(name: str, trained: dict, report: dict, epsilon: float | None) -> dict:
    groups = {g["repeats"]: g["mean"] for g in report["exposure"]["groups"]}
    return {"model": name, "epsilon": epsilon, "val_loss": trained["val_loss"], "ms_per_step": trained["ms_per_step"],
            "exposure": groups, "exposure_max": max(g["max"] for g in report["exposure"]["groups"] if g["repeats"]),
            "auc": report["membership"]["auc"], "member_loss": report["membership"]["member_loss"],
            "non_member_loss": report["membership"]["non_member_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[8.0, 1.0])
    parser.add_argument("--count", type=int, default=20, help="canaries per insertion count")
    parser.add_argument("--examples", type=int, default=500, help="documents per side of the membership attack")
    parser.add_argument("--held-out", type=int, default=600, help="documents set aside as non-members")
    parser.add_argument("--work", type=Path, help="keep the texts, models and reports here (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="pocketlm-privacy-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        source, held_out = set_aside(SOURCE, work, args.held_out)
        text = work / "train.txt"
        pocketlm("audit", "canaries", str(source), str(text), "--count", str(args.count), "--repeats", "1,4,16",
                 "--digits", "6")
        canaries = work / "train.canaries.json"
        results = []
        runs = [("no privacy", None)] + [(f"DP-SGD, epsilon {e:g}", e) for e in args.epsilons]
        for i, (name, epsilon) in enumerate(runs):
            extra = {"data.source": str(text), "data.dedupe": "false"}
            if epsilon is not None:
                extra.update({"privacy.epsilon": epsilon, "train.compile": "false"})
            trained = train(RECIPE, work / f"run{i}", args.steps, **extra)
            spent = None
            if epsilon is not None:
                spent = json.loads((work / f"run{i}" / "model" / "pocketlm.json").read_text())["privacy"]["epsilon"]
            report = audit(work / f"run{i}" / "model", canaries, source, held_out, work / f"audit{i}.json", args.examples)
            results.append(row(name, trained, report, spent))
            print(f"{name}: done", flush=True)
    print(f"\n{'model':22} {'eps spent':>9} {'val loss':>9} {'ms/step':>8} {'exp x0':>7} {'exp x1':>7} {'exp x4':>7} "
          f"{'exp x16':>8} {'max':>6} {'MIA AUC':>8}")
    for r in results:
        e = r["exposure"]
        eps = f"{r['epsilon']:.3f}" if r["epsilon"] is not None else "-"
        print(f"{r['model']:22} {eps:>9} {r['val_loss']:9.4f} {r['ms_per_step']:8.1f} {e.get(0, 0):7.2f} "
              f"{e.get(1, 0):7.2f} {e.get(4, 0):7.2f} {e.get(16, 0):8.2f} {r['exposure_max']:6.2f} {r['auc']:8.4f}")
    print("exposure in bits (chance 1.44, fully memorised 19.93); x0: controls never planted")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
