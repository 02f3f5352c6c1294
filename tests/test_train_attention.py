"""The CPU training attention kernel (pocketlm/csrc/train_attention.cpp) against PyTorch's attention and
transformers' model: outputs and gradients, GQA, odd lengths, strided views, bf16, torch.compile."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from pocketlm.kernels import train_attention
from pocketlm.checkpoint import load_model
from pocketlm.model import apply_rope, rope_tables

from helpers import tiny_model_dir

pytestmark = pytest.mark.skipif(not train_attention.available(), reason="needs an x86 CPU with AVX2 and a C++ compiler")

# (batch, seq, heads, kv heads, head_dim): the shakespeare-char shape, GQA, odd lengths, a head_dim whose
# halves are not whole vectors (RoPE's scalar path), SmolLM2's head_dim
SHAPES = [(2, 64, 4, 4, 32), (3, 17, 6, 2, 8), (2, 70, 9, 3, 64), (1, 1, 2, 1, 16), (2, 33, 4, 2, 12)]


def reference(q, k, v, cos, sin):
    """PyTorch's attention, in float64: RoPE, heads repeated for GQA, causal scaled_dot_product_attention."""
    q, k, v = (z.double().transpose(1, 2) for z in (q, k, v))
    c, s = cos.double()[None, None], sin.double()[None, None]
    q, k = apply_rope(q, c, s), apply_rope(k, c, s)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def views_of_one_projection(b, t, h, g, d, dtype, scale=1.0):
    """q, k, v as views of one (batch, seq, (h + 2g) d) tensor, as a fused projection would give them."""
    torch.manual_seed(0)
    qkv = (torch.randn(b, t, (h + 2 * g) * d) * scale).to(dtype).requires_grad_()
    q, k, v = qkv.split([h * d, g * d, g * d], -1)
    return qkv, q.reshape(b, t, h, d), k.reshape(b, t, g, d), v.reshape(b, t, g, d)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_output_and_gradients_match_pytorch(shape):
    b, t, h, g, d = shape
    cos, sin = rope_tables(d, t, 10000.0)
    qkv, q, k, v = views_of_one_projection(b, t, h, g, d, torch.float32)
    out = train_attention.causal_attention(q, k, v, cos, sin)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()

    leaf = qkv.detach().double().requires_grad_()
    rq, rk, rv = leaf.split([h * d, g * d, g * d], -1)
    expected = reference(rq.reshape(b, t, h, d), rk.reshape(b, t, g, d), rv.reshape(b, t, g, d), cos, sin)
    (expected * weights.double()).sum().backward()

    assert out.shape == (b, t, h, d) and out.dtype == torch.float32
    assert (out.double() - expected).abs().max().item() < 1e-5
    assert (qkv.grad.double() - leaf.grad).abs().max().item() < 2e-5 * max(1.0, leaf.grad.abs().max().item())


def test_kept_workspaces_carry_nothing_between_calls():
    """Each thread keeps its kernel workspace for a shape between calls: after a call on other values of
    the same shape (padded positions and head_dim: seq 33, head_dim 12), a call still matches PyTorch."""
    b, t, h, g, d = 2, 33, 4, 2, 12
    cos, sin = rope_tables(d, t, 10000.0)
    _, q, k, v = views_of_one_projection(b, t, h, g, d, torch.float32, scale=30.0)
    (train_attention.causal_attention(q, k, v, cos, sin) * torch.randn(b, t, h, d)).sum().backward()
    test_output_and_gradients_match_pytorch((b, t, h, g, d))


def test_bf16_inputs_give_bf16_within_rounding():
    b, t, h, g, d = 4, 64, 4, 4, 32
    cos, sin = rope_tables(d, t, 10000.0)
    qkv, q, k, v = views_of_one_projection(b, t, h, g, d, torch.bfloat16)
    out = train_attention.causal_attention(q, k, v, cos, sin)
    out.float().sum().backward()
    expected = reference(q.detach(), k.detach(), v.detach(), cos, sin)  # the same bf16 values, in float64
    assert out.dtype == qkv.grad.dtype == torch.bfloat16
    assert (out.double() - expected).abs().max().item() < 2e-2  # bf16 keeps 8 bits: ~0.4% of values near 2
    assert torch.isfinite(qkv.grad.float()).all()


