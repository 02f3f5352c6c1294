"""Import a Hugging Face Llama-family directory (config.json + safetensors + tokenizer files)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import load_config, load_tensors, save_model_dir
from ..errors import CheckpointError
from ..tokenizer import Tokenizer
from .llama2c import tokenizer_from_sentencepiece


def import_hf(src: str | Path, out: str | Path, dtype: torch.dtype | None = torch.float32) -> Path:
    """Copy a Hugging Face Llama directory into a pocketlm model directory (weights validated, cast to `dtype`)."""
    src = Path(src)
    config = load_config(src)
    tensors = _read_weights(src)
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tokenizer = _read_tokenizer(src)
    generation = {}
    if (src / "generation_config.json").is_file():
        generation = json.loads((src / "generation_config.json").read_text())
        generation = {k: v for k, v in generation.items() if not k.startswith("_") and k != "transformers_version"}
    source = {"format": "hf", "path": str(src.resolve())}
    return save_model_dir(out, config, tensors, tokenizer, provenance={"source": source}, generation_config=generation)


def _read_weights(src: Path) -> dict[str, torch.Tensor]:
    single = src / "model.safetensors"
    index = src / "model.safetensors.index.json"
    if single.is_file():
        return load_tensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_tensors(src / shard))
        return tensors
    if any(src.glob("*.bin")) or any(src.glob("*.pt")):
        raise CheckpointError(f"{src}: has only pickled weights (.bin/.pt); pocketlm reads safetensors only. "
                              "Convert them first (transformers: model.save_pretrained(dir, safe_serialization=True)).")
    raise CheckpointError(f"{src}: no model.safetensors or model.safetensors.index.json found")


def _read_tokenizer(src: Path) -> Tokenizer:
    if (src / "tokenizer.json").is_file():
        return Tokenizer.load(src)
    if (src / "tokenizer.model").is_file():
        tokenizer = tokenizer_from_sentencepiece(src / "tokenizer.model")
        if (src / "tokenizer_config.json").is_file():
            template = json.loads((src / "tokenizer_config.json").read_text()).get("chat_template")
            tokenizer.chat_template = template or tokenizer.chat_template
        return tokenizer
    raise CheckpointError(f"{src}: no tokenizer.json or tokenizer.model; a model directory needs its tokenizer")
