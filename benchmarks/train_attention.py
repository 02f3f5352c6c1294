"""pocketlm's CPU training attention kernel (pocketlm/train_attention.py) against PyTorch's attention ops.

1. Attention alone, forward and backward: the kernel against RoPE + `_explicit_causal_attention` (the
   model's PyTorch path for CPU training), eager, for the shakespeare-char shape and SmolLM2's
   (9 query heads, 3 kv heads, head_dim 64) at several lengths, fp32 and bf16.
2. A whole compiled shakespeare-char training step (bf16 autocast where the CPU has it, as the recipe runs):
   two models, one with the kernel and one made to take PyTorch's path, their steps alternating in one
   process so both see the same machine load.

    python benchmarks/train_attention.py [--steps 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from few_rows import median_ms  # noqa: E402
from load_and_decode import machine  # noqa: E402

from pocketlm.kernels import train_attention  # noqa: E402
from pocketlm.model import _explicit_causal_attention, apply_rope, rope_tables  # noqa: E402

SHAPES = [  # batch, seq, heads, kv heads, head_dim
    (12, 64, 4, 4, 32),   # shakespeare-char
    (4, 256, 9, 3, 64),   # SmolLM2
    (2, 512, 9, 3, 64),
    (1, 1024, 9, 3, 64),
]


def attention_alone(repeats: int) -> list[dict]:
    rows = []
    for b, t, h, g, d in SHAPES:
        cos, sin = rope_tables(d, t, 10000.0)
        bias = torch.full((t, t), float("-inf")).triu(1)
        for dtype in (torch.float32, torch.bfloat16):
            qkv = torch.randn(b, t, (h + 2 * g) * d, dtype=dtype, requires_grad=True)

            def heads():
                q, k, v = qkv.split([h * d, g * d, g * d], -1)
                return q.reshape(b, t, h, d), k.reshape(b, t, g, d), v.reshape(b, t, g, d)

            def kernel():
                train_attention.causal_attention(*heads(), cos, sin).float().sum().backward()

            def pytorch():
                q, k, v = (z.transpose(1, 2) for z in heads())
                c, s = cos.to(dtype)[None, None], sin.to(dtype)[None, None]
                _explicit_causal_attention(apply_rope(q, c, s), apply_rope(k, c, s), v, bias).float().sum().backward()

            n = max(5, repeats // (t // 64))
            ours, theirs = median_ms(kernel, n), median_ms(pytorch, n)
            rows.append({"shape": [b, t, h, g, d], "dtype": str(dtype).replace("torch.", ""),
                         "kernel_ms": ours, "pytorch_ms": theirs, "speedup": theirs / ours})
    return rows


def whole_step(steps: int) -> dict:
    """Compiled shakespeare-char steps with and without the kernel, alternating."""
    from pocketlm.train import load_recipe
    from pocketlm.train.batches import batch_starts, windows
    from pocketlm.train.data_source import load_training_data
    from pocketlm.train.loop import autocast_dtype, build_model, clip_gradients, make_optimizer
    from pocketlm.train.objectives import LANGUAGE_MODELLING

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(REPO / "recipes" / "shakespeare-char.yaml",
                             overrides=[f"out_dir={tmp}", "log.progress=false"])
        data = load_training_data(recipe, is_main=True)
    amp = autocast_dtype(recipe, torch.device("cpu"))
    autocast = (lambda: torch.autocast("cpu", dtype=amp)) if amp else (lambda: torch.autocast("cpu", enabled=False))

    def contender(kernel: bool):
        torch.manual_seed(recipe.seed)
        model = build_model(recipe, data.tokenizer, torch.device("cpu"))
        if not kernel:
            for layer in model.model.layers:
                layer.self_attn._kernel_trains = types.MethodType(lambda self, *args: False, layer.self_attn)
        optimizer = make_optimizer(model, recipe)
        loss_fn = torch.compile(lambda batch: LANGUAGE_MODELLING.loss(model, batch), options={"cpp_wrapper": True})
        times = []

        def step(i: int) -> None:
            started = time.perf_counter()
            x, y = windows(data.train, batch_starts(recipe.seed, i, 12, len(data.train), 64), 64, torch.device("cpu"))
            with autocast():
                loss, _ = loss_fn({"input_ids": x, "labels": y})
            loss.backward()
            clip_gradients(model, optimizer, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss.detach())
            times.append((time.perf_counter() - started) * 1e3)
        return step, times

    train_attention.available()
    with_kernel, kernel_ms = contender(True)
    without, pytorch_ms = contender(False)
    for i in range(steps):
        with_kernel(i)
        without(i)
    skip = min(10, steps // 2)  # compile warm-up
    ours, theirs = statistics.median(kernel_ms[skip:]), statistics.median(pytorch_ms[skip:])
    return {"dtype": str(amp or torch.float32).replace("torch.", ""), "steps": steps, "kernel_ms": ours,
            "pytorch_ms": theirs, "speedup": theirs / ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="whole training steps of each contender")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls of attention alone (fewer for long sequences)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not train_attention.available():
        sys.exit("the training attention kernel is not available here (it needs an x86 CPU with AVX2 and g++)")
    print(f"machine: {machine()}")
    print("attention forward + backward, ms (median):")
    print(f"  {'batch x seq x heads/kv x dim':30}{'dtype':>10}{'kernel':>9}{'pytorch':>9}{'speed-up':>10}")
    alone = attention_alone(args.repeats)
    for r in alone:
        b, t, h, g, d = r["shape"]
        print(f"  {f'{b} x {t} x {h}/{g} x {d}':30}{r['dtype']:>10}{r['kernel_ms']:>9.2f}{r['pytorch_ms']:>9.2f}"
              f"{r['speedup']:>9.2f}x")
    step = whole_step(args.steps)
    print(f"compiled shakespeare-char training step ({step['dtype']}, {step['steps']} steps each, alternating): "
          f"{step['kernel_ms']:.1f} ms with the kernel, {step['pytorch_ms']:.1f} ms without: {step['speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "attention": alone, "step": step}, indent=2))


if __name__ == "__main__":
    main()
