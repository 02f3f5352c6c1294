"""The upcycle stage: a dense model directory in, a mixture of experts out (`pocketlm upcycle`).

Sparse upcycling (Komatsuzaki et al., 2022): every expert of a layer starts as a copy of that layer's MLP and
the router at small random weights. Whichever k experts the router picks, they compute the same function and
their renormalised weights sum to 1, so the new model gives the dense model's outputs until training pulls the
experts apart: training continues from the dense model's quality instead of from scratch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_config, load_model, read_provenance, save_model_dir
from .config import ModelConfig
from .errors import ConfigError


def upcycle_dir(model_dir, out, experts: int, top_k: int, seed: int = 0, router_std: float = 0.02,
                router_aux_loss_coef: float = 0.001) -> Path:
    """Write `model_dir` as a Mixtral-style mixture with `experts` copies of each MLP, `top_k` used per token."""
    config = load_config(model_dir)
    if config.moe:
        raise ConfigError(f"{model_dir} is already a mixture of {config.num_local_experts} experts")
    if config.attention_bias or config.mlp_bias:
        raise ConfigError(f"{model_dir} has linear biases; Mixtral's layers have none, so it cannot be upcycled exactly")
    fields = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    moe = ModelConfig.from_dict({**fields, "num_local_experts": experts, "num_experts_per_tok": top_k,
                                 "router_aux_loss_coef": router_aux_loss_coef}, source="upcycle")
    model, tokenizer = load_model(model_dir)
    if model.quant_scheme is not None:
        raise ConfigError(f"{model_dir} is quantized ({model.quant_scheme.describe()}); upcycle its float parent")
    generator = torch.Generator().manual_seed(seed)
    dense_state = model.state_dict()
    tensors = {name: tensor for name, tensor in dense_state.items() if ".mlp." not in name}
    for i in range(config.num_hidden_layers):
        dense, moe_prefix = f"model.layers.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
        router = torch.randn(experts, config.hidden_size, generator=generator) * router_std
        tensors[moe_prefix + "gate.weight"] = router.to(tensors["model.norm.weight"].dtype)
        for e in range(experts):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                tensors[f"{moe_prefix}experts.{e}.{ours}.weight"] = dense_state[dense + theirs + ".weight"].clone()
    parent = read_provenance(model_dir)
    provenance = {
        "source": parent.get("source"), "parent": str(Path(model_dir).resolve()), "recipe": parent.get("recipe"),
        "data_hashes": parent.get("data_hashes", {}), "metrics": {},
        "upcycle": {"experts": experts, "top_k": top_k, "seed": seed, "router_std": router_std},
    }
    return save_model_dir(out, moe, tensors, tokenizer, provenance=provenance)
