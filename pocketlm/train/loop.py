"""One training loop for every objective: batches -> loss -> AdamW step, with evaluation, atomic
checkpoints, exact resume, JSONL logs and DDP. Objectives (pretrain, sft, distill, dpo; see
objectives.py) only supply the loss, and data (data_source.py, batches.py) only supplies batches.

Batches are drawn from a generator seeded by (seed, step), so the data position is the step number:
a resumed run, or a run spread over several processes, sees exactly the batches of the original.
"""

from __future__ import annotations

import functools
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

from ..adapt.adapters import (
    attach,
    config_from_spec,
    merged_weights,
    save_adapter,
    trainable_summary,
)
from ..checkpoint import load_config, save_model_dir
from ..config import ModelConfig
from ..engine import SamplingParams
from ..errors import ConfigError
from ..hub import resolve_model
from ..kernels import train_attention
from ..kernels.allocator import cached_cpu_memory
from ..kernels.cpu_features import cpu_has_bf16, warn_if_bf16_is_slow
from ..loading import open_model
from ..model import LlamaForCausalLM
from ..streaming import generate
from ..tokenizer import Tokenizer
from .batch_threads import BatchThreads, batch_thread_count, sum_gradients
from .console import console
from .data_source import load_data
from .distill import (
    TeacherCache,
    cache_key,
    check_same_vocabulary,
    load_teacher,
    teacher_logits,
    write_corpus,
)
from .flat_adamw import FlatAdamW
from .joint_graph import JointGradients
from .objectives import (
    LANGUAGE_MODELLING,
    PRIVATE_SFT,
    SFT,
    Objective,
    distillation,
    dpo,
    with_proximal_term,
    with_router_loss,
)
from .plots import plot_expert_usage, plot_loss_curve
from .preference import attach_reference_logprobs
from .privacy import PrivateTraining, check_private_run
from .recipe import Recipe
from .state import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint


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


def keeps_callers_threads(run: Callable) -> Callable:
    """A run sets torch's thread count for itself (train.threads); a Python caller gets its own back after,
    so a notebook's evaluation after training is not left on the run's one thread."""
    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        previous = torch.get_num_threads()
        try:
            return run(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)
    return wrapper


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
    if choice == "float32" or recipe.privacy is not None:  # private: per-sample norms in float32 (recipe.py)
        return None
    if choice == "bfloat16":
        warn_if_bf16_is_slow(torch.bfloat16, device)
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


# ---------------------------------------------------------------------------------------------
# optimizer, schedule
# ---------------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms, biases), fused where PyTorch offers it (or plain SGD,
    optim.algorithm: sgd)."""
    o = recipe.optim
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.algorithm == "sgd":
        return torch.optim.SGD(groups, lr=o.lr)
    kwargs = dict(lr=o.lr, betas=o.betas, eps=o.eps)
    if o.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass  # no fused kernel for this device: fall back to the foreach implementation
    return torch.optim.AdamW(groups, **kwargs)


def clip_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Scale the gradients down to a total norm of at most max_norm; return their norm before. A fused AdamW
    takes the scale as its gradient divisor (`grad_scale`, the one GradScaler unscales with), which saves a
    pass over every gradient (2% of a shakespeare-char step, BENCHMARKS.md); other optimizers get
    torch's clip_grad_norm_."""
    if not optimizer.defaults.get("fused"):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)  # clip_grad_norm_'s coefficient, inverted
    return norm


