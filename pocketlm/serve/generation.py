"""One request's generation: its choices (scheduler jobs) turned into text, log-probs, a log record
and metrics, with the events handed from the scheduler thread to the event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING

from fastapi import Request

from ..errors import ContextLengthError, PocketLMError
from ..streaming import StopStringFilter, TextAssembler
from .protocol import APIError, error_body
from .scheduler import Finished, Job, PromptLogprobs, QueueFullError, TokenEvent
from .store import RequestRecord
from .variants import Variant

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("pocketlm.serve")

STATUS_OF = {"stop": 200, "length": 200, "cancelled": 499, "timeout": 504}  # "error" carries its own status


class Choice:
    """Turns one job's events into text (stop strings held back and cut) and log-prob entries."""

    def __init__(self, index: int, tokenizer, prompt_ids: list[int], stops: list[str]):
        self.index = index
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.assembler = TextAssembler(tokenizer, prompt_ids)
        self.stops = StopStringFilter(stops)
        self.text = ""
        self.tokens: list[TokenEvent] = []
        self.echo: PromptLogprobs | None = None
        self.finish: str | None = None
        self.error = ""
        self.error_status = 500

    def feed(self, event) -> str:
        """Handle one event; return the text it makes available."""
        if self.finish is not None:
            return ""
        if isinstance(event, PromptLogprobs):
            self.echo = event
            return ""
        if isinstance(event, Finished):
            self.finish, self.error, self.error_status = event.reason, event.message, event.status
            piece = self.stops.flush() if event.reason in ("stop", "length") else ""
            self.text += piece
            return piece
        self.tokens.append(event)
        if event.eos:
            return ""
        piece = self.stops.feed(self.assembler.add(event.token))
        if self.stops.hit:
            self.finish = "stop"
        self.text += piece
        return piece


class Relay:
    """Hands scheduler events to the event loop in batches: a decode step makes one event per running
    sequence, and one wake-up of the loop per step (not per event) keeps the loop's share of the GIL small."""

    _by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Relay]" = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, object]] = []
        self.lock = threading.Lock()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "Relay":
        relay = cls._by_loop.get(loop)
        if relay is None:
            relay = cls._by_loop[loop] = cls(loop)
        return relay

    def post(self, queue: asyncio.Queue, item) -> None:
        with self.lock:
            self.pending.append((queue, item))
            wake = len(self.pending) == 1
        if wake:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        for queue, item in batch:
            queue.put_nowait(item)


