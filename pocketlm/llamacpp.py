"""Opening GGUF files in llama-cpp-python, the peer pocketlm is checked and measured against.

On CPUs with Intel AMX (Sapphire Rapids and later), llama.cpp repacks quantized weights into its AMX
buffer type, and on some of these machines its AMX matrix multiply crashes the process on the first
batched evaluation (ggml-org/llama.cpp#20824, open upstream; reproduced here on a 128-token prompt).
`open_llama` turns llama.cpp's extra buffer types off on such CPUs, so llama.cpp runs its portable
AVX-512 kernels there; elsewhere it runs with its defaults.
"""

from __future__ import annotations

import contextlib
import runpy
import sys
from pathlib import Path

from .kernels.cpu_features import cpu_has_amx


@contextlib.contextmanager
def _without_extra_buffers():
    """While open, llama-cpp-python's model parameters default to no extra buffer types (AMX, repack)."""
    import llama_cpp
    import llama_cpp.llama as high_level

    original = llama_cpp.llama_model_default_params

    def defaults():
        params = original()
        params.use_extra_bufts = False
        return params

    high_level.llama_cpp.llama_model_default_params = defaults
    try:
        yield
    finally:
        high_level.llama_cpp.llama_model_default_params = original


def safe_settings():
    """A context under which llama-cpp-python opens models without the crashing AMX path (a no-op
    on CPUs without AMX)."""
    return _without_extra_buffers() if cpu_has_amx() else contextlib.nullcontext()


def open_llama(model_path: str | Path, **kwargs):
    """llama_cpp.Llama(model_path, **kwargs), safe on AMX CPUs (see the module's docstring)."""
    from llama_cpp import Llama

    with safe_settings():
        return Llama(model_path=str(model_path), **kwargs)


def run_server(argv: list[str]) -> None:
    """llama-cpp-python's OpenAI server (`python -m llama_cpp.server ARGS`) under the same settings:
    `python -m pocketlm.llamacpp ARGS`."""
    with safe_settings():
        sys.argv = ["llama_cpp.server", *argv]
        runpy.run_module("llama_cpp.server", run_name="__main__")


if __name__ == "__main__":
    run_server(sys.argv[1:])
