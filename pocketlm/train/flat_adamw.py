"""The end of a batch-thread training step on one flat buffer: the threads' gradients summed, their norm
for clipping, and PyTorch's fused AdamW, each one call over every parameter instead of one per tensor.

Why: with batch threads (batch_threads.py) that end of the step runs on one core while the other waits.
Over a shakespeare-char model's 39 tensors it took 1.7 ms of an 18.7 ms step; on one buffer, 1.3 ms
(BENCHMARKS.md). The parameters, their gradients and AdamW's moments become views of four flat fp32
buffers, laid out group by group so that each parameter group is one slice. The optimizer keeps its
per-parameter state (those views, and a step count per parameter), so checkpoints are written and read as
before; the update is the same fused kernel torch.optim.AdamW(fused=True) calls, on the same numbers.
"""

from __future__ import annotations

from typing import Sequence

import torch


class FlatAdamW:
    """Flat buffers for a fused AdamW's parameters (see the module docstring). Build it after the
    optimizer's state is loaded (a resumed run): that state is copied into the buffers."""

    @staticmethod
    def applies(optimizer: torch.optim.Optimizer, trainable: Sequence[torch.Tensor]) -> bool:
        """Whether the optimizer is a plain fused AdamW over fp32 CPU parameters, exactly `trainable`."""
        d = optimizer.defaults
        if not (isinstance(optimizer, torch.optim.AdamW) and d.get("fused") and not d.get("amsgrad")
                and not d.get("maximize") and not d.get("capturable") and not d.get("differentiable")):
            return False
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return ({id(p) for p in params} == {id(p) for p in trainable} and len(params) == len(trainable)
                and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params))

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        total = sum(p.numel() for p in params)
        self.weights, self.grads = torch.empty(total), torch.zeros(total)
        self.exp_avg, self.exp_avg_sq = torch.zeros(total), torch.zeros(total)
        self.ranges: list[tuple[int, int]] = []  # each group's slice
        self.steps: list[torch.Tensor] = []  # every parameter's step count (AdamW's state), kept equal
        self._grad_views: dict[int, torch.Tensor] = {}
        at = 0
        for group in optimizer.param_groups:
            start = at
            for p in group["params"]:
                n = p.numel()
                state = optimizer.state[p]
                for name, buffer in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                    view = buffer[at:at + n].view_as(p)
                    if name in state:
                        view.copy_(state[name])
                    state[name] = view
                state.setdefault("step", torch.tensor(0.0))
                self.steps.append(state["step"])
                weight = self.weights[at:at + n].view_as(p)
                weight.copy_(p.detach())
                p.data = weight
                p.grad = self._grad_views[id(p)] = self.grads[at:at + n].view_as(p)
                at += n
            self.ranges.append((start, at))
        if len({float(s) for s in self.steps}) > 1:
            raise ValueError("FlatAdamW: the parameters' AdamW step counts differ; they must have been "
                             "stepped together")
        self._params = params

    def gather(self, trainable: Sequence[torch.Tensor], per_slice: Sequence[Sequence[torch.Tensor | None]],
               accumulate: bool) -> None:
        """Each slice's gradients (torch.autograd.grad's over `trainable`) into the flat gradient, slice by
        slice in order: copied from the first unless `accumulate` (a later micro-batch), added after."""
        views = [self._grad_views[id(p)] for p in trainable]
        for i, grads in enumerate(per_slice):
            pairs = [(v, g) for v, g in zip(views, grads) if g is not None]
            if i == 0 and not accumulate:
                if len(pairs) < len(views):
                    self.grads.zero_()  # a parameter this step did not use has no gradient
                torch._foreach_copy_([v for v, _ in pairs], [g for _, g in pairs])
            elif pairs:
                torch._foreach_add_([v for v, _ in pairs], [g for _, g in pairs])

    def clip(self, max_norm: float) -> torch.Tensor:
        """The gradients' total norm; AdamW will scale them to at most max_norm (the divisor it takes as
        `grad_scale`, as GradScaler unscales with)."""
        norm = torch.linalg.vector_norm(self.grads)
        self.optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
        return norm

    def step(self) -> None:
        """One AdamW update of every parameter, with each group's current hyperparameters."""
        scale = getattr(self.optimizer, "grad_scale", None)
        torch._foreach_add_(self.steps, 1)
        first = 0
        for group, (start, end) in zip(self.optimizer.param_groups, self.ranges):
            if end > start:
                beta1, beta2 = group["betas"]
                torch._fused_adamw_([self.weights[start:end]], [self.grads[start:end]],
                                    [self.exp_avg[start:end]], [self.exp_avg_sq[start:end]], [],
                                    [self.steps[first]], lr=group["lr"], beta1=beta1, beta2=beta2,
                                    weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                                    maximize=False, grad_scale=scale, found_inf=None)
            first += len(group["params"])
        self.optimizer.grad_scale = None

    def release(self) -> None:
        """Give each parameter its own storage again (the model outlives the run's buffers), and drop
        the gradients."""
        for p in self._params:
            p.data = p.data.clone()
            p.grad = None
