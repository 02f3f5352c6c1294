"""DPO's frozen reference: its log-probabilities of every chosen and rejected reply, computed once.

The reference never changes during training, so running it at every step would only repeat work.
Its values are computed before the first update (from dpo.reference, or from the starting model
itself before any adapter is attached) and kept in OUT_DIR/reference-logprobs.npz, which a resumed
run reads back instead of asking a model that has since been trained.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..loading import open_model
from .objectives import reply_logprobs


@torch.no_grad()
def reference_logprobs(model, rows, batch: int, device, autocast) -> dict[str, np.ndarray]:
    was_training = model.training
    model.eval()
    out = {"ref_chosen": [], "ref_rejected": []}
    for start in range(0, rows.n, batch):
        picks = np.arange(start, min(start + batch, rows.n))
        b = rows.batch(picks, device)
        for side in ("chosen", "rejected"):
            with autocast():
                values = reply_logprobs(model, b[f"{side}_input_ids"], b[f"{side}_labels"])
            out[f"ref_{side}"].append(values.float().cpu().numpy())
    model.train(was_training)
    return {k: np.concatenate(v) for k, v in out.items()}


def _fingerprint(rows) -> str:
    digest = hashlib.sha256()
    for key in sorted(rows.arrays):
        if not key.startswith("ref_"):
            digest.update(np.ascontiguousarray(rows.arrays[key]).tobytes())
    return digest.hexdigest()


def attach_reference_logprobs(recipe, model, data, runtime, autocast) -> None:
    """Add ref_chosen / ref_rejected arrays to the training and validation rows."""
    path = Path(recipe.out_dir) / "reference-logprobs.npz"
    keys = {"train": _fingerprint(data.train), "val": _fingerprint(data.val)}
    saved = dict(np.load(path)) if path.is_file() else {}
    if saved and all(str(saved.get(f"{name}_fingerprint")) == key for name, key in keys.items()):
        for name, rows in (("train", data.train), ("val", data.val)):
            rows.arrays.update({k: saved[f"{name}_{k}"] for k in ("ref_chosen", "ref_rejected")})
        return
    reference = model
    if recipe.dpo.reference:
        reference, _ = open_model(recipe.dpo.reference, device=runtime.device)
        reference = reference.float()
    per = max(1, recipe.train.batch_size // recipe.train.grad_accum)
    record = {}
    for name, rows in (("train", data.train), ("val", data.val)):
        values = reference_logprobs(reference, rows, per, runtime.device, autocast)
        rows.arrays.update(values)
        record.update({f"{name}_{k}": v for k, v in values.items()})
        record[f"{name}_fingerprint"] = np.array(keys[name])
    if runtime.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **record)
        tmp.replace(path)
