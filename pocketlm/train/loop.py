"""One training loop for every objective: batches -> loss -> AdamW step, with evaluation, atomic
checkpoints, exact resume, JSONL logs and DDP. Objectives (pretrain now; distill, SFT, DPO later)
only supply the loss.

Batches are drawn from a generator seeded by (seed, step), so the data position is the step number:
a resumed run, or a run spread over several processes, sees exactly the batches of the original.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console

from ..checkpoint import save_model_dir
from ..config import ModelConfig
from ..errors import ConfigError
from ..model import LlamaForCausalLM
from .recipe import Recipe
from .state import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint

console = Console(stderr=True)


# ---------------------------------------------------------------------------------------------
# processes and devices
# ---------------------------------------------------------------------------------------------
@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(recipe: Recipe) -> Runtime:
    """One process, or one of several started by torchrun (gloo on CPU, NCCL on CUDA)."""
    want = recipe.train.device
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    threads = recipe.train.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    torch.set_num_threads(threads)
    return Runtime(rank=rank, world=world, device=device)


def autocast_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    choice = recipe.train.dtype
    if choice == "float32":
        return None
    if choice == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def cpu_has_bf16() -> bool:
    """bf16 matmuls pay off only with native support (AVX512-BF16 or AMX); elsewhere they are emulated."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def batch_starts(seed: int, step: int, count: int, n_tokens: int, block: int) -> np.ndarray:
    """Start offsets of the `count` windows of optimizer step `step` (same in every process)."""
    if n_tokens <= block + 1:
        raise ConfigError(f"the data has {n_tokens} tokens, fewer than train.block_size + 2 = {block + 2}; "
                          "use more data or a smaller block_size")
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - block - 1, size=count)


def windows(tokens: np.ndarray, starts: np.ndarray, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([tokens[s:s + block + 1] for s in starts]).astype(np.int64)
    batch = torch.from_numpy(rows).to(device)
    return batch[:, :-1], batch[:, 1:]


# ---------------------------------------------------------------------------------------------
# objective, optimizer, schedule
# ---------------------------------------------------------------------------------------------
def pretrain_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


OBJECTIVES: dict[str, Callable] = {"pretrain": pretrain_loss}


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms, biases), fused where PyTorch offers it."""
    o = recipe.optim
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=o.lr, betas=o.betas, eps=o.eps)
    if o.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass  # no fused kernel for this device: fall back to the foreach implementation
    return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup, then cosine decay to min_lr over decay_steps (nanoGPT's schedule)."""
    o = recipe.optim
    decay_steps = o.decay_steps or recipe.train.max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / (o.warmup_steps + 1)
    if step >= decay_steps:
        return o.min_lr
    progress = (step - o.warmup_steps) / max(1, decay_steps - o.warmup_steps)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.lr - o.min_lr)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def build_model(recipe: Recipe, tokenizer, device: torch.device) -> LlamaForCausalLM:
    if recipe.init_from:
        from ..checkpoint import load_model
        from ..hub import resolve_model

        model, _ = load_model(resolve_model(recipe.init_from))
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"init_from: the model has {model.config.vocab_size} tokens but the data's tokenizer "
                              f"{tokenizer.vocab_size}; prepare the data with data.tokenizer set to the model directory")
        model = model.float()
    else:
        shape = recipe.model.model_dump(exclude={"init_std"}, exclude_none=True)
        shape.setdefault("vocab_size", tokenizer.vocab_size)
        shape.setdefault("max_position_embeddings", recipe.train.block_size)
        shape.setdefault("intermediate_size", _swiglu_hidden(shape["hidden_size"]))
        if shape["vocab_size"] < tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size {shape['vocab_size']} is smaller than the tokenizer's {tokenizer.vocab_size}")
        shape["bos_token_id"] = tokenizer.bos_token_id
        shape["eos_token_id"] = tokenizer.eos_token_id
        config = ModelConfig.from_dict(shape, source="recipe model")
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(config).init_weights(std=recipe.model.init_std, seed=recipe.seed)
    if recipe.train.block_size > model.config.max_position_embeddings:
        raise ConfigError(f"train.block_size {recipe.train.block_size} exceeds the model's context "
                          f"{model.config.max_position_embeddings}")
    return model.to(device)


