"""Qwen2-MoE models against transformers' own Qwen2MoeForCausalLM: a router whose top-k weights are not
renormalised (norm_topk_prob false) or are, a shared expert scaled by a sigmoid gate, dense MLPs on the layers
mlp_only_layers names, biases on q, k and v only, and mixed full and windowed layers."""

from __future__ import annotations

import pytest
import torch

from pocketlm.checkpoint import load_model, save_model_dir
from pocketlm.config import ModelConfig
from pocketlm.engine import SamplingParams, generate_tokens
from pocketlm.errors import ConfigError

import parity
from helpers import byte_level_tokenizer, tiny_config

# transformers' defaults for Qwen2-MoE (no renormalisation, a shared expert), and a variant with renormalised
# weights, a dense first layer and a windowed second one, run on prompts 3x its window
VARIANTS = {
    "shared": dict(norm_topk_prob=False),
    "dense-layer-window": dict(norm_topk_prob=True, mlp_only_layers=[0], use_sliding_window=True, sliding_window=12,
                               layer_types=["full_attention", "sliding_attention"]),
}


def qwen2_moe_config(**overrides):
    import transformers

    base = tiny_config(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                       shared_expert_intermediate_size=128, head_dim=16)
    return transformers.Qwen2MoeConfig(**{**base, **overrides})


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers' Qwen2MoeForCausalLM, pocketlm's import of its sharded directory)."""
    import transformers

    root = tmp_path_factory.mktemp("qwen2moe")
    torch.manual_seed(0)
    return parity.imported(transformers.Qwen2MoeForCausalLM(qwen2_moe_config(**VARIANTS[request.param])), root)


def test_logits_match_transformers(pair):
    parity.logits_match(*pair)


def test_the_layers_are_what_the_config_says(pair):
    hf, model = pair
    config = hf.config
    for i, layer in enumerate(model.model.layers):
        assert layer.moe == (i not in config.mlp_only_layers)
        assert layer.self_attn.window == (config.sliding_window if config.layer_types[i] == "sliding_attention" else None)
        assert layer.self_attn.q_proj.bias is not None and layer.self_attn.o_proj.bias is None
    assert model.config.renormalise_top_k == config.norm_topk_prob


def test_greedy_generation_matches_transformers(pair):
    parity.greedy_matches(*pair)


def test_batched_decoding_equals_uncached_passes(pair):
    parity.batched_decoding_equals_uncached_passes(pair[1])


def test_training_gradients_match_transformers(pair):
    parity.gradients_match(*pair, lambda m: (m.model.layers[1].mlp.gate.weight, m.model.layers[1].mlp.shared_expert_gate.weight),
                           lambda hf: (hf.model.layers[1].mlp.gate.weight, hf.model.layers[1].mlp.shared_expert_gate.weight))


def test_the_model_directory_loads_unchanged_in_transformers(pair, tmp_path):
    parity.directory_loads_in_transformers(pair[1], tmp_path / "m", "Qwen2MoeForCausalLM")


def test_load_balancing_loss_equals_transformers(pair):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    parity.router_matches(*pair, load_balancing_loss_func, 4, 2)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_experts_and_shared_expert(pair, tmp_path, method):
    """Experts and the shared expert quantized, the router and the shared expert's gate in float; the quantized
    mixture decodes as its own uncached passes do and stays close to the float model."""
    from pocketlm.quant import Int4Linear, Int8Linear, QuantScheme
    from pocketlm.quantize import quantize_dir

    _, model = pair
    float_dir = save_model_dir(tmp_path / "f", model.config.to_hf_dict(), model.state_dict(), byte_level_tokenizer())
    quantized, _ = load_model(quantize_dir(float_dir, tmp_path / method, QuantScheme(method, 32 if method == "int4" else None)))
    mixture = quantized.model.layers[1].mlp
    kind = Int4Linear if method == "int4" else Int8Linear
    assert all(isinstance(m.gate_proj, kind) and isinstance(m.down_proj, kind) for m in mixture.mlps())
    assert not isinstance(mixture.gate, kind) and not isinstance(mixture.shared_expert_gate, kind)
    prompt = torch.randint(0, 300, (10,)).tolist()
    out = list(generate_tokens(quantized, prompt, SamplingParams(max_new_tokens=16, ignore_eos=True)))
    with torch.no_grad():
        logits = quantized(torch.tensor([prompt + out]))[0, len(prompt) - 1:-1]
        assert logits.argmax(-1).tolist() == out
        ids = torch.tensor([prompt])
        assert torch.nn.functional.cosine_similarity(quantized(ids).flatten(), model(ids).flatten(), dim=0) > 0.99


def test_incomplete_qwen2_moe_configs_are_one_line():
    base = tiny_config(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                       shared_expert_intermediate_size=96)
    with pytest.raises(ConfigError, match="num_experts_per_tok \\(6\\) must be between 1 and num_local_experts \\(4\\)"):
        ModelConfig.from_dict({**base, "num_experts_per_tok": 6})
    with pytest.raises(ConfigError, match="needs moe_intermediate_size"):
        ModelConfig.from_dict({k: v for k, v in base.items() if k != "moe_intermediate_size"})
    with pytest.raises(ConfigError, match="decoder_sparse_step must be at least 1"):
        ModelConfig.from_dict({**base, "decoder_sparse_step": 0})
    with pytest.raises(ConfigError, match="name each layer's attention"):
        ModelConfig.from_dict({**base, "use_sliding_window": True, "sliding_window": 8})
