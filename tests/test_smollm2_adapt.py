"""PEFT interop on the real model: a LoRA adapter written by pocketlm for SmolLM2-135M-Instruct gives,
in transformers + peft, the logits pocketlm gives with the adapter and with its merged export."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_lora_adapter_matches_peft(smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pocketlm.adapt.adapters import attach, lora_config, merged_weights, save_adapter
    from pocketlm.checkpoint import load_model, save_model_dir

    model, tokenizer = load_model(smollm2_dir)
    config = lora_config(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    config.init_lora_weights = False  # random A and B, so the adapter changes the model from the start
    torch.manual_seed(0)
    attach(model, config)
    model.eval()
    adapter = save_adapter(model, tmp_path / "adapter", smollm2_dir)
    merged_dir = save_model_dir(tmp_path / "merged", model.config, merged_weights(model), tokenizer)

    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. The capital of Italy is")])
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        plain = hf(input_ids=ids).logits
        reference = PeftModel.from_pretrained(hf, adapter).eval()(input_ids=ids).logits
        ours = model(ids)
        merged = load_model(merged_dir)[0](ids)
    assert (reference - plain).abs().max() > 0.1
    assert (ours - reference).abs().max() <= 1e-4
    assert (merged - reference).abs().max() <= 1e-4
