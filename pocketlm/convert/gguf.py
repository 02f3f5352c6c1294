"""GGUF (llama.cpp's file format) to and from a pocketlm model directory.

    tokenizer_from_gguf(path)           the Hugging Face tokenizer that llama.cpp's vocabulary describes
    import_gguf(src, out)               a GGUF llama model -> model directory (weights dequantized)
    export_gguf(model_dir, out_path)    a model directory -> GGUF (f32, f16, q8_0, q4_0)

The tokenizer is rebuilt so that it gives the token ids llama.cpp gives (checked against llama.cpp's own
tests in gguf_vocab/). Weights are read with `gguf.GGUFReader` and dequantized with `gguf.quants`;
llama.cpp's row permutation of the query and key projections is undone on import and redone on export.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import dequantize, quantize
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from ..checkpoint import WEIGHTS, load_config, load_tensors, save_model_dir
from ..fsio import file_sha256
from ..config import ModelConfig
from ..errors import CheckpointError, UnsupportedModelError
from ..tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"
SPIECE_SPACE = "\u2581"  # SentencePiece's visible space


# =============================================================================================
# reading a GGUF file
# =============================================================================================
def open_gguf(path: str | Path) -> GGUFReader:
    """A GGUFReader for `path`, or a CheckpointError that names the file and says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; give the path of a .gguf model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF'); give a llama.cpp .gguf model file")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader fails with ValueError/IndexError/struct errors on damaged headers
        raise CheckpointError(f"{path}: the GGUF header cannot be read ({type(exc).__name__}: {exc}); "
                              f"the file is {_damage(path)}, download or convert it again") from None
    _check_tensor_data(reader, path)
    return reader


