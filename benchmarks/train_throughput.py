"""Training speed of the shakespeare-char shape: pocketlm against a nanoGPT-shaped peer, in one run.

nanoGPT's CPU configuration (4 layers, 4 heads, 128 dims, block 64, batch 12, 2000 iterations, lr 1e-3
cosine to 1e-4 with 100 warmup steps, AdamW betas (0.9, 0.99), weight decay 0.1, clip 1.0, no dropout,
fp32, no compile). nanoGPT itself is not installable from a package registry, so the peer run here is
nanoGPT's model and loop written out in this file (same architecture, init and optimizer), fed the same batches;
nanoGPT's own figure on this machine class (shared/MEASUREMENTS.md) is printed beside it. The machine
is shared and its speed drifts over minutes, so the two runs are interleaved: after every `--block`
pocketlm steps the peer takes as many, and each step is timed on its own. A block of 25 steps lasts about
a second, short against the machine's drift, and lets each run keep its data in the caches as it does when it
trains alone; `--block 1` alternates single steps (earlier sessions' figures; the ratio came out the same,
BENCHMARKS.md).

    python benchmarks/train_throughput.py [--steps 2000] [--block 25] [--set train.parallel=ops] [--json out.json]
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


class NanoGPT(torch.nn.Module):
    """nanoGPT's model, written out here from its published design: learned positions, pre-LayerNorm
    blocks without biases, causal SDPA attention, a 4x GELU MLP, the output head tied to the embedding,
    normal(0, 0.02) init with residual projections scaled by 1/sqrt(2 * n_layer)."""

    def __init__(self, vocab: int, block: int = 64, layers: int = 4, heads: int = 4, dim: int = 128):
        super().__init__()
        nn = torch.nn
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "ln_1": nn.LayerNorm(dim, bias=False), "c_attn": nn.Linear(dim, 3 * dim, bias=False),
                "attn_proj": nn.Linear(dim, dim, bias=False), "ln_2": nn.LayerNorm(dim, bias=False),
                "c_fc": nn.Linear(dim, 4 * dim, bias=False), "mlp_proj": nn.Linear(4 * dim, dim, bias=False)}))
        self.ln_f = nn.LayerNorm(dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / (2 * layers) ** 0.5 if name.endswith("proj.weight") else 0.02
                torch.nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for blk in self.blocks:
            q, k, v = blk["c_attn"](blk["ln_1"](x)).split(x.shape[-1], dim=2)
            q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
            x = x + blk["attn_proj"](y)
            x = x + blk["mlp_proj"](F.gelu(blk["c_fc"](blk["ln_2"](x))))
        return self.lm_head(self.ln_f(x))


class NanoGPTShapedPeer:
    """nanoGPT's model and training loop (fp32, eager, AdamW as nanoGPT sets it up on a CPU), fed the
    batches pocketlm sees."""

    def __init__(self, recipe, shards):
        torch.manual_seed(1337)
        self.recipe, self.shards = recipe, shards
        self.vocab = int(shards.manifest["vocab_size"])
        self.model = NanoGPT(self.vocab).train()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
        self.step_count, self.ms = 0, []
        self.threads = torch.get_num_threads()  # nanoGPT's: PyTorch's default, every op across the cores

    def steps_until(self, step: int) -> None:
        """Take steps until `step` are done, with the peer's own thread count (pocketlm's loop may run
        its ops on one thread each: train.parallel)."""
        ours = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        while self.step_count < step:
            self.step()
        torch.set_num_threads(ours)

    def step(self) -> None:
        from pocketlm.train.batches import batch_starts, windows
        from pocketlm.train.loop import lr_at

        started = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step_count, self.recipe)
        starts = batch_starts(self.recipe.seed, self.step_count, 12, len(self.shards.train), 64)
        x, y = windows(self.shards.train, starts, 64, torch.device("cpu"))
        loss = F.cross_entropy(self.model(x).reshape(-1, self.vocab), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.ms.append((time.perf_counter() - started) * 1000)

    @torch.no_grad()
    def val_loss(self) -> float:
        from pocketlm.train.batches import batch_starts, windows

        self.model.eval()
        losses = []
        for i in range(self.recipe.eval.iters):
            starts = batch_starts(self.recipe.seed + 1, i, 12, len(self.shards.val), 64)
            x, y = windows(self.shards.val, starts, 64, torch.device("cpu"))
            losses.append(float(F.cross_entropy(self.model(x).reshape(-1, self.vocab), y.reshape(-1))))
        return float(np.mean(losses))


def run_interleaved(steps: int, block: int, workdir: Path, overrides: list[str]) -> dict:
    """pocketlm's loop with `block` peer steps after each `block` of its own: both see the same machine load."""
    from pocketlm.train import load_recipe, train
    from pocketlm.train.data_source import load_training_data

    recipe = load_recipe(RECIPE, overrides=[f"out_dir={workdir / 'pocketlm'}", f"train.max_steps={steps}",
                                            "log.interval=1", "log.progress=false", "eval.sample_prompt=null", *overrides])
    peer = NanoGPTShapedPeer(recipe, load_training_data(recipe, is_main=True))

    def peer_block(record: dict) -> None:
        if record["step"] % block == 0 or record["step"] == steps:
            peer.steps_until(record["step"])

    started = time.perf_counter()
    train(recipe, on_step=peer_block)
    wall = time.perf_counter() - started
    records = [json.loads(l) for l in (workdir / "pocketlm" / "log.jsonl").read_text().splitlines()]
    ours_ms = [r["ms"] for r in records[10:] if "val_loss" not in r]  # skip compile warm-up and eval steps
    eval_steps = {r["step"] for r in records if "val_loss" in r}
    peer_ms = [ms for i, ms in enumerate(peer.ms[10:], start=11) if i not in eval_steps]
    return {
        "pocketlm": {"ms_per_iter": statistics.median(ours_ms), "val_loss": [r["val_loss"] for r in records if "val_loss" in r][-1],
                     "setup": f"Llama (RoPE, SwiGLU, RMSNorm), {recipe.train.dtype} autocast, compile={recipe.train.compile}, "
                              f"parallel={recipe.train.parallel}",
                     "val_curve": {r["step"]: r["val_loss"] for r in records if "val_loss" in r}},
        "nanoGPT-shaped peer": {"ms_per_iter": statistics.median(peer_ms), "val_loss": peer.val_loss(),
                                "setup": "nanoGPT's model and loop written out, fp32 eager"},
        "wall_s": wall,
    }


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=_positive, default=2000)
    parser.add_argument("--block", type=_positive, default=25, help="steps each run takes before the other takes as many")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for pocketlm's run, e.g. train.parallel=ops")
    parser.add_argument("--json")
    args = parser.parse_args()
    tokens_per_iter = 12 * 64
    from pocketlm.errors import ConfigError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            results = run_interleaved(args.steps, args.block, Path(tmp), args.set)
        except ConfigError as e:  # a bad --set
            parser.error(str(e))
    ours, peer = results["pocketlm"], results["nanoGPT-shaped peer"]
    print(f"machine: {machine()}")
    print(f"shakespeare-char shape: 4 layers, 4 heads, 128 dims, block 64, batch 12, {args.steps} iterations, "
          f"interleaved in blocks of {args.block} step{'s' if args.block > 1 else ''}, {results['wall_s']:.0f} s in all")
    print(f"{'':24}{'ms/iter':>9}{'tokens/s':>10}{'val loss':>10}  setup")
    for name in ("pocketlm", "nanoGPT-shaped peer"):
        r = results[name]
        print(f"{name:24}{r['ms_per_iter']:>9.1f}{tokens_per_iter / r['ms_per_iter'] * 1000:>10.0f}"
              f"{r['val_loss']:>10.4f}  {r['setup']}")
    print(f"{'nanoGPT (measured once)':24}{NANOGPT_MS:>9.1f}{tokens_per_iter / NANOGPT_MS * 1000:>10.0f}"
          f"{NANOGPT_VAL:>10.4f}  shared/MEASUREMENTS.md")
    print(f"pocketlm speed-up: {peer['ms_per_iter'] / ours['ms_per_iter']:.2f}x the peer in this run, "
          f"{NANOGPT_MS / ours['ms_per_iter']:.2f}x nanoGPT's measured {NANOGPT_MS} ms/iter")
    reached = [step for step, loss in sorted(ours["val_curve"].items()) if loss <= peer["val_loss"]]
    if reached:
        print(f"pocketlm reaches the peer's final validation loss ({peer['val_loss']:.4f}) by step {reached[0]} "
              f"of {args.steps}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
