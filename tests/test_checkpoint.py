"""The model directory: files written, round trip, and clear errors for broken directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pocketlm.checkpoint import WEIGHTS, load_model, read_provenance, update_provenance
from pocketlm.errors import CheckpointError, PocketLMError

from helpers import tiny_model_dir


@pytest.fixture
def model_dir(tmp_path):
    return tiny_model_dir(tmp_path / "m")


def test_directory_has_every_file(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", WEIGHTS, "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "pocketlm.json", "README.md"} <= names
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"].startswith("{% for")
    record = read_provenance(model_dir)
    assert record["parameters"] == sum(t.numel() for t in load_file(model_dir / WEIGHTS).values())
    assert "| layers | 2 |" in (model_dir / "README.md").read_text()


def test_round_trip_is_exact(model_dir):
    model, tokenizer = load_model(model_dir)
    saved = load_file(model_dir / WEIGHTS)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert tokenizer.decode(tokenizer.encode("the theme")) == "the theme"


def test_overwrite_is_atomic_and_leaves_no_temporaries(model_dir):
    tiny_model_dir(model_dir, seed=1)
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["m"]


def test_update_provenance_rewrites_card(model_dir):
    update_provenance(model_dir, metrics={"wikitext2_ppl": 12.5})
    assert read_provenance(model_dir)["metrics"] == {"wikitext2_ppl": 12.5}
    assert "wikitext2_ppl" in (model_dir / "README.md").read_text()


def _rewrite(model_dir, change):
    tensors = load_file(model_dir / WEIGHTS)
    change(tensors)
    save_file(tensors, model_dir / WEIGHTS)


@pytest.mark.parametrize("case, change, message", [
    ("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor model.layers.1.mlp.up_proj.weight"),
    ("extra", lambda t: t.update({"model.layers.9.junk": torch.zeros(2)}), "unexpected tensor model.layers.9.junk"),
    ("shape", lambda t: t.update({"model.norm.weight": torch.zeros(63)}), "model.norm.weight has shape (63,)"),
    ("dtype", lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int32)}), "model.norm.weight has dtype torch.int32"),
])
def test_mismatched_tensors_are_named(model_dir, case, change, message):
    _rewrite(model_dir, change)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_model(model_dir)
    assert WEIGHTS in str(info.value)


def test_truncated_weights(model_dir):
    path = model_dir / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_model(model_dir)
    assert str(path) in str(info.value) and "cut off" in str(info.value)


def test_text_file_as_weights(model_dir):
    (model_dir / WEIGHTS).write_text("this is not a weights file, just some text\n" * 5)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(model_dir)


@pytest.mark.parametrize("missing", ["config.json", WEIGHTS, "tokenizer.json"])
def test_missing_file(model_dir, missing):
    (model_dir / missing).unlink()
    with pytest.raises(CheckpointError, match=f"{missing}: missing|{missing}"):
        load_model(model_dir)


def test_unsupported_architecture(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel .* not supported"):
        load_model(model_dir)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_model(tmp_path / "nothing-here")


def test_bad_config_value_names_key(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(PocketLMError, match="num_key_value_heads 3 must divide"):
        load_model(model_dir)
