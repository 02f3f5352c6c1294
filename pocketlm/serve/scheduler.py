"""Continuous batching: one thread per served model decodes all its running requests together.

Requests wait in a bounded queue. Between decode steps a waiting request takes a free row of the KV
cache and its prompt is prefilled a chunk at a time, so a long prompt delays the others by one chunk
a step rather than by the whole prompt. Where the whole-step kernel serves the model (a quantized model on
an x86 CPU), prompt tokens are fed inside the decode step itself, as rows of their own cache row. When its prompt is in, it joins the batch at the next step and
leaves it when it finishes, is cancelled (its client went away, or a stop string matched) or times out.
Busy rows are kept contiguous (rows 0..n-1) so each step computes only them, over only the cache
positions they reach. A request decoded under a grammar (response_format, tools) keeps its own place in
it: its row's logits are masked to what its grammar allows before its token is chosen.

One request cannot break another: a failure while preparing, prefilling, decoding or sampling one row
ends that request alone (400 when a PocketLMError says the request was at fault, else 500, logged with
its request id) and every other row carries on with the tokens it would have produced alone. When a
batched forward pass fails, the rows that fail on their own are found and dropped, and the pass is run
again without them.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..constrain import Guide
from ..engine import NonFiniteLogitsError, SamplingParams, constrained, sample_next, seeded_generator
from ..errors import ConfigError, ContextLengthError, PocketLMError

log = logging.getLogger("pocketlm.serve")

SPAN_BUCKET = 128  # a step attends over the cache positions in use, rounded up to this


class QueueFullError(PocketLMError):
    """Every cache row is busy and the waiting queue is full: the client should retry later."""


@dataclass
class TokenEvent:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # the most likely tokens at this step, with log-probs
    eos: bool = False  # the end-of-sequence token: counted and scored (as OpenAI-style servers do), not shown


@dataclass
class PromptLogprobs:
    """Log-prob of each prompt token given the ones before it (None for the first), for `echo`."""
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class Finished:
    reason: str  # "stop" (EOS), "length", "cancelled", "timeout" or "error"
    message: str = ""
    status: int = 500  # for "error": 400 when the request was at fault, 500 when the server was


@dataclass
class Job:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-prob and the top k
    echo_logprobs: int | None = None  # the same for every prompt token
    stop_ids: frozenset[int] = frozenset()
    logit_bias: dict[int, float] | None = None  # added to those tokens' logits before sampling (OpenAI's)
    timeout: float | None = None  # seconds from submission
    request_id: str = ""  # named in the log when the job fails
    # set by the scheduler
    emit: Callable[[object], None] = field(default=lambda event: None, repr=False)
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the cache
    cancelled: bool = False
    deadline: float | None = None
    generator: torch.Generator | None = field(default=None, repr=False)
    echo: PromptLogprobs | None = field(default=None, repr=False)
    guide: Guide | None = field(default=None, repr=False)  # its place in sampling.grammar, if it has one

    @property
    def pos(self) -> int:
        """Position of the token this job feeds to the next decode step (= tokens already cached)."""
        return len(self.prompt_ids) - 1 + len(self.generated)

    @property
    def next_input(self) -> int:
        return self.generated[-1] if self.generated else self.prompt_ids[-1]

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the raw logits is its token: no sampling, penalty or bias to apply."""
        return (self.sampling.greedy and not self.presence_penalty and not self.frequency_penalty
                and not self.logit_bias and self.guide is None)


