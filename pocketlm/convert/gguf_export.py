"""Export: a model directory -> a GGUF file llama.cpp runs.

    export_gguf(model_dir, out_path)    float models as f32, f16, q8_0 or q4_0; quantized models as their own type

Llama and Mixtral-style mixtures (arch `llama` with `llama.expert_count`, experts stacked per layer) are written;
what llama.cpp would compute differently (a sliding window, Qwen2-MoE's shared expert) is refused.

A quantized model exports block for block, with no float copy in between. pocketlm's int8 (a scale per
row, fp16-exact) is llama.cpp's Q8_0 with every 32-block of a row carrying the row's scale; int4 (a
scale and a min per group, fp16-exact) is Q4_1 with each group's scale and min repeated over its
32-blocks, or Q4_0 when symmetric (min = -8 * scale). So the file holds exactly the weights the pocketlm
model computes with. The tokenizer is written as llama.cpp's vocabulary (see gguf.py for the reverse).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from ..checkpoint import (
    WEIGHTS,
    load_config,
    load_model,
    load_tensors,
    read_quant_scheme,
)
from ..config import ModelConfig
from ..errors import UnsupportedModelError
from ..quant import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    QuantScheme,
    dense_tensors,
    unpack_int4,
)
from ..tokenizer import Tokenizer
from .gguf import BPE_PRE, SPIECE_SPACE, byte_level_pre_tokenizer, gguf_name, permute_qk

# =============================================================================================
# quantized model directories, block for block
# =============================================================================================
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
        if p.dim() == 1 or name.endswith("block_sparse_moe.gate.weight"):  # norms; a mixture's router, as computed
            yield gguf_name(name), values.numpy(), GGMLQuantizationType.F32
        else:
            yield gguf_name(name), values.numpy().astype(np.float16), GGMLQuantizationType.F16


def export_quantized_gguf(model_dir: str | Path, out_path: str | Path) -> Path:
    model, tokenizer = load_model(model_dir)
    return write_gguf_arrays(out_path, model.config, tokenizer, quantized_tensors(model),
                             file_type(model.quant_scheme), name=Path(model_dir).name)


# =============================================================================================
# export: model directory -> GGUF
# =============================================================================================
OUTTYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
_BLOCK = 32  # elements per block of Q8_0 / Q4_0: a row must be a whole number of blocks


def tensor_type_for(name: str, shape: tuple[int, ...], outtype: str, tied: bool = False) -> GGMLQuantizationType:
    """llama.cpp's choices: 1-D tensors (norms, biases) and routers stay F32; rows that are not whole blocks fall back
    to F16; at q4_0 the output projection (token_embd when tied) stays Q8_0, as llama-quantize keeps it
    at higher precision (it picks Q6_K, or Q8_0 where rows are not whole 256-blocks)."""
    qtype = OUTTYPES[outtype][0]
    if len(shape) < 2 or name.endswith("ffn_gate_inp.weight"):  # and a mixture's router: llama.cpp never quantizes it
        return GGMLQuantizationType.F32
    if qtype == GGMLQuantizationType.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
        qtype = GGMLQuantizationType.Q8_0
    if qtype in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0) and shape[-1] % _BLOCK:
        return GGMLQuantizationType.F16
    return qtype


def encode_tensor(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The bytes (or float array) GGUFWriter stores for `values` as `qtype`."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == GGMLQuantizationType.F32:
        return values
    if qtype == GGMLQuantizationType.F16:
        return values.astype(np.float16)
    return quantize(values, qtype)


def export_tensors(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp layout) from (Hugging Face name, tensor) pairs.

    Any source of dense tensors works (a safetensors file, a quantized model dequantized layer by layer)."""
    for name, w in tensors:
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        w = w.detach().to(torch.float32).cpu()
        if ".q_proj." in name:
            w = permute_qk(w, config.num_attention_heads)
        elif ".k_proj." in name:
            w = permute_qk(w, config.num_key_value_heads)
        yield gguf_name(name), w.numpy()


_EXPERT = re.compile(r"(blk\.\d+\.ffn_(?:gate|up|down))\.(\d+)\.weight")