class Run:
    def __init__(self, server: Server, variant: Variant, endpoint: str, prompts: list[list[int]], job_args: dict,
                 stops: list[str], user: str | None, prompt_text: str):
        self.server, self.variant, self.endpoint, self.user = server, variant, endpoint, user
        self.id = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex
        self.arrived = time.time()
        self.created = int(self.arrived)
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.prompt_text = prompt_text
        self.choices = [Choice(i, variant.tokenizer, ids, stops) for i, ids in enumerate(prompts)]
        self.jobs = [Job(ids, **job_args, request_id=self.id) for ids in prompts]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.logged = False

    @property
    def prompt_tokens(self) -> int:
        return sum(len(c.prompt_ids) for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    def start(self) -> None:
        relay = Relay.of(asyncio.get_running_loop())
        scheduler = self.variant.scheduler
        try:
            for index, job in enumerate(self.jobs):
                scheduler.submit(job, lambda event, i=index: relay.post(self.queue, (i, event)))
        except QueueFullError as exc:
            self.cancel()
            self.finish_log(429, str(exc))
            raise APIError(429, str(exc), type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        except ContextLengthError as exc:
            self.cancel()
            self.finish_log(400, str(exc))
            raise APIError(400, str(exc), param="messages" if self.endpoint == "chat" else "prompt",
                           code="context_length_exceeded")
        except PocketLMError as exc:  # the request asked for something the model cannot do
            self.cancel()
            self.finish_log(400, str(exc))
            raise APIError(400, str(exc))

    def cancel(self) -> None:
        for job in self.jobs:
            self.variant.scheduler.cancel(job)

    async def events(self):
        """(choice, text piece) as tokens arrive, until every choice has finished."""
        try:
            while any(c.finish is None for c in self.choices):
                index, event = await self.queue.get()
                choice = self.choices[index]
                was_done = choice.finish is not None
                try:
                    piece = choice.feed(event)
                except Exception as exc:  # turning this choice's tokens into text failed: it ends, alone
                    log.error("request %s: choice %d failed while assembling its text", self.id, index, exc_info=exc)
                    self.variant.scheduler.cancel(self.jobs[index])
                    piece = choice.feed(Finished("error", f"internal error while assembling the text of this "
                                                          f"request: {type(exc).__name__}: {exc}"))
                if isinstance(event, TokenEvent) and not was_done:
                    if self.first_token is None:
                        self.first_token = time.perf_counter()
                    self.server.metrics.token(self.variant)
                if choice.finish == "stop" and not was_done and not isinstance(event, Finished):
                    self.variant.scheduler.cancel(self.jobs[index])  # a stop string matched
                yield choice, piece
        finally:
            if any(c.finish is None for c in self.choices):  # the client went away mid-generation
                self.cancel()
                for choice in self.choices:
                    choice.finish = choice.finish or "cancelled"
            self.finish_log()

    def status(self) -> tuple[int, str]:
        """The worst (HTTP status, error) among the choices."""
        return max((c.error_status if c.finish == "error" else STATUS_OF.get(c.finish or "cancelled", 500), c.error)
                   for c in self.choices)

    def finish_log(self, status: int | None = None, error: str = "") -> None:
        if self.logged:
            return
        self.logged = True
        if status is None:
            status, error = self.status()
            if status == 504:
                error = error or f"timed out after {self.server.config.request_timeout:g} s"
        now = time.perf_counter()
        ttft = None if self.first_token is None else self.first_token - self.started
        latency = now - self.started
        self.server.metrics.finished(self.variant, self.endpoint, status, latency, ttft, self.prompt_tokens)
        self.server.record(RequestRecord(
            id=self.id, variant=self.variant.name, model=self.variant.spec.model, endpoint=self.endpoint,
            status=status, experiment=self.variant.experiment, user=self.user, error=error or None,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            latency_ms=latency * 1000, ttft_ms=None if ttft is None else ttft * 1000,
            prompt_text=self.prompt_text, completion_text="\n".join(c.text for c in self.choices),
            created=self.arrived))

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def failure(self) -> APIError | None:
        status, error = self.status()
        headers = {"X-Pocketlm-Variant": self.variant.name, "X-Request-Id": self.id}
        if status == 200:
            return None
        if status == 504:
            return APIError(504, f"generation timed out after {self.server.config.request_timeout:g} s",
                            type_="timeout_error", code="timeout", headers=headers)
        if status == 499:
            return APIError(499, "the request was cancelled", code="cancelled", headers=headers)
        if status < 500:
            return APIError(status, error, headers=headers)
        return APIError(status, error or "generation failed", type_="server_error", headers=headers)


async def until_done(request: Request, run: Run) -> None:
    """Consume a non-streamed run, cancelling it if the client disconnects while it waits."""
    async def consume():
        async for _ in run.events():
            pass

    task = asyncio.create_task(consume())
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            task.result()
            return
        if await request.is_disconnected():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def stream_end(run: Run, body, head: dict) -> list[str]:
    """A stream's last events: an error that cut it short, or the usage when asked for; then [DONE]."""
    lines = []
    if (failure := run.failure()) is not None and failure.status != 499:
        lines.append(sse(error_body(failure.message, failure.type, code=failure.code)))
    elif body.stream_options and body.stream_options.include_usage:
        lines.append(sse({**head, "choices": [], "usage": run.usage()}))
    return lines + ["data: [DONE]\n\n"]


# ---------------------------------------------------------------------------------------------
# log-prob payloads
# ---------------------------------------------------------------------------------------------
def _piece(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def chat_logprobs(tokenizer, tokens: list[TokenEvent]) -> dict:
    def entry(token, logprob):
        text = _piece(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.token, t.logprob),
                         "top_logprobs": [entry(i, lp) for i, lp in (t.top or [])]} for t in tokens]}


def _top_dict(tokenizer, top: list[tuple[int, float]]) -> dict[str, float]:
    """{text: log-prob}, most likely first; tokens that decode to the same text keep the higher value."""
    out: dict[str, float] = {}
    for token, logprob in top:
        out.setdefault(_piece(tokenizer, token), logprob)
    return out


def completion_logprobs(tokenizer, choice: Choice, echo: bool) -> dict:
    tokens, logprobs, tops = [], [], []
    if echo and choice.echo is not None:
        for token, lp, top in zip(choice.prompt_ids, choice.echo.logprobs, choice.echo.top):
            tokens.append(token)
            logprobs.append(lp)
            tops.append(None if top is None else _top_dict(tokenizer, top))
    for event in choice.tokens:
        tokens.append(event.token)
        logprobs.append(event.logprob)
        tops.append(_top_dict(tokenizer, event.top or []))
    pieces = [_piece(tokenizer, t) for t in tokens]
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
