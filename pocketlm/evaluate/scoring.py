"""Log-likelihoods of continuations given contexts, batched: what multiple-choice scoring rests on.

Tokenization follows lm-evaluation-harness exactly, so scores are comparable with its `hf` model:
trailing whitespace of the context moves to the continuation, the pair is encoded as one string,
and the continuation is whatever that encoding has beyond the context's own encoding. Requests
whose model inputs are identical (the usual case for one-token answers such as MMLU's " A".." D")
share one forward pass. Requests that share a context (a question and its choices) share its computation:
one row holds the context once and every choice after it, each choice attending to the context and itself
only (on ARC-Challenge that is 2.7x fewer tokens than a row per choice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError

Progress = Callable[[int, int], None]

# tokens per scoring batch, padding included: on 2 Zen 5 cores, batches of 512-768 tokens scored PIQA and
# ARC-Challenge 10-25% faster than 4096 in fp32 and bf16 (the activations between the matmuls stay in cache)
BATCH_TOKENS = 512


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
def loglikelihoods(model, pairs: Sequence[tuple[list[int], list[int]]], max_batch_tokens: int = BATCH_TOKENS,
                   max_batch_rows: int = 64, progress: Progress | None = None) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation and
    whether greedy decoding would produce it. Inputs longer than the context window keep their end."""
    window = model.context_length
    for i, (_, continuation_ids) in enumerate(pairs):
        if not continuation_ids:
            raise ConfigError(f"request {i}: the continuation encodes to no tokens")
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    fits = [i for i, (context_ids, continuation_ids) in enumerate(pairs)
            if context_ids and len(context_ids) + len(continuation_ids) - 1 <= window]
    done = _score_packed(model, pairs, fits, results, max_batch_tokens, max_batch_rows, progress)
    packed = set(fits)
    rows: dict[tuple[int, ...], list[int]] = {}  # the others (cut to the window), by their whole input
    for i, (context_ids, continuation_ids) in enumerate(pairs):
        if i not in packed:
            whole = (list(context_ids) + list(continuation_ids))[-(window + 1):]
            rows.setdefault(tuple(whole[:-1]), []).append(i)
    device = model.device
    for batch in _batches(sorted(rows, key=len, reverse=True), max_batch_tokens, max_batch_rows):
        width = len(batch[0])
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for r, key in enumerate(batch):
            ids[r, :len(key)] = torch.tensor(key)  # right padding: causal attention never sees it
        hidden = model.hidden_states(ids.to(device))
        members = [(i, r) for r, key in enumerate(batch) for i in rows[key]]
        spans = [min(len(pairs[i][1]), len(batch[r])) for i, r in members]
        scored = torch.cat([hidden[r, len(batch[r]) - n:len(batch[r])] for (_, r), n in zip(members, spans)])
        targets = torch.cat([torch.tensor(list(pairs[i][1])[-n:]) for (i, _), n in zip(members, spans)])
        for (i, _), result in zip(members, _score_positions(model, scored, targets.to(device), spans)):
            results[i] = result
        done += len(members)
        if progress:
            progress(done, len(pairs))
    return results


HEAD_ROWS = 1024  # positions per call of the output head: bounds the (positions, vocabulary) log-probs held at once


def _score_positions(model, hidden: torch.Tensor, targets: torch.Tensor, spans: list[int]) -> list[tuple[float, bool]]:
    """Each span of consecutive positions (hidden (positions, width), the token each should predict in targets):
    its summed log-probability and whether every target is the position's most likely token. The head runs once
    per HEAD_ROWS positions across spans (a call per request would read the whole head matrix each time)."""
    logprob, best = [], []
    for at in range(0, hidden.shape[0], HEAD_ROWS):
        logprobs = F.log_softmax(model.lm_head(hidden[at:at + HEAD_ROWS]).float(), dim=-1)
        target = targets[at:at + HEAD_ROWS, None]
        logprob.append(logprobs.gather(-1, target)[:, 0])
        best.append(logprobs.argmax(dim=-1) == target[:, 0])
    sums = [part.sum().item() for part in torch.cat(logprob).split(spans)]
    greedy = [bool(part.all()) for part in torch.cat(best).split(spans)]
    return list(zip(sums, greedy))


def _score_packed(model, pairs, members: list[int], results: list, max_tokens: int, max_rows: int,
                  progress: Progress | None) -> int:
    """Score `members` into `results`; returns how many were scored. The requests of one context share a row:
    the context once, then each continuation but its last token, every continuation seeing the context and
    itself only, at the positions it would have alone (model.packed_hidden_states). So a question's context
    runs once for all its choices, in one pass with them, and rows of similar length batch with little
    padding."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in members:
        groups.setdefault(tuple(pairs[i][0]), []).append(i)
    packs = []  # (context, member indices): a row each
    for context, indices in groups.items():
        pack: list[int] = []
        filled = len(context)  # the row's tokens so far
        for i in indices:  # a context with very many continuations takes more than one row
            if pack and filled + len(pairs[i][1]) - 1 > max_tokens:
                packs.append((context, pack))
                pack, filled = [], len(context)
            pack.append(i)
            filled += len(pairs[i][1]) - 1
        packs.append((context, pack))

    def width(pack) -> int:
        return len(pack[0]) + sum(len(pairs[i][1]) - 1 for i in pack[1])

    packs.sort(key=width, reverse=True)
    device, done, start = model.device, 0, 0
    while start < len(packs):
        t = width(packs[start])
        stop = start + 1  # longest first: the first row's width bounds the batch's
        while stop < len(packs) and stop - start < max_rows and (stop - start + 1) * t <= max_tokens:
            stop += 1
        batch = packs[start:stop]
        start = stop
        ids = torch.zeros((len(batch), t), dtype=torch.long)
        positions = torch.zeros((len(batch), t), dtype=torch.long)
        segment = torch.full((len(batch), t), -1)  # 0: the context, k: the k-th continuation, -1: padding
        scored, targets, spans = [], [], []
        for r, (context, pack) in enumerate(batch):
            n = len(context)
            ids[r, :n], positions[r, :n], segment[r, :n] = torch.tensor(context), torch.arange(n), 0
            at = n
            for k, i in enumerate(pack, start=1):
                tail = list(pairs[i][1])
                m = len(tail) - 1
                ids[r, at:at + m] = torch.tensor(tail[:-1], dtype=torch.long)
                positions[r, at:at + m] = torch.arange(n, n + m)
                segment[r, at:at + m] = k
                scored.append(torch.tensor([r * t + n - 1] + list(range(r * t + at, r * t + at + m))))
                targets += tail
                spans.append(m + 1)
                at += m
        index = torch.arange(t)
        causal = index[None, :] <= index[:, None]
        # a token sees the context and its own continuation before it; padding sees only padding (never NaN)
        sees = causal & ((segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None]))
        hidden = model.packed_hidden_states(ids.to(device), positions.to(device), sees.to(device))
        flat = hidden.reshape(-1, hidden.shape[-1])[torch.cat(scored).to(device)]
        scores = _score_positions(model, flat, torch.tensor(targets, device=device), spans)
        for i, result in zip((i for _, pack in batch for i in pack), scores):
            results[i] = result
        done += len(scores)
        if progress:
            progress(done, len(pairs))
    return done


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

