"""Caching of CPU tensor memory while a model trains (csrc/cpu_allocator.cpp): freed tensor blocks are kept
by size and reused, instead of going back to glibc's malloc every time.

A training step frees and allocates the same few hundred buffers every step, and glibc spends a
measurable share of a shakespeare-char step serving them (perf); caching them made the step faster in the
same process, turned on and off in turns (docs/benchmarks-history.md). Preloading tcmalloc gained more:
it also serves oneDNN's own small aligned allocations, which do not come here.

At most CAP_BYTES of free blocks are held; turning caching off gives them back. It lives in pocketlm's
kernel library, so it is there wherever those kernels build (cpu_ops.py), and POCKETLM_CPU_KERNELS=0
turns it off with them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

from . import cpu_ops

CAP_BYTES = 1 << 30  # far above a small model's step; a larger step only caches less


@contextmanager
def cached_cpu_memory(enabled: bool = True) -> Iterator[bool]:
    """Cache CPU tensor memory inside the block (when `enabled` and the kernels load); yields whether it
    does. Tensors allocated inside may outlive the block: they are freed normally later."""
    on = enabled and os.environ.get(cpu_ops.SWITCH, "1") != "0" and cpu_ops.load()
    if on:
        torch.ops.pocketlm.cpu_caching_allocator(True, CAP_BYTES)
    try:
        yield on
    finally:
        if on:
            torch.ops.pocketlm.cpu_caching_allocator(False, 0)
