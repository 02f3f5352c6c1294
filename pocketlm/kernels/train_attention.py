"""Causal self-attention for training on a CPU in one kernel call forward and one backward
(csrc/train_attention.cpp): RoPE, scores, softmax and the weighted values of every (batch row, key/value
head), reading q, k and v where the projections wrote them and writing the output where o_proj reads it.

As PyTorch ops the same attention is six small batched matmuls a layer, a softmax and its backward, RoPE
and the transposes between them, a sixth of a shakespeare-char training step
(docs/benchmarks-history.md). The model uses the kernel when it trains on an x86 CPU from position 0 (no KV cache, no
prefix adapter); elsewhere, and with POCKETLM_CPU_KERNELS=0, attention stays PyTorch's. The kernel is
built with pocketlm's other CPU kernels (cpu_ops.py) on first use.
"""

from __future__ import annotations

import os

import torch

from . import cpu_ops

_decided: dict[str, bool] = {}
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    """Whether the kernel is built and loaded (decided once per process: a compiled graph cannot build it)."""
    if "ok" not in _decided:
        _decided["ok"] = (os.environ.get(cpu_ops.SWITCH, "1") != "0" and cpu_ops.load()
                          and _register())
    return _decided["ok"]


def serves(x: torch.Tensor) -> bool:
    """Whether attention over these activations can go through the kernel (on the CPU, once loaded). Under
    torch.compile the kernel must have been decided before (`available()`; the training loop does it):
    building it cannot be traced, and a graph broken there stays broken."""
    if x.device.type != "cpu":
        return False
    if "ok" not in _decided and torch.compiler.is_compiling():
        return False
    return available()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
    """softmax(rope(q) rope(k)^T / sqrt(head_dim), causal) v for q (batch, seq, heads, head_dim) and k, v
    (batch, seq, kv_heads, head_dim), the innermost dimension contiguous (views of the projections are
    fine); cos and sin hold positions 0..seq-1 (any leading dimensions of size 1). Returns (batch, seq,
    heads, head_dim) in q's dtype; differentiable in q, k and v."""
    dtype = q.dtype
    if dtype not in KERNEL_DTYPES:  # fp16 or fp64: computed in fp32
        q, k, v = q.float(), k.float(), v.float()
    cos = cos.reshape(-1, q.shape[-1]).float().contiguous()
    sin = sin.reshape(-1, q.shape[-1]).float().contiguous()
    out, _ = torch.ops.pocketlm.causal_attention(q, k, v, cos, sin)
    return out.to(dtype)


def _register() -> bool:
    """Shapes for torch.compile (once per process; the backward for autograd is registered in C++)."""

    @torch.library.register_fake("pocketlm::causal_attention")
    def _(q, k, v, cos, sin):
        b, t, h, d = q.shape
        return q.new_empty(b, t, h, d), q.new_empty(b, h, t, dtype=torch.float32)

    @torch.library.register_fake("pocketlm::causal_attention_backward")
    def _(dout, q, k, v, cos, sin, lse):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    return True
