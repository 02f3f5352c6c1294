"""CPU feature detection, and the one-line warning when bfloat16 is asked for on a CPU that emulates it."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from pocketlm.kernels import cpu_features
from pocketlm.checkpoint import load_model

from helpers import tiny_model_dir

ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma f16c\n\nprocessor\t: 1\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize("cpuinfo, bf16, amx", [(ZEN3, False, False), (SAPPHIRE_RAPIDS, True, True),
                                                 (GRAVITON3, True, False), ("", False, False)])
def test_cpu_features_from_cpuinfo(monkeypatch, cpuinfo, bf16, amx):
    monkeypatch.setattr(cpu_features, "_flags", lambda: cpu_features.parse_flags(cpuinfo))
    assert cpu_features.cpu_has_bf16() is bf16
    assert cpu_features.cpu_has_amx() is amx


def test_bf16_on_a_cpu_without_it_is_warned_about_once_per_load(monkeypatch, caplog, tmp_path):
    model_dir = tiny_model_dir(tmp_path / "m")
    monkeypatch.setattr(cpu_features, "_flags", lambda: cpu_features.parse_flags(ZEN3))
    with caplog.at_level(logging.WARNING, logger="pocketlm"):
        model, _ = load_model(model_dir, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16  # a warning, not a refusal
    warnings = [r.getMessage() for r in caplog.records if r.name == "pocketlm.kernels.cpu_features"]
    assert len(warnings) == 1 and "no bf16 instructions" in warnings[0] and "float32" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pocketlm"):
        load_model(model_dir)  # float32: nothing to say
        monkeypatch.setattr(cpu_features, "_flags", lambda: cpu_features.parse_flags(SAPPHIRE_RAPIDS))
        load_model(model_dir, dtype=torch.bfloat16)  # native bf16
        monkeypatch.setattr(cpu_features, "_flags", lambda: None)
        load_model(model_dir, dtype=torch.bfloat16)  # no /proc/cpuinfo (macOS): unknown, so no claim
    assert not [r for r in caplog.records if r.name == "pocketlm.kernels.cpu_features"]


def test_a_recipe_asking_for_bf16_on_a_cpu_without_it_is_warned_about(monkeypatch, caplog):
    from pocketlm.train.loop import autocast_dtype

    monkeypatch.setattr(cpu_features, "_flags", lambda: cpu_features.parse_flags(ZEN3))
    recipe = SimpleNamespace(train=SimpleNamespace(dtype="bfloat16"), privacy=None)
    with caplog.at_level(logging.WARNING, logger="pocketlm"):
        assert autocast_dtype(recipe, torch.device("cpu")) == torch.bfloat16
        recipe.train.dtype = "auto"
        assert autocast_dtype(recipe, torch.device("cpu")) is None  # auto picks float32 here, silently
    assert len([r for r in caplog.records if "no bf16 instructions" in r.getMessage()]) == 1
