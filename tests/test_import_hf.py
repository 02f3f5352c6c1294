"""Importing Hugging Face directories, and the model cache behind `pocketlm pull`."""

from __future__ import annotations

import pytest
import torch

from pocketlm.checkpoint import load_model, read_provenance
from pocketlm.convert import import_model
from pocketlm.errors import CheckpointError, ModelNotFoundError

from helpers import byte_level_tokenizer, tiny_config


def _hf_dir(path, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hf = LlamaForCausalLM(LlamaConfig(**tiny_config(**overrides))).eval()
    hf.save_pretrained(path, max_shard_size="100KB")  # several shards and an index, as big models have
    tok = byte_level_tokenizer()
    PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<s>", eos_token="</s>",
                            chat_template=tok.chat_template).save_pretrained(path)
    return hf


@pytest.mark.parametrize("tied", [False, True])
def test_import_sharded_hf_directory(tmp_path, tied):
    hf = _hf_dir(tmp_path / "hf", tie_word_embeddings=tied)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    out = import_model(tmp_path / "hf", tmp_path / "ours")
    model, tokenizer = load_model(out)
    ids = torch.randint(0, 300, (1, 25))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    assert tokenizer.chat_template.startswith("{% for m in messages %}")
    assert read_provenance(out)["source"]["format"] == "hf"


def test_pickled_only_directory_is_refused(tmp_path):
    _hf_dir(tmp_path / "hf")
    for f in (tmp_path / "hf").glob("model*.safetensors*"):
        f.unlink()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickled weights"):
        import_model(tmp_path / "hf", tmp_path / "ours")


def test_pull_reuses_the_cache(tmp_path, monkeypatch, smollm2_gguf):
    from pocketlm import hub

    monkeypatch.setenv("POCKETLM_MODELS", str(tmp_path / "models"))
    calls = []
    real_import = __import__("pocketlm.convert.gguf", fromlist=["import_gguf"]).import_gguf
    monkeypatch.setattr(hub, "import_gguf", lambda *a, **k: calls.append(a) or real_import(*a, **k))
    first = hub.pull("smollm2-135m-instruct")
    second = hub.pull("SmolLM2-135M-Instruct")
    assert first == second == tmp_path / "models" / "smollm2-135m-instruct"
    assert len(calls) == 1
    assert hub.resolve_model("smollm2-135m-instruct") == first
    with pytest.raises(ModelNotFoundError, match="no such model directory"):
        hub.resolve_model(str(tmp_path / "missing"))
