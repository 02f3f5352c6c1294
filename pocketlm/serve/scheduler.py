"""Continuous batching: one thread per served model decodes all its running requests together.

Requests wait in a bounded queue. Between decode steps a waiting request takes a free row of the KV
cache and its prompt is prefilled a chunk at a time, so a long prompt delays the others by one chunk
a step rather than by the whole prompt. When its prompt is in, it joins the batch at the next step and
leaves it when it finishes, is cancelled (its client went away, or a stop string matched) or times out.
Busy rows are kept contiguous (rows 0..n-1) so each step computes only them, over only the cache
positions they reach.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine import SamplingParams, sample_next
from ..errors import ContextLengthError, PocketLMError

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
    timeout: float | None = None  # seconds from submission
    # set by the scheduler
    emit: Callable[[object], None] = field(default=lambda event: None, repr=False)
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the cache
    cancelled: bool = False
    deadline: float | None = None
    generator: torch.Generator | None = field(default=None, repr=False)
    echo: PromptLogprobs | None = field(default=None, repr=False)

    @property
    def pos(self) -> int:
        """Position of the token this job feeds to the next decode step (= tokens already cached)."""
        return len(self.prompt_ids) - 1 + len(self.generated)

    @property
    def next_input(self) -> int:
        return self.generated[-1] if self.generated else self.prompt_ids[-1]


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
        job.max_new_tokens = max(0, min(job.max_new_tokens, self.context - len(job.prompt_ids)))
        job.emit = emit
        if job.timeout:
            job.deadline = time.monotonic() + job.timeout
        if job.sampling.seed is not None:
            job.generator = torch.Generator().manual_seed(job.sampling.seed)
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
                except Exception as exc:  # a fault must not stop the server: fail the jobs in hand, go on
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
        if batch:
            self._prefill_batch(batch)
        elif self.prefilling is not None:
            self._prefill_chunk(self.prefilling)
        if self.running:
            self._decode_step()

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
        decoding overwrites those cache positions before any step attends to them."""
        first_row = len(self.running)
        lengths = [len(job.prompt_ids) - 1 for job in jobs]
        width = max(lengths)
        if width:
            ids = torch.tensor([job.prompt_ids[:-1] + [0] * (width - n) for job, n in zip(jobs, lengths)])
            echo = any(job.echo_logprobs is not None for job in jobs)
            logits = self.model(ids, start=0, last_only=not echo, cache_row=slice(first_row, first_row + len(jobs)))
            for row, (job, n) in enumerate(zip(jobs, lengths)):
                job.prefilled = n
                if job.echo_logprobs is not None:
                    job.echo = PromptLogprobs([None], [None])
                    self._score_prompt(job, logits[row, :n], 0, n)
        for row, job in enumerate(jobs, start=first_row):
            self._prefilled(job, row)

    def _prefill_chunk(self, job: Job) -> None:
        """Feed the next chunk of a long prompt into the job's cache row (all but its last token, which
        the first decode step takes); with echo, score each prompt token on the way."""
        row = len(self.running)
        end = min(job.prefilled + self.prefill_chunk, len(job.prompt_ids) - 1)
        ids = torch.tensor([job.prompt_ids[job.prefilled:end]])
        want_echo = job.echo_logprobs is not None
        logits = self.model(ids, start=job.prefilled, last_only=not want_echo, cache_row=row)
        if want_echo:
            job.echo = job.echo or PromptLogprobs([None], [None])
            self._score_prompt(job, logits[0], job.prefilled, end)
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

    def _decode_step(self) -> None:
        jobs = self.running
        ids = torch.tensor([[job.next_input] for job in jobs])
        pos = torch.tensor([job.pos for job in jobs])
        span = min(self.model.model.layers[0].self_attn.cache.k.shape[2],
                   -(-(int(pos.max()) + 1 + self.model.prefix_tokens) // SPAN_BUCKET) * SPAN_BUCKET)
        logits = self.model.decode_step(ids, pos, self.model.decode_mask(pos, span))
        self.steps += 1
        chosen = logits.argmax(-1).tolist()
        want_logprobs = any(job.logprobs is not None for job in jobs)
        logprobs = torch.log_softmax(logits, -1) if want_logprobs else None
        finished: list[tuple[int, Finished]] = []
        for i, job in enumerate(jobs):
            if job.sampling.temperature > 0 or job.presence_penalty or job.frequency_penalty:
                chosen[i] = self._sample(job, logits[i:i + 1])
            token = chosen[i]
            eos = token in job.stop_ids and not job.sampling.ignore_eos
            event = TokenEvent(token, eos=eos)
            if job.logprobs is not None:
                event.logprob = float(logprobs[i, token])
                if job.logprobs:
                    values, indices = logprobs[i].topk(job.logprobs)
                    event.top = list(zip(indices.tolist(), values.tolist()))
            self._emit(job, event)
            if eos:
                finished.append((i, Finished("stop")))
                continue
            job.generated.append(token)
            if len(job.generated) >= job.max_new_tokens or job.pos >= self.context:
                finished.append((i, Finished("length")))
        self._history.append((time.monotonic(), len(jobs)))
        while self._history and self._history[0][0] < time.monotonic() - 60:
            self._history.popleft()
        for index, event in reversed(finished):
            self._finish(index, event)

    def _sample(self, job: Job, logits: torch.Tensor) -> int:
        if job.generated and (job.presence_penalty or job.frequency_penalty):
            # OpenAI's penalties: subtract count * frequency + presence from each generated token's logit
            ids, counts = torch.tensor(job.generated).unique(return_counts=True)
            logits = logits.clone()
            logits[0, ids] -= counts.float() * job.frequency_penalty + job.presence_penalty
        return int(sample_next(logits, job.sampling, job.generator)[0])


def _logprobs(logits: torch.Tensor, targets: list[int], k: int):
    """(log-prob of each target, top-k (token, log-prob)) for rows of logits (seq, vocab)."""
    logp = torch.log_softmax(logits, -1)
    chosen = logp[torch.arange(len(targets)), torch.tensor(targets)].tolist()
    if k:
        values, indices = logp.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        tops = [None] * len(targets)
    return list(zip(chosen, tops))
