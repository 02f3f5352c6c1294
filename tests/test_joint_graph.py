"""A training slice's forward and backward as one compiled graph (pocketlm/train/joint_graph.py), against
eager autograd on the same model."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from torch._subclasses.fake_tensor import FakeTensor

from helpers import tiny_config
from pocketlm.kernels import train_attention
from pocketlm.train.instruct import IGNORE
from pocketlm.config import ModelConfig
from pocketlm.model import LlamaForCausalLM
from pocketlm.train.joint_graph import JointGradients
from pocketlm.train.objectives import SFT, lm_loss


def tiny_model(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = ModelConfig(**tiny_config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                       max_position_embeddings=32, **overrides))
    train_attention.available()  # the loop decides the attention kernel before compiling; so does this
    return LlamaForCausalLM(config).init_weights(std=0.05, seed=0).train()


def lm_batch(rows: int = 3, length: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, 64, (rows, length + 1), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def eager(model, trainable, batch, scale):
    loss = lm_loss(model, batch)[0] * scale
    return loss.detach(), torch.autograd.grad(loss, trainable)


def test_one_graph_gives_autograd_s_gradients_laid_out_flat():
    """The gradients come as one flat tensor in the order asked for (here backwards, with a tied
    weight: one parameter used twice), equal to autograd's; the parameters are read at every call."""
    model = tiny_model(tie_word_embeddings=True)
    trainable = list(model.parameters())
    order = list(reversed(range(len(trainable))))
    joint = JointGradients(lm_loss, model, trainable, nullcontext, flat_order=order)
    batch = lm_batch()
    for _ in range(2):
        ref_loss, ref_grads = eager(model, trainable, batch, 0.25)
        loss, metrics, flat = joint(batch, 0.25)
        assert metrics == {} and flat.shape == (sum(p.numel() for p in trainable),)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(flat, torch.cat([ref_grads[i].reshape(-1) for i in order]), rtol=1e-4, atol=1e-6)
        with torch.no_grad():  # an optimizer step, in place: the next call must see it
            for p in trainable:
                p.mul_(0.9).add_(0.01)
    # the tables the model builds on first use stayed real tensors: eager code still runs on them
    assert not any(isinstance(t, FakeTensor) for t in model._rope_cache)
    assert torch.isfinite(lm_loss(model, lm_batch(seed=1))[0])


def test_frozen_parameters_are_inputs_without_gradients():
    """Only the trainable parameters get gradients (a tuple in their order, as torch.autograd.grad gives);
    frozen ones are read as they are at each call."""
    model = tiny_model()
    trainable = [p for name, p in model.named_parameters() if "mlp" in name]
    joint = JointGradients(lm_loss, model, trainable, nullcontext)
    batch = lm_batch(rows=2, seed=3)
    _, _, grads = joint(batch, 1.0)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2.0)  # frozen, changed between calls
    ref_loss, ref_grads = eager(model, trainable, batch, 1.0)
    loss, _, grads = joint(batch, 1.0)
    assert isinstance(grads, tuple) and len(grads) == len(trainable)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_a_loss_that_depends_on_values_is_left_to_autograd(caplog):
    """SFT's loss selects the labelled positions with a boolean mask, which fake tensors cannot trace:
    the caller is told to take the usual path (None), once per batch shape, with the reason logged."""
    model = tiny_model()
    joint = JointGradients(SFT.loss, model, list(model.parameters()), nullcontext)
    batch = lm_batch()
    batch["labels"] = batch["labels"].clone()
    batch["labels"][:, :5] = IGNORE
    with caplog.at_level(logging.INFO, logger="pocketlm.train.joint_graph"):
        assert joint(batch, 1.0) is None
        assert joint(batch, 1.0) is None
    said = [r for r in caplog.records if "stay separate graphs" in r.getMessage()]
    assert len(said) == 1
    assert not any(isinstance(t, FakeTensor) for t in model._rope_cache)
