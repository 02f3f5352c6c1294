"""Data parallelism over threads for training on a CPU: each thread runs the forward and backward of one
slice of the step's batch with every op on a single core, instead of every op being split across the cores.

Why: for a small model the ops are small, and splitting each one across cores (PyTorch's intra-op
parallelism) costs a fork and a join per op, about 300 of them a step, while the second core waits through
the first one's Python and dispatch work. In a shakespeare-char step the second core idled for 31% of the
step; with a slice of the batch per thread the step ran 1.07-1.11x faster, 1.30-1.37x while the machine
was busy (BENCHMARKS.md).

The slices are micro-batches run at the same time: the loop scales their losses as it scales gradient
accumulation's, and their gradients are summed in slice order, so a run gives the same numbers every time
(the resume guarantee needs that), whichever thread finishes first.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def batch_thread_count(mode: str, threads: int, rows: int, device: torch.device, world: int,
                       random_forward: bool) -> int:
    """How many threads share a micro-batch of `rows` rows: 1 (intra-op parallelism instead) unless
    `mode` allows batch threads: a CPU, one process (DDP's hooks expect one backward at a time), and for
    `auto` no dropout (threads would draw random numbers in a varying order); as many threads as split the
    rows evenly (slices of one shape share one compiled graph)."""
    if mode == "ops" or device.type != "cpu" or world > 1 or threads < 2:
        return 1
    if random_forward and mode == "auto":
        return 1
    n = min(threads, rows)
    while rows % n:
        n -= 1
    return n


class BatchThreads:
    """`n` threads (the caller's and n - 1 more), every one limited to a single intra-op thread while this
    is open. Changing PyTorch's thread count is slow (milliseconds), so it is set once, here, not per step."""

    def __init__(self, n: int):
        self.n = n
        self._previous = torch.get_num_threads()
        torch.set_num_threads(1)
        self._pool = ThreadPoolExecutor(n - 1, thread_name_prefix="pocketlm-batch",
                                        initializer=torch.set_num_threads, initargs=(1,))

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn over items, the first on the calling thread and the rest on the pool, at the same time; the
        results (or the first error) in the items' order."""
        futures = [self._pool.submit(fn, item) for item in items[1:]]
        try:
            first = fn(items[0])
        except BaseException as error:
            wait(futures)  # all threads done before the error propagates
            raise _cause([error, *(f.exception() for f in futures)]) from None
        errors = [f.exception() for f in futures]
        if any(errors):
            raise _cause(errors)
        return [first, *(f.result() for f in futures)]

    def map_chunks(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn over any number of items, split into n contiguous runs, one per thread; results in order."""
        size = -(-len(items) // self.n)
        runs = [items[i:i + size] for i in range(0, len(items), size)]
        if len(runs) < 2:
            return [fn(item) for item in items]
        return [r for run in self.map(lambda run: [fn(item) for item in run], runs) for r in run]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        torch.set_num_threads(self._previous)


def _cause(errors: Sequence[BaseException | None]) -> BaseException:
    """The error to report from threads that failed together: the first that is not a broken barrier
    (threads released because another one failed), else the first."""
    errors = [e for e in errors if e is not None]
    return next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])


def sum_gradients(params: Sequence[torch.nn.Parameter], per_slice: Sequence[Sequence[torch.Tensor | None]]) -> None:
    """Add each slice's gradients (torch.autograd.grad's, one list per slice) into the parameters' .grad,
    slice by slice in order."""
    for grads in per_slice:
        pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
        adding = [(p, g) for p, g in pairs if p.grad is not None]
        for p, g in pairs:
            if p.grad is None:
                p.grad = g
        if adding:
            torch._foreach_add_([p.grad for p, _ in adding], [g for _, g in adding])

