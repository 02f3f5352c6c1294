"""Checks a pocketlm model is held to against transformers' own class for the same weights: logits, greedy
generation, batched decoding against uncached passes, training gradients, the router's logits and
load-balancing loss, and the model directory loading back in transformers."""

from __future__ import annotations

import pytest
import torch

from pocketlm.checkpoint import save_model_dir
from pocketlm.engine import SamplingParams, generate_batch, generate_tokens

from helpers import byte_level_tokenizer


def imported(hf, root):
    """(hf, pocketlm's import of hf saved as a sharded Hugging Face directory under root). Norms are moved away
    from 1 and biases from 0 first, so a mix-up of either would show."""
    from transformers import PreTrainedTokenizerFast

    from pocketlm.checkpoint import load_model
    from pocketlm.convert import import_model

    hf.eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(root / "hf", max_shard_size="100KB")  # sharded, as big models come
    tok = byte_level_tokenizer()
    PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<s>", eos_token="</s>",
                            chat_template=tok.chat_template).save_pretrained(root / "hf")
    model, _ = load_model(import_model(root / "hf", root / "ours"))
    return hf, model


def logits_match(hf, model, length: int = 40) -> None:
    ids = torch.randint(0, 300, (2, length))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def greedy_matches(hf, model, new_tokens: int = 32) -> None:
    prompt = torch.randint(0, 300, (12,)).tolist()
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False)[0, 12:]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    assert list(generate_tokens(model, prompt, params)) == expected.tolist()


def batched_decoding_equals_uncached_passes(model) -> None:
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 9)]
    for prompt, out in zip(prompts, generate_batch(model, prompts, SamplingParams(max_new_tokens=20, ignore_eos=True))):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(out)]))[0, len(prompt) - 1:-1]
        assert logits.argmax(-1).tolist() == list(out)


def gradients_match(hf, model, ours_of, theirs_of) -> None:
    """The loss and, for each (ours_of(model), theirs_of(hf)) parameter pair given as functions, its gradient."""
    ids = torch.randint(0, 300, (2, 24))
    ours = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1))
    ours.backward()
    theirs = hf(ids, labels=ids).loss
    theirs.backward()
    try:
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
        for mine, reference in zip(ours_of(model), theirs_of(hf)):
            assert torch.allclose(mine.grad, reference.grad, atol=1e-6)
    finally:
        model.zero_grad(set_to_none=True)
        hf.zero_grad(set_to_none=True)


def router_matches(hf, model, loss_func, experts: int, top_k: int) -> None:
    """The routers' logits, layer by layer, and the training objective's load-balancing loss (router_loss)
    against transformers' `loss_func`."""
    from pocketlm.train.objectives import LANGUAGE_MODELLING, with_router_loss

    ids = torch.randint(0, 300, (2, 24))
    collected: list = []
    with torch.no_grad():
        model(ids, router_logits=collected)
        theirs = tuple(r for r in hf(ids, output_router_logits=True).router_logits if r is not None)
    assert len(collected) == len(theirs) == sum(layer.moe for layer in model.model.layers)
    for ours, reference in zip(collected, theirs):
        assert torch.allclose(ours, reference, atol=1e-5)
    expected = loss_func(theirs, experts, top_k)
    with torch.no_grad():
        _, metrics = with_router_loss(LANGUAGE_MODELLING, 1.0, top_k).loss(model, {"input_ids": ids, "labels": ids})
    assert metrics["router_loss"].item() == pytest.approx(expected.item(), abs=1e-6)


def directory_loads_in_transformers(model, path, architecture: str) -> None:
    from transformers import AutoModelForCausalLM

    out = save_model_dir(path, model.config.to_hf_dict(), model.state_dict(), byte_level_tokenizer())
    theirs = AutoModelForCausalLM.from_pretrained(out)
    assert type(theirs).__name__ == architecture
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max().item() <= 1e-4
