"""pocketlm's integer-activation kernels ("qdot", csrc/qdot.h): input rows quantized to int8 in blocks of 32
values (a scale per block, as llama.cpp's Q8 activations), times int4 or int8 weights by integer dot
products: AVX-512 VNNI, AVX-VNNI, or AVX2's maddubs where the CPU has no VNNI.

Weights are repacked once into qdot's layout (`pack_int4`, `pack_int8`): blocks of 16 output rows, each
chunk of columns one 64-byte load. The instruction set is the best the CPU has, checked once per machine
by timing each one it can run (`choose`); POCKETLM_QDOT names one instead. The ops are in the library
kernels/cpu_ops.py builds and loads; cpu_ops.available() makes the choice once it is loaded.
"""

from __future__ import annotations

import json
import os
import time

import torch

from ..errors import ConfigError
from .cpu_features import flags_key

ROWS = 16  # output rows per weight block
BLOCK = 32  # input values per activation scale
ISAS = ("avx512vnni", "avxvnni", "avx2")  # best first, as the kernels rank them without a measurement
SWITCH = "POCKETLM_QDOT"  # an instruction set's name: use it (where the CPU has it) instead of measuring

_choice: dict[str, object] = {}


def serves(out_features: int, in_features: int, group_size: int = BLOCK) -> bool:
    """Whether a matrix of this shape (and int4 group) fits qdot's blocks."""
    return out_features % ROWS == 0 and in_features % BLOCK == 0 and group_size % BLOCK == 0


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (out, in) 0..15 with scales and mins (out, in / group) -> words (out/16, in/8, 64) uint8 and tables
    (out/16, groups, 2, 16) fp16 (each group's 16 scales, then its 16 mins). Scales and mins must be fp16 values."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n // ROWS, ROWS, k // 8, 2, 4)  # (block, row, chunk, low/high nibble, byte)
    words = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).permute(0, 2, 1, 3).reshape(n // ROWS, k // 8, 64)

    def by_block(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n // ROWS, ROWS, -1).transpose(1, 2)

    tables = torch.stack((by_block(scales), by_block(mins)), dim=2).to(torch.float16)
    return words.contiguous(), tables.contiguous()


def pack_int8(codes: torch.Tensor) -> torch.Tensor:
    """codes (out, in) int8 -> (out/16, in/4, 64) uint8, each code plus 128."""
    n, k = codes.shape
    shifted = (codes.to(torch.int16) + 128).to(torch.uint8).reshape(n // ROWS, ROWS, k // 4, 4)
    return shifted.permute(0, 2, 1, 3).reshape(n // ROWS, k // 4, 64).contiguous()


def int4_linear(x: torch.Tensor, words: list[torch.Tensor], tables: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """x (rows, in) through one or more packed int4 matrices, outputs side by side -> (rows, sum of outs) fp32."""
    return torch.ops.pocketlm.qdot_int4(x.float().contiguous(), words, tables, group_size)


def int8_linear(x: torch.Tensor, codes: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    """x (rows, in) through one or more packed int8 matrices with per-row fp32 scales -> (rows, sum of outs) fp32."""
    return torch.ops.pocketlm.qdot_int8(x.float().contiguous(), codes, scales)


def quantized_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, in) as the kernels see it: int8 codes (rows, in) and a scale per block of 32 (rows, in / 32)."""
    return torch.ops.pocketlm.qdot_quantize(x.float().contiguous())


def supported() -> list[str]:
    """The instruction sets this CPU can run the kernels with, best first; none before the kernel library
    is loaded (cpu_ops.load)."""
    if not hasattr(torch.ops.pocketlm, "qdot_supported"):
        return []
    return [isa for isa in ISAS if torch.ops.pocketlm.qdot_supported(isa)]


def active() -> str:
    return torch.ops.pocketlm.qdot_isa()


def choose() -> dict:
    """Use the fastest instruction set for this CPU: the one named by POCKETLM_QDOT, else each one the CPU
    has timed on SmolLM2-sized products (a few ms, once per machine: the result is cached by the CPU's
    flags). Returns what was decided and why: {"isa", "reason", "timings_us"}."""
    if _choice:
        return _choice
    isas = supported()
    forced = os.environ.get(SWITCH)
    if forced:
        if forced not in isas:
            raise ConfigError(f"{SWITCH}={forced}: this CPU runs pocketlm's qdot kernels with "
                              f"{', '.join(isas) or 'none'}; name one of those or unset it")
        decision = {"isa": forced, "reason": f"named by {SWITCH}", "timings_us": {}}
    elif len(isas) == 1:
        decision = {"isa": isas[0], "reason": "the only instruction set this CPU has for them", "timings_us": {}}
    else:
        decision = _cached_measurement(isas)
    torch.ops.pocketlm.qdot_use(decision["isa"])
    _choice.update(decision)
    return _choice


def _cached_measurement(isas: list[str]) -> dict:
    from ..paths import cache_dir

    path = cache_dir() / "cpu_kernels" / f"qdot-choice-{flags_key()}.json"
    try:
        decision = json.loads(path.read_text())
        if decision.get("isa") in isas:
            return decision
    except (OSError, ValueError):
        pass
    timings = {isa: measure(isa) for isa in isas}
    fastest = min(timings, key=timings.get)
    decision = {"isa": fastest, "timings_us": timings,
                "reason": "fastest measured: " + ", ".join(f"{i} {t:.0f} us" for i, t in timings.items())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(decision))
    except OSError:
        pass  # measured again next time
    return decision


def measure(isa: str, repeats: int = 20) -> float:
    """Microseconds for one row and four rows through SmolLM2's largest layer shape (1536 x 576) in int4 and
    int8 with `isa`, the median of `repeats`."""
    previous = active()
    torch.ops.pocketlm.qdot_use(isa)
    try:
        g = torch.Generator().manual_seed(0)
        codes4 = torch.randint(0, 16, (1536, 576), generator=g, dtype=torch.uint8)
        ones = torch.ones(1536, 576 // 32)
        words, tables = pack_int4(codes4, ones, ones, 32)
        codes8 = pack_int8(torch.randint(-127, 128, (1536, 576), generator=g, dtype=torch.int8))
        scales = torch.ones(1536)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for rows in (1, 4):
                x = torch.randn(rows, 576, generator=g)
                torch.ops.pocketlm.qdot_int4(x, [words], [tables], 32)
                torch.ops.pocketlm.qdot_int8(x, [codes8], [scales])
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1e6
    finally:
        torch.ops.pocketlm.qdot_use(previous)