def _damage(path: Path) -> str:
    """Name the usual damage: binary bytes replaced by U+FFFD when a file went through a text conversion."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if head.count(b"\xef\xbf\xbd") > 2:
        return "damaged (its bytes were replaced by U+FFFD, as when a binary file is saved as UTF-8 text)"
    return "truncated or damaged"


def _check_tensor_data(reader: GGUFReader, path: Path) -> None:
    """A truncated file still has a whole header; its last tensors then run past the end of the file."""
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise CheckpointError(f"{path}: truncated: tensor {t.name} needs bytes up to {t.data_offset + int(t.n_bytes):,} "
                                  f"but the file has {size:,}; download or convert it again")


def _reader_and_path(path_or_reader: str | Path | GGUFReader) -> tuple[GGUFReader, str]:
    if isinstance(path_or_reader, GGUFReader):
        return path_or_reader, str(getattr(path_or_reader.data, "filename", "<gguf>"))
    return open_gguf(path_or_reader), str(path_or_reader)


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value metadata as Python values (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _f32(value: float) -> float:
    """The shortest decimal that is the same float32 (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(str(np.float32(value)))


# =============================================================================================
# tokenizer: GGUF metadata -> Hugging Face tokenizer
# =============================================================================================
# llama.cpp splits byte-level BPE text with regexes chosen by `tokenizer.ggml.pre` (llama-vocab.cpp).
# Each entry is applied in turn, each one splitting the pieces of the one before.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# canonical name -> (aliases llama.cpp treats the same way, split regexes, whether merges are ignored
# for words already in the vocabulary). "gpt-2" and "smollm" use tokenizers' own GPT-2 regex.
_BPE_PRE = {
    "gpt-2": (("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion"), None, False),
    "smollm": (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), None, False),
    "llama-bpe": (("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "dbrx", "smaug-bpe"), [_LLAMA3_SPLIT], True),
    "qwen2": (("qwen2", "stablelm2", "megrez", "deepseek-r1-qwen"), [_QWEN2_SPLIT], False),
    "falcon": (("falcon",), [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, "[0-9][0-9][0-9]"], False),
    "default": (("default",), [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"], False),
}


def _canonical_pre(pre: str | None, path: str) -> str:
    pre = pre or "default"  # llama.cpp's choice when the key is missing
    for name, (aliases, _, _) in _BPE_PRE.items():
        if pre in aliases:
            return name
    raise UnsupportedModelError(f"{path}: byte-level BPE pre-tokenizer '{pre}' is not supported; "
                                f"pocketlm knows {', '.join(a for v in _BPE_PRE.values() for a in v[0])}")


def _byte_level_pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer that splits text as llama.cpp does for pre-tokenizer type `name` (canonical)."""
    if name == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":  # single digits, then GPT-2's regex: exactly SmolLM2's own tokenizer.json
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _BPE_PRE[name][1]]
    return pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level_backend(meta: dict[str, Any], path: str) -> BackendTokenizer:
    """tokenizer.ggml.model = gpt2: byte-level BPE with the merges stored in the file."""
    tokens = meta["tokenizer.ggml.tokens"]
    if "tokenizer.ggml.merges" not in meta:
        raise CheckpointError(f"{path}: byte-level (gpt2) vocabulary without tokenizer.ggml.merges; the file is incomplete")
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    pre = _canonical_pre(meta.get("tokenizer.ggml.pre"), path)
    vocab = _vocab_dict(tokens)
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=_BPE_PRE[pre][2]))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _spm_backend(meta: dict[str, Any], path: str) -> BackendTokenizer:
    """tokenizer.ggml.model = llama: SentencePiece BPE, merged best score first, with <0xXX> byte fallback."""
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise CheckpointError(f"{path}: SentencePiece (llama) vocabulary without tokenizer.ggml.scores; the file is incomplete")
    types = meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    vocab = _vocab_dict(tokens)
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types),
                                          unk_token=tokens[unk_id] if unk_id is not None else None,
                                          byte_fallback=True, fuse_unk=True))
    # llama.cpp writes spaces as "▁" and, unless told otherwise, puts one before the text
    # (and after each special token: tokenizers normalizes each piece between added tokens).
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend(SPIECE_SPACE)] if prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPIECE_SPACE)])
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Merges equivalent to llama.cpp's SentencePiece tokenizer, which repeatedly joins the adjacent pair
    whose joined text is the highest-scoring token: every split of every token into two tokens, best first."""
    mergeable = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (TokenType.NORMAL, TokenType.USER_DEFINED)}
    found = []
    for token, i in mergeable.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in mergeable and right in mergeable:
                found.append((-scores[i], i, mergeable[left], mergeable[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a repeated token keeps its first id, as llama.cpp's text_to_token does
    return vocab


def _add_gguf_special_tokens(backend: BackendTokenizer, tokens: list[str], types: list[int], extra: Iterable[int]) -> None:
    """Control (and unknown) tokens become special added tokens, user-defined ones plain added tokens,
    so they stay whole in text instead of being cut into pieces."""
    special = {i for i, ty in enumerate(types) if ty in (TokenType.CONTROL, TokenType.UNKNOWN)} | set(extra)
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == TokenType.USER_DEFINED]
    if user:
        backend.add_tokens(user)


def _template(bos: str | None, eos: str | None, add_bos: bool, add_eos: bool, backend: BackendTokenizer):
    """A TemplateProcessing that adds BOS/EOS as the file says (so AutoTokenizer and Tokenizer.encode agree)."""
    head = [bos] if add_bos and bos else []
    tail = [eos] if add_eos and eos else []
    if not head and not tail:
        return None
    single = head + ["$A"] + tail
    pair = single + head + ["$B:1"] + tail
    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(head + tail)]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)


def tokenizer_from_gguf(path_or_reader: str | Path | GGUFReader) -> Tokenizer:
    """Rebuild the tokenizer described by a GGUF file's `tokenizer.*` metadata."""
    reader, path = _reader_and_path(path_or_reader)
    meta = read_metadata(reader)
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"{path}: has no tokenizer (tokenizer.ggml.tokens is missing); use a GGUF file with its vocabulary")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    if kind == "gpt2":
        backend, add_bos = _byte_level_backend(meta, path), False
    elif kind == "llama":
        backend, add_bos = _spm_backend(meta, path), True  # llama.cpp's defaults for each kind
    else:
        raise UnsupportedModelError(f"{path}: tokenizer '{kind}' is not supported; pocketlm imports "
                                    "'gpt2' (byte-level BPE) and 'llama' (SentencePiece) vocabularies")

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    names = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
             "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    ids = [meta[f"tokenizer.ggml.{k}"] for k in ("bos_token_id", "eos_token_id", "eot_token_id")
           if meta.get(f"tokenizer.ggml.{k}") is not None and meta[f"tokenizer.ggml.{k}"] < len(tokens)]
    _add_gguf_special_tokens(backend, tokens, types, ids)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    post = _template(names["bos_token"], names["eos_token"], add_bos, add_eos, backend)
    if post is not None:
        backend.post_processor = post
    arch = meta.get("general.architecture", "llama")
    return Tokenizer(
        backend=backend,
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=meta.get(f"{arch}.context_length"),
        extra_config={"add_bos_token": add_bos, "add_eos_token": add_eos},
        **names,
    )


# =============================================================================================
# weights: GGUF -> model directory
# =============================================================================================
# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a llama GGUF tensor, or None if it is not one a Llama has."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{suffix}"
    return None


def gguf_name(hf: str) -> str:
    """The inverse of hf_name."""
    stem, _, suffix = hf.rpartition(".")
    for g, h in _TOP_NAMES.items():
        if stem == h:
            return f"{g}.{suffix}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    for g, h in _LAYER_NAMES.items():
        if m and m.group(2) == h:
            return f"blk.{m.group(1)}.{g}.{suffix}"
    raise UnsupportedModelError(f"tensor {hf} has no GGUF name; pocketlm exports plain Llama models")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for q_proj/k_proj (convert_hf_to_gguf's permute): within each head, the two
    rotary halves are interleaved, because ggml's RoPE rotates adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of permute_qk: back to Hugging Face's rotate-half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def config_from_gguf(reader: GGUFReader, path: str = "<gguf>") -> ModelConfig:
    """ModelConfig from `general.architecture` = llama metadata."""
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"{path}: architecture '{arch}' is not supported; pocketlm imports llama")
    if meta.get("llama.expert_count"):
        raise UnsupportedModelError(f"{path}: a mixture-of-experts llama ({meta['llama.expert_count']} experts) "
                                    "is not supported by the GGUF importer yet")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UnsupportedModelError(f"{path}: RoPE scaling ({scaling if scaling != 'none' else 'rope_freqs'}) "
                                    "is not supported yet; pocketlm imports llama models with plain RoPE")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{path}: has no token_embd.weight; it is a vocabulary-only GGUF, not a model")

    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise CheckpointError(f"{path}: metadata llama.{key} is missing; the GGUF file is incomplete")
        return meta[f"llama.{key}"]

    heads = need("attention.head_count")
    hidden = need("embedding_length")
    head_dim = meta.get("llama.attention.key_length", hidden // heads)
    rope_dims = meta.get("llama.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embedding ({rope_dims} of {head_dim} dims) is not supported")
    tok = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return ModelConfig.from_dict({
        "vocab_size": int(names["token_embd.weight"].shape[1]),
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": meta.get("llama.context_length", 2048),
        "rms_norm_eps": _f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": tok["bos"], "eos_token_id": tok["eos"], "pad_token_id": tok["padding"],
    }, source=path)


def gguf_tensors(reader: GGUFReader, config: ModelConfig, path: str = "<gguf>",
                 dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, dequantized tensor in HF layout) for every tensor of a llama GGUF."""
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise UnsupportedModelError(f"{path}: tensor {t.name} is not part of a plain llama model; "
                                        "this GGUF variant is not supported")
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UnsupportedModelError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf "
                                        "cannot dequantize; re-quantize the model to e.g. Q8_0 or Q4_K") from None
        # GGUF lists dimensions innermost first; PyTorch outermost first
        w = torch.from_numpy(np.array(values, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape))))
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            w = unpermute_qk(w, config.num_attention_heads)
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            w = unpermute_qk(w, config.num_key_value_heads)
        yield name, w.to(dtype).contiguous()


def _file_type_name(value: int | None) -> str | None:
    try:
        return None if value is None else LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(value)


def import_gguf(src: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a llama GGUF file into a model directory at `out` (weights dequantized to `dtype`)."""
    src = Path(src)
    reader = open_gguf(src)
    config = config_from_gguf(reader, str(src))
    tokenizer = tokenizer_from_gguf(reader)
    tensors = dict(gguf_tensors(reader, config, str(src), dtype))
    meta = read_metadata(reader)
    tensor_types = Counter(t.tensor_type.name for t in reader.tensors)
    provenance = {"source": {
        "format": "gguf", "path": str(src.resolve()), "sha256": file_sha256(src),
        "file_type": _file_type_name(meta.get("general.file_type")),
        "tensor_types": dict(sorted(tensor_types.items())),
        "name": meta.get("general.name"),
    }}
    eos = [config.eos_token_id] if config.eos_token_id is not None else []
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and eot not in eos:  # chat models stop at end-of-turn as well
        eos.append(eot)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
                  "pad_token_id": config.pad_token_id}
    return save_model_dir(out, config, tensors, tokenizer, provenance=provenance,
                          generation_config={k: v for k, v in generation.items() if v is not None})


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
    """llama.cpp's choices: 1-D tensors (norms, biases) stay F32; rows that are not whole blocks fall back
    to F16; at q4_0 the output projection (token_embd when tied) stays Q8_0, as llama-quantize keeps it
    at higher precision (it picks Q6_K, or Q8_0 where rows are not whole 256-blocks)."""
    qtype = OUTTYPES[outtype][0]
    if len(shape) < 2:
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
    for name in _BPE_PRE:
        if _pre_tokenizer_json(_byte_level_pre_tokenizer(name)) == pre_json:
            return name
    raise UnsupportedModelError(f"the tokenizer's pre-tokenizer {json.dumps(pre_json)[:200]} has no llama.cpp "
                                f"equivalent; llama.cpp knows {', '.join(_BPE_PRE)}")


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
    from ..checkpoint import read_quant_scheme

    model_dir = Path(model_dir)
    config = load_config(model_dir)
    scheme = read_quant_scheme(model_dir)
    tokenizer = Tokenizer.load(model_dir)
    if scheme is not None:
        from . import gguf_quantized

        native = gguf_quantized.outtype_name(scheme)
        if outtype in ("auto", native):
            return gguf_quantized.export_quantized_gguf(model_dir, out_path)
        if outtype not in ("f32", "f16"):
            raise UnsupportedModelError(f"{model_dir} is {scheme.describe()}; it exports as {native} (--outtype auto) "
                                        "or dequantized as f16/f32; quantize its float parent for other types")
        from ..checkpoint import load_model
        from ..quant import dense_tensors

        model, _ = load_model(model_dir)
        return write_gguf(out_path, config, tokenizer, dense_tensors(model), outtype, name=model_dir.name)
    tensors = load_tensors(model_dir / WEIGHTS, config)
    return write_gguf(out_path, config, tokenizer, tensors.items(), "f16" if outtype == "auto" else outtype,
                      name=model_dir.name)
