"""Weight-only quantization: int8 per output channel, int4 per group of input columns.

Storage (safetensors, Hugging Face names; the scheme is recorded in pocketlm.json under "quantization"):

    int8   X.weight  int8  (out, in)        w = weight * scales[:, None]            (symmetric)
           X.scales  fp32  (out,)
    int4   X.weight  uint8 (out, in / 2)    two 4-bit codes per byte, llama.cpp's block layout:
                                            byte j of a group holds code j (low nibble) and j + g/2 (high)
           X.scales  fp32  (out, in / g)    w = code * scale + min                  (asymmetric, codes 0..15)
           X.mins    fp32  (out, in / g)

Scales and mins are rounded to fp16 values so the GGUF export (Q8_0, Q4_1 / Q4_0 blocks with fp16
scales) is exact: the exported file holds the same numbers the model computes with.

The output head (and the embedding, which it is often tied to) is quantized to int8 in both schemes
when `head` is on: it is a fifth of a small model's weights and the one matrix read in full per token.

Speed. At batch 1 a decode step reads every weight once, so the matmuls are memory-bound. Under
`torch.compile` an int8 layer with one input row is written as a dequantizing dot product, which
inductor turns into one vectorized loop per layer, close to the memory's read bandwidth and several times
faster than PyTorch's bf16 GEMV (docs/benchmarks-history.md). Other row counts use PyTorch's packed kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) or dequantize to the activation dtype.
On x86 CPUs with AVX2 (AVX-512 included), products of any number of rows run pocketlm's qdot kernels
(kernels/qdot.py: activations quantized to int8 per block of 32, integer dot products; the weights repacked
into qdot's blocks of 16 rows), q/k/v and gate/up in one call each, and a quantized model's whole decode
step is one call of them (kernels/decode_step.py). POCKETLM_CPU_KERNELS=exact uses the fp32-activation
kernels instead (kernels/cpu_ops.py; int4 codes in `int4_words`'s layout) for fewer than EXACT_ROWS rows.
Where none can be built, the compiled one-row products read the codes as 32-bit
words (ROW_LAYOUT "words"), and int4 gets an inductor loop of its own (`_int8_row_product`,
`_int4_row_product`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .kernels import cpu_ops, qdot
from .kernels.dispatch import EXACT_ROWS, KernelWeights, fused_projections
from .model import expected_shapes

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantScheme:
    method: str  # "int8" or "int4"
    group_size: int | None = None  # int4 only
    symmetric: bool = False  # int4 only: codes centred on 8 with no min (exports as Q4_0 instead of Q4_1)
    head: bool = True  # also quantize the output head and the embedding (to int8)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown quantization {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "int4" and self.group_size not in GROUP_SIZES:
            raise ConfigError(f"int4 needs a group size of {', '.join(map(str, GROUP_SIZES))}; got {self.group_size}")
        if self.method == "int8" and (self.group_size is not None or self.symmetric):
            raise ConfigError("int8 is per-channel and symmetric; --group-size and --symmetric apply to int4 only")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantScheme":
        known = {"method", "group_size", "symmetric", "head"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown field {sorted(unknown)[0]!r} in the quantization record; expected {sorted(known)}")
        return cls(**data)

    def describe(self) -> str:
        if self.method == "int8":
            return "int8 per-channel"
        return f"int4 group {self.group_size} {'symmetric' if self.symmetric else 'asymmetric'}"


def _fp16_exact(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


# ---------------------------------------------------------------------------------------------
# quantizers (tensor -> stored form) and their inverses
# ---------------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: codes in [-127, 127] and one scale per output row."""
    w = w.float()
    scales = _fp16_exact(w.abs().amax(dim=1) / 127.0)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return codes.float() * scales[:, None]


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise 4-bit codes 0..15 with w = code * scale + min per group of `group_size` columns.

    Asymmetric: scale = (max - min) / 15 (llama.cpp's Q4_1). Symmetric: the value of largest magnitude
    maps to code 0 with scale = -that / 8 and min = -8 * scale (llama.cpp's Q4_0).
    """
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ConfigError(f"a weight with {in_f} columns cannot be split into groups of {group_size}")
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    if symmetric:
        idx = g.abs().argmax(dim=-1, keepdim=True)
        extreme = g.gather(-1, idx).squeeze(-1)
        scales = _fp16_exact(-extreme / 8.0)
        scales = torch.where(scales != 0, scales, torch.ones_like(scales))
        mins = -8.0 * scales
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scales = _fp16_exact((hi - lo) / 15.0)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        mins = _fp16_exact(lo)
    codes = torch.round((g - mins[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(codes.reshape(out_f, in_f), group_size), scales, mins


def pack_int4(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) codes 0..15 -> (out, in/2) bytes; in each group, byte j = code j | code (j + g/2) << 4."""
    out_f, in_f = codes.shape
    g = codes.reshape(out_f, in_f // group_size, 2, group_size // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(out_f, in_f // 2).contiguous()


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f, half = packed.shape
    g = packed.reshape(out_f, half * 2 // group_size, group_size // 2)
    return torch.stack((g & 15, g >> 4), dim=2).reshape(out_f, half * 2)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> torch.Tensor:
    codes = unpack_int4(packed, group_size).float()
    out_f, in_f = codes.shape
    g = codes.reshape(out_f, in_f // group_size, group_size) * scales[..., None] + mins[..., None]
    return g.reshape(out_f, in_f)


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------
def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _stored(x: torch.Tensor) -> torch.Tensor:
    """x, made a stored buffer in a compiled graph. Inductor would otherwise inline x's producer (the
    RMSNorm before a projection, the SiLU before the down projection) into the matrix-vector loop and
    recompute it for every output row: 49,152 times for the output head. as_strided makes inductor
    materialise its input."""
    x = x.contiguous()
    return torch.as_strided(x, x.shape, x.stride())


# How a compiled one-row product reads the codes on the CPU: "bytes", as stored (fast where inductor
# has AVX-512's masked loads), or "words", four int8 / eight int4 codes per 32-bit word (AVX2; see
# _int8_row_product and _int4_row_product). Read once: a compiled graph cannot ask.
ROW_LAYOUT = "bytes" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "words"
LANES = 8  # output rows an int4 "words" block interleaves: one AVX2 vector of fp32


def _tree_sum(terms: list[torch.Tensor]) -> torch.Tensor:
    """Sum in pairs: a chain of dependent vector adds, one per term, stalled the matrix-vector loops."""
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _int8_row_product(x: torch.Tensor, weight: torch.Tensor, words: torch.Tensor | None) -> torch.Tensor:
    """weight (out, in) int8 times one input row x, unscaled, written for inductor (fp32, exact products).

    With AVX-512 inductor loads the int8 codes 16 at a time with masked loads. With AVX2 it has no such
    load for 8 int8 (or int32) values and copies each through a stack buffer, which ran the output head
    at a small fraction of the memory's bandwidth. There `words`, the same codes seen as float32 words (four codes each; a view made
    outside the graph, where inductor would not fuse it), are read with full-vector loads, bit-cast to
    int32, and each word's four bytes sign-extended with shifts. Byte j of word i is column 4i + j, so
    the row is laid out as four planes x[j::4] to match."""
    if words is None:
        row = _stored(x.reshape(1, 1, -1).float())
        return (row * weight.float()).sum(-1)
    codes = words.view(torch.int32)  # (out, in / 4)
    planes = _stored(x.reshape(-1, 4).t().float())  # (4, in / 4): plane j holds x[j::4]
    return _tree_sum([planes[j] * ((codes << (24 - 8 * j)) >> 24).float() for j in range(4)]).sum(-1)


def int4_words(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes (out, in), 0..15, packed for `_int4_row_product`: (out / LANES, in / 8, LANES) 32-bit
    words seen as float32, word [b, w, l] holding the codes of row b * LANES + l at columns 8w .. 8w + 7,
    column 8w + k in bits 4k .. 4k + 3. The rows of a block sit side by side, so one vector load
    reads a word of each of LANES rows, and a block's words follow one another in memory."""
    out, cols = codes.shape
    words = (codes.to(torch.int64).reshape(out, cols // 8, 8) << (4 * torch.arange(8))).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # as two's complement
    return words.reshape(out // LANES, LANES, cols // 8).transpose(1, 2).contiguous().view(torch.float32)


def _by_lanes(t: torch.Tensor) -> torch.Tensor:
    """(out, n) -> (out / LANES, n, LANES): a per-row table in the block layout of `int4_words`."""
    return t.reshape(t.shape[0] // LANES, LANES, -1).transpose(1, 2).contiguous()


# x[8w + k] is paired with (word & (15 << 4k)), that is code * 16^k: x / 16^k makes the product exact
# without a shift per code (16^-k is a power of two). The top code is shifted down instead: masked in
# place it would make the int32 negative.
_NIBBLE_SCALE = torch.tensor([16.0 ** -k for k in range(7)] + [1.0])


def _int4_row_product(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                      group_size: int) -> torch.Tensor:
    """One input row x (in,) through int4 codes in the `int4_words` layout, with `scales` and `mins` in
    the block layout (out / LANES, groups, LANES): w = code * scale + min, so the row's product is
    sum(scale * code . x) + sum(min * sum(x over the group)). Written for inductor on AVX2, where
    PyTorch's int4 kernel reads far below the memory's bandwidth: this loop vectorizes over the LANES rows
    of a block."""
    codes = words.view(torch.int32)  # (blocks, in / 8, LANES)
    row = _stored(x.reshape(-1, 8).float() * _NIBBLE_SCALE.to(x.device))  # (in / 8, 8)
    terms = [row[None, :, k, None] * (codes & (15 << (4 * k))).float() for k in range(7)]
    terms.append(row[None, :, 7, None] * ((codes >> 28) & 15).float())
    per_word = _tree_sum(terms) * scales.repeat_interleave(group_size // 8, 1)
    group_sums = x.reshape(-1, group_size).float().sum(-1)  # (groups,)
    y = per_word.sum(1) + (mins * group_sums[None, :, None]).sum(1)  # (blocks, LANES)
    return y.reshape(-1)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        m.weight, m.scales = quantize_int8(linear.weight.detach())
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.device.type == "cpu" and "_native" not in self.__dict__ and not _compiling():
            self.prepare_native()
        native = fused_projections(x, [self])  # a few rows on an AVX2 CPU: pocketlm's kernel (exact fp32)
        if native is not None:
            return native[0]
        if x.device.type != "cpu":
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        elif rows == 1 and _compiling():
            # one row: a dequantizing dot product that inductor fuses into one bandwidth-bound loop (exact fp32)
            y = _int8_row_product(x, self.weight, self.__dict__.get("_words")).reshape(*x.shape[:-1], -1) * self.scales
        elif rows >= EXACT_ROWS and not _compiling():
            # prefill and scoring: dequantizing costs little next to the matmul, and keeps fp32 accuracy
            y = F.linear(x.float(), self.weight.float()) * self.scales
        else:
            # a few rows (eager or batched decoding): PyTorch's int8 kernel, fast with bf16 activations
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight,
                                          self.bf16_scales()).float().reshape(*x.shape[:-1], -1)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def bf16_scales(self) -> torch.Tensor:
        """The scales in bf16 for PyTorch's int8 kernel, kept (inductor's lowering of that kernel needs
        them as a stored tensor, not computed in the graph); `prepare_decode` makes them ahead of compiling."""
        cached = self.__dict__.get("_bf16_scales")
        if cached is None or cached.device != self.scales.device or cached.shape != self.scales.shape:
            cached = self.scales.to(torch.bfloat16)
            self.__dict__["_bf16_scales"] = cached
        return cached

    def prepare_native(self) -> None:
        """Decide once whether a few rows go through pocketlm's AVX2 kernel (see kernels/cpu_ops.py)."""
        self.__dict__["_native"] = (self.weight.device.type == "cpu" and not self.weight.is_meta
                                    and cpu_ops.available())

    def kernel_weights(self) -> KernelWeights | None:
        """The weights as pocketlm's kernels read them (kernels/dispatch.py): in qdot's layout where those
        kernels are in use and fit the shape, else as stored; None where no kernel of pocketlm's runs."""
        if "_native" not in self.__dict__ and not _compiling():
            self.prepare_native()
        if not self.__dict__.get("_native") or not self.weight.is_contiguous() or self.scales.dtype != torch.float32:
            return None
        if cpu_ops.mode() == "qdot" and qdot.serves(self.out_features, self.in_features):
            # repacked once, and again only if the weights were replaced or written to in place (checked
            # outside compiled graphs, which cannot trace the check and see the weights fixed)
            cached = self.__dict__.get("_qdot")
            if not _compiling():
                key = (self.weight.data_ptr(), None if self.weight.is_inference() else self.weight._version)
                if cached is None or cached[0] != key:
                    cached = self.__dict__["_qdot"] = (key, qdot.pack_int8(self.weight))
            if cached is not None:
                return KernelWeights("qdot-int8", cached[1], self.scales, 0, self.out_features, self.bias)
        return KernelWeights("int8", self.weight, self.scales, 0, self.out_features, self.bias)

    def prepare_decode(self) -> None:
        self.bf16_scales()
        self.prepare_native()
        if (ROW_LAYOUT == "words" and self.weight.device.type == "cpu" and self.in_features % 4 == 0
                and not self.__dict__.get("_native")):
            self.__dict__["_words"] = self.weight.view(torch.float32)  # see _int8_row_product

    def dequantized(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales)


class Int8Embedding(nn.Module):
    """An embedding table stored in int8 with a scale per row; can share its storage with the head."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(num_embeddings))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.scales[ids].unsqueeze(-1)


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, groups))
        self.register_buffer("mins", torch.empty(out_features, groups))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)
        self._kernel: tuple[torch.Tensor, torch.Tensor] | None = None  # packed for PyTorch's int4 kernel

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int, symmetric: bool = False) -> "Int4Linear":
        m = cls(linear.in_features, linear.out_features, group_size, bias=linear.bias is not None)
        m.weight, m.scales, m.mins = quantize_int4(linear.weight.detach(), group_size, symmetric)
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m

    def prepare_kernel(self) -> None:
        """Repack for the few-row kernel (done once, after loading): pocketlm's AVX2 kernel where it is
        available (see kernels/cpu_ops.py), else `torch._weight_int4pack_mm_for_cpu`."""
        if self.weight.device.type != "cpu" or self.weight.is_meta:
            return
        self.__dict__["_native"] = self._native_tables()
        if self.__dict__["_native"] is not None:
            return
        codes = unpack_int4(self.weight, self.group_size).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        # the kernel computes (code - 8) * scale + zero, so zero = min + 8 * scale; (groups, out, 2)
        zeros = self.mins + 8 * self.scales
        scales_and_zeros = torch.stack((self.scales, zeros), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self._kernel = (packed, scales_and_zeros)

    def _native_tables(self) -> tuple[str, torch.Tensor, torch.Tensor] | None:
        """(kind, codes, tables) for pocketlm's kernels: qdot's layout where those kernels are in use and fit
        the shape, else the codes in `int4_words`'s layout and the scales and mins as fp16 in its block
        layout (for cpu_ops.int4_linear); None where neither can run. Scales and mins must be fp16 values
        (exact: the quantizer rounds them to fp16)."""
        if self.out_features % LANES or not cpu_ops.available():
            return None
        if not (torch.equal(self.scales.half().float(), self.scales) and torch.equal(self.mins.half().float(), self.mins)):
            return None  # scales that are not fp16 values (not written by pocketlm's quantizer)
        codes = unpack_int4(self.weight, self.group_size)
        if cpu_ops.mode() == "qdot" and qdot.serves(self.out_features, self.in_features, self.group_size):
            return ("qdot-int4", *qdot.pack_int4(codes, self.scales, self.mins, self.group_size))
        tables = torch.stack((_by_lanes(self.scales), _by_lanes(self.mins)), dim=2).half()
        return "int4", int4_words(codes).view(torch.int32), tables

    def kernel_weights(self) -> KernelWeights | None:
        """The weights as pocketlm's kernels read them (kernels/dispatch.py); None where those do not run."""
        if "_native" not in self.__dict__ and not _compiling():
            self.prepare_kernel()
        tables = self.__dict__.get("_native")
        if tables is None:
            return None
        return KernelWeights(tables[0], tables[1], tables[2], self.group_size, self.out_features, self.bias)

    def prepare_decode(self) -> None:
        """With the "words" row layout and without pocketlm's kernels, the tables `_int4_row_product`
        reads (a second copy of the codes, as big as the first); `compile_decoder` calls it before compiling."""
        if "_native" not in self.__dict__:
            self.prepare_kernel()
        if (ROW_LAYOUT == "words" and self.weight.device.type == "cpu" and not self.weight.is_meta
                and self.out_features % LANES == 0 and self.group_size % 8 == 0
                and self.__dict__.get("_native") is None):
            codes = unpack_int4(self.weight, self.group_size)
            self.__dict__["_words"] = (int4_words(codes), _by_lanes(self.scales), _by_lanes(self.mins))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and "_native" not in self.__dict__ and not _compiling():
            self.prepare_kernel()
        fused = fused_projections(x, [self])  # a few rows on an AVX2 CPU: pocketlm's kernel (exact fp32)
        if fused is not None:
            return fused[0]
        words, native = self.__dict__.get("_words"), self.__dict__.get("_native")
        if flat.shape[0] == 1 and words is not None and _compiling():
            y = _int4_row_product(flat[0], *words, self.group_size)
        elif x.device.type == "cpu" and native is None and (flat.shape[0] < EXACT_ROWS or _compiling()):
            if self._kernel is None:
                self.prepare_kernel()
            packed, scales_and_zeros = self._kernel
            y = torch._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), packed, self.group_size, scales_and_zeros)
        else:
            y = F.linear(flat.float() if x.device.type == "cpu" else flat, self.dequantized().to(
                torch.float32 if x.device.type == "cpu" else x.dtype))
        y = y.float().reshape(*x.shape[:-1], -1)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return dequantize_int4(self.weight, self.scales, self.mins, self.group_size)


QUANTIZED_LINEARS = (Int8Linear, Int4Linear)


# ---------------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------------
def quantize_model(model, scheme: QuantScheme):
    """Replace the float linear layers of a loaded LlamaForCausalLM with quantized ones, in place."""
    if scheme.method == "int8":
        _swap_linears(model, scheme, Int8Linear.from_float)
    else:
        _swap_linears(model, scheme, lambda linear: Int4Linear.from_float(linear, scheme.group_size, scheme.symmetric))
    if scheme.head:
        tied = model.config.tie_word_embeddings
        head = Int8Linear.from_float(model.lm_head)
        embed = Int8Embedding(*model.model.embed_tokens.weight.shape)
        if tied:
            embed.weight, embed.scales = head.weight, head.scales
        else:
            embed.weight, embed.scales = quantize_int8(model.model.embed_tokens.weight.detach())
        model.lm_head, model.model.embed_tokens = head, embed
    return model


def build_quantized_skeleton(model, scheme: QuantScheme):
    """Swap in empty quantized modules (on the model's device, usually meta) so a quantized state dict
    can be assigned straight into them without ever making float weights."""
    if scheme.method == "int8":
        _swap_linears(model, scheme, lambda l: Int8Linear(l.in_features, l.out_features, l.bias is not None))
    else:
        _swap_linears(model, scheme, lambda l: Int4Linear(l.in_features, l.out_features, scheme.group_size,
                                                          l.bias is not None))
    if scheme.head:
        model.lm_head = Int8Linear(model.lm_head.in_features, model.lm_head.out_features)
        model.model.embed_tokens = Int8Embedding(*model.model.embed_tokens.weight.shape)
    return model


def _swap_linears(model, scheme: QuantScheme, make) -> None:
    """Replace every attention and MLP projection (each expert's, in a mixture; its router stays in float, so
    tokens go where they went) with make(old layer) and record the scheme."""
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), *_feed_forwards(layer)):
            for name in names:
                setattr(parent, name, make(getattr(parent, name)))
    model.quant_scheme = scheme


def _feed_forwards(layer):
    """(module, names of its projections) for a layer's MLP, or each expert of its mixture (the routers stay float)."""
    mlps = layer.ffn.mlps() if layer.moe else [layer.ffn]
    return [(mlp, mlp.projections) for mlp in mlps]


def tie_quantized_head(model) -> None:
    """After loading a tied model, point the head at the embedding's int8 storage."""
    if isinstance(model.lm_head, Int8Linear) and model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.lm_head.scales = model.model.embed_tokens.scales


_EXPERT_WEIGHT = re.compile(r"\.experts\.\d+\.w[123]\.weight$")  # a mixture's expert projections


def expected_quantized_shapes(config, scheme: QuantScheme) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of a quantized state dict (float tensors may be any float dtype)."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, shape in expected_shapes(config).items():
        is_head = name in ("lm_head.weight", "model.embed_tokens.weight")
        is_block_linear = name.endswith("_proj.weight") or _EXPERT_WEIGHT.search(name) is not None
        if is_block_linear and scheme.method == "int4":
            rows, cols = shape
            groups = cols // scheme.group_size
            out[name] = ((rows, cols // 2), torch.uint8)
            out[name[:-len("weight")] + "scales"] = ((rows, groups), torch.float32)
            out[name[:-len("weight")] + "mins"] = ((rows, groups), torch.float32)
        elif is_block_linear or (is_head and scheme.head):
            out[name] = (shape, torch.int8)
            out[name[:-len("weight")] + "scales"] = ((shape[0],), torch.float32)
        else:
            out[name] = (shape, torch.float32)
    return out


def dense_tensors(model):
    """(HF name, float tensor) for every weight of a (possibly quantized) model, one at a time:
    what an exporter to a dense format needs, without materialising the whole model in fp32."""
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED_LINEARS):
            if name == "lm_head" and model.config.tie_word_embeddings:
                continue
            yield f"{name}.weight", module.dequantized()
            if module.bias is not None:
                yield f"{name}.bias", module.bias
        elif isinstance(module, Int8Embedding):
            yield f"{name}.weight", dequantize_int8(module.weight, module.scales)
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        yield name, p.detach()


def prepare_kernels(model) -> None:
    """Ready a loaded quantized model for its kernels: int4 weights are repacked, and int8 weights that
    the memory-mapped file left unaligned are copied (PyTorch's int8 kernel crashes on odd addresses)."""
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.prepare_kernel()
        elif isinstance(module, (Int8Linear, Int8Embedding)) and module.weight.data_ptr() % 64:
            module.weight = module.weight.clone()
    tie_quantized_head(model)


def stored_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict as a model directory stores it: int4 scales and mins as fp16, which holds them exactly
    (the quantizer makes them fp16 values, as llama.cpp's Q4_0/Q4_1 store them), which saves 13 of SmolLM2's
    103 MB. `load_model` widens them back to the model's float dtype."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            for key in ("scales", "mins"):
                value = getattr(module, key)
                if torch.equal(value.half().float(), value):
                    state[f"{name}.{key}"] = value.half()
    return state
