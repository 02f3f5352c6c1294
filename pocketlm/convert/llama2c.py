"""llama2.c interop: the legacy `.bin` checkpoint (version 0) and its `tokenizer.bin`.

Legacy layout (see karpathy/llama2.c `export.py` `legacy_export` and `run.c` `memory_map_weights`):

    header   7 x int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
             (vocab_size < 0 means the classifier is not shared with the token embedding)
    float32  token_embedding_table (vocab, dim)
             rms_att_weight, wq, wk, wv, wo (each for all layers, layer after layer)
             rms_ffn_weight, w1, w2, w3
             rms_final_weight (dim)
             freq_cis_real, freq_cis_imag (seq_len, head_size/2 each; run.c skips them)
             wcls (vocab, dim), only when untied

llama2.c's attention applies RoPE to interleaved pairs (x0, x1), (x2, x3), ...; Hugging Face Llama rotates
halves (x0, x_{d/2}), ... . The two agree once the rows of wq / wk are permuted within each head, exactly as
transformers' `convert_llama_weights_to_hf.py` does for Meta's checkpoints. The permutation only moves rows,
so import followed by export reproduces every weight bit for bit.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from ..checkpoint import WEIGHTS, load_config, load_tensors, save_model_dir
from ..config import ModelConfig
from ..errors import CheckpointError, UnsupportedModelError
from ..fsio import atomic_write, file_sha256
from ..tokenizer import Tokenizer

HEADER = struct.Struct("<7i")
MAGIC_V1 = 0x616B3432  # "ak42": llama2.c's newer (version 1 / 2) export formats
ROPE_THETA = 10000.0  # hard-coded in llama2.c's run.c and model.py
RMS_NORM_EPS = 1e-5  # likewise
MAX_DIM = 1 << 20  # no plausible header field is this large; beyond it the file is not a checkpoint

# SentencePiece piece types (sentencepiece_model.proto)
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6
SP_UNIGRAM, SP_BPE = 1, 2


# ---------------------------------------------------------------------------------------------
# header and layout
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # always positive here; `shared_classifier` carries the sign
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    def pack(self) -> bytes:
        vocab = self.vocab_size if self.shared_classifier else -self.vocab_size
        return HEADER.pack(self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads, vocab, self.seq_len)

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every float32 array after the header, in file order, with its shape."""
        d, h, n, v, hs = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.head_size
        q_out, kv_out = self.n_heads * hs, self.n_kv_heads * hs
        arrays = [
            ("token_embedding_table", (v, d)),
            ("rms_att_weight", (n, d)),
            ("wq", (n, q_out, d)),
            ("wk", (n, kv_out, d)),
            ("wv", (n, kv_out, d)),
            ("wo", (n, d, q_out)),
            ("rms_ffn_weight", (n, d)),
            ("w1", (n, h, d)),
            ("w2", (n, d, h)),
            ("w3", (n, h, d)),
            ("rms_final_weight", (d,)),
            ("freq_cis_real", (self.seq_len, hs // 2)),
            ("freq_cis_imag", (self.seq_len, hs // 2)),
        ]
        if not self.shared_classifier:
            arrays.append(("wcls", (v, d)))
        return arrays

    def file_size(self) -> int:
        return HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in self.layout())

    def to_config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.hidden_dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=self.seq_len,
            rms_norm_eps=RMS_NORM_EPS,
            rope_theta=ROPE_THETA,
            tie_word_embeddings=self.shared_classifier,
        )


def read_header(path: str | Path) -> Llama2cHeader:
    """Read and sanity-check the header; every user mistake becomes a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; give the path of a llama2.c .bin checkpoint")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == MAGIC_V1:
        raise CheckpointError(f"{path}: a llama2.c version 1/2 export (magic 'ak42'); pocketlm reads the legacy "
                              "format: re-export it with llama2.c's `python export.py --version 0 ...`")
    if _looks_like_text(head):
        raise CheckpointError(f"{path}: looks like a text file, not a llama2.c checkpoint; give the .bin weights "
                              "file written by llama2.c's export.py (legacy version 0)")
    if len(head) < HEADER.size:
        raise CheckpointError(f"{path}: too short ({size} bytes) for a llama2.c header of {HEADER.size} bytes; "
                              "the file is truncated or not a llama2.c checkpoint")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = HEADER.unpack(head)
    fields = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                  vocab_size=abs(vocab), seq_len=seq_len)
    bad = [f"{k}={v}" for k, v in fields.items() if not 0 < v < MAX_DIM]
    if not bad and (dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2):
        bad = [f"dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv} (need n_heads | dim, n_kv_heads | n_heads, "
               "even head size)"]
    if bad:
        raise CheckpointError(f"{path}: header has impossible sizes ({', '.join(bad)}); this is not a llama2.c "
                              "legacy checkpoint or its header is corrupt")
    header = Llama2cHeader(**fields, shared_classifier=vocab > 0)
    expected = header.file_size()
    if size < expected:
        raise CheckpointError(f"{path}: truncated: {size:,} bytes, but its header ({_describe(header)}) needs "
                              f"{expected:,}; re-export or re-download the file")
    if size > expected:
        raise CheckpointError(f"{path}: sizes do not add up: {size:,} bytes, but its header ({_describe(header)}) "
                              f"accounts for {expected:,}; the header does not describe these weights")
    return header


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return printable == len(head)


def _describe(h: Llama2cHeader) -> str:
    return (f"dim {h.dim}, hidden {h.hidden_dim}, {h.n_layers} layers, {h.n_heads} heads, {h.n_kv_heads} kv heads, "
            f"vocab {h.vocab_size}{'' if h.shared_classifier else ' untied'}, seq_len {h.seq_len}")


# ---------------------------------------------------------------------------------------------
# RoPE conventions
# ---------------------------------------------------------------------------------------------
def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair rows (llama2.c, Meta) -> rotate-half rows (Hugging Face), per head."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_rope`."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def freq_cis(head_size: int, seq_len: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos / sin tables llama2.c's model.py `precompute_freqs_cis` computes and legacy export writes."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_size, 2)[: head_size // 2].float() / head_size))
    angles = torch.outer(torch.arange(seq_len), freqs).float()
    return torch.cos(angles), torch.sin(angles)


# ---------------------------------------------------------------------------------------------
# weights: llama2.c arrays <-> Hugging Face tensors
# ---------------------------------------------------------------------------------------------
def read_llama2c(path: str | Path) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """The header and every array of a legacy .bin, by llama2.c's names (memory-mapped, read-only)."""
    header = read_header(path)
    flat = np.memmap(path, dtype="<f4", mode="r", offset=HEADER.size)
    arrays, pos = {}, 0
    for name, shape in header.layout():
        n = int(np.prod(shape))
        arrays[name] = torch.from_numpy(np.array(flat[pos:pos + n])).view(shape)
        pos += n
    return header, arrays


def llama2c_to_hf(header: Llama2cHeader, a: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    t = {"model.embed_tokens.weight": a["token_embedding_table"], "model.norm.weight": a["rms_final_weight"]}
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = a["rms_att_weight"][i]
        t[p + "self_attn.q_proj.weight"] = permute_rope(a["wq"][i], header.n_heads)
        t[p + "self_attn.k_proj.weight"] = permute_rope(a["wk"][i], header.n_kv_heads)
        t[p + "self_attn.v_proj.weight"] = a["wv"][i]
        t[p + "self_attn.o_proj.weight"] = a["wo"][i]
        t[p + "post_attention_layernorm.weight"] = a["rms_ffn_weight"][i]
        t[p + "mlp.gate_proj.weight"] = a["w1"][i]
        t[p + "mlp.down_proj.weight"] = a["w2"][i]
        t[p + "mlp.up_proj.weight"] = a["w3"][i]
    t["lm_head.weight"] = a["token_embedding_table"] if header.shared_classifier else a["wcls"]
    return {k: v.contiguous() for k, v in t.items()}


def hf_to_llama2c(header: Llama2cHeader, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def stack(suffix: str, fn=lambda w: w) -> torch.Tensor:
        return torch.stack([fn(t[f"model.layers.{i}.{suffix}"]) for i in range(header.n_layers)])

    cos, sin = freq_cis(header.head_size, header.seq_len)
    a = {
        "token_embedding_table": t["model.embed_tokens.weight"],
        "rms_att_weight": stack("input_layernorm.weight"),
        "wq": stack("self_attn.q_proj.weight", lambda w: unpermute_rope(w, header.n_heads)),
        "wk": stack("self_attn.k_proj.weight", lambda w: unpermute_rope(w, header.n_kv_heads)),
        "wv": stack("self_attn.v_proj.weight"),
        "wo": stack("self_attn.o_proj.weight"),
        "rms_ffn_weight": stack("post_attention_layernorm.weight"),
        "w1": stack("mlp.gate_proj.weight"),
        "w2": stack("mlp.down_proj.weight"),
        "w3": stack("mlp.up_proj.weight"),
        "rms_final_weight": t["model.norm.weight"],
        "freq_cis_real": cos,
        "freq_cis_imag": sin,
    }
    if not header.shared_classifier:
        a["wcls"] = t["lm_head.weight"]
    return {k: v.to(torch.float32) for k, v in a.items()}


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------
def import_llama2c(bin_path: str | Path, out: str | Path, tokenizer_path: str | Path) -> Path:
    """Convert a llama2.c legacy .bin plus its SentencePiece .model into a pocketlm model directory."""
    bin_path = Path(bin_path)
    header, arrays = read_llama2c(bin_path)
    tokenizer = tokenizer_from_sentencepiece(tokenizer_path)
    if tokenizer.vocab_size != header.vocab_size:
        raise CheckpointError(f"{tokenizer_path}: has {tokenizer.vocab_size} tokens but {bin_path} was trained with "
                              f"{header.vocab_size}; give the tokenizer .model the checkpoint was trained with")
    tokenizer.model_max_length = header.seq_len
    provenance = {"source": {"format": "llama2c", "path": str(bin_path.resolve()), "sha256": file_sha256(bin_path),
                             "tokenizer": str(Path(tokenizer_path).resolve())}}
    return save_model_dir(out, header.to_config(), llama2c_to_hf(header, arrays), tokenizer, provenance=provenance)


def export_llama2c(model_dir: str | Path, out_path: str | Path) -> Path:
    """Write a model directory as a llama2.c legacy .bin that `run.c` loads (and `import_llama2c` reads back)."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    _check_exportable(config, model_dir)
    tensors = load_tensors(model_dir / WEIGHTS, config)
    header = Llama2cHeader(
        dim=config.hidden_size, hidden_dim=config.intermediate_size, n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads, vocab_size=config.vocab_size,
        seq_len=config.max_position_embeddings, shared_classifier=config.tie_word_embeddings,
    )
    arrays = hf_to_llama2c(header, tensors)

    def write(f) -> None:
        f.write(header.pack())
        for name, shape in header.layout():
            assert tuple(arrays[name].shape) == shape, (name, arrays[name].shape, shape)
            f.write(arrays[name].contiguous().numpy().astype("<f4", copy=False).tobytes())

    return atomic_write(Path(out_path), write)


def _check_exportable(config: ModelConfig, model_dir: Path) -> None:
    """llama2.c's run.c has no biases, fixed RoPE theta and head_size = dim / n_heads."""
    problems = []
    if config.attention_bias or config.mlp_bias:
        problems.append("linear biases")
    if config.rope_theta != ROPE_THETA or getattr(config, "rope_scaling", None):
        problems.append(f"rope_theta {config.rope_theta} (llama2.c uses {ROPE_THETA:g}, unscaled)")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"head_dim {config.head_dim} * heads != hidden_size {config.hidden_size}")
    if config.moe:
        problems.append("a mixture of experts (run.c has one MLP per layer)")
    if config.windowed:
        problems.append(f"sliding-window attention (window {config.sliding_window}; run.c attends to every position)")
    if problems:
        raise UnsupportedModelError(f"{model_dir}: cannot be exported to llama2.c: {'; '.join(problems)}")
    if config.rms_norm_eps != RMS_NORM_EPS:
        warnings.warn(f"{model_dir}: rms_norm_eps is {config.rms_norm_eps:g}; llama2.c always uses {RMS_NORM_EPS:g}, "
                      "so its outputs will differ slightly", stacklevel=3)


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------
def tokenizer_from_sentencepiece(model_path: str | Path) -> Tokenizer:
    """A Hugging Face fast tokenizer that encodes like `SentencePieceProcessor.encode`, plus BOS in front.

    Built directly from the .model protobuf so that the normalizer reproduces this model's own settings
    (add_dummy_prefix, remove_extra_whitespaces, precompiled charsmap) instead of Llama 2's fixed ones.
    Known differences from sentencepiece, shared with every HF Llama tokenizer: special tokens written as
    text ("<s>") become special ids, and for Unigram models the text "<0x41>" can match the byte piece.
    """
    model_path = Path(model_path)
    proto = _read_sentencepiece(model_path)
    spec = proto.trainer_spec
    pieces = list(proto.pieces)
    if spec.model_type == SP_BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        model = models.BPE(vocab, _bpe_merges(pieces), unk_token=pieces[spec.unk_id].piece, fuse_unk=True,
                           byte_fallback=spec.byte_fallback, dropout=None)
    elif spec.model_type == SP_UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    else:
        raise UnsupportedModelError(f"{model_path}: SentencePiece model type {spec.model_type} (char/word) is not "
                                    "supported; pocketlm converts BPE and Unigram models")
    backend = BackendTokenizer(model)
    backend.normalizer = _sp_normalizer(proto.normalizer_spec)
    add_prefix = proto.normalizer_spec.add_dummy_prefix
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if add_prefix else []))

    # control and unknown pieces are special tokens; user-defined pieces are matched verbatim in text
    backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                for p in pieces if p.type in (SP_UNKNOWN, SP_CONTROL)])
    backend.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == SP_USER_DEFINED])

    def piece(i: int) -> str | None:
        return pieces[i].piece if 0 <= i < len(pieces) else None

    bos, eos = piece(spec.bos_id), piece(spec.eos_id)
    if bos is not None:  # BOS lives in the post-processor so every consumer of tokenizer.json adds it
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, spec.bos_id)])
    return Tokenizer(backend=backend, bos_token=bos, eos_token=eos, unk_token=piece(spec.unk_id),
                     pad_token=piece(spec.pad_id))


