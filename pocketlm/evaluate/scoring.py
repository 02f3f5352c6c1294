"""Log-likelihoods of continuations given contexts, batched: what multiple-choice scoring rests on.

Tokenization follows lm-evaluation-harness exactly, so scores are comparable with its `hf` model:
trailing whitespace of the context moves to the continuation, the pair is encoded as one string,
and the continuation is whatever that encoding has beyond the context's own encoding. Requests
whose model inputs are identical (the usual case for one-token answers such as MMLU's " A".." D")
share one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError

Progress = Callable[[int, int], None]


def prefix_token_id(tokenizer) -> int:
    """The token an empty context is replaced by (BOS, else EOS), as lm-evaluation-harness does."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")
    return token


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for scoring `continuation` after `context`."""
    if not continuation:
        raise ConfigError("an empty continuation cannot be scored; every choice needs some text")
    if not context:
        return [prefix_token_id(tokenizer)], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def _batches(keys: list[tuple[int, ...]], max_tokens: int, max_rows: int) -> list[list[tuple[int, ...]]]:
    """Split keys (sorted longest first) into batches whose padded size stays within max_tokens."""
    batches, current = [], []
    for key in keys:
        if current and ((len(current) + 1) * len(current[0]) > max_tokens or len(current) == max_rows):
            batches.append(current)
            current = []
        current.append(key)
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def loglikelihoods(model, pairs: Sequence[tuple[list[int], list[int]]], max_batch_tokens: int = 4096,
                   max_batch_rows: int = 64, progress: Progress | None = None) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation and
    whether greedy decoding would produce it. Inputs longer than the context window keep their end."""
    window = model.context_length
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, (context_ids, continuation_ids) in enumerate(pairs):
        if not continuation_ids:
            raise ConfigError(f"request {i}: the continuation encodes to no tokens")
        whole = (list(context_ids) + list(continuation_ids))[-(window + 1):]
        rows.setdefault(tuple(whole[:-1]), []).append(i)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    done = 0
    device = model.device
    for batch in _batches(sorted(rows, key=len, reverse=True), max_batch_tokens, max_batch_rows):
        width = len(batch[0])
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for r, key in enumerate(batch):
            ids[r, :len(key)] = torch.tensor(key)  # right padding: causal attention never sees it
        hidden = model.hidden_states(ids.to(device))
        for r, key in enumerate(batch):
            members = rows[key]
            span = max(len(pairs[i][1]) for i in members)
            span = min(span, len(key))
            logprobs = F.log_softmax(model.lm_head(hidden[r, len(key) - span:len(key)]).float(), dim=-1)
            greedy = logprobs.argmax(dim=-1)
            for i in members:
                target = torch.tensor(list(pairs[i][1])[-span:], device=device)
                part = logprobs[span - len(target):]
                score = part.gather(-1, target[:, None]).sum().item()
                results[i] = (score, bool((greedy[span - len(target):] == target).all()))
            done += len(members)
        if progress:
            progress(done, len(pairs))
    return results


def rolling_nll(model, ids: Sequence[int], window: int, stride: int | None = None,
                progress: Progress | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ids[1:] given what precedes each token, scored in
    windows of `window` tokens advancing by `stride`; every token after the first is scored once,
    with up to `window - stride` tokens of extra context. Returns (nll, tokens scored)."""
    stride = stride or window
    window = min(window, model.context_length)
    if not 0 < stride <= window:
        raise ConfigError(f"stride must be in 1..window ({window}); got {stride}")
    if len(ids) < 2:
        raise ConfigError("the text is a single token; nothing to score")
    all_ids = torch.tensor(list(ids), device=model.device)
    nll, scored, n = 0.0, 0, len(ids)
    prev_end, begin = 1, 0  # windows are [begin, end); targets run from prev_end to end - 1
    with torch.inference_mode():
        while prev_end < n:
            end = min(begin + window, n)
            first = prev_end - begin
            hidden = model.hidden_states(all_ids[begin:end][None])[0, first - 1:end - begin - 1]
            logprobs = F.log_softmax(model.lm_head(hidden).float(), dim=-1)
            nll -= logprobs.gather(-1, all_ids[prev_end:end, None]).sum().item()
            scored += end - prev_end
            prev_end = end
            begin = min(begin + stride, end - 1)  # keep one token of context even when stride == window
            if progress:
                progress(scored, n - 1)
    return nll, scored

