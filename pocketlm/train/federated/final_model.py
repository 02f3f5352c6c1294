"""The federated model: the recipe's starting model with its trainable weights (adapter or all) set from packed
weights, and the finished run written as `pocketlm train` writes it: OUT_DIR/model (a model directory), and for an
adapter OUT_DIR/adapter in PEFT's format (with the merged model as OUT_DIR/model for LoRA with adapter.merge)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...adapt.adapters import attach, config_from_spec, merged_weights, save_adapter
from ...checkpoint import save_model_dir
from ...hub import resolve_model
from ..loop import load_init_model
from ..recipe import Recipe
from .weights import unpack


def starting_model(recipe: Recipe):
    """(model, tokenizer): init_from with the recipe's adapter attached, initialised as the loop initialises it
    (seeded by recipe.seed)."""
    torch.manual_seed(recipe.seed)
    model, tokenizer = load_init_model(recipe)
    if recipe.adapter is not None:
        attach(model, config_from_spec(model, recipe.adapter))
    return model, tokenizer


def save_federated_model(recipe: Recipe, weights: np.ndarray, layout, provenance: dict) -> Path:
    model, tokenizer = starting_model(recipe)
    trained = unpack(weights, layout)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trained:
                p.copy_(trained[name])
    out_dir = Path(recipe.out_dir)
    provenance = {"recipe": recipe.model_dump(mode="json"), "parent": recipe.init_from, **provenance}
    if recipe.adapter is None:
        state = {k: v.detach().float() for k, v in model.state_dict().items()}
        return save_model_dir(out_dir / "model", model.config, state, tokenizer, provenance=provenance)
    adapter_dir = save_adapter(model, out_dir / "adapter", resolve_model(recipe.init_from), provenance=provenance)
    if recipe.adapter.type != "lora" or not recipe.adapter.merge:
        return adapter_dir
    provenance["adapter"] = {"path": str(adapter_dir.resolve()), "type": "lora", "r": recipe.adapter.r,
                             "alpha": recipe.adapter.alpha, "merged": True}
    return save_model_dir(out_dir / "model", model.config, merged_weights(model), tokenizer, provenance=provenance)
