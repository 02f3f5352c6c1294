"""GGUF (llama.cpp's file format) to and from a pocketlm model directory.

    tokenizer_from_gguf(path)           the Hugging Face tokenizer that llama.cpp's vocabulary describes
    import_gguf(src, out)               a GGUF llama model or Mixtral-style mixture -> model directory (dequantized)

Export is in gguf_export.py.

The tokenizer is rebuilt so that it gives the token ids llama.cpp gives (checked against llama.cpp's own
tests in gguf_vocab/). Weights are read with `gguf.GGUFReader` and dequantized with `gguf.quants`;
llama.cpp's row permutation of the query and key projections is undone on import and redone on export.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from gguf import GGUFReader, LlamaFileType, TokenType
from gguf.quants import dequantize
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers import Tokenizer as BackendTokenizer

from ..checkpoint import save_model_dir
from ..config import ModelConfig
from ..errors import CheckpointError, UnsupportedModelError
from ..fsio import file_sha256
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
BPE_PRE = {
    "gpt-2": (("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion"), None, False),
    "smollm": (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), None, False),
    "llama-bpe": (("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "dbrx", "smaug-bpe"), [_LLAMA3_SPLIT], True),
    "qwen2": (("qwen2", "stablelm2", "megrez", "deepseek-r1-qwen"), [_QWEN2_SPLIT], False),
    "falcon": (("falcon",), [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, "[0-9][0-9][0-9]"], False),
    "default": (("default",), [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"], False),
}


def _canonical_pre(pre: str | None, path: str) -> str:
    pre = pre or "default"  # llama.cpp's choice when the key is missing
    for name, (aliases, _, _) in BPE_PRE.items():
        if pre in aliases:
            return name
    raise UnsupportedModelError(f"{path}: byte-level BPE pre-tokenizer '{pre}' is not supported; "
                                f"pocketlm knows {', '.join(a for v in BPE_PRE.values() for a in v[0])}")


def byte_level_pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer that splits text as llama.cpp does for pre-tokenizer type `name` (canonical)."""
    if name == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":  # single digits, then GPT-2's regex: exactly SmolLM2's own tokenizer.json
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in BPE_PRE[name][1]]
    return pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level_backend(meta: dict[str, Any], path: str) -> BackendTokenizer:
    """tokenizer.ggml.model = gpt2: byte-level BPE with the merges stored in the file."""
    tokens = meta["tokenizer.ggml.tokens"]
    if "tokenizer.ggml.merges" not in meta:
        raise CheckpointError(f"{path}: byte-level (gpt2) vocabulary without tokenizer.ggml.merges; the file is incomplete")
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    pre = _canonical_pre(meta.get("tokenizer.ggml.pre"), path)
    vocab = _vocab_dict(tokens)
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=BPE_PRE[pre][2]))
    backend.pre_tokenizer = byte_level_pre_tokenizer(pre)
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
    "ffn_gate_inp": "block_sparse_moe.gate",  # a mixture's router
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# a Mixtral layer's experts: w1 (gate), w3 (up), w2 (down). llama.cpp stacks a layer's experts into one 3-D
# tensor per projection (blk.N.ffn_gate_exps); older files hold one per expert (blk.N.ffn_gate.E), which is
# also the form the exporter stacks from.
_EXPERT_NAMES = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}
_STACKED = re.compile(r"(blk\.\d+\.ffn_(?:gate|up|down))_exps\.weight")


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
    m = re.fullmatch(r"blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(\d+)", stem)
    if m and suffix == "weight":
        return f"model.layers.{m.group(1)}.block_sparse_moe.experts.{m.group(3)}.{_EXPERT_NAMES[m.group(2)]}.weight"
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
    m = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])", stem)
    for g, h in _EXPERT_NAMES.items():
        if m and m.group(3) == h and suffix == "weight":
            return f"blk.{m.group(1)}.{g}.{m.group(2)}.weight"
    raise UnsupportedModelError(f"tensor {hf} has no GGUF name; pocketlm exports Llama and Mixtral models")


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
    experts, used = _mixture(meta, names, need("block_count"), path)
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
        "num_local_experts": experts, "num_experts_per_tok": used,
    }, source=path)


def _mixture(meta: dict[str, Any], names: Iterable[str], layers: int, path: str) -> tuple[int | None, int | None]:
    """(expert_count, expert_used_count) of a Mixtral-style llama GGUF, (None, None) for a dense one; a mixture
    pocketlm would compute differently from llama.cpp is refused."""
    shared = sorted(n for n in names if "_shexp" in n)
    if shared:
        raise UnsupportedModelError(f"{path}: shared experts ({shared[0]}) are not supported; pocketlm imports "
                                    "Mixtral-style mixtures, whose experts are all routed")
    count = meta.get("llama.expert_count") or 0
    if not count:
        return None, None
    used = meta.get("llama.expert_used_count")
    if used is None or not 1 <= used <= count:
        raise CheckpointError(f"{path}: llama.expert_used_count is {used} with llama.expert_count {count}; a mixture "
                              "routes each token to 1 to expert_count experts, so the GGUF file is damaged")
    for i in range(layers):
        wanted = {f"blk.{i}.ffn_gate_inp.weight": []}  # each tensor, with the per-expert ones that may stand for it
        wanted.update({f"blk.{i}.{k}_exps.weight": [f"blk.{i}.{k}.{e}.weight" for e in range(count)]
                       for k in ("ffn_gate", "ffn_up", "ffn_down")})
        for one, split in wanted.items():
            if one not in names and not (split and all(n in names for n in split)):
                raise UnsupportedModelError(f"{path}: a mixture of {count} experts without {one}; pocketlm reads a "
                                            "router (ffn_gate_inp) and experts stacked (ffn_gate_exps, ffn_up_exps, "
                                            "ffn_down_exps) or one tensor per expert (ffn_gate.E, ffn_up.E, ffn_down.E)")
    return count, used


def gguf_tensors(reader: GGUFReader, config: ModelConfig, path: str = "<gguf>",
                 dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, dequantized tensor in HF layout) for every tensor of a llama GGUF."""
    for t in reader.tensors:
        name, stacked = hf_name(t.name), _STACKED.fullmatch(t.name)
        if name is None and stacked is None:
            raise UnsupportedModelError(f"{path}: tensor {t.name} is not part of a plain llama model; "
                                        "this GGUF variant is not supported")
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UnsupportedModelError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf "
                                        "cannot dequantize; re-quantize the model to e.g. Q8_0 or Q4_K") from None
        # GGUF lists dimensions innermost first; PyTorch outermost first
        w = torch.from_numpy(np.array(values, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape))))
        if stacked is not None:  # (experts, rows, cols): one tensor per expert, as Mixtral's directory holds them
            if w.dim() != 3 or w.shape[0] != config.num_local_experts:
                raise CheckpointError(f"{path}: tensor {t.name} has shape {tuple(w.shape)}; a mixture of "
                                      f"{config.num_local_experts} experts stacks them first")
            for e in range(w.shape[0]):
                yield hf_name(f"{stacked.group(1)}.{e}.weight"), w[e].to(dtype).clone()
            continue
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
