"""A training slice's forward and backward as one compiled graph, for the CPU batch threads: the loss, its
metrics and the gradients come out of a single function call.

Why: `torch.compile` of the loss compiles a forward graph and a backward graph. Each slice then goes through
dynamo's frame hook and AOTAutograd's Python wrappers, the autograd engine, and the backward's wrappers,
largely holding the GIL while the other batch thread waits for it. Here the loss and `torch.autograd.grad`
are traced together with make_fx into one graph of aten ops, in which the gradients are plain outputs, and
inductor compiles it as it compiles an inference graph, called directly (`torch._inductor.compile`: no
frame hook, no guards; the batch's shapes and strides pick the graph). On a shakespeare-char step with two
batch threads the slices ran about 7% faster than with the compiled loss and autograd, and another 3-4%
without dynamo's entry (BENCHMARKS.md).

The trace runs on fake tensors with static shapes, once per batch shape. Whatever depends on tensor values
(a boolean mask, `.item()`) cannot be traced that way: for such an objective, or a model that samples random
numbers (dropout), the loop keeps the compiled loss and autograd, and logs why once (INFO, this module's
logger).
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager
from typing import Callable

import torch
from torch.fx.experimental.proxy_tensor import make_fx

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# (loss, metrics, gradients): a tuple in `trainable`'s order, or one flat tensor (flat_order)
Result = tuple[torch.Tensor, dict[str, torch.Tensor], tuple[torch.Tensor | None, ...] | torch.Tensor]


class JointGradients:
    """`(batch, scale) -> (scaled loss, metrics, gradients of trainable)`, like the loop's compiled loss
    followed by torch.autograd.grad, or None for a batch whose graph cannot be traced (the caller then
    takes that path itself). Parameters are graph inputs, read at every call: updating them in place
    (FlatAdamW) or replacing them with tensors of the same shape, type and layout is fine. Safe to call
    from several threads at once."""

    def __init__(self, loss: LossFn, model: torch.nn.Module, trainable: list[torch.Tensor],
                 autocast: Callable[[], AbstractContextManager], flat_order: list[int] | None = None):
        """With `flat_order` (positions in `trainable`), the gradients come as one flat fp32 tensor, those
        parameters' gradients flattened one after another in that order (zeros for an unused one), as
        FlatAdamW lays them out: the graph writes them there, and summing slices is one add."""
        self.loss, self.model, self.autocast, self.flat_order = loss, model, autocast, flat_order
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        ids = {id(p): i for i, p in enumerate(self.params)}
        if any(id(p) not in ids for p in trainable):
            raise ValueError("JointGradients: a trainable tensor is not one of the model's parameters")
        self.trainable_at = [ids[id(p)] for p in trainable]
        self._graphs: dict[tuple, _Graph | None] = {}  # compiled graph per batch signature; None: untraceable
        self._lock = threading.Lock()  # one trace and compile at a time (two at once can hang)

    def __call__(self, batch: dict[str, torch.Tensor], scale: float) -> Result | None:
        keys = sorted(batch)
        if not all(isinstance(batch[k], torch.Tensor) for k in keys):
            return None
        # the compiled code has no guards: it is for tensors of these shapes, strides, types and devices
        signature = tuple((k, tuple(batch[k].shape), batch[k].stride(), batch[k].dtype, batch[k].device) for k in keys)
        graph = self._graphs.get(signature, False)
        if graph is False:
            with self._lock:
                graph = self._graphs.get(signature, False)
                if graph is False:
                    graph = self._graphs[signature] = self._build(keys, batch)
        return None if graph is None else graph(self.params, scale, [batch[k] for k in keys])

    def _build(self, keys: list[str], batch: dict) -> _Graph | None:
        model, names, trainable_at, flat_order = self.model, self.names, self.trainable_at, self.flat_order
        n = len(self.params)
        layout: dict[str, list] = {}  # what the trace found: the metrics' names, the unused parameters

        def slice_step(*inputs):  # flat tensors in and out: what inductor compiles without wrappers
            params, scale, tensors = inputs[:n], inputs[n], inputs[n + 1:]
            weights = dict(zip(names, params))
            with torch.enable_grad(), self.autocast():
                loss, metrics = self.loss(lambda *a, **kw: torch.func.functional_call(model, weights, a, kw),
                                          dict(zip(keys, tensors)))
                loss = loss * scale
            wrt = [params[i] for i in trainable_at]
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            layout["metrics"] = sorted(metrics)
            layout["unused"] = [i for i, g in enumerate(grads) if g is None]
            if flat_order is not None:
                grads = [torch.cat([(torch.zeros_like(wrt[i]) if grads[i] is None else grads[i]).reshape(-1).float()
                                    for i in flat_order])]
            return (loss.detach(), *(metrics[k].detach() for k in layout["metrics"]),
                    *(g for g in grads if g is not None))

        wanted = set(trainable_at)
        inputs = [*(p.detach().requires_grad_(i in wanted) for i, p in enumerate(self.params)), torch.tensor(1.0),
                  *(batch[k] for k in keys)]
        try:
            # once for real first: tables the model builds on first use (RoPE's, the causal mask) must be
            # real tensors, not the trace's fakes; the trace reads them as constants
            with torch.no_grad(), self.autocast():
                self.loss(model, batch)
            traced = make_fx(slice_step, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
            with torch.no_grad():
                compiled = torch._inductor.compile(traced, [t.detach() for t in inputs], options={"cpp_wrapper": True})
        except Exception as error:  # noqa: BLE001 - untraceable (value-dependent): the usual path instead
            log.info("training slices: forward and backward stay separate graphs (%s: %s)",
                     type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            return None
        return _Graph(compiled, layout["metrics"], layout["unused"], flat_order is not None)

class _Graph:
    """One compiled slice step and how to read its flat outputs."""

    def __init__(self, compiled: Callable, metrics: list[str], unused: list[int], flat: bool):
        self.compiled, self.metrics, self.unused, self.flat = compiled, metrics, unused, flat

    def __call__(self, params: list[torch.Tensor], scale: float, tensors: list[torch.Tensor]) -> Result:
        with torch.no_grad():
            out = self.compiled(*(p.detach() for p in params), torch.tensor(scale, dtype=torch.float32), *tensors)
        m = len(self.metrics)
        loss, metrics, grads = out[0], dict(zip(self.metrics, out[1:1 + m])), list(out[1 + m:])
        if self.flat:
            return loss, metrics, grads[0]
        for i in self.unused:
            grads.insert(i, None)
        return loss, metrics, tuple(grads)
