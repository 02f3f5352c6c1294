"""GGUF export of a quantized model directory, block for block, with no float copy in between.

pocketlm's int8 (a scale per row, fp16-exact) is llama.cpp's Q8_0 with every 32-block of a row carrying
the row's scale; int4 (a scale and a min per group, fp16-exact) is Q4_1 with each group's scale and min
repeated over its 32-blocks, or Q4_0 when symmetric (min = -8 * scale). So the file holds exactly the
weights the pocketlm model computes with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType

from ..errors import UnsupportedModelError
from ..quant import Int4Linear, Int8Embedding, Int8Linear, QuantScheme, unpack_int4

BLOCK = 32


def _fp16_bytes(values: torch.Tensor) -> np.ndarray:
    """(..., n) float values -> (..., n, 2) bytes of their fp16 form."""
    return values.to(torch.float16).numpy().view(np.uint8).reshape(*values.shape, 2)


def q8_0_blocks(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """int8 codes (rows, cols) with one scale per row -> Q8_0 bytes (rows, cols / 32 * 34)."""
    rows, cols = codes.shape
    blocks = cols // BLOCK
    d = _fp16_bytes(scales[:, None].expand(rows, blocks).contiguous())  # (rows, blocks, 2)
    qs = codes.numpy().view(np.uint8).reshape(rows, blocks, BLOCK)
    return np.concatenate([d, qs], axis=-1).reshape(rows, blocks * (2 + BLOCK))


def q4_blocks(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
              symmetric: bool) -> np.ndarray:
    """int4 codes with per-group scale/min -> Q4_0 (symmetric) or Q4_1 bytes, 32 columns per block."""
    codes = unpack_int4(packed, group_size)
    rows, cols = codes.shape
    blocks = cols // BLOCK
    per = group_size // BLOCK
    b = codes.reshape(rows, blocks, 2, BLOCK // 2)
    qs = (b[:, :, 0] | (b[:, :, 1] << 4)).numpy()  # byte j: code j | code j+16 << 4
    d = _fp16_bytes(scales.repeat_interleave(per, dim=1).contiguous())
    if symmetric:
        return np.concatenate([d, qs], axis=-1).reshape(rows, -1)
    m = _fp16_bytes(mins.repeat_interleave(per, dim=1).contiguous())
    return np.concatenate([d, m, qs], axis=-1).reshape(rows, -1)


def file_type(scheme: QuantScheme) -> LlamaFileType:
    if scheme.method == "int8":
        return LlamaFileType.MOSTLY_Q8_0
    return LlamaFileType.MOSTLY_Q4_0 if scheme.symmetric else LlamaFileType.MOSTLY_Q4_1


def outtype_name(scheme: QuantScheme) -> str:
    return {LlamaFileType.MOSTLY_Q8_0: "q8_0", LlamaFileType.MOSTLY_Q4_0: "q4_0",
            LlamaFileType.MOSTLY_Q4_1: "q4_1"}[file_type(scheme)]


def quantized_tensors(model) -> Iterator[tuple[str, np.ndarray, GGMLQuantizationType]]:
    """(GGUF name, stored array, GGML type) for every tensor of a quantized LlamaForCausalLM."""
    from .gguf import gguf_name, permute_qk

    config = model.config
    scheme: QuantScheme = model.quant_scheme

    def rows_in_gguf_order(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.endswith(".q_proj"):
            return permute_qk(t, config.num_attention_heads)
        if name.endswith(".k_proj"):
            return permute_qk(t, config.num_key_value_heads)
        return t

    for name, module in model.named_modules():
        if name == "lm_head" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd
        if isinstance(module, (Int8Linear, Int8Embedding)):
            if module.weight.shape[1] % BLOCK:
                raise UnsupportedModelError(f"{name}: rows of {module.weight.shape[1]} are not whole 32-blocks; "
                                            "export the float model with --outtype f16 instead")
            codes = rows_in_gguf_order(name, module.weight)
            scales = rows_in_gguf_order(name, module.scales)
            yield gguf_name(name + ".weight"), q8_0_blocks(codes, scales), GGMLQuantizationType.Q8_0
        elif isinstance(module, Int4Linear):
            packed, scales, mins = (rows_in_gguf_order(name, t) for t in (module.weight, module.scales, module.mins))
            qtype = GGMLQuantizationType.Q4_0 if scheme.symmetric else GGMLQuantizationType.Q4_1
            yield gguf_name(name + ".weight"), q4_blocks(packed, scales, mins, module.group_size, scheme.symmetric), qtype
        else:
            continue
        if getattr(module, "bias", None) is not None:
            yield gguf_name(name + ".bias"), rows_in_gguf_order(name, module.bias).float().numpy(), GGMLQuantizationType.F32
    for name, p in model.named_parameters():  # what stayed float: norms, and the head/embedding when not quantized
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        values = p.detach().float()
        if p.dim() == 1:
            yield gguf_name(name), values.numpy(), GGMLQuantizationType.F32
        else:
            yield gguf_name(name), values.numpy().astype(np.float16), GGMLQuantizationType.F16


def export_quantized_gguf(model_dir: str | Path, out_path: str | Path) -> Path:
    from ..checkpoint import load_model
    from .gguf import write_gguf_arrays

    model, tokenizer = load_model(model_dir)
    return write_gguf_arrays(out_path, model.config, tokenizer, quantized_tensors(model),
                             file_type(model.quant_scheme), name=Path(model_dir).name)
