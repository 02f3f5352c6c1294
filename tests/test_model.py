"""pocketlm's model against transformers' own LlamaForCausalLM on the same model directory."""

from __future__ import annotations

import pytest
import torch

from pocketlm.checkpoint import load_model

from helpers import tiny_model_dir

CONFIGS = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "mha-tied-theta": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500.0),
    "head-dim-override": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir(tmp_path / name, **CONFIGS[name])
    ours, _ = load_model(model_dir)
    theirs = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_kv_cache_matches_full_forward(tmp_path):
    model, _ = load_model(tiny_model_dir(tmp_path / "m"))
    ids = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(2, 64)
        parts = [model(ids[:, :17]), model(ids[:, 17:25], start=17)]
        parts += [model(ids[:, i:i + 1], start=i) for i in range(25, 30)]
        model.clear_cache()
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5


def test_context_limit_is_enforced(tmp_path):
    model, _ = load_model(tiny_model_dir(tmp_path / "m", max_position_embeddings=16))
    with pytest.raises(ValueError, match="exceeds the context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_transformers_seed_snippet_runs_unchanged(tmp_path):
    """The README's transformers snippet, verbatim, on a pocketlm directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = str(tiny_model_dir(tmp_path / "m", tie_word_embeddings=True))
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    inputs = tok("the theme", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 8
    assert isinstance(tok.decode(out[0]), str)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) \
        == "<s>user\nhi</s>\n<s>assistant\n"


def test_init_weights_is_seeded(tmp_path):
    from pocketlm.config import ModelConfig
    from pocketlm.model import LlamaForCausalLM

    from helpers import tiny_config

    config = ModelConfig.from_dict(tiny_config())
    a = LlamaForCausalLM(config).init_weights(seed=3)
    b = LlamaForCausalLM(config).init_weights(seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(a.model.norm.weight, torch.ones(64))
    assert abs(a.model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.002


def test_training_attention_path_matches_inference(tmp_path):
    """With gradients on, CPU training takes the explicit-attention path; it must give the same logits."""
    model, _ = load_model(tiny_model_dir(tmp_path / "m", num_key_value_heads=2))
    ids = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        reference = model(ids)
    trained = model(ids)
    assert trained.requires_grad
    assert (trained - reference).abs().max().item() < 1e-5
    trained.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear_for_every_row_count(bias):
    # Linear computes 2-6 rows as W @ x^T (faster on a CPU); every row count must give F.linear's result.
    from pocketlm.model import FEW_ROWS, Linear

    torch.manual_seed(0)
    layer = Linear(96, 160, bias=bias)
    torch.nn.init.normal_(layer.weight)
    if bias:
        torch.nn.init.normal_(layer.bias)
    for shape in [(r, 96) for r in range(1, 9)] + [(2, 3, 96), (1, 5, 96)]:
        x = torch.randn(*shape, requires_grad=True)
        y = layer(x)
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert y.shape == expected.shape and y.is_contiguous()
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
        (grad,) = torch.autograd.grad(y.square().sum(), x)
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-3)
    assert 2 in FEW_ROWS and 6 in FEW_ROWS
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)  # the compiled decode step takes the same path
    with torch.no_grad():
        x = torch.randn(1, 3, 96)
        torch.testing.assert_close(compiled(x), torch.nn.functional.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-4)