def _read_sentencepiece(path: Path):
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; give the SentencePiece tokenizer .model the checkpoint uses")
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except (DecodeError, RuntimeWarning, ValueError):
        proto = None
    if proto is None or not proto.pieces or not 0 <= proto.trainer_spec.unk_id < len(proto.pieces):
        raise CheckpointError(f"{path}: not a SentencePiece .model file; give the tokenizer .model (not a llama2.c "
                              "tokenizer.bin or a text vocabulary)")
    return proto


def _bpe_merges(pieces) -> list[tuple[str, str]]:
    """Merges for Hugging Face BPE, ranked like SentencePiece's scores (higher score merges first)."""
    normal = {p.piece: i for i, p in enumerate(pieces) if p.type == SP_NORMAL}
    merges = []
    for piece, rank in sorted(normal.items(), key=lambda kv: (-pieces[kv[1]].score, kv[1])):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(l, r) for l, r in splits if l in normal and r in normal]
        merges += sorted(splits, key=lambda lr: (normal[lr[0]], normal[lr[1]]))
    return merges


def _sp_normalizer(spec) -> normalizers.Normalizer:
    """SentencePiece's normalization for this model.

    remove_extra_whitespaces there drops leading spaces and collapses runs of spaces (U+0020 only), but
    strips trailing whitespace after escaping, so a literal trailing "▁" goes too.
    """
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A +"), ""),
                  normalizers.Replace(Regex(r"[ ▁]+\z"), "")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps)