class Lookahead:
    """`make(step)` for the steps to come, `ahead` of them at a time (up to `end`): each step's batches
    are a function of the step alone, and made one step at a time between the heavy steps of a small
    model they ran on cold caches, ten times slower than made together (docs/benchmarks-history.md)."""

    def __init__(self, make: Callable[[int], object], end: int, ahead: int = 16):
        self.make, self.end, self.ahead = make, end, ahead
        self._made: dict[int, object] = {}

    def __call__(self, step: int):
        if step not in self._made:
            self._made = {s: self.make(s) for s in range(step, max(step + 1, min(step + self.ahead, self.end)))}
        return self._made.pop(step)


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
def build_model(recipe: Recipe, tokenizer, device: torch.device, base_model=None) -> LlamaForCausalLM:
    """A new model of the recipe's shape, or `base_model` (init_from, loaded by load_init_model)."""
    if recipe.init_from:
        model = base_model if base_model is not None else load_init_model(recipe)[0]
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"init_from: the model has {model.config.vocab_size} tokens but the data's tokenizer "
                              f"{tokenizer.vocab_size}; prepare the data with data.tokenizer set to the model directory")
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
@dataclass
class WarmStart:
    """One federated client's round (train/federated/): the loop starts from these trainable weights (the global
    model) at step `first_step` of the schedule, adds FedProx's proximal term when `proximal_mu` > 0, and hands
    the model to `finished` at the end instead of writing a model directory."""

    weights: dict[str, torch.Tensor]
    first_step: int = 0
    proximal_mu: float = 0.0
    finished: Callable[[torch.nn.Module], None] | None = None

    def load(self, model: torch.nn.Module) -> None:
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(trainable) != set(self.weights):
            raise ConfigError(f"federated: the global weights name {len(self.weights)} tensors, the model trains "
                              f"{len(trainable)}; the run's model or adapter changed since it started")
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(self.weights[name])


