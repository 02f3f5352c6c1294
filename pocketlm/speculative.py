"""Speculative decoding: a cheap draft model proposes k tokens, the target checks them all in one forward
pass and keeps the longest prefix it accepts, plus one token of its own.

Greedy, a proposal is accepted when it is the target's argmax, so the output is the target's greedy output
token for token. Sampling (temperature > 0, with top-k / top-p), a proposal x drawn from the draft's
distribution q is accepted with probability min(1, p(x) / q(x)) under the target's distribution p, and at
the first rejection the target's token is drawn from max(0, p - q), renormalised (Leviathan et al. 2023,
"Fast Inference from Transformers via Speculative Decoding"): every token is distributed exactly as the
target's own sampling would draw it. The gain is that one target pass can yield up to k + 1 tokens. The
draft must share the target's tokenizer, for example a quantized copy of the target or a small model
distilled from it.

Under a grammar (`SamplingParams.grammar`) the draft proposes only tokens the grammar allows, each
position's mask is kept, and the target's logits at that position are masked the same way before the
check, so the output is what constrained decoding with the target alone gives (greedy: token for token;
sampled: in distribution). The grammar's state is rolled back over the rejected proposals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .engine import SamplingParams, cache_length, check_prompt, decode_fn, seeded_generator, token_probs
from .errors import ConfigError


@dataclass
class SpeculativeStats:
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, accepted by the target
    target_passes: int = 0  # target forward passes after the prompt

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return (self.accepted + self.target_passes) / self.target_passes if self.target_passes else 0.0

    def add(self, other: "SpeculativeStats") -> None:
        """Count `other`'s run in too (a conversation's answers)."""
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.target_passes += other.target_passes


def check_compatible(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    if target.config.vocab_size != draft.config.vocab_size:
        raise ConfigError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                          f"({target.config.vocab_size}); speculative decoding needs a draft with the same tokenizer")
    if target_tokenizer is not None and draft_tokenizer is not None:
        probe = "The quick brown fox, 1234 ünïcödé!\n"
        if target_tokenizer.encode(probe) != draft_tokenizer.encode(probe):
            raise ConfigError("the draft model's tokenizer splits text differently from the target's; "
                              "speculative decoding needs a draft with the same tokenizer")


def speculative_generate(target, draft, prompt_ids: list[int], max_new_tokens: int, k: int = 4,
                         stop_ids: set[int] = frozenset(),
                         sampling: SamplingParams | None = None) -> tuple[list[int], SpeculativeStats]:
    """Continuation of `prompt_ids` by `target` (greedy, or sampled under `sampling`'s temperature, top-k,
    top-p and seed), drafted `k` tokens at a time by `draft`."""
    stats = SpeculativeStats()
    tokens = speculative_tokens(target, draft, prompt_ids, max_new_tokens, k, stop_ids, stats, sampling)
    return list(tokens), stats


@torch.inference_mode()
def speculative_tokens(target, draft, prompt_ids: list[int], max_new_tokens: int, k: int = 4,
                       stop_ids: set[int] = frozenset(), stats: SpeculativeStats | None = None,
                       sampling: SamplingParams | None = None) -> Iterator[int]:
    """Yield the target's tokens as they are accepted; `stats` (if given) is updated as it goes."""
    if k < 1:
        raise ConfigError(f"the number of draft tokens k must be >= 1; got {k}")
    if sampling is not None and sampling.repetition_penalty != 1.0:
        raise ConfigError("speculative decoding takes no repetition penalty; leave it at 1 with a draft model")
    greedy = sampling is None or sampling.greedy
    # sampling happens on the CPU (vocabulary-sized vectors), so the draft and the target may sit on other devices
    generator = None if greedy else seeded_generator(sampling.seed)
    check_compatible(target, draft)
    context = min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
    check_prompt(prompt_ids, context)
    max_new = min(max_new_tokens, context - len(prompt_ids) - k - 1)
    stats = stats if stats is not None else SpeculativeStats()
    if max_new <= 0:
        return
    t_dev, d_dev = target.device, draft.device
    length = cache_length(len(prompt_ids) + max_new + k + 1, context)
    target.setup_cache(1, length, rolling=False)  # rejected drafts rewind positions: windows keep older ones
    draft.setup_cache(1, length, rolling=False)
    # after the prompt the draft sees one or two tokens at a time: those go through its decode step (the
    # whole-step kernel for a quantized draft, see kernels/decode_step.py, or its compiled step), which costs a
    # third of a forward pass or less
    draft_step = decode_fn(draft)

    def draft_logits(tokens: list[int], start: int) -> torch.Tensor:
        """The draft's next-token logits after `tokens`, fed at positions start..."""
        if len(tokens) > 2:
            return draft(torch.tensor([tokens], device=d_dev), start=start, last_only=True)[0, -1]
        for i, token in enumerate(tokens):
            logits = draft_step(torch.tensor([[token]], device=d_dev), torch.tensor([start + i], device=d_dev))[0]
        return logits

    def draw(probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=generator))

    def distribution(logits: torch.Tensor) -> torch.Tensor:
        return token_probs(logits, sampling).cpu()

    guide = sampling.grammar.guide() if sampling is not None and sampling.grammar is not None else None
    vocab = target.config.vocab_size

    def allowed() -> torch.Tensor | None:
        return None if guide is None else guide.allowed(vocab)

    def masked(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return logits if mask is None else logits.masked_fill(~mask.to(logits.device), float("-inf"))

    try:
        seq = list(prompt_ids)
        logits = masked(target(torch.tensor([seq], device=t_dev), last_only=True)[0, -1], allowed())
        out = [int(logits.argmax()) if greedy else draw(distribution(logits))]
        if guide is not None:
            guide.advance(out[0])
        yield out[0]
        draft_fed = 0  # positions of `seq` already in the draft's cache
        while len(out) < max_new and out[-1] not in stop_ids:
            full = seq + out
            # draft: catch up on tokens it has not seen, then propose k tokens one at a time
            proposals, q, masks = [], [], []
            logits = draft_logits(full[draft_fed:], draft_fed)
            for i in range(k):
                if i:
                    logits = draft_logits(proposals[-1:], len(full) + i - 1)
                masks.append(allowed())
                logits = masked(logits, masks[-1])
                if greedy:
                    proposals.append(int(logits.argmax()))
                else:
                    q.append(distribution(logits))
                    proposals.append(draw(q[-1]))
                if guide is not None:
                    if proposals[-1] in stop_ids:  # the end: the grammar takes nothing after it
                        break  # (and is not advanced by it: llguidance's rollback does not count an end)
                    guide.advance(proposals[-1])
            m = len(proposals)
            masks.append(allowed() if guide is not None and proposals[-1] not in stop_ids else None)
            # target: one pass over the last accepted token and the proposals, each position masked as the draft's was
            chunk = torch.tensor([[full[-1]] + proposals], device=t_dev)
            logits = target(chunk, start=len(full) - 1)[0]
            if guide is not None:
                logits = torch.stack([masked(row, mask) for row, mask in zip(logits, masks)])
            if greedy:  # accept while the proposals are the target's own argmax
                preds = logits.argmax(-1).tolist()
                n = 0
                while n < m and proposals[n] == preds[n]:
                    n += 1
                own = preds[n]
            else:  # accept x with probability min(1, p(x) / q(x)); at a rejection draw from max(0, p - q)
                p = distribution(logits)
                n = 0
                while n < m and float(torch.rand((), generator=generator)) * q[n][proposals[n]] < p[n][proposals[n]]:
                    n += 1
                residual = (p[n] - q[n]).clamp(min=0) if n < m else p[n]
                own = draw(residual if residual.sum() > 0 else p[n])
            stats.drafted += m
            stats.accepted += n
            stats.target_passes += 1
            new = proposals[:n] + [own]
            if guide is not None and not any(t in stop_ids for t in proposals[:n]):
                # back to the last accepted proposal (a proposed end was never advanced), then the target's token
                guide.rollback(m - n - (proposals[-1] in stop_ids))
                guide.advance(own)
            for token in new:
                out.append(token)
                yield token
                if token in stop_ids or len(out) >= max_new:
                    return
            draft_fed = min(len(full) + m - 1, len(full) + n)
    finally:
        target.clear_cache()
        draft.clear_cache()
