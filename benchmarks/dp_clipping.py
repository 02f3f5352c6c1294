"""Ghost clipping against per-sample clipping in private training: peak memory and time a step, same recipe.

Per-sample clipping (Opacus' hooks) holds every row's gradient of every trainable weight before clipping them:
batch x trainable weights of memory. Ghost clipping (privacy.clipping: ghost) takes each row's gradient norm from
the layers' inputs and output gradients, then runs a second backward with each row's loss scaled by its clipping
factor: the same update (tests/test_privacy.py checks it against torch.func), for a second backward's time.

Cases, each a private run of --steps steps (noise multiplier 1.0) at 16 rows a step:
  full: recipes/tinystories.yaml widened to 512 wide x 8 layers and untied (ghost clipping cannot take the norm of
        a weight two layers share), pretraining on 256-token rows: every weight trains;
  lora: recipes/lora-sft-arc-easy.yaml, SmolLM2-135M-Instruct with a rank-16 LoRA adapter, one example a row.

Every run is its own `pocketlm train` process under GNU time (its peak resident memory); the time a step is the
median of the logged steps after the first.

    .venv/bin/python benchmarks/dp_clipping.py [--steps 4] [--split runs/arc_easy_split] [--json out.json]
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

POCKETLM = str(REPO / ".venv" / "bin" / "pocketlm")
PRIVATE = ["privacy.noise_multiplier=1.0", "train.dtype=float32", "train.compile=false", "log.progress=false",
           "log.interval=1", "train.batch_size=16"]
CASES = {
    "full": ("recipes/tinystories.yaml", ["model.hidden_size=512", "model.num_hidden_layers=8",
                                           "model.num_attention_heads=8", "model.num_key_value_heads=4",
                                           "model.tie_word_embeddings=false"]),
    "lora": ("recipes/lora-sft-arc-easy.yaml", ["sft.packing=false"]),
}


def run(case: str, clipping: str, steps: int, work: Path, split: Path) -> dict:
    recipe, overrides = CASES[case]
    out = work / f"{case}-{clipping}"
    data = [f"data.source={split / 'train.jsonl'}"] if case == "lora" else []
    peak = work / f"{case}-{clipping}.peak"
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(peak), POCKETLM, "train", recipe, f"out_dir={out}",
                    f"train.max_steps={steps}", f"eval.interval={steps}", "eval.iters=1",
                    f"checkpoint.interval={steps}", f"privacy.clipping={clipping}", *PRIVATE, *overrides, *data],
                   cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    record = json.loads((out / ("adapter" if case == "lora" else "model") / "pocketlm.json").read_text())
    return {"peak_mb": round(int(peak.read_text().split()[-1]) / 1024),
            "ms_per_step": round(statistics.median(r["ms"] for r in log if "ms" in r and r["step"] > 1)),
            "val_loss": next(r["val_loss"] for r in reversed(log) if "val_loss" in r),
            "epsilon": record["privacy"]["epsilon"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--split", type=Path, default=REPO / "runs" / "arc_easy_split")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(machine(), flush=True)
    if "lora" in args.cases and not (args.split / "train.jsonl").is_file():
        subprocess.run([POCKETLM, "split-task", "arc_easy", str(args.split)], cwd=REPO, check=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            for clipping in ("per_sample", "ghost"):
                results[f"{case}/{clipping}"] = found = run(case, clipping, args.steps, Path(tmp), args.split.resolve())
                print(f"{case:5} {clipping:10} peak {found['peak_mb']:6d} MB  {found['ms_per_step']:7d} ms a step  "
                      f"val loss {found['val_loss']:.4f}  epsilon {found['epsilon']}", flush=True)
    for case in args.cases:
        per, ghost = results[f"{case}/per_sample"], results[f"{case}/ghost"]
        print(f"{case}: ghost clipping peaks at {ghost['peak_mb'] / per['peak_mb']:.2f}x per-sample's memory "
              f"({per['peak_mb'] - ghost['peak_mb']:+d} MB saved) and takes {ghost['ms_per_step'] / per['ms_per_step']:.2f}x "
              "its time a step")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
