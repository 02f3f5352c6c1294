"""The floor under a shakespeare-char training step on this CPU: its projection matmuls alone, in fp32.

A training step of the recipe's model (4 layers, 128 dims, SwiGLU width 344, 12 x 64 tokens) multiplies
each layer's q/k/v, output, gate, up and down weights three times: forward, and the two products of the
backward pass. This times exactly those products (as torch.mm, the kernels the training step calls), and
a large SGEMM for the CPU's attainable fp32 rate; attention, the elementwise work and AdamW come on top.
Compare with `train_throughput.py`'s ms/iteration: a step cannot be faster than this floor.

    python benchmarks/train_matmul_floor.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pocketlm.train.loop import _swiglu_hidden  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_and_decode import machine  # noqa: E402

LAYERS, DIM, TOKENS = 4, 128, 12 * 64


def timed(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hidden = _swiglu_hidden(DIM)
    shapes = [(DIM, 3 * DIM), (DIM, DIM), (DIM, hidden), (DIM, hidden), (hidden, DIM)]  # in, out
    weights = [torch.randn(i, o) for i, o in shapes]
    inputs = {i: torch.randn(TOKENS, i) for i, _ in shapes}
    grads = {o: torch.randn(TOKENS, o) for _, o in shapes}

    def step_matmuls():
        for _ in range(LAYERS):
            for (i, o), w in zip(shapes, weights):
                inputs[i] @ w  # forward
                grads[o] @ w.t()  # gradient of the input
                inputs[i].t() @ grads[o]  # gradient of the weight

    flops = LAYERS * sum(3 * 2 * TOKENS * i * o for i, o in shapes)
    step_s = timed(step_matmuls, 50)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    big_s = timed(lambda: a @ b, 10)
    print(f"machine: {machine()}; {args.threads} threads")
    print(f"projection matmuls of one step: {flops / 1e9:.2f} GFLOP in {step_s * 1e3:.1f} ms "
          f"({flops / step_s / 1e9:.0f} GFLOP/s)")
    print(f"2048 x 2048 SGEMM: {2 * 2048 ** 3 / big_s / 1e9:.0f} GFLOP/s; the step's matmuls at that rate: "
          f"{flops / (2 * 2048 ** 3 / big_s) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
