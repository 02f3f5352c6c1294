"""Shared fixtures: the real data in ../shared/data and the real SmolLM2-135M-Instruct model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("POCKETLM_SHARED_DATA", REPO.parent / "shared" / "data"))
if SHARED_DATA.is_dir():  # `dataset:NAME/FILE` (recipes, pipelines) from the local copies: no network in tests
    os.environ.setdefault("POCKETLM_DATASETS", str(SHARED_DATA))


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
    threads = torch.get_num_threads()
    yield
    # the next test starts on the suite's thread count whatever this one set (cli.main run in-process sets its own)
    torch.set_num_threads(threads)


GGUF_VOCABS = ("ggml-vocab-gpt-2.gguf", "ggml-vocab-llama-spm.gguf")
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"


def _parses_as_gguf(path: Path) -> bool:
    from gguf import GGUFReader

    try:
        GGUFReader(path)
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def gguf_vocab_dir(shared_data) -> Path:
    """llama.cpp's vocab-only GGUF files beside their test cases (.inp texts, .out expected ids).

    The cases come from ../shared/data/gguf_vocab. Its .gguf copies were damaged on the way there
    (non-UTF-8 bytes replaced by U+FFFD, so no GGUF reader can parse them); where a copy doesn't parse,
    the intact file is taken from llama-cpp-python's source package on PyPI, which vendors llama.cpp's
    models/ folder, and cached.
    """
    import shutil
    import subprocess
    import sys
    import tarfile

    from pocketlm.paths import cache_dir

    shared = shared_data / "gguf_vocab"
    target = cache_dir() / "test-data" / "gguf_vocab"
    target.mkdir(parents=True, exist_ok=True)
    for name in GGUF_VOCABS:
        for suffix in (".inp", ".out"):
            shutil.copyfile(shared / (name + suffix), target / (name + suffix))
        if _parses_as_gguf(shared / name):
            shutil.copyfile(shared / name, target / name)
    missing = [n for n in GGUF_VOCABS if not _parses_as_gguf(target / n)]
    if missing:
        sdist_dir = cache_dir() / "downloads"
        sdists = list(sdist_dir.glob("llama_cpp_python-0.3.36.tar.gz"))
        if not sdists:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "--disable-pip-version-check", "-q", "-d", str(sdist_dir), LLAMA_CPP_SDIST], check=True)
            sdists = list(sdist_dir.glob("llama_cpp_python-0.3.36.tar.gz"))
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                if Path(member.name).name in missing and "/vendor/llama.cpp/models/" in member.name:
                    with tar.extractfile(member) as src, open(target / Path(member.name).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    for name in GGUF_VOCABS:
        assert _parses_as_gguf(target / name), f"no intact copy of {name}"
    return target


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every socket connection and name lookup refused (and recorded), with HF_HUB_OFFLINE unset, so that a
    test shows what runs from the cache alone. Yields the list of attempts (empty when nothing tried)."""
    import socket

    import huggingface_hub.constants

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, at import
    attempts: list = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"test: the network was reached ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: refuse(None, host))  # a lookup too
    return attempts
