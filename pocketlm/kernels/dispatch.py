"""The interface between layers and pocketlm's kernels.

A layer takes part by offering `kernel_weights()`: its weights packed as the kernels read them
(`KernelWeights`), or None where the kernels cannot run it. The model and the whole-step kernel ask
for that and nothing else, so the kernels never see quant's classes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import cpu_ops, qdot

EXACT_ROWS = 16  # from this many rows on, CPU matmuls outside qdot dequantize to fp32 (exact) instead of using bf16 kernels


class KernelWeights(NamedTuple):
    """One projection as `cpu_ops.int8_linear` / `cpu_ops.int4_linear` (fp32 activations) or
    `qdot.int8_linear` / `qdot.int4_linear` (int8 activations) read it."""
    kind: str  # "int8", "int4", "qdot-int8" or "qdot-int4"
    codes: torch.Tensor  # int8: (out, in) int8; int4: the codes in quant.int4_words' layout, as int32; qdot: its layout
    scales: torch.Tensor  # int8: fp32 (out,); int4: fp16 scales and mins in the block layout; qdot: likewise in its own
    group_size: int  # int4's group of input columns; 0 for int8
    out_features: int
    bias: torch.Tensor | None


def kernel_weights(layer) -> KernelWeights | None:
    """The layer's packed weights, where it offers them and the kernels serve it."""
    offer = getattr(layer, "kernel_weights", None)
    return None if offer is None else offer()


def fused_projections(x: torch.Tensor, layers) -> list[torch.Tensor] | None:
    """The outputs of several projections of the same input (q, k, v; gate, up; or one layer) from one call of
    pocketlm's kernels: each call pays dispatch and thread start-up, and a decode step of SmolLM2
    makes 210 of them unfused. The qdot kernels take any number of rows (prompts too: they beat
    dequantizing the weights for PyTorch's matmul at every row count); the fp32-activation ones fewer than
    EXACT_ROWS. None where the kernels do not serve all the layers, or where autograd needs the input's
    gradient (the kernels have none)."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return None
    packed = [kernel_weights(m) for m in layers]
    if any(p is None for p in packed) or len({(p.kind, p.group_size) for p in packed}) != 1:
        return None
    if rows >= EXACT_ROWS and not packed[0].kind.startswith("qdot-"):
        return None
    flat = x.reshape(rows, -1)
    if packed[0].kind == "qdot-int4":
        y = qdot.int4_linear(flat, [p.codes for p in packed], [p.scales for p in packed], packed[0].group_size)
    elif packed[0].kind == "qdot-int8":
        y = qdot.int8_linear(flat, [p.codes for p in packed], [p.scales for p in packed])
    elif packed[0].kind == "int4":
        y = cpu_ops.int4_linear(flat, [p.codes for p in packed], [p.scales for p in packed], packed[0].group_size)
    else:
        y = cpu_ops.int8_linear(flat, [p.codes for p in packed], [p.scales for p in packed])
    outs = y.reshape(*x.shape[:-1], -1).split([p.out_features for p in packed], dim=-1)
    return [(o if p.bias is None else o + p.bias).to(x.dtype) for o, p in zip(outs, packed)]
