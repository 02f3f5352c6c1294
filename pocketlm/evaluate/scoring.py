"""Log-likelihoods of continuations given contexts, batched: what multiple-choice scoring rests on.

Tokenization follows lm-evaluation-harness exactly, so scores are comparable with its `hf` model:
trailing whitespace of the context moves to the continuation, the pair is encoded as one string,
and the continuation is whatever that encoding has beyond the context's own encoding. Requests
whose model inputs are identical (the usual case for one-token answers such as MMLU's " A".." D")
share one forward pass. Requests that share a context (a question and its choices) share its computation:
the context runs once into a KV cache, copied to one row per choice, and only the continuations run after
it (on ARC-Challenge that is 2.7x fewer tokens).
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
    for i, (_, continuation_ids) in enumerate(pairs):
        if not continuation_ids:
            raise ConfigError(f"request {i}: the continuation encodes to no tokens")
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    shared = _shared_contexts(pairs, window)
    done = _score_shared(model, pairs, shared, results, max_batch_tokens, max_batch_rows, progress, len(pairs))
    in_shared = {i for members in shared.values() for i in members}
    rows: dict[tuple[int, ...], list[int]] = {}  # the other requests, by their whole input
    for i, (context_ids, continuation_ids) in enumerate(pairs):
        if i not in in_shared:
            whole = (list(context_ids) + list(continuation_ids))[-(window + 1):]
            rows.setdefault(tuple(whole[:-1]), []).append(i)
    device = model.device
    for batch in _batches(sorted(rows, key=len, reverse=True), max_batch_tokens, max_batch_rows):
        width = len(batch[0])
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for r, key in enumerate(batch):
            ids[r, :len(key)] = torch.tensor(key)  # right padding: causal attention never sees it
        hidden = model.hidden_states(ids.to(device))
        spans = [min(max(len(pairs[i][1]) for i in rows[key]), len(key)) for key in batch]
        # the head once for the batch's scored positions (a call per row reads the whole head matrix each time)
        scored = torch.cat([hidden[r, len(key) - span:len(key)] for r, (key, span) in enumerate(zip(batch, spans))])
        every = F.log_softmax(model.lm_head(scored).float(), dim=-1).split(spans)
        for key, span, logprobs in zip(batch, spans, every):
            members = rows[key]
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


SHARING_PAYS = 1.5  # share a context when that feeds at most 1/1.5 of the tokens (PIQA's long answers: 1.2, slower)


def _shared_contexts(pairs, window: int) -> dict[tuple[int, ...], list[int]]:
    """Requests grouped by their context, for the groups whose inputs fit the window whole and where running
    the context once saves enough: a second pass after a cached context costs more per token than one
    pass (on PIQA, 1.2x fewer tokens took 1.8x the time; on ARC-Challenge 2.7x fewer took 0.6x)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context_ids, continuation_ids) in enumerate(pairs):
        if context_ids and len(context_ids) + len(continuation_ids) - 1 <= window:
            groups.setdefault(tuple(context_ids), []).append(i)

    def pays(context: tuple[int, ...], members: list[int]) -> bool:
        alone = sum(len(context) + len(pairs[i][1]) for i in members)
        return alone >= SHARING_PAYS * (len(context) + sum(len(pairs[i][1]) for i in members))

    return {context: members for context, members in groups.items() if len(members) > 1 and pays(context, members)}


def _score_shared(model, pairs, groups: dict[tuple[int, ...], list[int]], results: list, max_tokens: int,
                  max_rows: int, progress: Progress | None, total: int) -> int:
    """Score the requests of `groups` into `results`; returns how many were scored. Contexts of one length run
    together (one start position for the rows after them, no padding): the context pass fills cache rows
    0..G-1 and gives the log-probs of each continuation's first token; each row of the continuation pass
    starts from a copy of its context's cache row."""
    done = 0
    by_length: dict[int, list[tuple[int, ...]]] = {}
    for context in groups:
        by_length.setdefault(len(context), []).append(context)
    device = model.device
    try:
        for length, contexts in sorted(by_length.items(), reverse=True):
            chunk: list[tuple[int, ...]] = []
            for context in contexts + [None]:  # None flushes the last chunk
                if context is not None:
                    rows = sum(len(groups[c]) for c in chunk) + len(groups[context])
                    width = max(len(pairs[i][1]) for c in chunk + [context] for i in groups[c]) - 1
                    if not chunk or (rows <= max_rows and (len(chunk) + 1) * length + rows * width <= max_tokens):
                        chunk.append(context)
                        continue
                if chunk:
                    _score_chunk(model, pairs, groups, chunk, results, device)
                    done += sum(len(groups[c]) for c in chunk)
                    if progress:
                        progress(done, total)
                chunk = [context] if context is not None else []
    finally:
        model.clear_cache()
    return done


def _score_chunk(model, pairs, groups, contexts: list[tuple[int, ...]], results: list, device) -> None:
    members = [i for context in contexts for i in groups[context]]
    owner = torch.tensor([g for g, context in enumerate(contexts) for _ in groups[context]], device=device)
    length = len(contexts[0])
    width = max(len(pairs[i][1]) for i in members) - 1  # continuation tokens fed after the context
    model.setup_cache(len(members), length + max(width, 1))
    hidden = model.hidden_states(torch.tensor(contexts, device=device), start=0, cache_row=slice(0, len(contexts)))
    first = F.log_softmax(model.lm_head(hidden[:, -1]).float(), dim=-1)  # each context's next-token log-probs
    after = None
    if width > 0:
        for layer in model.model.layers:  # row r starts from its context's keys and values
            cache = layer.self_attn.cache
            cache.k.copy_(cache.k[owner])
            cache.v.copy_(cache.v[owner])
        ids = torch.zeros((len(members), width), dtype=torch.long, device=device)
        for r, i in enumerate(members):
            tail = list(pairs[i][1])[:-1]
            ids[r, :len(tail)] = torch.tensor(tail)  # right padding: causal attention never sees it
        after = model.hidden_states(ids, start=length)
    # the head once over every scored position of the continuation pass (a call per request reads the whole
    # head matrix each time)
    spans = [len(pairs[i][1]) - 1 for i in members]
    rest = (F.log_softmax(model.lm_head(torch.cat([after[r, :n] for r, n in enumerate(spans)])).float(), dim=-1)
            if after is not None else None)
    offset = 0
    for r, (i, n) in enumerate(zip(members, spans)):
        target = torch.tensor(list(pairs[i][1]), device=device)
        logprobs = first[owner[r]][None]
        if n:
            logprobs = torch.cat([logprobs, rest[offset:offset + n]])
            offset += n
        score = logprobs.gather(-1, target[:, None]).sum().item()
        results[i] = (score, bool((logprobs.argmax(dim=-1) == target).all()))


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

