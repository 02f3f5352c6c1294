"""Rolling-window perplexity against a direct computation with transformers on the same weights."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import tiny_model_dir
from pocketlm.checkpoint import load_model
from pocketlm.errors import ConfigError
from pocketlm.evaluate.perplexity import perplexity

TEXT = "the theory of the thing is that the thing he said was the theory. " * 6


def reference_nll(model_dir, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Hugging Face's strided-perplexity recipe, written independently with transformers' model."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    x = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 1
    for begin in range(0, len(ids), stride):
        begin = min(begin, prev_end - 1)  # non-overlapping windows still need one token of context
        end = min(begin + window, len(ids))
        with torch.no_grad():
            logp = hf(x[:, begin:end]).logits.float().log_softmax(-1)[0]
        for pos in range(prev_end, end):  # predict token `pos` from the tokens before it in the window
            nll -= logp[pos - begin - 1, ids[pos]].item()
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return nll, count


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("ppl") / "m", max_position_embeddings=256)


@pytest.mark.parametrize("window,stride", [(256, 256), (64, 64), (64, 16), (50, 49)])
def test_matches_transformers(tiny, window, stride):
    model, tokenizer = load_model(tiny)
    result = perplexity(model, tokenizer, TEXT, window=window, stride=stride)
    ids = [tokenizer.bos_token_id] + tokenizer.encode(TEXT, add_special_tokens=False)
    nll, count = reference_nll(tiny, ids, window, stride)
    assert result.tokens == count == len(ids) - 1  # every token after BOS scored exactly once
    assert result.nll == pytest.approx(nll, rel=1e-4)
    assert result.token_perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert result.bits_per_byte == pytest.approx(nll / len(TEXT.encode()) / math.log(2), rel=1e-4)
    assert result.word_perplexity == pytest.approx(math.exp(nll / len(TEXT.split())), rel=1e-4)


def test_more_context_helps_a_model_that_can_use_it(tiny):
    """Overlapping windows give each token more context; on repeated text even a random model's
    perplexity must not get worse by much, and the token counts stay the same."""
    model, tokenizer = load_model(tiny)
    a = perplexity(model, tokenizer, TEXT, window=32, stride=32)
    b = perplexity(model, tokenizer, TEXT, window=32, stride=8)
    assert a.tokens == b.tokens


def test_bad_arguments(tiny):
    model, tokenizer = load_model(tiny)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, tokenizer, TEXT, window=32, stride=64)
    with pytest.raises(ConfigError, match="empty"):
        perplexity(model, tokenizer, "  \n", window=32)
