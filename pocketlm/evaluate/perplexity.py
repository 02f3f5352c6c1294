"""Perplexity of a model over a text, with rolling windows.

The text is tokenized once and scored in windows of `window` tokens that advance by `stride`; each
window scores only the tokens the previous window did not, so every token after the first is scored
exactly once, with up to `window - stride` tokens of context (the method of Hugging Face's perplexity
guide and lm-evaluation-harness's rolling log-likelihood). Reported: token perplexity, word
perplexity (per whitespace-separated word) and bits per UTF-8 byte, which compare across tokenizers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError
from .scoring import rolling_nll


@dataclass
class PerplexityResult:
    token_perplexity: float
    word_perplexity: float
    bits_per_byte: float
    nll: float  # summed negative log-likelihood in nats
    tokens: int  # tokens scored
    words: int
    bytes: int
    window: int
    stride: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, window: int = 1024, stride: int | None = None,
               max_tokens: int | None = None, progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Rolling-window perplexity of `text`. `max_tokens` scores only the first that many tokens (the
    word and byte counts are then taken from the text those tokens cover)."""
    stride = stride or window
    window = min(window, model.context_length)
    if not text.strip():
        raise ConfigError("the text to score is empty")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids  # the first real token is scored given BOS
    if max_tokens is not None and max_tokens + 1 < len(ids):
        ids = ids[: max_tokens + 1]
        text = tokenizer.decode(ids[1:] if tokenizer.bos_token_id is not None else ids)
    started = time.perf_counter()
    total_nll, scored = rolling_nll(model, ids, window, stride, progress)
    words = max(len(text.split()), 1)
    n_bytes = max(len(text.encode("utf-8")), 1)
    return PerplexityResult(
        token_perplexity=math.exp(total_nll / scored),
        word_perplexity=math.exp(total_nll / words),
        bits_per_byte=total_nll / n_bytes / math.log(2),
        nll=total_nll, tokens=scored, words=words, bytes=n_bytes, window=window, stride=stride,
        seconds=time.perf_counter() - started,
    )
