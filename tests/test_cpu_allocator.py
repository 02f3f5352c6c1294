"""The caching CPU allocator used while training (pocketlm/kernels/csrc/cpu_allocator.cpp, kernels/allocator.py)."""

from __future__ import annotations

import pytest
import torch

from pocketlm.kernels import allocator, cpu_ops

pytestmark = pytest.mark.skipif(not cpu_ops.load(), reason="needs an x86 CPU with AVX2 and a C++ compiler")


def test_freed_blocks_are_reused_and_given_back():
    with allocator.cached_cpu_memory() as on:
        assert on
        a = torch.empty(300_000)  # 1.2 MB
        where = a.data_ptr()
        del a
        b = torch.ones(299_000)  # a little smaller: the same size class, the same block
        assert b.data_ptr() == where and b.data_ptr() % 64 == 0
        assert torch.equal(b, torch.ones(299_000))
        del b
        assert held() >= 1_200_000
    assert held() == 0  # turning it off gave the blocks back
    torch.empty(300_000).fill_(1.0)  # made and freed by the default allocator again: nothing held
    assert held() == 0


def test_cap_bounds_the_blocks_held(monkeypatch):
    monkeypatch.setattr(allocator, "CAP_BYTES", 3 << 20)
    with allocator.cached_cpu_memory():
        blocks = [torch.empty(250_000) for _ in range(5)]  # 5 x 1 MB
        del blocks
        assert held() <= 3 << 20


def test_tensors_outlive_the_block_and_training_math_is_unchanged():
    torch.manual_seed(0)
    x = torch.randn(64, 96)
    w = torch.randn(96, 32, requires_grad=True)
    (x @ w).square().sum().backward()
    expected = w.grad.clone()
    w.grad = None
    with allocator.cached_cpu_memory():
        for _ in range(3):
            w.grad = None
            (x @ w).square().sum().backward()
        kept = w.grad
    assert torch.equal(kept, expected)
    del kept, w  # freed after caching stopped: back to the system, not into a bin
    assert held() == 0


def test_switched_off_with_the_kernels(monkeypatch):
    monkeypatch.setenv(cpu_ops.SWITCH, "0")
    with allocator.cached_cpu_memory() as on:
        assert not on
    with allocator.cached_cpu_memory(enabled=False) as on:
        assert not on


def held() -> int:
    return torch.ops.pocketlm.cpu_cached_bytes()
