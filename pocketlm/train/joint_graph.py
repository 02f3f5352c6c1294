"""A training slice's forward and backward as one compiled graph, for the CPU batch threads: the loss, its
metrics and the gradients come out of a single function call.

Why: `torch.compile` of the loss compiles a forward graph and a backward graph. Each slice then goes through
dynamo's frame hook and AOTAutograd's Python wrappers, the autograd engine, and the backward's wrappers,
largely holding the GIL while the other batch thread waits for it. Here the loss and `torch.autograd.grad`
are traced together with make_fx into one graph of aten ops, in which the gradients are plain outputs, and
inductor compiles it as it compiles an inference graph: one entry a slice. On a shakespeare-char step with
two batch threads the slices ran about 7% faster than with the compiled loss and autograd (BENCHMARKS.md).

The trace runs on fake tensors with static shapes, once per batch shape. Whatever depends on tensor values
(a boolean mask, `.item()`) cannot be traced that way: for such an objective, or a model that samples random
numbers (dropout), the loop keeps the compiled loss and autograd, and says so once.
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
Result = tuple[torch.Tensor, dict[str, torch.Tensor], tuple[torch.Tensor | None, ...]]


class JointGradients:
    """`(batch, scale) -> (scaled loss, metrics, gradients of trainable)`, like the loop's compiled loss
    followed by torch.autograd.grad, or None for a batch whose graph cannot be traced (the caller then
    takes that path itself). Parameters are graph inputs, read at every call: updating them in place
    (FlatAdamW) or replacing them is fine. Safe to call from several threads at once."""

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
        missing = [p for p in trainable if id(p) not in ids]
        if missing:
            raise ValueError("JointGradients: a trainable tensor is not one of the model's parameters")
        self.trainable_at = [ids[id(p)] for p in trainable]
        self._graphs: dict[tuple, Callable | None] = {}  # compiled graph per batch signature; None: untraceable
        self._lock = threading.Lock()  # one trace and compile at a time (two at once can hang)

    def __call__(self, batch: dict[str, torch.Tensor], scale: float) -> Result | None:
        keys = sorted(batch)
        if not all(isinstance(batch[k], torch.Tensor) for k in keys):
            return None
        signature = tuple((k, tuple(batch[k].shape), batch[k].dtype, batch[k].device) for k in keys)
        graph = self._graphs.get(signature, False)
        if graph is False:
            with self._lock:
                graph = self._graphs.get(signature, False)
                if graph is False:
                    graph = self._build(keys, batch)
                    if graph is not None:
                        try:
                            out = self._run(graph, keys, batch, scale)  # compiles here
                        except Exception as error:  # noqa: BLE001 - any failure: the usual path instead
                            self._give_up(signature, error)
                            return None
                        self._graphs[signature] = graph
                        return out
                    self._graphs[signature] = None
        return None if graph is None else self._run(graph, keys, batch, scale)

    def _run(self, graph: Callable, keys: list[str], batch: dict, scale: float) -> Result:
        with torch.no_grad():
            loss, metrics, grads = graph([p.detach() for p in self.params],
                                         torch.tensor(scale, dtype=torch.float32), [batch[k] for k in keys])
        return loss, metrics, grads if self.flat_order is not None else tuple(grads)

    def _build(self, keys: list[str], batch: dict) -> Callable | None:
        model, names, trainable_at, flat_order = self.model, self.names, self.trainable_at, self.flat_order

        def slice_step(params, scale, tensors):
            weights = dict(zip(names, params))
            with torch.enable_grad(), self.autocast():
                loss, metrics = self.loss(lambda *a, **kw: torch.func.functional_call(model, weights, a, kw),
                                          dict(zip(keys, tensors)))
                loss = loss * scale
            wrt = [params[i] for i in trainable_at]
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            if flat_order is not None:
                grads = torch.cat([(torch.zeros_like(wrt[i]) if grads[i] is None else grads[i]).reshape(-1).float()
                                   for i in flat_order])
            return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads

        wanted = set(trainable_at)
        params = [p.detach().requires_grad_(i in wanted) for i, p in enumerate(self.params)]
        try:
            # once for real first: tables the model builds on first use (RoPE's, the causal mask) must be
            # real tensors, not the trace's fakes; the trace reads them as constants
            with torch.no_grad(), self.autocast():
                self.loss(model, batch)
            traced = make_fx(slice_step, tracing_mode="fake", _allow_non_fake_inputs=True)(
                params, torch.tensor(1.0), [batch[k] for k in keys])
        except Exception as error:  # noqa: BLE001 - untraceable (value-dependent): the usual path instead
            self._give_up(None, error)
            return None
        return torch.compile(traced, fullgraph=True, options={"cpp_wrapper": True})

    def _give_up(self, signature, error: Exception) -> None:
        if signature is not None:
            self._graphs[signature] = None
        log.info("training slices: forward and backward stay separate graphs (%s: %s)",
                 type(error).__name__, str(error).splitlines()[0] if str(error) else "")