def export_llama2c_tokenizer(model_dir: str | Path, out_path: str | Path) -> Path:
    """Write the model directory's tokenizer as llama2.c's tokenizer.bin (as its tokenizer.py `export`).

    Format: uint32 max_token_length, then per token: float32 score, uint32 byte length, UTF-8 bytes. run.c
    assumes SentencePiece conventions (BOS 1, EOS 2, byte tokens <0x00>.. at 3..258, "▁" for space), so
    other tokenizers are refused. Scores are not kept in tokenizer.json; SentencePiece BPE gives the k-th
    normal piece the score -k, and special / byte pieces 0, which is what this writes.
    """
    model_dir = Path(model_dir)
    tokenizer = Tokenizer.load(model_dir)
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    n = len(by_id)
    byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)]
    if byte_ids != list(range(3, 259)) or tokenizer.bos_token_id != 1 or tokenizer.eos_token_id != 2 or sorted(by_id) != list(range(n)):
        raise UnsupportedModelError(f"{model_dir}: tokenizer does not follow llama2.c's SentencePiece layout (BOS 1, "
                                    "EOS 2, byte tokens <0x00>..<0xFF> at ids 3..258); it cannot be written as tokenizer.bin")
    special = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special}
    tokens, scores, k = [], [], 0
    for i in range(n):
        text = by_id[i]
        if i in (1, 2) or text in special or 3 <= i < 259:
            score = 0.0
        else:
            score, k = -float(k), k + 1  # -0.0 for the first piece, as SentencePiece writes it
        if i == 1:
            text = "\n<s>\n"
        elif i == 2:
            text = "\n</s>\n"
        tokens.append(text.replace("▁", " ").encode("utf-8"))
        scores.append(score)

    def write(f) -> None:
        f.write(struct.pack("<I", max(len(t) for t in tokens)))
        for b, s in zip(tokens, scores):
            f.write(struct.pack("<fI", s, len(b)))
            f.write(b)

    return atomic_write(Path(out_path), write)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
