"""pocketlm's CPU kernel library: how it is built and loaded, which kernels decoding uses, and the
fp32-activation products.

The sources are in `csrc/`. They are compiled with the system's C++ compiler on first use, in about
30 s, into ~/.cache/pocketlm/cpu_kernels/ (POCKETLM_CACHE moves it), and loaded as torch ops: the qdot
products with int8 activations (`pocketlm::qdot_int4`, `qdot_int8`; kernels/qdot.py, one build per
instruction set), the fp32-activation products (`pocketlm::int4_linear`, `int8_linear`), attention of one
query over the KV cache (`decode_attention`) and a quantized model's whole decode step (`decode_step`;
kernels/decode_step.py). Eager code and `torch.compile`d graphs call them alike. The same library holds the
causal attention used for CPU training (train_attention.cpp) and the allocator (allocator.py).

They are used on every x86 CPU with AVX2 (`mode`): qdot by default, the fp32-activation kernels with
POCKETLM_CPU_KERNELS=exact. Without a compiler, or with POCKETLM_CPU_KERNELS=0, the layers keep PyTorch's
kernels and inductor's loops, and say so once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..paths import cache_dir

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("cpu_kernels.cpp", "decode_step.cpp", "train_attention.cpp", "cpu_allocator.cpp",
                                    "qlinear.cpp")]
# the qdot kernels once per instruction set, each file with its own flags (see csrc/qdot.h); the op picks
# at run time among those the CPU has
ISA_SOURCES = {CSRC / "qdot_avx2.cpp": [], CSRC / "qdot_avxvnni.cpp": ["-mavxvnni"],
               CSRC / "qdot_avx512vnni.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]}
HEADERS = [CSRC / name for name in ("kernels.h", "qdot.h", "qdot_impl256.h", "spin_pool.h")]
SWITCH = "POCKETLM_CPU_KERNELS"  # "0" turns the kernels off; "exact" keeps decoding's activations in fp32
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w"]

log = logging.getLogger(__name__)
_loaded: dict[str, bool] = {}


def wanted() -> bool:
    """Whether the kernels are for this CPU: any x86 CPU with AVX2 (AVX-512 included), unless switched off."""
    capability = torch.backends.cpu.get_cpu_capability()
    return mode() != "off" and (capability == "AVX2" or capability.startswith("AVX512"))


def mode() -> str:
    """How quantized layers multiply with a few input rows: "qdot" (the default: activations quantized to int8,
    integer dot products; kernels/qdot.py), "exact" (POCKETLM_CPU_KERNELS=exact: fp32 activations, the
    products of the dequantized weights), or "off" (POCKETLM_CPU_KERNELS=0: PyTorch's kernels and inductor)."""
    switch = os.environ.get(SWITCH, "1")
    return "off" if switch == "0" else "exact" if switch == "exact" else "qdot"


def available() -> bool:
    """Whether the layers use the kernels: on CPUs they are for (see `wanted`), once built and loaded.
    Decided once per process (a compiled graph cannot ask)."""
    if "available" not in _loaded:
        _loaded["available"] = wanted() and load()
        if _loaded["available"] and mode() == "qdot":
            from . import qdot

            qdot.choose()  # the instruction set, checked by a measurement once per machine
    return _loaded["available"]


def load() -> bool:
    """Build (the first time) and load the kernels on any x86 CPU with AVX2; False, after one warning
    that says why, where they cannot be built."""
    if "ok" not in _loaded:
        _loaded["ok"] = _load()
    return _loaded["ok"]


def _load() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return False
    try:
        library = build()
        if not hasattr(torch.ops.pocketlm, "int4_linear"):  # a second load would register the ops twice
            torch.ops.load_library(str(library))
            _register_shapes()
    except (KernelBuildError, OSError) as e:  # OSError: a library the dynamic loader refuses
        log.warning("pocketlm's CPU kernels are not available (%s); quantized decoding and CPU training's "
                    "attention use PyTorch's slower kernels. Install g++ to get them, or set %s=0 to silence "
                    "this.", e, SWITCH)
        return False
    return True


class KernelBuildError(RuntimeError):
    pass


def build() -> Path:
    """The compiled library, from the cache when this source was built before with this torch."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C++ compiler {compiler!r} on PATH")
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    texts = [p.read_text() for p in SOURCES + list(ISA_SOURCES) + HEADERS]
    isa_flags = [flag for flags in ISA_SOURCES.values() for flag in flags]
    key = hashlib.sha256("\n".join([*texts, torch.__version__, compiler, abi, *FLAGS, *isa_flags]).encode())
    target = cache_dir() / "cpu_kernels" / f"pocketlm_cpu_kernels_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    torch_lib = library_paths()[0]
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    log.info("building pocketlm's CPU kernels (once, about 30 s)")
    with tempfile.TemporaryDirectory(dir=target.parent) as objects:
        try:
            isa_objects = []
            for source, extra in ISA_SOURCES.items():
                isa_objects.append(str(Path(objects) / (source.stem + ".o")))
                _compile([compiler, *FLAGS, *extra, "-c", str(source), "-o", isa_objects[-1]], compiler)
            _compile([compiler, *FLAGS, abi, *(f"-I{p}" for p in include_paths()), *map(str, SOURCES), *isa_objects,
                      "-o", str(partial), f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"], compiler)
            os.replace(partial, target)  # atomic: a concurrent or killed build never leaves half a library
        finally:
            partial.unlink(missing_ok=True)
    return target


def _compile(command: list[str], compiler: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise KernelBuildError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")


def _register_shapes() -> None:
    """Shape functions, so torch.compile can trace through the ops."""

    @torch.library.register_fake("pocketlm::int4_linear")
    def _(x, words, tables, group_size):
        return x.new_empty(x.shape[0], sum(w.shape[0] * w.shape[2] for w in words))

    @torch.library.register_fake("pocketlm::int8_linear")
    def _(x, codes, scales):
        return x.new_empty(x.shape[0], sum(c.shape[0] for c in codes))

    @torch.library.register_fake("pocketlm::qdot_int4")
    def _(x, words, tables, group_size):
        return x.new_empty(x.shape[0], sum(16 * w.shape[0] for w in words))

    @torch.library.register_fake("pocketlm::qdot_int8")
    def _(x, codes, scales):
        return x.new_empty(x.shape[0], sum(16 * c.shape[0] for c in codes))

    @torch.library.register_fake("pocketlm::decode_attention")
    def _(q, k, v, mask):
        return torch.empty_like(q)


def int4_linear(x: torch.Tensor, words: list[torch.Tensor], tables: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """x (rows, in) through one or more int4 matrices, their outputs side by side -> (rows, sum of outs)
    fp32. Each matrix is its codes in `quant.int4_words`'s layout (as int32) and a table
    (out / 8, groups, 2, 8) fp16 of each block's scales then mins."""
    return torch.ops.pocketlm.int4_linear(x.float().contiguous(), words, tables, group_size)


def int8_linear(x: torch.Tensor, codes: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    """x (rows, in) through one or more int8 matrices (out, in) with per-row fp32 scales, their outputs
    side by side -> (rows, sum of outs) fp32."""
    return torch.ops.pocketlm.int8_linear(x.float().contiguous(), codes, scales)


def serves_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `decode_attention` can take these queries and keys (fp32 on the CPU, head_dim a multiple of 8)."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == torch.float32 and q.shape[-1] % 8 == 0
            and k.stride(-1) == 1 and available())


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row and head over a key/value cache: q (rows, kv_heads, group, head_dim), k and v
    (rows, kv_heads, positions, head_dim) (views of the cache are fine), mask (rows, positions) bool,
    true where a position may be attended to -> (rows, kv_heads, group, head_dim) fp32. Masked
    positions are skipped."""
    return torch.ops.pocketlm.decode_attention(q.contiguous(), k, v, mask.reshape(q.shape[0], -1).contiguous())
