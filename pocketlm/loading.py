"""Opening a model: the one way every command and stage turns what a user named into (model, tokenizer).

A model argument may be a registry name or `hf:ORG/NAME` (pulled on first use), a model directory
(float or quantized: the directory says which), or a PEFT adapter directory (opened on its base model,
LoRA merged into the weights unless `merge=False`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .adapt.adapters import is_adapter_dir, load_adapted
from .checkpoint import load_model
from .hub import resolve_model


def open_model(name_or_dir: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               adapter: str | Path | None = None, merge: bool = True):
    """(model, tokenizer) for a model name or directory; `adapter` puts an adapter directory on it."""
    path = resolve_model(str(name_or_dir))
    if adapter is not None:
        return load_adapted(adapter, dtype=dtype, device=device, merge=merge, base=str(path))
    if not (path / "config.json").is_file() and is_adapter_dir(path):
        return load_adapted(path, dtype=dtype, device=device, merge=merge)
    return load_model(path, dtype=dtype, device=device)