@keeps_callers_threads
def train(recipe: Recipe, progress: bool | None = None, on_step: Callable[[dict], None] | None = None,
          warm_start: WarmStart | None = None) -> Path:
    """Run a recipe to the end (or resume it) and return the final model directory (or, for an
    adapter without a merged copy, the adapter directory).

    `on_step`, if given, is called in the main process with each step's record (step, loss, lr, ms, ...).
    `warm_start` runs one federated client's round (see WarmStart); it returns OUT_DIR.
    """
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
    if recipe.distill is not None and not recipe.distill_sequence:
        _check_teacher_vocabulary(recipe)  # before any data is prepared
    if runtime.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        existing = latest_checkpoint(ckpt_root)
        if existing and not recipe.resume:
            raise ConfigError(f"{out_dir} holds checkpoints of an earlier run ({existing.name}); pass resume=true to "
                              "continue it, or choose another out_dir")
    _barrier(runtime)

    corpus = None
    if recipe.distill_sequence:
        _on_each_machine(runtime, lambda: write_corpus(recipe.distill, out_dir / "teacher-corpus", runtime.device,
                                                        recipe.seed, progress=runtime.main and (
                                                            recipe.log.progress if progress is None else progress)))
        corpus = out_dir / "teacher-corpus" / "corpus.jsonl"

    base_model, base_tokenizer = load_init_model(recipe)
    data = load_data(recipe, runtime.main, lambda: _barrier(runtime), int(os.environ.get("LOCAL_RANK", "0")) == 0,
                     per_step=t.batch_size, model_tokenizer=base_tokenizer, corpus=corpus)
    model = build_model(recipe, data.tokenizer, runtime.device, base_model)
    amp = autocast_dtype(recipe, runtime.device)
    autocast = (lambda: torch.autocast(runtime.device.type, dtype=amp)) if amp else nullcontext
    objective = make_objective(recipe, model, data, runtime, autocast, progress)
    if recipe.adapter is not None:
        attach(model, config_from_spec(model, recipe.adapter))
        if runtime.main and warm_start is None:
            console.print(f"{recipe.adapter.type} adapter: {trainable_summary(model)}", highlight=False)
    if warm_start is not None:
        warm_start.load(model)
        if warm_start.proximal_mu > 0:  # anchored at the global weights just loaded
            objective = with_proximal_term(objective, warm_start.proximal_mu, model)
    optimizer = make_optimizer(model, recipe)
    private = None  # DP-SGD: per-sample gradients, clipped and noised (privacy.py)
    if recipe.privacy is not None:
        check_private_run(recipe, model, runtime.world)
        private = PrivateTraining(recipe, model, optimizer, data.train.row_count)
        if runtime.main:
            console.print(f"private training: noise multiplier {private.noise_multiplier:.4f}, rows clipped to "
                          f"{private.max_grad_norm}, sample rate {private.sample_rate:.5f} of {private.examples} rows, "
                          f"delta {private.delta:.3g}", highlight=False, soft_wrap=True)
    state = TrainerState(step=warm_start.first_step if warm_start is not None else 0)
    log_path = out_dir / "log.jsonl"
    checkpoint = latest_checkpoint(ckpt_root) if recipe.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        if private is not None:
            private.load_state_dict(state.privacy, state.step)
        if runtime.main:
            _truncate_log(log_path, state.step)
            console.print(f"resumed from {checkpoint} (step {state.step})")
    elif runtime.main and log_path.exists():
        log_path.unlink()
    cache = _teacher_cache(recipe, data, model.config.vocab_size, runtime, autocast, state.step, progress)

    wrapped = model if private is None else private.module
    if runtime.world > 1:
        # an expert that gets none of a process's tokens takes no part in its backward: DDP must look for such
        # parameters, or it waits for their gradients and fails at the next step
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            find_unused_parameters=bool(model.config.moe))
    step_loss = lambda batch: objective.loss(wrapped, batch)  # noqa: E731
    if runtime.device.type == "cpu":
        train_attention.available()  # built and loaded now: a compiled graph cannot do it
    if t.compile:  # forward, loss and their backward in one compiled graph
        # on a CPU the graph's wrapper is C++ instead of Python: 2-4% of a shakespeare-char step (BENCHMARKS.md)
        step_loss = torch.compile(step_loss, options={"cpp_wrapper": runtime.device.type == "cpu"})
    logger = _Logger(log_path, out_dir, recipe, enabled=runtime.main)
    show = (recipe.log.progress if progress is None else progress) and runtime.main
    bar = _Progress(recipe.train.max_steps, state.step, enabled=show)

    def make_batch(picks):
        batch = data.train.batch(picks, runtime.device)
        if cache is not None:
            batch.update(cache.lookup(picks, runtime.device))
        return batch

    random_forward = recipe.adapter is not None and recipe.adapter.type == "lora" and recipe.adapter.dropout > 0
    slices = 1 if private is not None else batch_thread_count(t.parallel, torch.get_num_threads(), per_micro,
                                                               runtime.device, runtime.world, random_forward)
    threads = BatchThreads(slices) if slices > 1 else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    # with batch threads the threads also share the end of the step, on flat buffers (flat_adamw.py)
    flat = (FlatAdamW(optimizer, trainable, slices) if threads is not None and FlatAdamW.applies(optimizer, trainable)
            else None)
    slice_grads: list = [None] * slices
    # compiled, a slice's forward and backward are one graph where they can be (joint_graph.py)
    joint = (JointGradients(objective.loss, model, trainable, autocast, flat.order if flat is not None else None)
             if threads is not None and t.compile and not random_forward else None)

    def slice_gradients(batch, scale):
        """(scaled loss, metrics, gradients) of one slice of a micro-batch, on the calling thread."""
        if joint is not None and (found := joint(batch, scale)) is not None:
            return found
        with autocast():
            loss, metrics = step_loss(batch)
            loss = loss * scale
        return loss.detach(), metrics, torch.autograd.grad(loss, trainable, allow_unused=True)

    def slice_step(i, batch, scale, accumulate, update):
        """Slice i's gradients, then its share of the gradient sum and (with update) of clipping and AdamW,
        on the calling thread while the other threads do theirs -> (loss, metrics, gradient norm)."""
        try:
            loss, metrics, slice_grads[i] = slice_gradients(batch, scale)
            return loss, metrics, flat.end_of_step(i, slice_grads, accumulate, update, t.grad_clip)
        except BaseException:
            flat.abort()  # the other threads wait for this one's gradients: let them go
            raise

    def step_inputs(step):
        """(labelled tokens of the step, or None unless the objective sums over them; per micro-batch this
        process's batch, or with batch threads its slices)."""
        if private is not None:  # Poisson: a random number of rows, each micro-batch a share (None: no rows)
            return None, [make_batch(part) if len(part) else None
                          for part in np.array_split(private.picks(recipe.seed, step), t.grad_accum)]
        picks = data.train.picks(recipe.seed, step, t.batch_size)
        micro_batches = []
        for micro in range(t.grad_accum):
            first = (micro * runtime.world + runtime.rank) * per_micro
            rows = picks[first:first + per_micro]
            per = per_micro // slices
            micro_batches.append(make_batch(rows) if threads is None else
                                 [make_batch(rows[i * per:(i + 1) * per]) for i in range(slices)])
        return data.train.labelled_tokens(picks) if objective.token_sum else None, micro_batches

    inputs = Lookahead(step_inputs, t.max_steps)
    model.train()
    tokens_per_step = t.batch_size * data.train.tokens_per_row
    last_train_loss = last_val_loss = None
    first_step = state.step
    with cached_cpu_memory(runtime.device.type == "cpu"):  # freed tensor blocks reused (allocator.py)
        try:
            while state.step < t.max_steps:
                step_started = time.perf_counter()
                lr = lr_at(state.step, recipe)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                labelled, micro_batches = inputs(state.step)
                # per micro-batch loss scale: a mean over micro-batches (and their thread slices), or a token sum
                # over the step's labelled tokens (times the processes, whose gradients DDP averages)
                scale = runtime.world / max(1, labelled) if objective.token_sum else 1 / (t.grad_accum * slices)
                if private is not None:
                    scale = 1.0  # each row's own mean gradient, clipped before any sum; the noisy sum is scaled by Opacus
                total = torch.zeros((), device=runtime.device)
                sums: dict[str, torch.Tensor] = {}
                stepped = False  # by the batch threads themselves
                for micro, batches in enumerate(micro_batches):
                    if private is not None:
                        results = []
                        if batches is not None:
                            loss, metrics = step_loss(batches)
                            private.backward(loss)
                            results = [(loss.detach() / t.grad_accum, metrics)]
                        private.micro_step(last=micro == t.grad_accum - 1, empty=batches is None)
                    elif threads is None:
                        sync = micro == t.grad_accum - 1 or runtime.world == 1
                        with (nullcontext() if sync else wrapped.no_sync()), autocast():
                            loss, metrics = step_loss(batches)
                            loss = loss * scale
                        loss.backward()
                        results = [(loss.detach(), metrics)]
                    else:
                        # the first step compiles the graph: on one thread (compiling on two at once can hang)
                        compiling = state.step == first_step
                        if flat is not None and not compiling:
                            update = micro == t.grad_accum - 1
                            results = threads.map(lambda i: slice_step(i, batches[i], scale, micro > 0, update),
                                                  range(slices))
                            stepped, grad_norm = update, results[0][2]
                        else:
                            run = (lambda f, xs: [f(x) for x in xs]) if compiling else threads.map
                            results = run(lambda batch: slice_gradients(batch, scale), batches)
                            if flat is not None:
                                flat.gather([r[2] for r in results], accumulate=micro > 0)
                            else:
                                sum_gradients(trainable, [r[2] for r in results])
                    for loss, metrics, *_ in results:
                        total += loss
                        for key, value in metrics.items():
                            sums[key] = sums.get(key, 0) + value.float() / (t.grad_accum * slices)
                if private is not None:
                    grad_norm = None  # the optimizer stepped in micro_step, on clipped and noised gradients
                elif flat is None:
                    grad_norm = clip_gradients(model, optimizer, t.grad_clip) if t.grad_clip > 0 else None
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                elif not stepped:
                    grad_norm = flat.clip(t.grad_clip) if t.grad_clip > 0 else None
                    flat.step()
                if runtime.world > 1:
                    dist.all_reduce(total, op=dist.ReduceOp.AVG)
                    for value in sums.values():
                        dist.all_reduce(value, op=dist.ReduceOp.AVG)
                state.step += 1
                state.tokens_seen += tokens_per_step
                last_train_loss = float(total)
                elapsed_ms = (time.perf_counter() - step_started) * 1000
                counts = sums.pop("expert_counts", None)
                record = {"step": state.step, "loss": last_train_loss, "lr": lr, "ms": round(elapsed_ms, 3),
                          "tokens": state.tokens_seen, **{k: float(v) for k, v in sums.items()},
                          **(expert_usage(counts) if counts is not None else {})}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                bar.update(state.step, last_train_loss, elapsed_ms)

                is_eval = state.step % recipe.eval.interval == 0 or state.step == t.max_steps
                is_best = False
                if is_eval:
                    val_loss, val_metrics = evaluate(model, data.val, objective, recipe, runtime.device, autocast,
                                                     threads)
                    record["val_loss"] = last_val_loss = val_loss
                    if private is not None:
                        record["epsilon"] = round(private.epsilon(), 4)
                    record.update({f"val_{k}": v for k, v in val_metrics.items()})
                    is_best = state.best_val_loss is None or val_loss < state.best_val_loss
                    if is_best:
                        state.best_val_loss = val_loss
                    if runtime.main:
                        sample = _sample(model, data.tokenizer, recipe)
                        if sample is not None:
                            record["sample"] = sample
                        extra = "".join(f", val {k} {v:.4f}" for k, v in val_metrics.items())
                        if "epsilon" in record:
                            extra += f", epsilon {record['epsilon']:.3f} (delta {private.delta:.3g})"
                        if "expert_imbalance" in record:
                            extra += f", busiest expert {record['expert_imbalance']:.2f}x an even share"
                        bar.note(f"step {state.step}: train loss {last_train_loss:.4f}, val loss {val_loss:.4f}{extra}"
                                 + (f", sample: {sample!r}" if sample else ""))
                if runtime.main and (state.step % recipe.log.interval == 0 or is_eval):
                    logger.write(record)
                if runtime.main and on_step is not None:
                    on_step(record)
                if state.step % recipe.checkpoint.interval == 0 or state.step == t.max_steps:
                    if private is not None:
                        state.privacy = private.state_dict()
                    if runtime.main:
                        save_checkpoint(ckpt_root, model, optimizer, state, recipe.checkpoint.keep_last,
                                        recipe.checkpoint.keep_best, is_best)
                    _barrier(runtime)
        finally:
            if threads is not None:
                threads.close()
            if flat is not None:
                flat.release()
            if private is not None:
                private.close()
    bar.close()

    final = out_dir / "model"
    if warm_start is not None:
        logger.close()
        if warm_start.finished is not None:
            warm_start.finished(model)
        return out_dir
    if runtime.main:
        final = _save_final(model, data, recipe, state, last_train_loss, last_val_loss, out_dir,
                            private.summary() if private is not None else None)
        logger.close()
        console.print(f"saved to {final}")
    _barrier(runtime)
    if runtime.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return final