class Scheduler:
    """Owns one model and its KV cache (max_batch rows of max_context tokens) and a decoding thread."""

    def __init__(self, model, max_batch: int = 32, max_context: int | None = None, queue_size: int = 64,
                 prefill_chunk: int = 256, name: str = "model"):
        self.model = model
        self.name = name
        self.max_batch = max_batch
        self.context = min(model.context_length, max_context or model.context_length)
        self.queue_size = queue_size
        self.prefill_chunk = prefill_chunk
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []  # decoding; running[i] owns cache row i
        self.prefilling: Job | None = None  # owns cache row len(running)
        self._admitting = 0
        self.steps = 0
        self._history: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self._cond = threading.Condition()
        self._stopped = False
        model.setup_cache(max_batch, self.context)
        self._thread = threading.Thread(target=self._loop, name=f"pocketlm-scheduler-{name}", daemon=True)
        self._thread.start()

    # ---- the request side (any thread) --------------------------------------------------------
    def submit(self, job: Job, emit: Callable[[object], None]) -> Job:
        """Queue a job; `emit` receives its TokenEvent / PromptLogprobs / Finished events, from this
        scheduler's thread. Raises ContextLengthError or QueueFullError at once."""
        if not job.prompt_ids:
            raise ContextLengthError("the prompt is empty; give at least one token of text")
        if len(job.prompt_ids) >= self.context:
            raise ContextLengthError(f"the prompt has {len(job.prompt_ids)} tokens but this server's context for "
                                     f"{self.name} is {self.context} tokens; shorten the prompt")
        vocab = self.model.config.vocab_size
        for what, ids in (("prompt token id", job.prompt_ids), ("logit_bias token id", job.logit_bias or ())):
            if (bad := next((t for t in ids if not 0 <= t < vocab), None)) is not None:
                raise ConfigError(f"{what} {bad} is outside the vocabulary of {self.name} (0..{vocab - 1})")
        job.max_new_tokens = max(0, min(job.max_new_tokens, self.context - len(job.prompt_ids)))
        job.emit = emit
        if job.timeout:
            job.deadline = time.monotonic() + job.timeout
        job.generator = seeded_generator(job.sampling.seed)
        if job.sampling.grammar is not None:
            job.guide = job.sampling.grammar.guide()  # each job keeps its own place in the grammar
        with self._cond:
            if self._stopped:
                raise QueueFullError(f"{self.name} is shutting down")
            free_rows = self.max_batch - self.active
            if len(self.waiting) >= self.queue_size + free_rows:
                raise QueueFullError(f"{self.name} is busy: all {self.max_batch} sequences are running and "
                                     f"{len(self.waiting)} requests are waiting (the queue holds {self.queue_size}); retry shortly")
            self.waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job at the next step and free its row (its client went away, or it has what it needs)."""
        job.cancelled = True
        with self._cond:
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return len(self.running) + (self.prefilling is not None) + self._admitting

    def tokens_since(self, since: float) -> int:
        """Tokens generated since `since` (time.monotonic()), over the last minute at most."""
        return sum(n for t, n in list(self._history) if t >= since)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)
        for job in list(self.waiting) + self.running + [j for j in [self.prefilling] if j]:
            self._emit(job, Finished("cancelled", "the server is shutting down"))
        self.model.clear_cache()

    # ---- the scheduler thread -------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopped and not (self.waiting or self.running or self.prefilling):
                        self._cond.wait()
                    if self._stopped:
                        return
                    batch = self._admit()
                    self._admitting = len(batch)  # taken from the queue, not yet running: still busy rows
                try:
                    self._step(batch)
                except Exception as exc:  # a fault outside any one row's work: fail the jobs in hand, go on
                    log.exception("scheduler step failed")
                    for job in self.running + batch + [j for j in [self.prefilling] if j]:
                        self._emit(job, Finished("error", f"generation failed: {exc}"))
                    self.running, self.prefilling = [], None
                self._admitting = 0

    def _admit(self) -> list[Job]:
        """Take waiting jobs into free rows (under the lock). Short prompts come as a batch, prefilled
        together in one forward pass; a prompt longer than a chunk becomes `prefilling`, fed a chunk a step."""
        batch: list[Job] = []
        if self.prefilling is not None:
            return batch
        free = self.max_batch - len(self.running)
        width = 0
        while self.waiting and len(batch) < free:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                self._emit(job, Finished("cancelled"))
                continue
            need = len(job.prompt_ids) - 1
            if need > self.prefill_chunk:
                if not batch:
                    self.prefilling = self.waiting.popleft()
                break
            if batch and (len(batch) + 1) * max(width, need) > self.prefill_chunk:  # padded tokens this pass
                break
            width = max(width, need)
            batch.append(self.waiting.popleft())
        return batch

    def _step(self, batch: list[Job]) -> None:
        now = time.monotonic()
        for index in range(len(self.running) - 1, -1, -1):
            job = self.running[index]
            if job.cancelled or (job.deadline and now > job.deadline):
                self._finish(index, Finished("cancelled" if job.cancelled else "timeout"))
        job = self.prefilling
        if job is not None and (job.cancelled or (job.deadline and now > job.deadline)):
            self.prefilling = None
            self._emit(job, Finished("cancelled" if job.cancelled else "timeout"))
        feeding = batch or [j for j in [self.prefilling] if j]
        if feeding and self._rides_along(feeding):
            self._mixed_step(batch)
        else:
            self._step_apart(batch)

    def _step_apart(self, batch: list[Job]) -> None:
        """Prefill (the new short prompts together, or the next chunk of a long one) in a pass of its own,
        then decode the running rows."""
        if batch:
            self._prefill_batch(batch)
        elif self.prefilling is not None:
            self._prefill_chunk(self.prefilling)
        if self.running:
            self._decode_step()

    def _rides_along(self, jobs: list[Job]) -> bool:
        """Whether these prompts can be fed within the decode step: the whole-step kernel serves the model
        (it takes a prompt's tokens as rows of its own cache row), and no prompt is to be scored (echo)."""
        return self.model.steps_any_rows and all(job.echo_logprobs is None for job in jobs)

    def _mixed_step(self, batch: list[Job]) -> None:
        """One call of the whole-step kernel decodes the running rows and feeds prompt tokens into the rows
        after them: the new short prompts whole (all but their last tokens), or else the next chunk of the
        long prompt being prefilled. Admitting requests then never stops the others for a pass of its own.
        If the call fails, the step is done apart, as without it (re-running writes the same keys and
        values), so a failure is traced to its request."""
        n = len(self.running)
        ids = [job.next_input for job in self.running]
        pos = [job.pos for job in self.running]
        rows = list(range(n))
        chunk = self.prefilling
        spans = [(job, n + i, 0, len(job.prompt_ids) - 1) for i, job in enumerate(batch)] if batch else \
            [(chunk, n, chunk.prefilled, min(chunk.prefilled + self.prefill_chunk, len(chunk.prompt_ids) - 1))]
        for job, row, start, end in spans:
            ids += job.prompt_ids[start:end]
            pos += range(start, end)
            rows += [row] * (end - start)
        try:
            positions = torch.tensor(pos)
            logits = self.model.decode_step(torch.tensor(ids)[:, None], positions,
                                            self.model.decode_mask(positions, self._span(positions)),
                                            rows=torch.tensor(rows), logit_rows=n) if ids else None
        except Exception:
            log.warning("a decode step with prompt tokens failed; doing it apart", exc_info=True)
            self._step_apart(batch)
            return
        for job, row, _, end in spans:
            job.prefilled = end
            if end == len(job.prompt_ids) - 1:
                if job is self.prefilling:
                    self.prefilling = None
                self._prefilled(job, row)
        if n:
            self._decode_step(logits)
        elif self.running:  # nothing was decoding: the new rows take their first step now, not a step later
            self._decode_step()

    def _failed(self, job: Job, exc: Exception, stage: str) -> Finished:
        """The event that ends a job whose own work raised: 400 for a PocketLMError (the request asked for
        something that cannot be done), else 500, logged with the request id."""
        if isinstance(exc, PocketLMError):
            return Finished("error", str(exc), status=400)
        log.error("request %s failed while %s", job.request_id or "(no id)", stage, exc_info=exc)
        return Finished("error", f"internal error while {stage} this request (id {job.request_id or 'none'}, "
                                 f"in the server's log): {type(exc).__name__}: {exc}")

    def _emit(self, job: Job, event) -> None:
        try:
            job.emit(event)
        except Exception:  # the receiving side is gone (its event loop closed): nothing to tell
            job.cancelled = True

    def _finish(self, index: int, event: Finished) -> None:
        """Release running[index]: the last busy row moves into its place, and a prefilling job moves
        down one row behind it, so busy rows stay contiguous."""
        job = self.running[index]
        last = len(self.running) - 1
        if index != last:
            moved = self.running[last]
            self.model.move_cache_row(last, index, moved.pos)
            self.running[index] = moved
        self.running.pop()
        if self.prefilling is not None:
            self.model.move_cache_row(last + 1, last, self.prefilling.prefilled)
        self._emit(job, event)

    def _prefill_batch(self, jobs: list[Job]) -> None:
        """Prefill short prompts together, one row each (rows after the running ones), padded on the right:
        a row's padding lies after its own tokens, so causal attention never lets the row see it, and
        decoding overwrites those cache positions before any step attends to them (a rolling cache would keep
        the padding in place of the row's latest positions: there prompts of different lengths go one by
        one). If the pass fails, each prompt is prefilled alone, so only the ones that fail by themselves end."""
        first_row = len(self.running)
        lengths = [len(job.prompt_ids) - 1 for job in jobs]
        if self.model.rolling_cache and len(set(lengths)) > 1:  # padding would overwrite a window's slots
            for job in jobs:
                self._prefill_batch([job])
            return
        width = max(lengths)
        logits = None
        if width:
            ids = torch.tensor([job.prompt_ids[:-1] + [0] * (width - n) for job, n in zip(jobs, lengths)])
            echo = any(job.echo_logprobs is not None for job in jobs)
            try:
                logits = self.model(ids, start=0, last_only=not echo,
                                    cache_row=slice(first_row, first_row + len(jobs)))
            except Exception as exc:
                if len(jobs) == 1:
                    self._emit(jobs[0], self._failed(jobs[0], exc, "prefilling"))
                    return
                for job in jobs:
                    self._prefill_batch([job])
                return
        for index, (job, n) in enumerate(zip(jobs, lengths)):
            try:
                job.prefilled = n
                if job.echo_logprobs is not None:
                    job.echo = PromptLogprobs([None], [None])
                    if n:
                        self._score_prompt(job, logits[index, :n], 0, n)
            except Exception as exc:
                self._emit(job, self._failed(job, exc, "scoring the prompt of"))
                continue  # its row is not taken: the next job's prompt moves down into it
            self._prefilled(job, first_row + index)

    def _prefill_chunk(self, job: Job) -> None:
        """Feed the next chunk of a long prompt into the job's cache row (all but its last token, which
        the first decode step takes); with echo, score each prompt token on the way."""
        row = len(self.running)
        end = min(job.prefilled + self.prefill_chunk, len(job.prompt_ids) - 1)
        try:
            ids = torch.tensor([job.prompt_ids[job.prefilled:end]])
            want_echo = job.echo_logprobs is not None
            logits = self.model(ids, start=job.prefilled, last_only=not want_echo, cache_row=row)
            if want_echo:
                job.echo = job.echo or PromptLogprobs([None], [None])
                self._score_prompt(job, logits[0], job.prefilled, end)
        except Exception as exc:
            self.prefilling = None
            self._emit(job, self._failed(job, exc, "prefilling"))
            return
        job.prefilled = end
        if job.prefilled == len(job.prompt_ids) - 1:
            self.prefilling = None
            self._prefilled(job, row)

    def _score_prompt(self, job: Job, logits: torch.Tensor, start: int, end: int) -> None:
        """Log-probs of prompt tokens start+1..end from the logits at positions start..end-1."""
        for lp, top in _logprobs(logits.float(), job.prompt_ids[start + 1:end + 1], job.echo_logprobs):
            job.echo.logprobs.append(lp)
            job.echo.top.append(top)

    def _prefilled(self, job: Job, row: int) -> None:
        """A job whose prompt is in cache row `row` joins the batch (in row len(running)), or ends there."""
        if job.echo_logprobs is not None:
            self._emit(job, job.echo or PromptLogprobs([None], [None]))
        if job.max_new_tokens == 0:
            self._emit(job, Finished("length"))
            return
        if row != len(self.running):  # a job before it in the batch ended at its prompt: close the gap
            self.model.move_cache_row(row, len(self.running), job.prefilled)
        self.running.append(job)

    def _decode_step(self, logits: torch.Tensor | None = None) -> None:
        """Choose and emit the next token of the first running rows: those `logits` (rows, vocab) are for,
        given, or else every running row, decoded now."""
        logits = self._decode_logits() if logits is None else logits
        if logits is None:
            return
        jobs = self.running[:logits.shape[0]]
        self.steps += 1
        argmax = logits.argmax(-1)
        chosen = argmax.tolist()
        # the largest logit NaN (argmax takes NaN for the largest) or infinite: the model failed that sequence
        finite = torch.isfinite(logits.gather(-1, argmax[:, None]))[:, 0].tolist()
        want_logprobs = any(job.logprobs is not None for job in jobs)
        logprobs = torch.log_softmax(logits, -1) if want_logprobs else None
        finished: list[tuple[int, Finished]] = []
        for i, job in enumerate(jobs):
            try:
                event = self._next_token(job, logits[i:i + 1], chosen[i], finite[i],
                                         None if logprobs is None else logprobs[i])
            except Exception as exc:
                finished.append((i, self._failed(job, exc, "sampling")))
                continue
            self._emit(job, event)
            if event.eos:
                finished.append((i, Finished("stop")))
                continue
            job.generated.append(event.token)
            if len(job.generated) >= job.max_new_tokens or job.pos >= self.context:
                finished.append((i, Finished("length")))
        self._history.append((time.monotonic(), len(jobs)))
        while self._history and self._history[0][0] < time.monotonic() - 60:
            self._history.popleft()
        for index, event in reversed(finished):
            self._finish(index, event)

    def _decode_logits(self) -> torch.Tensor | None:
        """Next-token logits (batch, vocab) of the running rows. If the batched step raises, the first row
        that fails in a batch of its own and the rows before it (rows 0..k-1 of the cache form a smaller
        batch; a binary search finds k) is ended, and the step runs again without it. A re-run writes the
        same keys and values at the same positions, so the other rows' tokens do not change."""
        while self.running:
            try:
                return self._decode_rows(len(self.running))
            except Exception as exc:
                failing, error = self._first_failing_row(exc)
                self._finish(failing, self._failed(self.running[failing], error, "decoding"))
        return None

    def _first_failing_row(self, error: Exception) -> tuple[int, Exception]:
        """The smallest k with rows 0..k failing together (the whole batch did), and its error."""
        low, high = 0, len(self.running) - 1
        while low < high:
            middle = (low + high) // 2
            try:
                self._decode_rows(middle + 1)
                low = middle + 1
            except Exception as exc:
                high, error = middle, exc
        return low, error

    def _decode_rows(self, n: int) -> torch.Tensor:
        """One decode step of the first n running rows."""
        jobs = self.running[:n]
        ids = torch.tensor([[job.next_input] for job in jobs])
        pos = torch.tensor([job.pos for job in jobs])
        return self.model.decode_step(ids, pos, self.model.decode_mask(pos, self._span(pos)))

    def _span(self, pos: torch.Tensor) -> int:
        """The cache positions a step attends over: those in use, rounded up to SPAN_BUCKET."""
        return min(self.model.cache_positions,
                   -(-(int(pos.max()) + 1 + self.model.prefix_tokens) // SPAN_BUCKET) * SPAN_BUCKET)

    def _next_token(self, job: Job, logits: torch.Tensor, argmax: int, finite: bool,
                    logprobs: torch.Tensor | None) -> TokenEvent:
        """The token a job takes from its row of logits (1, vocab), with its log-probs when asked for."""
        if not finite:
            raise NonFiniteLogitsError("the model gave a NaN or infinite logit for this sequence")
        token = argmax if job.plain_greedy else self._sample(job, logits)
        if job.guide is not None:
            job.guide.advance(token)
        event = TokenEvent(token, eos=token in job.stop_ids and not job.sampling.ignore_eos)
        if job.logprobs is not None:
            event.logprob = float(logprobs[token])
            if job.logprobs:
                values, indices = logprobs.topk(min(job.logprobs, logprobs.shape[-1]))
                event.top = list(zip(indices.tolist(), values.tolist()))
        return event

    def _sample(self, job: Job, logits: torch.Tensor) -> int:
        logits = logits.float().clone()
        if job.generated and (job.presence_penalty or job.frequency_penalty):
            # OpenAI's penalties: subtract count * frequency + presence from each generated token's logit
            ids, counts = torch.tensor(job.generated).unique(return_counts=True)
            logits[0, ids] -= counts.float() * job.frequency_penalty + job.presence_penalty
        if job.logit_bias:
            logits[0, list(job.logit_bias)] += torch.tensor(list(job.logit_bias.values()))
        if job.guide is not None:
            logits = constrained(logits, [job.guide])
        return int(sample_next(logits, job.sampling, job.generator)[0])


def _logprobs(logits: torch.Tensor, targets: list[int], k: int):
    """(log-prob of each target, top-k (token, log-prob)) for rows of logits (seq, vocab)."""
    logp = torch.log_softmax(logits, -1)
    chosen = logp[torch.arange(len(targets)), torch.tensor(targets)].tolist()
    if k:
        values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        tops = [None] * len(targets)
    return list(zip(chosen, tops))