def stack_experts(arrays: Iterable[tuple[str, np.ndarray, GGMLQuantizationType]],
                  n_experts: int) -> Iterator[tuple[str, np.ndarray, GGMLQuantizationType]]:
    """A mixture in llama.cpp's layout: each layer's per-expert projections (blk.N.ffn_gate.E, as gguf_name names
    them) stacked into one 3-D tensor (blk.N.ffn_gate_exps, experts first), as convert_hf_to_gguf.py writes Mixtral.
    Experts are stacked once encoded: quantized blocks run along rows, so stacking bytes equals encoding the stack."""
    pending: dict[str, dict[int, tuple[np.ndarray, GGMLQuantizationType]]] = {}
    for gname, values, qtype in arrays:
        m = _EXPERT.fullmatch(gname)
        if m is None:
            yield gname, values, qtype
            continue
        group = pending.setdefault(m.group(1), {})
        group[int(m.group(2))] = (values, qtype)
        if len(group) == n_experts:  # same shapes, so the same type
            del pending[m.group(1)]
            yield f"{m.group(1)}_exps.weight", np.stack([group[e][0] for e in range(n_experts)]), qtype


def _check_exportable(config: ModelConfig, name: str) -> None:
    """Refuse what llama.cpp's llama architecture would compute differently from pocketlm."""
    if config.family == "qwen2_moe":
        raise UnsupportedModelError(f"{name}: GGUF export of a Qwen2-MoE model is not supported: llama.cpp's llama "
                                    "architecture has no shared expert, always renormalises the top-k weights and "
                                    "names Qwen's experts differently; use the model directory itself (Hugging Face "
                                    "format) instead")
    if config.windowed:  # src/models/llama.cpp builds build_attn_inp_kv (no iswa) and never reads the window
        raise UnsupportedModelError(f"{name}: sliding-window attention (sliding_window {config.sliding_window}) cannot "
                                    "be written to GGUF: llama.cpp's llama architecture ignores "
                                    "llama.attention.sliding_window and would attend to every position; use the model "
                                    "directory itself (Hugging Face format) instead")


def _write_llama_metadata(writer: GGUFWriter, config: ModelConfig, name: str, file_type: LlamaFileType) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    if config.moe:  # llama.cpp routes as Mixtral does: softmax over all experts, top k, renormalised
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_file_type(file_type)
    if file_type not in (LlamaFileType.ALL_F32, LlamaFileType.MOSTLY_F16):
        writer.add_quantization_version(2)


def _strip_keys(obj: Any, keys: tuple[str, ...] = ("trim_offsets",)) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_keys(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_strip_keys(v, keys) for v in obj]
    return obj


def _pre_tokenizer_json(pre: Any) -> Any:
    probe = BackendTokenizer(models.BPE())
    probe.pre_tokenizer = pre
    return _strip_keys(json.loads(probe.to_str())["pre_tokenizer"])