def test_large_scores_stay_finite():
    """Scores of hundreds (a saturated softmax) must not overflow: the kernel subtracts each row's maximum."""
    b, t, h, g, d = 1, 40, 2, 2, 16
    cos, sin = rope_tables(d, t, 10000.0)
    qkv, q, k, v = views_of_one_projection(b, t, h, g, d, torch.float32, scale=30.0)
    out = train_attention.causal_attention(q, k, v, cos, sin)
    out.sum().backward()
    expected = reference(q.detach(), k.detach(), v.detach(), cos, sin)
    assert torch.isfinite(qkv.grad).all()
    assert (out.double() - expected).abs().max().item() < 1e-3


def test_bad_inputs_give_clear_errors():
    cos, sin = rope_tables(8, 5, 10000.0)
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(RuntimeError, match="kv heads"):
        train_attention.causal_attention(q, torch.randn(1, 5, 3, 8), torch.randn(1, 5, 3, 8), cos, sin)
    with pytest.raises(RuntimeError, match="head_dim must be the innermost"):
        train_attention.causal_attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), q, q, cos, sin)
    with pytest.raises(RuntimeError, match="cos and sin"):
        train_attention.causal_attention(q, q, q, cos[:3], sin[:3])


def _fallback(model) -> None:
    """Make a model's attention take PyTorch's path, to compare the kernel against it."""
    for layer in model.model.layers:
        layer.self_attn._kernel_trains = types.MethodType(lambda self, *args: False, layer.self_attn)


def _loss_and_grads(model, ids, compiled=False):
    model.zero_grad(set_to_none=True)
    run = (lambda: F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()))
    loss = torch.compile(run)() if compiled else run()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_training_step_matches_transformers_and_pytorch_attention(tmp_path, monkeypatch):
    """A training forward/backward of a GQA model: the loss equals transformers' on the same weights, and
    every gradient equals the one through PyTorch's attention ops (the kernel is called: counted)."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir(tmp_path / "m", num_attention_heads=4, num_key_value_heads=2)
    ours, _ = load_model(model_dir)
    plain, _ = load_model(model_dir)
    _fallback(plain)
    theirs = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.randint(0, 300, (3, 41))

    calls = []
    kernel = train_attention.causal_attention
    monkeypatch.setattr(train_attention, "causal_attention", lambda *a: calls.append(1) or kernel(*a))
    loss, grads = _loss_and_grads(ours, ids)
    assert len(calls) == ours.config.num_hidden_layers
    plain_loss, plain_grads = _loss_and_grads(plain, ids)
    hf_loss = theirs(ids[:, :-1], labels=None).logits
    hf_loss = F.cross_entropy(hf_loss.flatten(0, 1), ids[:, 1:].flatten())

    assert abs(loss.item() - hf_loss.item()) < 1e-5
    assert abs(loss.item() - plain_loss.item()) < 1e-6
    for name, grad in grads.items():
        assert (grad - plain_grads[name]).abs().max().item() <= 1e-5 * max(1.0, plain_grads[name].abs().max().item()), name


def test_compiled_training_step_has_one_graph_and_matches_eager(tmp_path):
    from torch._dynamo.utils import counters

    model, _ = load_model(tiny_model_dir(tmp_path / "m"))
    ids = torch.randint(0, 300, (2, 33))
    eager_loss, eager_grads = _loss_and_grads(model, ids)
    torch._dynamo.reset()
    counters.clear()
    loss, grads = _loss_and_grads(model, ids, compiled=True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert abs(loss.item() - eager_loss.item()) < 1e-5
    for name, grad in grads.items():
        assert torch.allclose(grad, eager_grads[name], atol=1e-5, rtol=1e-4), name


def test_autograd_is_registered_in_cpp():
    """A Python autograd kernel would be called back, under the GIL, from every compiled forward (batch
    threads then wait on each other): the Autograd kernel must be the C++ one."""
    assert train_attention.available()
    dump = torch._C._dispatch_dump("pocketlm::causal_attention")
    autograd = next(line for line in dump.splitlines() if line.startswith("Autograd"))
    assert "train_attention.cpp" in autograd, autograd


def test_switched_off_by_environment():
    code = "from pocketlm.kernels import train_attention; print(train_attention.available())"
    env = {**os.environ, "POCKETLM_CPU_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
