"""Training speed of the shakespeare-char shape: pocketlm against a nanoGPT-shaped peer, in one run.

nanoGPT's CPU configuration (4 layers, 4 heads, 128 dims, block 64, batch 12, 2000 iterations, lr 1e-3
cosine to 1e-4 with 100 warmup steps, AdamW betas (0.9, 0.99), weight decay 0.1, clip 1.0, no dropout,
fp32, no compile). nanoGPT itself is not installable from a package registry, so the peer run here is
Hugging Face transformers' GPT2LMHeadModel in exactly that shape and that loop, fed the same batches;
nanoGPT's own figure on this machine class (shared/MEASUREMENTS.md) is printed beside it.

    python benchmarks/train_throughput.py [--steps 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_and_decode import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "shakespeare-char.yaml"
NANOGPT_MS, NANOGPT_VAL = 45.7, 1.8857  # shared/MEASUREMENTS.md


def run_pocketlm(steps: int, workdir: Path) -> dict:
    from pocketlm.train import load_recipe, train

    recipe = load_recipe(RECIPE, overrides=[f"out_dir={workdir / 'pocketlm'}", f"train.max_steps={steps}",
                                            "log.interval=1", "log.progress=false", "eval.sample_prompt=null"])
    started = time.perf_counter()
    final = train(recipe)
    wall = time.perf_counter() - started
    records = [json.loads(l) for l in (workdir / "pocketlm" / "log.jsonl").read_text().splitlines()]
    ms = [r["ms"] for r in records[10:] if "val_loss" not in r]  # skip compile warm-up and eval steps
    val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    return {"ms_per_iter": statistics.median(ms), "val_loss": val, "wall_s": wall, "final": str(final),
            "setup": f"Llama (RoPE, SwiGLU, RMSNorm), {recipe.train.dtype} autocast, compile={recipe.train.compile}"}


def run_peer(steps: int, workdir: Path) -> dict:
    """GPT-2 (transformers) in nanoGPT's shape and loop, on the batches pocketlm sees."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pocketlm.data import load_shards
    from pocketlm.train import load_recipe
    from pocketlm.train.loop import batch_starts, lr_at, windows

    recipe = load_recipe(RECIPE, overrides=[f"out_dir={workdir / 'pocketlm'}", f"train.max_steps={steps}"])
    shards = load_shards(workdir / "pocketlm" / "data")  # prepared by the pocketlm run: nanoGPT's char ids
    torch.manual_seed(1337)
    vocab = int(shards.manifest["vocab_size"])
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.99))
    times = []
    started = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        x, y = windows(shards.train, batch_starts(recipe.seed, step, 12, len(shards.train), 64), 64, torch.device("cpu"))
        logits = model(x).logits
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - t0) * 1000)
    wall = time.perf_counter() - started
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(recipe.eval.iters):
            x, y = windows(shards.val, batch_starts(recipe.seed + 1, i, 12, len(shards.val), 64), 64, torch.device("cpu"))
            losses.append(float(F.cross_entropy(model(x).logits.reshape(-1, vocab), y.reshape(-1))))
    return {"ms_per_iter": statistics.median(times[10:]), "val_loss": float(np.mean(losses)), "wall_s": wall,
            "setup": "GPT-2 (transformers) in nanoGPT's shape, fp32 eager"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--json")
    args = parser.parse_args()
    tokens_per_iter = 12 * 64
    with tempfile.TemporaryDirectory() as tmp:
        results = {"pocketlm": run_pocketlm(args.steps, Path(tmp)), "nanoGPT-shaped peer": run_peer(args.steps, Path(tmp))}
    print(f"machine: {machine()}")
    print(f"shakespeare-char shape: 4 layers, 4 heads, 128 dims, block 64, batch 12, {args.steps} iterations")
    print(f"{'':22}{'ms/iter':>9}{'tokens/s':>10}{'val loss':>10}{'wall s':>8}  setup")
    for name, r in results.items():
        print(f"{name:22}{r['ms_per_iter']:>9.1f}{tokens_per_iter / r['ms_per_iter'] * 1000:>10.0f}"
              f"{r['val_loss']:>10.4f}{r['wall_s']:>8.0f}  {r['setup']}")
    print(f"{'nanoGPT (measured once)':22}{NANOGPT_MS:>9.1f}{tokens_per_iter / NANOGPT_MS * 1000:>10.0f}{NANOGPT_VAL:>10.4f}"
          f"{'':>8}  shared/MEASUREMENTS.md")
    ours, peer = results["pocketlm"], results["nanoGPT-shaped peer"]
    print(f"pocketlm speed-up: {peer['ms_per_iter'] / ours['ms_per_iter']:.2f}x the peer in this run, "
          f"{NANOGPT_MS / ours['ms_per_iter']:.2f}x nanoGPT's measured {NANOGPT_MS} ms/iter")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
