"""Differentially private training (DP-SGD, Abadi et al. 2016) through Opacus, inside the one training loop.

Each step samples every training row independently with probability q = batch_size / N (Poisson sampling,
which is what the accountant's guarantee assumes). Every row's gradient is computed on its own (Opacus'
per-sample gradients, from hooks on the layers), clipped to `max_grad_norm`, summed, and Gaussian noise of
std `noise_multiplier * max_grad_norm` is added before the optimizer step. With `clipping: ghost` the rows'
gradients are never held: the hooks give each row's gradient norm, and a second backward, with each row's
share of the output gradient scaled by its clipping factor, leaves the sum of the clipped gradients. The
accountant (PRV or RDP) turns (noise multiplier, q, steps) into the epsilon spent at a given delta.

The unit protected is one training row: a block of block_size tokens for pretraining and distillation, one
example for SFT (packing is refused, so that a row is one example). Anything that makes a row's gradient
depend on other rows, or that runs without the per-sample hooks, would void the guarantee and is refused.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import ConfigError
from ..model import Embedding, Linear
from .recipe import Recipe

class PrivateTraining:
    """The per-sample-gradient module, the noisy optimizer and the accountant of one private run."""

    def __init__(self, recipe: Recipe, model: torch.nn.Module, optimizer: torch.optim.Optimizer, examples: int):
        from opacus.accountants import create_accountant
        from opacus.optimizers import DPOptimizer

        spec, train = recipe.privacy, recipe.train
        self.examples = examples
        self.sample_rate = train.batch_size / examples
        if self.sample_rate >= 1:
            raise ConfigError(f"privacy: train.batch_size {train.batch_size} must be smaller than the {examples} training "
                              "rows; each step samples rows with probability batch_size / rows")
        self.delta = spec.delta if spec.delta is not None else 1 / (10 * examples)
        if self.delta >= 1 / examples:
            raise ConfigError(f"privacy.delta {self.delta:g} must be below 1 / N = {1 / examples:.3g} (N = {examples} "
                              "training rows): a larger delta allows leaking a whole row outright")
        self.max_grad_norm, self.accountant_name = spec.max_grad_norm, spec.accountant
        self.noise_multiplier = spec.noise_multiplier or noise_for_epsilon(
            spec.epsilon, self.delta, self.sample_rate, train.max_steps, spec.accountant)
        self.target_epsilon = spec.epsilon
        self.clipping = spec.clipping
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if self.clipping == "ghost":
            from opacus.optimizers import DPOptimizerFastGradientClipping as Noisy

            self.module = ghost_clipping_module(model, spec.max_grad_norm)
            self._output = None  # the model's output in the last forward pass (the second backward scales it)
            self._hook = model.register_forward_hook(self._keep_output)
        else:
            Noisy = DPOptimizer
            self.module = per_sample_module(model)
        self.optimizer = Noisy(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=spec.max_grad_norm,
                               expected_batch_size=train.batch_size, loss_reduction="mean")
        self.accountant = create_accountant(spec.accountant)
        self._checked = False

    # ---- sampling -------------------------------------------------------------------------------
    def picks(self, seed: int, step: int) -> np.ndarray:
        """The rows of step `step`: each row in independently with probability q (a function of (seed, step)
        alone, so a resumed run samples what the original did)."""
        rng = np.random.default_rng([seed, step, 0x5EED])
        return np.flatnonzero(rng.random(self.examples) < self.sample_rate)

    # ---- a step ----------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """The backward of a micro-batch's loss, a mean over its rows of each row's own loss. Per-sample: each
        weight gets every row's gradient. Ghost: a first pass gets every row's gradient norm, and a second pass
        scales each row's share of the output gradient by its clipping factor, so that each weight's gradient is
        the sum of the rows' clipped gradients."""
        if self.clipping != "ghost":
            loss.backward()
            return
        output = self._output
        loss.backward(retain_graph=True)
        if not self._checked:
            self._check_every_weight_has_row_gradients()
        factors = self.module.get_clipping_coef()  # (rows,): min(1, max_grad_norm / |row's gradient|)
        for p in self.trainable.values():
            p.grad = None
        scale = (factors * len(factors)).to(output.dtype)  # the mean gave each row 1/rows of its gradient
        handle = output.register_hook(lambda g: g * scale.view(-1, *([1] * (g.dim() - 1))))
        self.module.disable_hooks()
        try:
            loss.backward()
        finally:
            handle.remove()
            self.module.enable_hooks()
            self._output = None

    def _keep_output(self, _module, _inputs, output) -> None:
        if torch.is_tensor(output) and output.requires_grad:
            self._output = output

    def micro_step(self, last: bool, empty: bool) -> None:
        """After a micro-batch's backward: clip its rows' gradients into the step's sum, and on the last one add
        the noise and step the optimizer. An empty micro-batch (Poisson sampling can draw none) adds nothing."""
        if empty:
            for p in self.trainable.values():
                if self.clipping == "ghost":
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = p.new_zeros((0, *p.shape))
        elif not self._checked:
            self._check_every_weight_has_row_gradients()
        self.optimizer.signal_skip_step(do_skip=not last)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if last:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def _check_every_weight_has_row_gradients(self) -> None:
        """A weight whose layer ran without Opacus' hooks has no per-sample gradient: its update would be
        neither clipped nor noised. Refuse, naming the layers."""
        held = "_norm_sample" if self.clipping == "ghost" else "grad_sample"
        missing = [n for n, p in self.trainable.items() if getattr(p, held, None) is None]
        if missing:
            layers = sorted({n.rsplit(".", 1)[0] for n in missing})
            raise ConfigError(f"privacy: Opacus computed no per-sample gradients for {', '.join(layers[:4])}"
                              f"{' and more' if len(layers) > 4 else ''}: their layers run outside its hooks; "
                              "train without privacy, or freeze them (an adapter)")
        self._checked = True

    # ---- accounting ------------------------------------------------------------------------------
    def epsilon(self) -> float:
        """Epsilon spent so far at the run's delta (0 before the first step)."""
        return float(self.accountant.get_epsilon(delta=self.delta)) if self.accountant.history else 0.0

    def state_dict(self) -> dict:
        """The accountant's history, for a checkpoint (JSON)."""
        return {"accountant": self.accountant_name,
                "history": [list(entry) for entry in self.accountant.history]}

    def load_state_dict(self, state: dict | None, step: int) -> None:
        if state is None or state.get("accountant") != self.accountant_name:
            raise ConfigError(f"privacy: the checkpoint at step {step} has no {self.accountant_name} accountant "
                              "state; a private run resumes only from its own checkpoints")
        self.accountant.history = [tuple(entry) for entry in state["history"]]

    def summary(self) -> dict:
        """What pocketlm.json and the model card record."""
        return {"epsilon": round(self.epsilon(), 4), "delta": self.delta, "target_epsilon": self.target_epsilon,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "sample_rate": self.sample_rate, "steps": sum(e[2] for e in self.accountant.history),
                "accountant": self.accountant_name, "sampling": "poisson", "unit": "one training row",
                "rows": self.examples, "clipping": self.clipping}

    def close(self) -> None:
        """Take Opacus' hooks off the model (it is saved, evaluated and served as a plain model)."""
        self.module._close()
        if self.clipping == "ghost":
            self._hook.remove()
            for p in self.trainable.values():
                p.__dict__.pop("_norm_sample", None)


