"""Decoding: sampling, and the loops that prefill a prompt into the KV cache and decode one token at a time.

`generate_tokens` yields one sequence's token ids, `generate_batch` decodes several prompts together.
Turning tokens into text (stop strings, UTF-8, chat prompts) is `streaming`'s job.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import quant
from .constrain import Grammar, Guide
from .errors import ConfigError, ContextLengthError
from .kernels import cpu_ops, decode_step
from .tokenizer import Tokenizer

# Temperatures below this decode greedily: dividing logits by a smaller one is numerically meaningless
# (the softmax is a one-hot on the largest logit anyway). vLLM uses the same threshold (_SAMPLING_EPS).
GREEDY_BELOW = 1e-5
SEED_RANGE = 2**64  # torch.Generator takes seeds in [0, 2**64); any integer seed is folded into it


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 (or anything below GREEDY_BELOW) means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    grammar: Grammar | None = None  # constrained decoding: only what the grammar accepts (pocketlm.constrain)

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (0 <= self.temperature < math.inf, f"temperature must be >= 0 and finite (0 is greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 < self.repetition_penalty < math.inf,
             f"repetition_penalty must be > 0 and finite (1 turns it off), got {self.repetition_penalty}"),
        ]
        if self.grammar is not None and self.ignore_eos:
            checks.append((False, "ignore_eos cannot be combined with a constraint: a complete output ends with EOS"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def seeded_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator for `seed` (any integer, folded into the generator's range), or None without one."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed % SEED_RANGE)


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers): divide positive logits of seen tokens, multiply negative ones.
    A penalty near 0 can push a logit to inf; sampling treats those as the largest finite value."""
    scores = logits.gather(-1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, seen, scores)


class NonFiniteLogitsError(RuntimeError):
    """A row's logits have no finite maximum (NaN or inf from the model): there is nothing to sample from."""


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits with NaN as -inf (never chosen) and +inf as the largest finite value, so that penalties
    and biases pushed to the extremes still leave a distribution; raises NonFiniteLogitsError for a row
    with nothing finite left."""
    logits = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    if not torch.isfinite(logits.amax(-1)).all():
        raise NonFiniteLogitsError("the model gave no finite logit for this sequence")
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token from (batch, vocab) logits: greedy, or temperature + top-k + top-p sampling."""
    if params.greedy:
        tokens = logits.argmax(-1)
        # argmax takes NaN for the largest: only then (or with nothing finite) clean the row and look again
        if not torch.isfinite(logits.gather(-1, tokens[..., None])).all():
            tokens = finite_logits(logits).argmax(-1)
        return tokens
    return torch.multinomial(token_probs(logits, params), 1, generator=generator).squeeze(-1)