def expert_usage(counts: torch.Tensor) -> dict:
    """A step's top-k choices per MoE layer and expert (summed over micro-batches, batch threads and processes:
    the loop averages them, which keeps their proportions) as each layer's shares, and the busiest expert's
    share over an even one (1 when balanced, E / k when every token picks the same k)."""
    share = counts / counts.sum(-1, keepdim=True)
    return {"expert_share": [[round(x, 5) for x in row] for row in share.tolist()],
            "expert_imbalance": round(float(share.max()) * share.shape[-1], 4)}


def load_init_model(recipe: Recipe):
    """(model, tokenizer) of init_from, or (None, None) for a model trained from scratch."""
    if not recipe.init_from:
        return None, None

    model, tokenizer = open_model(recipe.init_from)
    return model.float(), tokenizer


def _check_teacher_vocabulary(recipe: Recipe) -> None:
    teacher_dir = resolve_model(recipe.distill.teacher)
    check_same_vocabulary(Tokenizer.load(teacher_dir), load_config(teacher_dir).vocab_size,
                          recipe.distill.teacher, recipe)


def make_objective(recipe: Recipe, model, data, runtime: Runtime, autocast, progress) -> Objective:
    """The recipe's objective, with a mixture of experts' load-balancing loss added (router_aux_loss_coef,
    Mixtral's default 0.001; 0 leaves it out)."""
    objective = _base_objective(recipe, model, data, runtime, autocast, progress)
    config = model.config
    coef = config.router_aux_loss_coef if config.router_aux_loss_coef is not None else 0.001
    if config.moe and coef > 0:
        return with_router_loss(objective, coef, config.num_experts_per_tok, runtime.world)
    return objective


