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


@torch.inference_mode()
def decoded_perplexity(model, windows: torch.Tensor) -> float:
    """Token perplexity of `windows` (batch, length) scored one token at a time through `decode_step`, the
    path generation and the server take (the prompt path above multiplies many rows at once and never runs
    the decoding kernels). The windows decode side by side as one batch; each step is fed the text's token
    and scored on the next one."""
    batch, length = windows.shape
    model.setup_cache(batch, length)
    total = 0.0
    try:
        for t in range(length - 1):
            pos = torch.full((batch,), t)
            logits = model.decode_step(windows[:, t:t + 1], pos, model.decode_mask(pos))
            total -= torch.log_softmax(logits.double(), -1).gather(1, windows[:, t + 1:t + 2]).sum().item()
    finally:
        model.clear_cache()
    return math.exp(total / (batch * (length - 1)))