def _gguf_pre_name(pre_json: Any) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a byte-level tokenizer.json pre-tokenizer."""
    pre_json = _strip_keys(pre_json)
    for name in BPE_PRE:
        if _pre_tokenizer_json(byte_level_pre_tokenizer(name)) == pre_json:
            return name
    raise UnsupportedModelError(f"the tokenizer's pre-tokenizer {json.dumps(pre_json)[:200]} has no llama.cpp "
                                f"equivalent; llama.cpp knows {', '.join(BPE_PRE)}")


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def _adds(tokenizer: Tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS (read off the post-processor by encoding a probe)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    extra = len(full) - len(plain)
    add_bos = extra > 0 and bos is not None and full[0] == bos and (not plain or plain[0] != bos)
    add_eos = extra > 0 and eos is not None and full[-1] == eos and (not plain or plain[-1] != eos)
    return add_bos, add_eos


def _write_tokenizer(writer: GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.* metadata: gpt2 (byte-level BPE) or llama (SentencePiece-style BPE)."""
    data = json.loads(tokenizer.backend.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"tokenizer model {model.get('type')} cannot be written to GGUF; "
                                    "pocketlm exports BPE tokenizers (byte-level or SentencePiece-style)")
    id_to_token: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    special = {a["id"] for a in data.get("added_tokens", []) if a["special"]}
    for a in data.get("added_tokens", []):
        id_to_token[a["id"]] = a["content"]
    n = max(vocab_size, max(id_to_token) + 1)
    tokens = [id_to_token.get(i, f"[PAD{i}]") for i in range(n)]  # llama.cpp's name for unused slots
    added = {a["id"] for a in data.get("added_tokens", [])}
    merges = _merge_pairs(model.get("merges", []))
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or "ByteLevel" in json.dumps(data.get("decoder"))

    def token_type(i: int, text: str) -> int:
        if i not in id_to_token:
            return TokenType.UNUSED
        if i in special:
            return TokenType.UNKNOWN if text == tokenizer.unk_token else TokenType.CONTROL
        if i in added:
            return TokenType.USER_DEFINED
        if not byte_level and re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            return TokenType.BYTE
        return TokenType.NORMAL

    types = [token_type(i, t) for i, t in enumerate(tokens)]
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_gguf_pre_name(data.get("pre_tokenizer")))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([f"{a} {b}" for a, b in merges])
    elif model.get("byte_fallback") or SPIECE_SPACE in json.dumps(data.get("normalizer")) + json.dumps(data.get("pre_tokenizer")):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(_spm_scores(tokens, merges))
        writer.add_token_types(types)
        writer.add_add_space_prefix("Prepend" in json.dumps(data.get("normalizer"))
                                    or '"prepend_scheme": "always"' in json.dumps(data.get("pre_tokenizer")))
    else:
        raise UnsupportedModelError("the tokenizer is neither byte-level BPE nor SentencePiece-style BPE; "
                                    "it cannot be written to GGUF")
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        token_id = tokenizer.token_id(getattr(tokenizer, key))
        if token_id is not None:
            add(token_id)
    add_bos, add_eos = _adds(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _spm_scores(tokens: list[str], merges: list[tuple[str, str]]) -> list[float]:
    """Scores that make llama.cpp merge in the order of `merges`: a token made by merge r scores -r.
    Tokens no merge makes (characters, bytes, specials) are never the result of a merge; they score
    lowest so llama.cpp never prefers them."""
    first: dict[str, int] = {}
    for rank, (a, b) in enumerate(merges):
        first.setdefault(a + b, rank)
    floor = -float(len(merges) + 1)
    return [-float(first[t]) if t in first else floor for t in tokens]


def write_gguf(out_path: str | Path, config: ModelConfig, tokenizer: Tokenizer,
               tensors: Iterable[tuple[str, torch.Tensor]], outtype: str = "f16", name: str = "pocketlm") -> Path:
    """Write a llama GGUF file from a config, a tokenizer and (HF name, float tensor) pairs; atomically."""
    if outtype not in OUTTYPES:
        raise UnsupportedModelError(f"outtype '{outtype}' is not supported; choose one of {', '.join(OUTTYPES)} or auto")

    def encoded():
        for gname, values in export_tensors(config, tensors):
            qtype = tensor_type_for(gname, values.shape, outtype, config.tie_word_embeddings)
            yield gname, encode_tensor(values, qtype), qtype

    return write_gguf_arrays(out_path, config, tokenizer, encoded(), OUTTYPES[outtype][1], name)


def write_gguf_arrays(out_path: str | Path, config: ModelConfig, tokenizer: Tokenizer,
                      arrays: Iterable[tuple[str, np.ndarray, GGMLQuantizationType]], file_type: LlamaFileType,
                      name: str = "pocketlm") -> Path:
    """Write a llama GGUF file from (GGUF name, stored array, GGML type) triples, atomically."""
    _check_exportable(config, name)
    if config.moe:
        arrays = stack_experts(arrays, config.num_local_experts)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, "llama")
    try:
        _write_llama_metadata(writer, config, name, file_type)
        _write_tokenizer(writer, tokenizer, config.vocab_size)
        for gname, values, qtype in arrays:
            writer.add_tensor(gname, values, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def export_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "auto") -> Path:
    """Convert a model directory to a GGUF file llama.cpp runs.

    outtype: f32, f16, q8_0, q4_0, or auto. A quantized model (pocketlm quantize) exports exactly as its
    own type with auto (int8 -> Q8_0, int4 -> Q4_1, symmetric int4 -> Q4_0); a float model as F16.
    """
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    _check_exportable(config, model_dir.name)  # before reading weights a refused model may not even load
    scheme = read_quant_scheme(model_dir)
    tokenizer = Tokenizer.load(model_dir)
    if scheme is not None:
        native = outtype_name(scheme)
        if outtype in ("auto", native):
            return export_quantized_gguf(model_dir, out_path)
        if outtype not in ("f32", "f16"):
            raise UnsupportedModelError(f"{model_dir} is {scheme.describe()}; it exports as {native} (--outtype auto) "
                                        "or dequantized as f16/f32; quantize its float parent for other types")

        model, _ = load_model(model_dir)
        return write_gguf(out_path, config, tokenizer, dense_tensors(model), outtype, name=model_dir.name)
    tensors = load_tensors(model_dir / WEIGHTS, config)
    return write_gguf(out_path, config, tokenizer, tensors.items(), "f16" if outtype == "auto" else outtype,
                      name=model_dir.name)
