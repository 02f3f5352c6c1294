"""pocketlm's AVX2 kernels (pocketlm/csrc/cpu_kernels.cpp) against plain PyTorch references: the
quantized products against the dequantized matmul in float64, the decode attention against softmax
attention, and the fallback when the kernels cannot be built."""

from __future__ import annotations

import logging
import os
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from pocketlm import quant
from pocketlm.kernels import cpu_ops
from pocketlm.model import _single_query_attention
from pocketlm.kernels.dispatch import fused_projections
from pocketlm.quant import Int4Linear, Int8Linear

pytestmark = pytest.mark.skipif(not cpu_ops.load(), reason="needs an x86 CPU with AVX2 and a C++ compiler")


@pytest.fixture
def kernels_on(monkeypatch):
    """The layers use the fp32-activation kernels whatever this CPU would pick (they run on any AVX2 CPU)."""
    monkeypatch.setitem(cpu_ops._loaded, "available", True)
    monkeypatch.setenv(cpu_ops.SWITCH, "exact")


def reference(x: torch.Tensor, layer) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.dequantized().double(), bias)


@pytest.mark.parametrize("rows", [1, 3, 15])
@pytest.mark.parametrize("kind", ["int4-g32", "int4-g64", "int4-g128-symmetric", "int8"])
def test_quantized_products_match_the_dequantized_matmul(kernels_on, kind, rows):
    linear = torch.nn.Linear(256, 40, bias=True)
    if kind == "int8":
        q = Int8Linear.from_float(linear)
    else:
        q = Int4Linear.from_float(linear, int(kind.split("-")[1][1:]), symmetric=kind.endswith("symmetric"))
    x = torch.randn(2, rows, 256) * 3
    got = q(x)
    if kind == "int8":
        assert q.__dict__["_native"] is True  # the kernel ran
    else:
        assert q.__dict__["_native"] is not None and q._kernel is None  # and PyTorch's packed copy was never made
    torch.testing.assert_close(got.double(), reference(x, q), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_fused_projections_are_the_layers_outputs_side_by_side(kernels_on, kind):
    layers = [torch.nn.Linear(128, n, bias=(n == 16)) for n in (64, 16, 96)]
    qs = [Int4Linear.from_float(m, 32) if kind == "int4" else Int8Linear.from_float(m) for m in layers]
    x = torch.randn(1, 1, 128)
    for q in qs:
        q.prepare_decode()
    outs = fused_projections(x, qs)
    assert [o.shape for o in outs] == [(1, 1, 64), (1, 1, 16), (1, 1, 96)]
    for q, out in zip(qs, outs):
        torch.testing.assert_close(out.double(), reference(x, q), atol=2e-5, rtol=1e-5)
    # mixed kinds, many rows, or layers the kernels do not serve: the caller applies the layers one by one
    assert fused_projections(x, [qs[0], torch.nn.Linear(128, 8)]) is None
    assert fused_projections(torch.randn(quant.EXACT_ROWS, 128), qs) is None


def test_decode_attention_matches_softmax_attention(kernels_on):
    batch, kv_heads, group, d, cache = 2, 3, 3, 64, 40
    q = torch.randn(batch, kv_heads * group, 1, d)
    k_cache, v_cache = torch.randn(2, batch, kv_heads, cache, d).unbind(0)
    span = 32  # views of the cache's first positions, as the decode step passes them
    mask = torch.zeros(batch, 1, 1, span, dtype=torch.bool)
    mask[0, ..., :5] = True
    mask[1, ..., 3:29] = True  # a row whose first positions are padding
    k, v = k_cache[:, :, :span], v_cache[:, :, :span]
    got = _single_query_attention(q, k, v, mask)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got.double(), expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_refused_with_what_was_expected():
    codes, scales = torch.zeros(8, 64, dtype=torch.int8), torch.ones(8)
    with pytest.raises(RuntimeError, match=r"input must be \(rows, 64\)"):
        torch.ops.pocketlm.int8_linear(torch.zeros(1, 32), [codes], [scales])
    with pytest.raises(RuntimeError, match="codes must be contiguous int8"):
        torch.ops.pocketlm.int8_linear(torch.zeros(1, 64), [codes.float()], [scales])
    words, tables = torch.zeros(1, 8, 8, dtype=torch.int32), torch.zeros(1, 2, 2, 8, dtype=torch.half)
    with pytest.raises(RuntimeError, match="tables must be contiguous fp16"):
        torch.ops.pocketlm.int4_linear(torch.zeros(1, 64), [words], [tables.float()], 32)


def test_without_a_compiler_the_layers_fall_back_and_say_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path))
    with pytest.raises(cpu_ops.KernelBuildError, match="no C.. compiler 'no-such-compiler'"):
        cpu_ops.build()
    monkeypatch.setattr(cpu_ops, "_loaded", {})
    monkeypatch.setattr(cpu_ops, "wanted", lambda: True)
    with caplog.at_level(logging.WARNING, logger="pocketlm.kernels.cpu_ops"):
        assert not cpu_ops.available()
    assert "Install g++" in caplog.text
    q = Int4Linear.from_float(torch.nn.Linear(64, 16), 32)
    x = torch.randn(1, 64)
    y = q(x)  # PyTorch's int4 kernel (bf16 activations) instead
    assert q.__dict__["_native"] is None and q._kernel is not None
    torch.testing.assert_close(y.double(), reference(x, q), atol=0.05, rtol=0.05)


def test_a_failed_build_names_the_compiler_error(monkeypatch, tmp_path):
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_ops, "FLAGS", [*cpu_ops.FLAGS, "-fno-such-flag"])
    with pytest.raises(cpu_ops.KernelBuildError, match="g.. failed: .*no-such-flag"):
        cpu_ops.build()
    assert list((tmp_path / "cpu_kernels").iterdir()) == []  # no half-written library left behind


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_ops.SWITCH, "0")
    monkeypatch.setattr(cpu_ops, "_loaded", {})
    assert not cpu_ops.wanted() and not cpu_ops.available()


@pytest.mark.parametrize("switch,capability,expected", [
    ("1", "AVX2", True), ("1", "AVX512", True), ("exact", "AVX512_BF16", True), ("1", "DEFAULT", False),
    ("0", "AVX2", False), ("0", "AVX512", False)])
def test_which_cpus_use_the_kernels(monkeypatch, switch, capability, expected):
    monkeypatch.setenv(cpu_ops.SWITCH, switch)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_ops.wanted() is expected


def test_every_kernel_source_is_where_the_build_reads_it():
    """A source moved or renamed would otherwise only make the kernels unavailable (a warning, and the
    kernel tests skipped as if the machine had no compiler)."""
    assert [p for p in cpu_ops.SOURCES + cpu_ops.HEADERS if not p.is_file()] == []


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None or platform.machine().lower() not in ("x86_64", "amd64")
                    or torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="needs an x86 CPU with AVX2 and a C++ compiler")
def test_the_kernels_build_and_load_where_a_compiler_and_avx2_are_there():
    assert cpu_ops.load()
