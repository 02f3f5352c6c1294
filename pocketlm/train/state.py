"""Training checkpoints: everything an exact resume needs, with no pickle.

    checkpoints/step-000250/model.safetensors      model weights (Hugging Face names)
    checkpoints/step-000250/optimizer.safetensors  optimizer tensors, keyed state.<param>.<name>
    checkpoints/step-000250/trainer.json           step, best validation loss, optimizer scalars, RNG states
    checkpoints/index.json                         latest and best step

A checkpoint directory is written under a temporary name, fsynced and renamed, and index.json is
replaced atomically after it, so a kill at any moment leaves the previous good checkpoint usable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..fsio import atomic_write
from ..errors import CheckpointError


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    best_val_loss: float | None = None
    tokens_seen: int = 0
    privacy: dict | None = None  # a private run's accountant history (train/privacy.py)


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def save_checkpoint(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState,
                    keep_last: int, keep_best: bool, is_best: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    target = _step_dir(root, state.step)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file(_trained_weights(model), str(tmp / "model.safetensors"))
        tensors, scalars = _flatten_optimizer(model, optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        trainer = {
            "step": state.step, "best_val_loss": state.best_val_loss, "tokens_seen": state.tokens_seen,
            "optimizer": scalars, "privacy": state.privacy,
            "rng": {"python": _python_rng_to_json(random.getstate()), "torch": torch.get_rng_state().tolist()},
        }
        (tmp / "trainer.json").write_text(json.dumps(trainer))
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    index = read_index(root)
    index["latest"] = target.name
    if is_best or index.get("best") is None:
        index["best"] = target.name
    atomic_write(root / "index.json", lambda f: f.write(json.dumps(index).encode()))
    _prune(root, index, keep_last, keep_best)
    return target


def read_index(root: Path) -> dict[str, Any]:
    try:
        return json.loads((root / "index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint; half-written temporaries from a crash are removed."""
    if not root.is_dir():
        return None
    for leftover in root.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    latest = read_index(root).get("latest")
    if latest and (root / latest / "trainer.json").is_file():
        return root / latest
    complete = sorted(p for p in root.glob("step-*") if (p / "trainer.json").is_file())
    return complete[-1] if complete else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainerState:
    try:
        trainer = json.loads((path / "trainer.json").read_text())
        weights = load_file(str(path / "model.safetensors"))
        tensors = load_file(str(path / "optimizer.safetensors"))
    except Exception as exc:
        raise CheckpointError(f"{path}: training checkpoint cannot be read ({exc}); delete it to resume from an earlier one") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    frozen = _frozen_names(model)  # an adapter's base: it comes from init_from, not the checkpoint
    missing = [k for k in missing if not _is_tied(model, k) and k not in frozen]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the recipe's model (missing {missing[:2]}, unexpected {unexpected[:2]})")
    _restore_optimizer(model, optimizer, tensors, trainer["optimizer"])
    random.setstate(_python_rng_from_json(trainer["rng"]["python"]))
    torch.set_rng_state(torch.tensor(trainer["rng"]["torch"], dtype=torch.uint8))
    return TrainerState(step=trainer["step"], best_val_loss=trainer["best_val_loss"], tokens_seen=trainer["tokens_seen"],
                        privacy=trainer.get("privacy"))


# ---- helpers --------------------------------------------------------------------------------
def _prune(root: Path, index: dict[str, Any], keep_last: int, keep_best: bool) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    keep = {p.name for p in steps[-keep_last:]}
    if keep_best and index.get("best"):
        keep.add(index["best"])
    for path in steps:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def _frozen_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _trained_weights(model) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps: every weight, or only an adapter's when the base is frozen."""
    if _frozen_names(model):
        return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _drop_tied(model, weights)
    return weights


def _is_tied(model, name: str) -> bool:
    return name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


def _drop_tied(model, weights: dict) -> None:
    if getattr(model.config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)


def _flatten_optimizer(model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as named tensors plus JSON scalars, keyed by parameter name (stable across runs)."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": [], "state": {}}
    for group in optimizer.param_groups:
        scalars["param_groups"].append({k: v for k, v in group.items() if k != "params"})
    for p, state in optimizer.state.items():
        name = names[id(p)]
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{name}.{key}"] = value.detach().contiguous()
            else:
                scalars["state"].setdefault(name, {})[key] = value
    if not tensors:  # safetensors needs at least one entry
        tensors["__empty__"] = torch.zeros(0)
    return tensors, scalars


def _restore_optimizer(model, optimizer, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    params = dict(model.named_parameters())
    for group, saved in zip(optimizer.param_groups, scalars["param_groups"]):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    optimizer.state.clear()
    for key, value in tensors.items():
        if key == "__empty__":
            continue
        _, rest = key.split(".", 1)
        name, field = rest.rsplit(".", 1)
        optimizer.state[params[name]][field] = value
    for name, fields in scalars["state"].items():
        optimizer.state[params[name]].update(fields)


def _python_rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(data) -> tuple:
    return (data[0], tuple(data[1]), data[2])
