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
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError


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
    window = min(window, model.config.max_position_embeddings)
    if not 0 < stride <= window:
        raise ConfigError(f"stride must be in 1..window ({window}); got {stride}")
    if not text.strip():
        raise ConfigError("the text to score is empty")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids  # the first real token is scored given BOS
    if max_tokens is not None and max_tokens + 1 < len(ids):
        ids = ids[: max_tokens + 1]
        text = tokenizer.decode(ids[1:] if tokenizer.bos_token_id is not None else ids)
    if len(ids) < 2:
        raise ConfigError("the text is a single token; nothing to score")
    all_ids = torch.tensor(ids, device=model.device)
    total_nll, scored, started = 0.0, 0, time.perf_counter()
    # windows: [begin, end); score targets from max(prev_end, begin + 1) to end - 1
    prev_end, begin = 1, 0
    n = len(ids)
    while prev_end < n:
        end = min(begin + window, n)
        chunk = all_ids[begin:end][None]
        logits = model(chunk).float()[0]
        first = prev_end - begin  # first target position within the chunk
        targets = chunk[0, first:]
        logprobs = F.log_softmax(logits[first - 1:end - begin - 1], dim=-1)
        total_nll -= logprobs.gather(-1, targets[:, None]).sum().item()
        scored += targets.numel()
        prev_end = end
        begin = min(begin + stride, end - 1)  # keep one token of context even when stride == window
        if progress:
            progress(scored, n - 1)
    words = max(len(text.split()), 1)
    n_bytes = max(len(text.encode("utf-8")), 1)
    return PerplexityResult(
        token_perplexity=math.exp(total_nll / scored),
        word_perplexity=math.exp(total_nll / words),
        bits_per_byte=total_nll / n_bytes / math.log(2),
        nll=total_nll, tokens=scored, words=words, bytes=n_bytes, window=window, stride=stride,
        seconds=time.perf_counter() - started,
    )