def token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from (temperature >= GREEDY_BELOW): softmax of logits / temperature
    over the tokens top-k and top-p keep, zero elsewhere. The most likely token is always kept."""
    logits = finite_logits(logits)
    # shifted so the largest is 0 before dividing: a small temperature cannot overflow to inf
    logits = (logits - logits.amax(-1, keepdim=True)) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p; the first always stays (a top_p
        # below float32's smallest number compares as 0, which would otherwise drop it too)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------
def eos_ids(model, tokenizer: Tokenizer) -> set[int]:
    ids = set()
    for value in (model.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids


PROMPT_ROWS = 256  # prompt tokens per call of the whole-step kernel when it prefills (see _prefill_rows)
CACHE_BUCKET = 256  # cache lengths are rounded up to this, so a compiled step is reused across prompts


def constrained(logits: torch.Tensor, guides: list[Guide | None]) -> torch.Tensor:
    """(batch, vocab) logits with each row's disallowed tokens at -inf (a None guide leaves its row free)."""
    vocab = logits.shape[-1]
    allowed = torch.stack([torch.ones(vocab, dtype=torch.bool) if g is None else g.allowed(vocab) for g in guides])
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def cache_length(tokens: int, context: int) -> int:
    return min(context, -(-tokens // CACHE_BUCKET) * CACHE_BUCKET)


def compile_decoder(model, enable: bool = True) -> None:
    """Decode with a `torch.compile`d step from now on (compiles on first use, once per batch size and
    cache bucket; 1-2 minutes for SmolLM2 on 2 cores, 5-6 for int4 on an AVX2 CPU without pocketlm's
    kernels; then 2-4x faster decoding on the CPU).

    Where pocketlm's whole-step kernel serves the model (quantized, fp32 activations, an AVX2 CPU; see
    kernels/decode_step.py) nothing is compiled: that kernel decodes faster and from the first token.

    Call it on the finished model (after quantization, on its device). Dynamo's guards on the module
    tree cost about a tenth of a SmolLM2 step, so they are skipped; what they
    would protect is pinned instead: the step gets a code object of its own, so its compiled graphs
    serve this model only, and the cache length enters as the mask's shape, an input that is guarded.
    """
    if not enable:
        model._compiled_step = None
        return
    if model.device.type == "cpu":
        cpu_ops.available()  # built (once) and loaded now: not while dynamo traces the step
    if decode_step.serves(model):
        model._compiled_step = None  # the whole-step kernel runs it, faster than a compiled step and at once
        return
    for module in model.modules():  # tensors the compiled graph must find stored, not compute
        if hasattr(module, "prepare_decode"):
            module.prepare_decode()
    model.rope(model.device)  # else a step traced before any prefill recomputes every position's cos and sin
    own = _own_copy(type(model).decode_step)
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    if model.device.type == "cpu":
        # the step's Python wrapper checks every weight's size and stride each call (~760 checks, a tenth of
        # a SmolLM2 step). The weights are fixed once compile_decoder has run (see above)
        options["size_asserts"] = False
        if quant.ROW_LAYOUT == "words":
            # the int4 row product is one long pointwise expression per code word: past inductor's default of
            # 30 operations it is stored, then read back, instead of being summed in place
            options["realize_opcount_threshold"] = 100
    if model.device.type == "cuda":
        options["triton.cudagraphs"] = True  # one graph launch per step: batch-1 decoding is launch-bound on a GPU
    compiled = torch.compile(own, fullgraph=True, dynamic=False, options=options)
    model._compiled_step = lambda ids, pos: compiled(model, ids, pos, model.decode_mask(pos))


def _own_copy(fn):
    """fn with a code object of its own: dynamo keeps compiled graphs per code object."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def decode_fn(model):
    return getattr(model, "_compiled_step", None) or model.decode_step


def check_prompt(prompt_ids: list[int], context: int) -> None:
    if not prompt_ids:
        raise ConfigError("the prompt is empty; give at least one token of text")
    if len(prompt_ids) >= context:
        raise ContextLengthError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {context}; shorten it")


def _prefill(model, step_fn, prompts: list[list[int]], device) -> torch.Tensor:
    """Fill cache row b with prompt b and return the logits after each prompt (batch, vocab). The last
    prompt tokens go through the decode step together, so the first new token is chosen by the same
    computation as all later ones."""
    if model.steps_any_rows:
        _prefill_rows(model, prompts, device)
    else:
        for row, ids in enumerate(prompts):
            if len(ids) > 1:
                model(torch.tensor([ids[:-1]], device=device), start=0, last_only=True,
                      cache_row=row if len(prompts) > 1 else None)
    last = torch.tensor([[ids[-1]] for ids in prompts], device=device)
    return step_fn(last, torch.tensor([len(ids) - 1 for ids in prompts], device=device))


def _prefill_rows(model, prompts: list[list[int]], device) -> None:
    """All but the last token of each prompt fed through the whole-step kernel as rows of their cache rows,
    PROMPT_ROWS at a time, in order (so each row's earlier positions are cached before it attends to them).
    The server's scheduler feeds prompts the same way, and the kernel computes each row alone, so a greedy
    answer is the same token for token whether it is served or generated here."""
    places = [(row, p, token) for row, ids in enumerate(prompts) for p, token in enumerate(ids[:-1])]
    for start in range(0, len(places), PROMPT_ROWS):
        rows, pos, ids = (torch.tensor(column, device=device) for column in zip(*places[start:start + PROMPT_ROWS]))
        model.decode_step(ids[:, None], pos, model.decode_mask(pos), rows=rows, logit_rows=0)


@torch.inference_mode()
def generate_tokens(model, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int] = frozenset()) -> Iterator[int]:
    """Yield new token ids for one prompt until EOS (a `stop_ids` member, yielded last) or max_new_tokens."""
    context = model.context_length
    check_prompt(prompt_ids, context)
    max_new = min(params.max_new_tokens, context - len(prompt_ids))
    if max_new == 0:
        return
    device = model.device
    generator = seeded_generator(params.seed, device)
    tokens = torch.tensor([prompt_ids], device=device)
    model.setup_cache(1, cache_length(len(prompt_ids) + max_new, context))
    step_fn = decode_fn(model)
    guide = params.grammar.guide() if params.grammar is not None else None
    try:
        logits = _prefill(model, step_fn, [prompt_ids], device)
        pos = torch.tensor([len(prompt_ids)], device=device)
        for step in range(max_new):
            if params.repetition_penalty != 1.0:
                logits = apply_repetition_penalty(logits, tokens, params.repetition_penalty)
            if guide is not None:
                logits = constrained(logits, [guide])
            next_id = sample_next(logits, params, generator)
            token = int(next_id)
            if guide is not None:
                guide.advance(token)
            yield token
            if token in stop_ids and not params.ignore_eos:
                return
            if step + 1 == max_new:
                return
            tokens = torch.cat([tokens, next_id.view(1, 1)], dim=1)
            logits = step_fn(next_id.view(1, 1), pos)
            pos = pos + 1
    finally:
        model.clear_cache()


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], params: SamplingParams,
                   stop_ids: set[int] = frozenset()) -> list[list[int]]:
    """Decode several prompts of different lengths together: each is prefilled into its own row of one
    KV cache, then every step decodes all unfinished rows at their own positions in one batch."""
    context = model.context_length
    for ids in prompts:
        check_prompt(ids, context)
    max_new = min(params.max_new_tokens, context - max(len(p) for p in prompts))
    n = len(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    if max_new <= 0 or n == 0:
        return outputs
    device = model.device
    generator = seeded_generator(params.seed, device)
    model.setup_cache(n, cache_length(max(len(p) for p in prompts) + max_new, context))
    step_fn = decode_fn(model)
    guides = [params.grammar.guide() for _ in prompts] if params.grammar is not None else None
    try:
        logits = _prefill(model, step_fn, prompts, device)
        pos = torch.tensor([len(p) for p in prompts], device=device)
        done = [False] * n
        for step in range(max_new):
            if params.repetition_penalty != 1.0:
                for row in range(n):
                    seen = torch.tensor([prompts[row] + outputs[row]], device=device)
                    logits[row:row + 1] = apply_repetition_penalty(logits[row:row + 1], seen, params.repetition_penalty)
            if guides is not None:
                logits = constrained(logits, [None if done[row] else g for row, g in enumerate(guides)])
            next_ids = sample_next(logits, params, generator)
            for row, token in enumerate(next_ids.tolist()):
                if not done[row]:
                    if guides is not None:
                        guides[row].advance(token)
                    outputs[row].append(token)
                    done[row] = token in stop_ids and not params.ignore_eos
            if all(done) or step + 1 == max_new:
                break
            # finished rows keep stepping (their output is ignored) so the batch shape stays fixed
            logits = step_fn(next_ids.view(n, 1), pos)
            pos = pos + 1
    finally:
        model.clear_cache()
    return outputs
