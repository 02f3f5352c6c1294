"""Importers and exporters between pocketlm model directories and other formats (GGUF, HF, llama2.c).

`import_model` picks the importer from what the source is: a Hugging Face directory, a GGUF file
(recognised by its magic bytes), or a llama2.c legacy checkpoint (which needs a SentencePiece tokenizer).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PocketLMError
from .gguf import import_gguf
from .gguf_export import export_gguf
from .hf import import_hf
from .llama2c import export_llama2c, import_llama2c

EXPORT_FORMATS = ("gguf", "llama2c")


def detect_format(src: str | Path) -> str:
    src = Path(src)
    if not src.exists():
        raise PocketLMError(f"{src}: no such file or directory")
    if src.is_dir():
        return "hf"
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    if src.suffix == ".bin":
        return "llama2c"
    raise PocketLMError(
        f"{src}: not a model pocketlm can import; expected a Hugging Face directory, a .gguf file, "
        "or a llama2.c .bin checkpoint (with --tokenizer)"
    )


def import_model(src: str | Path, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    kind = detect_format(src)
    if kind == "hf":
        return import_hf(src, out)
    if kind == "gguf":
        return import_gguf(src, out)
    if tokenizer is None:
        raise PocketLMError(f"{src}: a llama2.c checkpoint carries no tokenizer; pass its SentencePiece model with --tokenizer PATH")

    return import_llama2c(src, out, tokenizer)


def export_model(model_dir: str | Path, out: str | Path, fmt: str, outtype: str = "auto") -> Path:
    if fmt == "gguf":
        return Path(export_gguf(model_dir, out, outtype=outtype))
    if fmt == "llama2c":
        return Path(export_llama2c(model_dir, out))
    raise PocketLMError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
