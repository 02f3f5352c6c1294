"""The end of a batch-thread training step on flat buffers: the slices' gradients summed, their norm for
clipping, and PyTorch's fused AdamW, each a few calls over every parameter instead of one per tensor, and
shared out among the batch threads instead of run by one of them while the others wait.

Why: with batch threads (batch_threads.py) the end of the step ran on one core, tensor by tensor over a
shakespeare-char model's 39 tensors. Over one flat buffer it is faster, and faster again shared by the
two threads (each sums, clips and updates about half of the parameters, meeting twice at a barrier: once
all gradients are in, once every share's sum of squares is) (docs/benchmarks-history.md). It is bound by memory
traffic: AdamW reads and writes 16 bytes of state per parameter, out of cache after the step's activations.

The parameters, their gradients and AdamW's moments and step counts become views of flat fp32 buffers,
laid out group by group so that each parameter group is one slice. The optimizer keeps its per-parameter
state (those views), so checkpoints are written and read as before; the update is the kernel
torch.optim.AdamW(fused=True) calls, and one thread or several give the same bits.
"""
from __future__ import annotations

import math
import threading
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

    def __init__(self, optimizer: torch.optim.Optimizer, trainable: Sequence[torch.Tensor], parts: int = 1):
        self.optimizer = optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        total = sum(p.numel() for p in params)
        self.weights, self.grads = torch.empty(total), torch.zeros(total)
        self.exp_avg, self.exp_avg_sq = torch.zeros(total), torch.zeros(total)
        self.ranges: list[tuple[int, int]] = []  # each group's slice
        self.step_counts = torch.zeros(len(params))  # every parameter's AdamW step (its state's "step" views one)
        self._grad_views: dict[int, torch.Tensor] = {}
        at = index = 0  # where p starts in the buffers; its place among the parameters
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
                step = self.step_counts[index]
                if "step" in state:
                    step.copy_(state["step"])
                state["step"] = step
                weight = self.weights[at:at + n].view_as(p)
                weight.copy_(p.detach())
                p.data = weight
                p.grad = self._grad_views[id(p)] = self.grads[at:at + n].view_as(p)
                at, index = at + n, index + 1
            self.ranges.append((start, at))
        if len(params) and bool((self.step_counts != self.step_counts[0]).any()):
            raise ValueError("FlatAdamW: the parameters' AdamW step counts differ; they must have been "
                             "stepped together")
        self._params = params
        self._parts = self._split(parts)
        self._barrier = threading.Barrier(parts) if parts > 1 else None
        self._squares: list[float | None] = [None] * parts
        self._grad_scale: torch.Tensor | None = None
        self._position = {id(p): k for k, p in enumerate(trainable)}  # where the slices' gradient lists hold p's

    def end_of_step(self, part: int, per_slice: list, accumulate: bool, update: bool,
                    max_norm: float) -> torch.Tensor | None:
        """Run by each of the `parts` batch threads at once, thread `part` after it stored its slice's
        gradients at per_slice[part] (torch.autograd.grad's over the trainable parameters, or one flat tensor
        laid out as the buffers are, see `order`): once all are there, each
        thread sums its share of the parameters' gradients (added to the flat gradient when `accumulate`, a
        later micro-batch) and, with `update`, clips and steps AdamW on that share. Returns the gradient
        norm (None without clipping or update). Any thread that fails must call `abort`."""
        self._barrier.wait()
        self._sum(part, per_slice, accumulate)
        if not update:
            return None
        self._squares[part] = self._square_sum(part) if max_norm > 0 else None
        if part == 0:
            self.step_counts.add_(1)
        self._barrier.wait()
        norm = self._scale(max_norm)
        self._update(part)
        return norm

    def abort(self) -> None:
        """Release the threads waiting in `end_of_step` (with threading.BrokenBarrierError)."""
        if self._barrier is not None:
            self._barrier.abort()

    def gather(self, per_slice: Sequence[Sequence[torch.Tensor | None] | torch.Tensor], accumulate: bool) -> None:
        """`end_of_step`'s sum on the calling thread alone: each slice's gradients into the flat gradient,
        in slice order (added to it when `accumulate`)."""
        for part in range(len(self._parts)):
            self._sum(part, per_slice, accumulate)

    def clip(self, max_norm: float) -> torch.Tensor:
        """The gradients' total norm; `step` will scale them to at most max_norm (AdamW's gradient
        divisor `grad_scale`, as GradScaler unscales with)."""
        self._squares = [self._square_sum(part) for part in range(len(self._parts))]
        return self._scale(max_norm)

    def step(self) -> None:
        """One AdamW update of every parameter on the calling thread (after `gather` and `clip`)."""
        self.step_counts.add_(1)
        for part in range(len(self._parts)):
            self._update(part)

    # each part is a run of whole parameters, about an equal share of the elements
    def _split(self, parts: int) -> list[tuple[list[torch.Tensor], int, int]]:
        sizes = [p.numel() for p in self._params]
        total, bounds, at = sum(sizes), [0], 0
        for i, n in enumerate(sizes):
            at += n
            if len(bounds) < parts and at >= total * len(bounds) / parts:
                bounds.append(i + 1)
        bounds += [len(sizes)] * (parts + 1 - len(bounds))
        offsets = [sum(sizes[:b]) for b in bounds]
        return [(self._params[bounds[k]:bounds[k + 1]], offsets[k], offsets[k + 1]) for k in range(parts)]

    @property
    def order(self) -> list[int]:
        """Where the flat buffers' parameters are in `trainable`, in buffer order: the layout a flat
        gradient handed to `end_of_step` or `gather` must have."""
        return [self._position[id(p)] for p in self._params]

    def _sum(self, part: int, per_slice, accumulate: bool) -> None:
        if isinstance(per_slice[0], torch.Tensor):  # flat gradients (joint_graph.py): one add per slice
            _, lo, hi = self._parts[part]
            self._add_into(self.grads[lo:hi], [g[lo:hi] for g in per_slice], accumulate)
            return
        for p in self._parts[part][0]:
            view = self._grad_views[id(p)]
            grads = [g[self._position[id(p)]] for g in per_slice]
            self._add_into(view, [g for g in grads if g is not None], accumulate)

    @staticmethod
    def _add_into(view: torch.Tensor, grads: list[torch.Tensor], accumulate: bool) -> None:
        """view = sum of grads in order (view + ... with `accumulate`; zeros for none)."""
        if accumulate:
            for g in grads:
                view.add_(g)
        elif not grads:
            view.zero_()  # a parameter no slice used
        elif len(grads) == 1:
            view.copy_(grads[0])
        else:
            torch.add(grads[0], grads[1], out=view)
            for g in grads[2:]:
                view.add_(g)

    def _square_sum(self, part: int) -> float:
        _, lo, hi = self._parts[part]
        return torch.dot(self.grads[lo:hi], self.grads[lo:hi]).item()

    def _scale(self, max_norm: float) -> torch.Tensor | None:
        """The norm from the parts' sums of squares (added in part order, so every thread gets the same),
        and AdamW's divisor for clipping to max_norm (clip_grad_norm_'s coefficient, inverted). In Python
        floats: as tensor ops these few numbers cost each thread a noticeable slice of a step, waiting for the GIL."""
        if max_norm <= 0:
            self._grad_scale = None
            return None
        norm = math.sqrt(sum(self._squares))
        self._grad_scale = torch.tensor(max((norm + 1e-6) / max_norm, 1.0))
        return torch.tensor(norm)

    def _update(self, part: int) -> None:
        _, lo, hi = self._parts[part]
        first = 0
        for group, (start, end) in zip(self.optimizer.param_groups, self.ranges):
            a, b = max(start, lo), min(end, hi)
            if a < b:
                beta1, beta2 = group["betas"]
                torch._fused_adamw_([self.weights[a:b]], [self.grads[a:b]], [self.exp_avg[a:b]],
                                    [self.exp_avg_sq[a:b]], [], [self.step_counts[first]], lr=group["lr"], beta1=beta1,
                                    beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                    amsgrad=False, maximize=False, grad_scale=self._grad_scale, found_inf=None)
            first += len(group["params"])

    def release(self) -> None:
        """Give each parameter its own storage again (the model outlives the run's buffers), and drop
        the gradients."""
        for p in self._params:
            p.data = p.data.clone()
            p.grad = None
