"""SmolLM2-135M-Instruct in float32 against bfloat16 on this CPU: a 4 x 128-token forward pass (what scoring
and prefill do) and a batch-4 decode step, the two dtypes alternating. On a CPU without bf16 instructions
PyTorch emulates bfloat16; this is the measurement behind pocketlm's warning there (cpu_features.py).

    python benchmarks/bf16_cpu.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_and_decode import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pocketlm.checkpoint import load_model
    from pocketlm.kernels.cpu_features import cpu_has_bf16
    from pocketlm.hub import pull

    path = pull("smollm2-135m-instruct")
    models = {name: load_model(path, dtype=dtype)[0] for name, dtype in
              (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    step_ids, pos = ids[:, :1], torch.tensor([128, 129, 130, 131])
    forward: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(ids)  # warm-up
            model.setup_cache(4, 256)
            model.decode_step(step_ids, pos)
        for _ in range(args.repeats):
            for name, model in models.items():
                started = time.perf_counter()
                model(ids)
                forward[name].append(time.perf_counter() - started)
                started = time.perf_counter()
                for _ in range(5):
                    model.decode_step(step_ids, pos)
                decode[name].append((time.perf_counter() - started) / 5)
    print(f"{machine()}; {args.threads} threads; bf16 instructions: {'yes' if cpu_has_bf16() else 'no'}")
    print(f"{'dtype':<9}  {'forward 4x128 s':>15}  {'decode step, batch 4 ms':>23}")
    for name in models:
        print(f"{name:<9}  {statistics.median(forward[name]):>15.2f}  {statistics.median(decode[name]) * 1e3:>23.1f}")
    slow = [statistics.median(forward["bfloat16"]) / statistics.median(forward["float32"]),
            statistics.median(decode["bfloat16"]) / statistics.median(decode["float32"])]
    print(f"bfloat16 / float32 time: forward {slow[0]:.2f}x, decode step {slow[1]:.2f}x")


if __name__ == "__main__":
    main()
