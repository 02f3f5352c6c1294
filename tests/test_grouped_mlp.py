"""The grouped SwiGLU op a training mixture runs its experts through (kernels/grouped_mlp.py): its values and
gradients against autograd through the per-group loop, PyTorch's own op checks, and a compiled mixture that
trains without a graph break and as the loop does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pocketlm.config import ModelConfig
from pocketlm.kernels.grouped_mlp import ALIGN, _layout, grouped_swiglu, padded_rows
from pocketlm.model import LlamaForCausalLM, SparseMoE

from helpers import tiny_config


def _operands(counts, d=8, h=12, dtype=torch.float64):
    torch.manual_seed(0)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), d, dtype=dtype, requires_grad=True)
    gate, up = (torch.randn(len(counts), h, d, dtype=dtype, requires_grad=True) for _ in range(2))
    down = torch.randn(len(counts), d, h, dtype=dtype, requires_grad=True)
    return x, counts, gate, up, down


def test_values_and_gradients_equal_autograd_through_the_loop():
    x, counts, gate, up, down = _operands([3, 0, 5, 1])  # a group with no rows gets zero gradients
    dy = torch.randn(len(x), 8, dtype=x.dtype)
    y = grouped_swiglu(x, counts, gate, up, down)[0]
    got = torch.autograd.grad(y, (x, gate, up, down), dy)
    parts, start = [], 0
    for e, n in enumerate(counts.tolist()):
        rows = x[start:start + n]
        parts.append(F.linear(F.silu(F.linear(rows, gate[e])) * F.linear(rows, up[e]), down[e]))
        start += n
    want_y = torch.cat(parts)
    want = torch.autograd.grad(want_y, (x, gate, up, down), dy)
    torch.testing.assert_close(y, want_y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert got[1][1].abs().sum() == 0


def test_every_product_has_a_row_count_rounded_to_align():
    """oneDNN builds a matmul for every new shape: the groups' products run over padded slots, so the shapes a
    training run meets repeat whatever the routing (row counts that changed every step slowed a mixture's step
    from 250 to 360 ms over 150 steps)."""
    counts = torch.tensor([3, 0, ALIGN, ALIGN + 1, 1])
    slots, dest = _layout(counts, int(counts.sum()))
    assert [e for e, _ in slots] == [0, 2, 3, 4]
    assert [s.stop - s.start for _, s in slots] == [ALIGN, ALIGN, 2 * ALIGN, ALIGN]
    assert all(s.start % ALIGN == 0 for _, s in slots)
    assert slots[-1][1].stop <= padded_rows(len(dest), counts)
    # each row lands inside its own group's slot, in order, and no two rows share a place
    groups = torch.repeat_interleave(torch.arange(len(counts)), counts)
    slot_of = dict(slots)
    for row, (group, place) in enumerate(zip(groups.tolist(), dest.tolist())):
        first = int(counts[:group].sum())
        assert place == slot_of[group].start + row - first
    assert len(set(dest.tolist())) == len(dest)


def test_pytorchs_op_checks_pass():
    """Schema, fake (meta) implementation, autograd registration and gradcheck, as torch.library checks them."""
    x, counts, gate, up, down = _operands([2, 3, 0])
    torch.library.opcheck(grouped_swiglu, (x, counts, gate, up, down))


def _mixture(seed=0):
    config = ModelConfig.from_dict(tiny_config(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48))
    return LlamaForCausalLM(config).init_weights(std=0.1, seed=seed)


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    router: list = []
    logits = model(ids, router_logits=router)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_training_mixture_takes_the_grouped_op_and_learns_as_the_loop(monkeypatch):
    model, ids = _mixture(), torch.randint(0, 300, (2, 24))
    calls = []
    original = SparseMoE._grouped
    monkeypatch.setattr(SparseMoE, "_grouped", lambda self, *a: calls.append(1) or original(self, *a))
    grouped_loss, grouped_grads = _step(model, ids)
    assert len(calls) == model.config.num_hidden_layers
    monkeypatch.setattr(SparseMoE, "_trains_grouped", lambda self: False)
    loop_loss, loop_grads = _step(model, ids)
    torch.testing.assert_close(grouped_loss, loop_loss, atol=1e-6, rtol=1e-6)
    for name, grad in grouped_grads.items():
        torch.testing.assert_close(grad, loop_grads[name], atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # inference reads only the chosen experts: the loop
        calls.clear()
        model(ids)
    assert not calls


def test_a_compiled_training_step_has_no_graph_break():
    model, ids = _mixture(1), torch.randint(0, 300, (2, 24))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda: model(ids, router_logits=[]))()
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    model.zero_grad(set_to_none=True)
    logits = compiled(ids, router_logits=[])
    F.cross_entropy(logits[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    _, eager = _step(model, ids)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_experts_keep_the_loop(frozen):
    model = _mixture()
    layer = model.model.layers[0].block_sparse_moe
    for expert in layer.experts:
        expert.w1.weight.requires_grad_(not frozen)
    assert layer._trains_grouped() == (not frozen)