def noise_for_epsilon(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier whose `steps` steps at `sample_rate` spend at most `epsilon` at `delta`."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            if accountant == "prv":  # PRV bounds its search with RDP internally; RDP's tightness is not PRV's
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                              steps=steps, accountant=accountant, epsilon_tolerance=0.01))
    except ValueError as exc:
        raise ConfigError(f"privacy.epsilon {epsilon}: no noise multiplier reaches it ({exc}); ask for a larger "
                          "epsilon, fewer steps or a smaller batch") from None


def check_private_run(recipe: Recipe, model, world: int) -> None:
    """What only the run knows: one process, and a model whose rows' gradients are their own."""
    if world > 1:
        raise ConfigError("privacy: private training runs in one process; Opacus' distributed path is not wired "
                          "into pocketlm (start it without torchrun)")
    if model.config.moe:
        raise ConfigError("privacy: a mixture of experts mixes every row's tokens in each expert's input, so Opacus "
                          "cannot separate their gradients, and its load-balancing loss is a function of the whole "
                          "batch; train a dense model")


def per_sample_module(model: torch.nn.Module):
    """The model with Opacus' hooks on: after a backward of a mean over rows, each trainable weight holds
    `grad_sample`, every row's own gradient (batch first)."""
    from opacus import GradSampleModule

    _use_opacus_samplers(GradSampleModule)
    # the token ids need no gradient, so the embedding's full backward hook fires on its output: expected
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                            "respect to module outputs")
    return GradSampleModule(model, batch_first=True, loss_reduction="mean")


def ghost_clipping_module(model: torch.nn.Module, max_grad_norm: float):
    """The model with Opacus' ghost-clipping hooks on: after a backward of a mean over rows, each trainable
    weight holds `_norm_sample`, the norm of every row's own gradient, computed without that gradient. A weight
    two layers share (a tied embedding and output head) has no such norm: refused, naming it."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                users.setdefault(id(p), []).append(name)
    shared = [names for names in users.values() if len(names) > 1]
    if shared:
        raise ConfigError(f"privacy.clipping ghost: {' and '.join(shared[0])} share one trainable weight, and ghost "
                          "clipping cannot take the norm of a weight used twice; use clipping: per_sample, or train "
                          "an adapter (the shared weight stays frozen)")
    _use_opacus_samplers(GradSampleModuleFastGradientClipping)
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                            "respect to module outputs")
    return GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                max_grad_norm=max_grad_norm, use_ghost_clipping=True)


def _use_opacus_samplers(grad_sample_module) -> None:
    """pocketlm's Linear and Embedding compute exactly what torch's do: give them Opacus' closed-form
    per-sample gradients (and gradient norms, for ghost clipping) instead of its generic, slower vmap."""
    samplers = grad_sample_module.GRAD_SAMPLERS
    samplers.setdefault(Linear, samplers[torch.nn.Linear])
    samplers.setdefault(Embedding, samplers[torch.nn.Embedding])
    norms = getattr(grad_sample_module, "NORM_SAMPLERS", None)
    if norms is not None:
        norms.setdefault(Linear, norms[torch.nn.Linear])
        embedding_norms = norms[torch.nn.Embedding]
        # Opacus' embedding norms view the token ids flat, which fails on a batch sliced from a longer one
        norms.setdefault(Embedding, lambda layer, activations, backprops: embedding_norms(
            layer, [a.contiguous() for a in activations], backprops))

