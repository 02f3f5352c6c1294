"""What travels between server and clients: the trainable weights (a LoRA adapter's when the recipe has one, else
every weight of the model) packed into ONE flat float32 array in a fixed order. Flower sends an array record of
many arrays far slower than one, and refuses bfloat16.

The layout (names and shapes, in order) is fixed when the run starts and written to the plan, so that the server,
which never builds the model, and every client agree on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

Layout = list[tuple[str, tuple[int, ...]]]


def trainable_layout(model: torch.nn.Module) -> Layout:
    return [(name, tuple(p.shape)) for name, p in model.named_parameters() if p.requires_grad]


def pack(model: torch.nn.Module, layout: Layout) -> np.ndarray:
    params = dict(model.named_parameters())
    return np.concatenate([params[name].detach().float().cpu().reshape(-1).numpy() for name, _ in layout]
                          or [np.zeros(0, np.float32)]).astype(np.float32, copy=False)


def unpack(flat: np.ndarray, layout: Layout) -> dict[str, torch.Tensor]:
    expected = sum(int(np.prod(shape)) for _, shape in layout)
    if flat.size != expected:
        raise ValueError(f"a packed update of {flat.size} values does not fit the run's layout of {expected}")
    out, at = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        out[name] = torch.from_numpy(np.array(flat[at:at + size], dtype=np.float32)).reshape(shape)
        at += size
    return out


def save_flat(path: str | Path, flat: np.ndarray) -> None:
    save_file({"weights": np.ascontiguousarray(flat, dtype=np.float32)}, str(path))


def load_flat(path: str | Path) -> np.ndarray:
    return load_file(str(path))["weights"]
