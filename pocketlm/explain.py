"""`pocketlm bench MODEL --explain`: which kernel each layer of a model runs on this CPU, and why.

The choice is made in the layers and kernels (kernels/cpu_ops.py: the family; kernels/qdot.py: the
instruction set, measured once per machine; kernels/decode_step.py: whether the whole step is one call);
this reads the same decisions back, so it says what decoding will do, not what it might.
"""

from __future__ import annotations

import re

import torch

from .kernels import cpu_features, cpu_ops, decode_step, qdot
from .kernels.dispatch import kernel_weights
from .quant import QUANTIZED_LINEARS, Int4Linear

FAMILY = {"qdot": "qdot: activations quantized to int8 per block of 32, integer dot products",
          "exact": "fp32 activations, exact products of the quantized weights (POCKETLM_CPU_KERNELS=exact)",
          "off": "switched off (POCKETLM_CPU_KERNELS=0): PyTorch's kernels and inductor's loops"}
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_int8",
              "amx_bf16")


def explain(model) -> list[str]:
    """Lines of text: the CPU, the kernel family and instruction set with the reason, the decode path, and a
    table of the layers (grouped across blocks) with the kernel each uses and why."""
    flags = cpu_features._flags() or set()
    lines = ["CPU: " + cpu_features.model_name() + "; " + (" ".join(f for f in SIMD_FLAGS if f in flags) or "no x86 SIMD flags read")]
    available = cpu_ops.available()
    mode = cpu_ops.mode()
    if not available:
        why = FAMILY["off"] if mode == "off" else "pocketlm's kernels are not available here (not x86 with AVX2, or no C++ compiler)"
        lines.append("kernels: " + why)
    else:
        lines.append("kernels: " + FAMILY[mode])
        if mode == "qdot":
            choice = qdot.choose()
            lines.append(f"instruction set: {choice['isa']} ({choice['reason']}); this CPU runs {', '.join(qdot.supported())}")
    lines.append("decoding: " + _decode_path(model))
    lines += ["", "| layers | weights | shape (out x in) | kernel | why |", "|---|---|---|---|---|"]
    rows: dict[tuple, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (*QUANTIZED_LINEARS, torch.nn.Linear)) and not _inside_quantized(model, name):
            rows.setdefault(_describe(module), []).append(name)
    for (weights, shape, kernel, why), names in rows.items():
        lines.append(f"| {_group(names)} | {weights} | {shape} | {kernel} | {why} |")
    return lines


def _describe(module) -> tuple[str, str, str, str]:
    shape = f"{module.out_features} x {module.in_features}"
    if not isinstance(module, QUANTIZED_LINEARS):
        return str(module.weight.dtype).removeprefix("torch."), shape, "PyTorch matmul", "float weights"
    if isinstance(module, Int4Linear):
        weights = f"int4 group {module.group_size}"
    else:
        weights = "int8 per channel"
    packed = kernel_weights(module)
    if packed is None:
        why = "pocketlm's kernels are off or unavailable" if not cpu_ops.available() else "scales that are not fp16 values, or rows not a multiple of 8"
        return weights, shape, "PyTorch (int4/int8 packed kernels, dequantized matmul for prompts)", why
    if packed.kind.startswith("qdot-"):
        return weights, shape, f"qdot {packed.kind[5:]} ({qdot.active()})", "fits qdot's blocks (16 rows, 32 columns) - every row count"
    if cpu_ops.mode() == "qdot":
        why = "not whole blocks of 16 rows and 32 columns (or group not a multiple of 32) for qdot"
    else:
        why = "POCKETLM_CPU_KERNELS=exact"
    return weights, shape, f"fp32-activation {packed.kind} (AVX2)", why + "; prompts of 16+ rows: dequantized matmul"


def _decode_path(model) -> str:
    if decode_step.serves(model):
        return "the whole-step kernel: one call per token for every batch size (kernels/decode_step.py)"
    if not model.native_decoding:
        return "the Python step (native decoding switched off)"
    if not any(isinstance(m, QUANTIZED_LINEARS) for m in model.modules()):
        return "the Python step (compiled with torch.compile unless --no-compile): the whole-step kernel runs quantized models"
    if cpu_ops.available() and decode_step.step_weights(model) is None:
        return ("the Python step, one kernel call per layer: the whole-step kernel needs every projection and the "
                "head quantized, fp32 activations and head_dim a multiple of 8")
    return "the Python step (compiled with torch.compile unless --no-compile)"


def _inside_quantized(model, name: str) -> bool:
    """A float Linear inside a LoRA-wrapped quantized layer is reported with its parent."""
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return bool(parent) and isinstance(model.get_submodule(parent), QUANTIZED_LINEARS)


def _group(names: list[str]) -> str:
    """model.layers.0.mlp.up_proj ... model.layers.29.mlp.up_proj -> model.layers.0-29.mlp.up_proj"""
    patterns: dict[str, list[int]] = {}
    for name in names:
        m = re.match(r"(.*?\.)(\d+)(\..*)", name)
        if m:
            patterns.setdefault(m.group(1) + "{}" + m.group(3), []).append(int(m.group(2)))
        else:
            patterns.setdefault(name, [])
    parts = []
    for pattern, numbers in patterns.items():
        if not numbers:
            parts.append(pattern)
        else:
            span = f"{min(numbers)}-{max(numbers)}" if len(numbers) > 1 else str(numbers[0])
            parts.append(pattern.format(span))
    return ", ".join(parts)