def _swiglu_hidden(hidden: int) -> int:
    """SwiGLU width with the parameters of a 4x GELU MLP (2/3 * 4 * d), rounded up to a multiple of 8."""
    return int(math.ceil(8 * hidden / 3 / 8) * 8)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def train(recipe: Recipe, progress: bool | None = None, on_step: Callable[[dict], None] | None = None) -> Path:
    """Run a recipe to the end (or resume it) and return the final model directory.

    `on_step`, if given, is called in the main process with each step's record (step, loss, lr, ms, ...).
    """
    from .data_source import load_training_data

    runtime = setup_runtime(recipe)
    out_dir = Path(recipe.out_dir)
    ckpt_root = out_dir / "checkpoints"
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)

    t = recipe.train
    per_micro, rem = divmod(t.batch_size, t.grad_accum * runtime.world)
    if rem or per_micro == 0:
        raise ConfigError(f"train.batch_size {t.batch_size} must be a multiple of train.grad_accum ({t.grad_accum}) "
                          f"x processes ({runtime.world})")
    if runtime.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        existing = latest_checkpoint(ckpt_root)
        if existing and not recipe.resume:
            raise ConfigError(f"{out_dir} holds checkpoints of an earlier run ({existing.name}); pass resume=true to "
                              "continue it, or choose another out_dir")
    _barrier(runtime)

    shards = load_training_data(recipe, runtime.main, barrier=lambda: _barrier(runtime),
                                is_local_main=int(os.environ.get("LOCAL_RANK", "0")) == 0)
    model = build_model(recipe, shards.tokenizer, runtime.device)
    optimizer = make_optimizer(model, recipe)
    state = TrainerState()
    log_path = out_dir / "log.jsonl"
    checkpoint = latest_checkpoint(ckpt_root) if recipe.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        if runtime.main:
            _truncate_log(log_path, state.step)
            console.print(f"resumed from {checkpoint} (step {state.step})")
    elif runtime.main and log_path.exists():
        log_path.unlink()

    wrapped = model
    if runtime.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    loss_fn = OBJECTIVES[t.objective]
    step_loss = lambda x, y: loss_fn(wrapped, x, y)  # noqa: E731
    if t.compile:  # forward, loss and their backward in one compiled graph
        step_loss = torch.compile(step_loss)
    amp = autocast_dtype(recipe, runtime.device)
    autocast = (lambda: torch.autocast(runtime.device.type, dtype=amp)) if amp else nullcontext
    logger = _Logger(log_path, out_dir, recipe, enabled=runtime.main)
    show = (recipe.log.progress if progress is None else progress) and runtime.main
    bar = _Progress(recipe.train.max_steps, state.step, enabled=show)

    train_tokens, val_tokens = shards.train, shards.val
    model.train()
    tokens_per_step = t.batch_size * t.block_size
    last_train_loss = last_val_loss = None
    while state.step < t.max_steps:
        step_started = time.perf_counter()
        lr = lr_at(state.step, recipe)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = batch_starts(recipe.seed, state.step, t.batch_size, len(train_tokens), t.block_size)
        total = torch.zeros((), device=runtime.device)
        for micro in range(t.grad_accum):
            first = (micro * runtime.world + runtime.rank) * per_micro
            x, y = windows(train_tokens, starts[first:first + per_micro], t.block_size, runtime.device)
            sync = micro == t.grad_accum - 1 or runtime.world == 1
            with (nullcontext() if sync else wrapped.no_sync()), autocast():
                loss = step_loss(x, y) / t.grad_accum
            loss.backward()
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if runtime.world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        state.step += 1
        state.tokens_seen += tokens_per_step
        last_train_loss = float(total)
        elapsed_ms = (time.perf_counter() - step_started) * 1000
        record = {"step": state.step, "loss": last_train_loss, "lr": lr, "ms": round(elapsed_ms, 3),
                  "tokens": state.tokens_seen}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        bar.update(state.step, last_train_loss, elapsed_ms)

        is_eval = state.step % recipe.eval.interval == 0 or state.step == t.max_steps
        is_best = False
        if is_eval:
            val_loss = evaluate(model, val_tokens, recipe, runtime.device, autocast)
            record["val_loss"] = last_val_loss = val_loss
            is_best = state.best_val_loss is None or val_loss < state.best_val_loss
            if is_best:
                state.best_val_loss = val_loss
            if runtime.main:
                sample = _sample(model, shards.tokenizer, recipe) if recipe.eval.sample_prompt else None
                if sample is not None:
                    record["sample"] = sample
                bar.note(f"step {state.step}: train loss {last_train_loss:.4f}, val loss {val_loss:.4f}"
                         + (f", sample: {sample!r}" if sample else ""))
        if runtime.main and (state.step % recipe.log.interval == 0 or is_eval):
            logger.write(record)
        if runtime.main and on_step is not None:
            on_step(record)
        if state.step % recipe.checkpoint.interval == 0 or state.step == t.max_steps:
            if runtime.main:
                save_checkpoint(ckpt_root, model, optimizer, state, recipe.checkpoint.keep_last,
                                recipe.checkpoint.keep_best, is_best)
            _barrier(runtime)
    bar.close()

    final = out_dir / "model"
    if runtime.main:
        final = _save_final(model, shards, recipe, state, last_train_loss, last_val_loss, final)
        logger.close()
        console.print(f"model saved to {final}")
    _barrier(runtime)
    if runtime.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return final


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, recipe: Recipe, device: torch.device, autocast=nullcontext) -> float:
    """Mean loss over eval.iters fixed validation batches (the same batches at every evaluation)."""
    model.eval()
    t = recipe.train
    per = max(1, t.batch_size // t.grad_accum)
    losses = []
    for i in range(recipe.eval.iters):
        starts = batch_starts(recipe.seed + 1, i, per, len(tokens), t.block_size)
        x, y = windows(tokens, starts, t.block_size, device)
        with autocast():
            losses.append(float(pretrain_loss(model, x, y)))
    model.train()
    return float(np.mean(losses))


def _sample(model, tokenizer, recipe: Recipe) -> str:
    from ..engine import SamplingParams, generate

    model.eval()
    try:
        text = generate(model, tokenizer, recipe.eval.sample_prompt, SamplingParams(max_new_tokens=recipe.eval.sample_tokens)).text
    finally:
        model.train()
    return text


def _save_final(model, shards, recipe: Recipe, state: TrainerState, train_loss, val_loss, out: Path) -> Path:
    weights = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    # the saved weights are the last step's: their validation loss is the last evaluation's, not the best one
    metrics = {"train_loss": train_loss, "val_loss": val_loss, "best_val_loss": state.best_val_loss,
               "steps": state.step, "tokens_seen": state.tokens_seen}
    provenance = {
        "recipe": recipe.model_dump(mode="json"),
        "parent": recipe.init_from,
        "data_hashes": {s["path"]: s.get("sha256") for s in shards.manifest.get("sources", []) if "path" in s},
        "metrics": metrics,
    }
    return save_model_dir(out, model.config, weights, shards.tokenizer, provenance=provenance)


def _barrier(runtime: Runtime) -> None:
    if runtime.world > 1 and dist.is_initialized():
        dist.barrier()


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records past the resumed checkpoint: those steps run again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


class _Logger:
    """JSONL log (one line per logged step), TensorBoard when installed, and the loss curve at the end."""

    def __init__(self, path: Path, out_dir: Path, recipe: Recipe, enabled: bool):
        self.enabled = enabled
        self.path, self.out_dir = path, out_dir
        self.file = open(path, "a") if enabled else None
        self.tb = None
        if enabled and recipe.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                pass  # tensorboard is optional

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key in ("loss", "val_loss", "lr", "grad_norm"):
                if key in record:
                    self.tb.add_scalar(key, record[key], record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        from .plots import plot_loss_curve

        plot_loss_curve(self.path, self.out_dir / "loss.png")


class _Progress:
    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                                     transient=False)
            self.task = self.progress.add_task("train", total=total, completed=done, info="")
            self.progress.start()

    def update(self, step: int, loss: float, ms: float) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=step, info=f"loss {loss:.4f}  {ms:.1f} ms/step")

    def note(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text, soft_wrap=True, highlight=False)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
