"""Where pocketlm keeps what it fetches, imports and builds (a base module: it imports nothing of pocketlm).

The cache lives in ~/.cache/pocketlm (override with POCKETLM_CACHE): downloads/ keeps fetched source
files, models/ keeps imported model directories (override with POCKETLM_MODELS), cpu_kernels/ the built
C++ kernels.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETLM_CACHE", Path.home() / ".cache" / "pocketlm")).expanduser()


def models_dir() -> Path:
    return Path(os.environ.get("POCKETLM_MODELS", cache_dir() / "models")).expanduser()