def _base_objective(recipe: Recipe, model, data, runtime: Runtime, autocast, progress) -> Objective:
    """DPO's reference log-probs are computed here, before any adapter or update touches the model, and cached
    in OUT_DIR for a resumed run."""
    objective = recipe.train.objective
    if objective == "pretrain":
        return LANGUAGE_MODELLING
    if objective == "sft":
        return PRIVATE_SFT if recipe.privacy is not None else SFT
    if objective == "distill":
        if recipe.distill_sequence:  # the corpus is the teacher's text: plain language modelling on it
            return LANGUAGE_MODELLING
        d = recipe.distill
        teacher = None
        if d.cache_top_k is None:
            loaded, _, _ = load_teacher(d.teacher, d.teacher_quantize, runtime.device)
            vocab = model.config.vocab_size
            teacher = lambda ids: teacher_logits(loaded, vocab, ids)  # noqa: E731
        return distillation(teacher, d.alpha, d.temperature)

    attach_reference_logprobs(recipe, model, data, runtime, autocast)
    return dpo(recipe.dpo.beta)


def _teacher_cache(recipe: Recipe, data, vocab: int, runtime: Runtime, autocast, from_step: int, progress,
                   fill_into: Path | None = None):
    """Fill the teacher's top-k cache for every chunk the remaining steps read (cached distillation), in OUT_DIR
    or `fill_into`; a shared cache (distill.cache_dir) is only read, and must hold every chunk."""
    d = recipe.distill
    if d is None or d.mode != "logits" or d.cache_top_k is None:
        return None

    needed = np.concatenate([data.train.picks(recipe.seed, s, recipe.train.batch_size)
                             for s in range(from_step, recipe.train.max_steps)] or [np.zeros(0, dtype=np.int64)])

    shared = d.cache_dir is not None and fill_into is None
    root = fill_into or (Path(d.cache_dir) if shared else Path(recipe.out_dir) / "teacher-cache")

    def open_cache() -> TeacherCache:
        return TeacherCache(root, data.train.tokens, recipe.train.block_size, d.cache_top_k,
                            cache_key(resolve_model(d.teacher), data.shards, d.teacher_quantize), shared=shared)

    def fill() -> None:
        cache = open_cache()
        missing = cache.missing(needed)
        if shared and len(missing):
            raise ConfigError(f"distill.cache_dir {d.cache_dir} lacks {len(missing)} of the {len(np.unique(needed))} "
                              "chunks this run reads; fill it with `pocketlm distill-cache` on the same recipe (seed, "
                              "batch size, block size and steps)")
        if len(missing):
            teacher, _, _ = load_teacher(d.teacher, d.teacher_quantize, runtime.device)
            per = max(1, recipe.train.batch_size // recipe.train.grad_accum)
            show = (recipe.log.progress if progress is None else progress) and runtime.main
            cache.fill(teacher, vocab, needed, per, runtime.device, autocast, progress=show)

    _on_each_machine(runtime, fill)
    return open_cache()


@keeps_callers_threads
def fill_teacher_cache(recipe: Recipe, progress: bool | None = None) -> Path:
    """The teacher's top-k logits for every chunk a distillation run of `recipe` reads over its max_steps, computed
    without training, into distill.cache_dir (else OUT_DIR/teacher-cache): `pocketlm distill-cache`, the teacher
    stage that every student run of the recipe then reads (distill.cache_dir)."""
    d = recipe.distill
    if d is None or d.mode != "logits" or d.cache_top_k is None:
        raise ConfigError("distill-cache needs a distillation recipe in logits mode with distill.cache_top_k (the k "
                          "logits kept per token)")
    runtime = setup_runtime(recipe)
    _check_teacher_vocabulary(recipe)
    Path(recipe.out_dir).mkdir(parents=True, exist_ok=True)
    base_model, base_tokenizer = load_init_model(recipe)
    data = load_data(recipe, runtime.main, lambda: _barrier(runtime), True, per_step=recipe.train.batch_size,
                     model_tokenizer=base_tokenizer)
    vocab = build_model(recipe, data.tokenizer, runtime.device, base_model).config.vocab_size  # the student's
    amp = autocast_dtype(recipe, runtime.device)
    autocast = (lambda: torch.autocast(runtime.device.type, dtype=amp)) if amp else nullcontext
    target = Path(d.cache_dir) if d.cache_dir else Path(recipe.out_dir) / "teacher-cache"
    return _teacher_cache(recipe, data, vocab, runtime, autocast, 0, progress, fill_into=target).root


def _on_each_machine(runtime: Runtime, work: Callable[[], None]) -> None:
    """Run `work` (which skips what is already on disk) in the main process, then in the first process
    of every other machine (no shared file system), while the rest wait."""
    local_main = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if runtime.main:
        work()
    _barrier(runtime)
    if local_main and not runtime.main:
        work()
    _barrier(runtime)


@torch.no_grad()
def evaluate(model, val, objective: Objective, recipe: Recipe, device: torch.device,
             autocast=nullcontext, threads: BatchThreads | None = None) -> tuple[float, dict[str, float]]:
    """Mean validation loss (and the objective's metrics) over eval.iters fixed batches, the same at
    every evaluation; row data (SFT, DPO) is read in order, at most once. With `threads`, each thread
    evaluates a run of the batches."""
    t = recipe.train
    per = max(1, t.batch_size // t.grad_accum)
    batches = []
    for i in range(recipe.eval.iters):
        picks = val.eval_picks(recipe.seed, i, per)
        if picks is None or len(picks) == 0:
            break
        batches.append(picks)

    def one(picks) -> tuple[float, dict[str, float]]:
        with torch.no_grad(), autocast():  # grad mode and autocast are per thread
            loss, found = objective.eval_loss(model, val.batch(picks, device))
        return float(loss), {key: float(value) for key, value in found.items()}

    model.eval()
    try:
        results = threads.map_chunks(one, batches) if threads is not None else [one(p) for p in batches]
    finally:
        model.train()
    metrics: dict[str, list[float]] = {}
    for _, found in results:
        for key, value in found.items():
            metrics.setdefault(key, []).append(value)
    return float(np.mean([loss for loss, _ in results])), {k: float(np.mean(v)) for k, v in metrics.items()}


def _sample(model, tokenizer, recipe: Recipe) -> str | None:
    if not recipe.eval.sample_prompt:
        return None

    model.eval()
    try:
        text = generate(model, tokenizer, recipe.eval.sample_prompt, SamplingParams(max_new_tokens=recipe.eval.sample_tokens)).text
    finally:
        model.train()
    return text


def _save_final(model, data, recipe: Recipe, state: TrainerState, train_loss, val_loss, out_dir: Path,
                privacy: dict | None = None) -> Path:
    """The trained model as a model directory (OUT_DIR/model); with an adapter, the adapter in PEFT's
    format (OUT_DIR/adapter) and, for LoRA with adapter.merge, the merged model as OUT_DIR/model."""
    # the saved weights are the last step's: their validation loss is the last evaluation's, not the best one
    metrics = {"train_loss": train_loss, "val_loss": val_loss, "best_val_loss": state.best_val_loss,
               "steps": state.step, "tokens_seen": state.tokens_seen}
    provenance = {"recipe": recipe.model_dump(mode="json"), "parent": recipe.init_from, **data.provenance,
                  "metrics": metrics, **({"privacy": privacy} if privacy is not None else {})}
    if recipe.adapter is None:
        weights = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
        return save_model_dir(out_dir / "model", model.config, weights, data.tokenizer, provenance=provenance)

    adapter_dir = save_adapter(model, out_dir / "adapter", resolve_model(recipe.init_from), provenance=provenance)
    if recipe.adapter.type != "lora" or not recipe.adapter.merge:
        return adapter_dir
    provenance["adapter"] = {"path": str(adapter_dir.resolve()), "type": "lora", "r": recipe.adapter.r,
                             "alpha": recipe.adapter.alpha, "merged": True}
    return save_model_dir(out_dir / "model", model.config, merged_weights(model), data.tokenizer, provenance=provenance)


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
    """JSONL log (one line per logged step), TensorBoard when installed, and the loss curve (and a mixture's
    expert usage) at the end."""

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
            for key in ("loss", "val_loss", "lr", "grad_norm", "router_loss", "expert_imbalance"):
                if key in record:
                    self.tb.add_scalar(key, record[key], record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()

        plot_loss_curve(self.path, self.out_dir / "loss.png")
        plot_expert_usage(self.path, self.out_dir / "expert_usage.png")  # a mixture of experts' runs only


class _Progress:
    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

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
