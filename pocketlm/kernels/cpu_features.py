"""What the CPU can do, from /proc/cpuinfo (Linux): which number formats it computes natively."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@functools.cache
def _flags() -> set[str] | None:
    """The first processor's feature flags (x86 `flags`, Arm `Features`), or None where there is no
    /proc/cpuinfo to read (macOS, Windows)."""
    try:
        return parse_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def parse_flags(cpuinfo: str) -> set[str] | None:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


@functools.cache
def model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def flags_key() -> str:
    """A short key for this CPU's model and flags: a decision measured on one machine is reused there only."""
    import hashlib

    return hashlib.sha256(" ".join([model_name(), *sorted(_flags() or ())]).encode()).hexdigest()[:12]


def cpu_has_bf16() -> bool:
    """bf16 matmuls pay off only with native support (AVX512-BF16 or AMX on x86, BF16 on Arm);
    elsewhere PyTorch emulates them, several times slower than float32."""
    flags = _flags() or set()
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_amx() -> bool:
    return "amx_int8" in (_flags() or set())


def warn_if_bf16_is_slow(dtype: torch.dtype | None, device: str | torch.device = "cpu") -> None:
    """One line when bf16 was asked for on a CPU that would emulate it (unknown CPUs are not warned about)."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and _flags() is not None and not cpu_has_bf16():
        log.warning("this CPU has no bf16 instructions (AVX512-BF16, AMX or Arm BF16): bfloat16 is emulated and can "
                    "run several times slower than float32 (SmolLM2 on an AVX2 CPU: 5-7x for prompts and scoring, "
                    "1.3-2x for batched decoding); float32 is the faster choice")
