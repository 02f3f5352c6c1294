"""The HTTP side: an OpenAI-compatible API over the schedulers, plus feedback, metrics and the web page.

Every failure answers in OpenAI's JSON error shape with a 4xx status when the client caused it; the
handlers never let an exception escape as a bare 500 page.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import SamplingParams, eos_ids
from ..errors import ConfigError, PocketLMError
from .config import ServeConfig
from .generation import (
    Run,
    chat_logprobs,
    completion_logprobs,
    sse,
    stream_end,
    until_done,
)
from .protocol import (
    CHAT_STREAM,
    COMPLETION_STREAM,
    APIError,
    ArenaVoteRequest,
    ArenaVoteResponse,
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    FeedbackRequest,
    FeedbackResponse,
    Health,
    ModelList,
    documented,
)
from .pipelines import pipeline_runs, report_path
from .rag import Library, cited, sources
from .report import ab_report
from .server import Server
from .structured import CallStream, ChatInput, chat_input
from .variants import Variant, load_variant

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("pocketlm.serve")


# ---------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------
def create_app(config: ServeConfig, variants: list[Variant] | None = None) -> FastAPI:
    """The FastAPI app for a config; `variants` are loaded from it unless given. The indexes variants name
    are opened first (a missing one is a ConfigError before any model loads)."""
    library = Library(config)
    try:
        if variants is None:
            variants = [load_variant(spec, config) for spec in config.models]
            if config.experiment:
                variants += [load_variant(spec, config, config.experiment.name) for spec in config.experiment.variants]
        for variant in variants:
            if variant.spec.index is not None and not variant.tokenizer.chat_template:
                raise ConfigError(f"variant {variant.name}: {variant.spec.model} has no chat template; answering "
                                  f"from an index needs an instruction-tuned model")
        names = {v.name for v in variants} | ({config.experiment.name} if config.experiment else set())
        clash = sorted(set(library.embedders) & names)
        if clash:
            raise ConfigError(f"the embedding model {clash[0]!r} has the name of a variant; rename the variant")
    except BaseException:
        library.close()
        raise
    server = Server(config, variants, library)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    app = FastAPI(title="pocketlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(GuardMiddleware, max_body=config.max_body_bytes, keys=server.keys)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        error = exc.errors()[0]
        if error.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
                            ).response()
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        if loc[-1:] == ["[key]"] and len(loc) >= 2:  # a mapping's key: only logit_bias has a key pattern
            field = ".".join(loc[:-2])
            return APIError(400, f"{field}: the key {loc[-2][:40]!r} is not a token id (its keys are token ids "
                                 f"written as strings, such as \"42\")", param=field).response()
        where = ".".join(loc) or "body"
        return APIError(400, f"{where}: {error.get('msg')}", param=where).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), code=str(exc.status_code)).response()

    @app.exception_handler(PocketLMError)
    async def pocketlm_error(request, exc: PocketLMError):
        return APIError(400, str(exc)).response()

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):  # a fault in a route itself, before any request id exists
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error").response()

    @app.get("/health", responses=documented(Health))
    async def health():
        return {"status": "ok", "models": list(server.variants), "experiment": server.experiment,
                "queue_depth": sum(v.scheduler.queue_depth for v in server.variants.values()),
                "active_sequences": sum(v.scheduler.active for v in server.variants.values())}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses=documented(content={"text/plain": {"schema": {"type": "string"}}}))
    async def metrics():
        """Prometheus' text exposition format."""
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=documented(ModelList))
    async def models():
        data = [{"id": v.name, "object": "model", "created": 0, "owned_by": "pocketlm", "model": v.spec.model,
                 "adapter": v.spec.adapter, "experiment": v.experiment, "weight": v.spec.weight,
                 "context_length": v.scheduler.context, **({"index": v.spec.index} if v.spec.index else {})}
                for v in server.variants.values()]
        if server.experiment:
            data.append({"id": server.experiment, "object": "model", "created": 0, "owned_by": "pocketlm",
                         "variants": [v.name for v in server.arms]})
        data += [{"id": e.name, "object": "model", "created": 0, "owned_by": "pocketlm", "task": "embedding",
                  "dimensions": e.dimension, "max_input_tokens": e.max_tokens, "model": e.ref}
                 for e in server.library.embedders.values()]
        return {"object": "list", "data": data}

    def user_of(request: Request, body_user: str | None) -> str | None:
        return request.headers.get("x-user") or body_user

    def job_args(body, max_new: int, logprobs: int | None, echo: int | None, variant: Variant,
                 grammar=None) -> dict:
        return dict(max_new_tokens=max_new,
                    sampling=SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                            seed=body.seed, ignore_eos=body.ignore_eos, grammar=grammar),
                    presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                    logit_bias=body.bias(), logprobs=logprobs, echo_logprobs=echo,
                    stop_ids=frozenset(eos_ids(variant.model, variant.tokenizer)),
                    timeout=server.config.request_timeout)

    def headers(run: Run) -> dict[str, str]:
        return {"X-Pocketlm-Variant": run.variant.name, "X-Request-Id": run.id}

    @app.post("/v1/chat/completions", responses=documented(ChatCompletion, CHAT_STREAM))
    async def chat_completions(request: Request, body: ChatRequest):
        variant = server.route(body.model, user_of(request, body.user))
        max_new = server.max_tokens(body.wanted_tokens(), server.config.default_max_tokens)
        passages = None
        if variant.name in server.library.shelves:  # answered from documents: retrieval on its own thread
            started = time.perf_counter()
            prompt, passages = await server.library.prompt(body, variant, max_new)
            server.metrics.retrieved(variant, time.perf_counter() - started)
            given = ChatInput(prompt, None, calls=False)
        else:
            given = await run_in_threadpool(chat_input, body, variant)  # a new grammar takes milliseconds to build
        top = (body.top_logprobs or 0) if body.logprobs else None
        run = Run(server, variant, "chat", [given.prompt] * body.n,
                  job_args(body, max_new, top, None, variant, given.grammar),
                  body.stop, user_of(request, body.user), "\n".join(m.text() for m in body.messages))
        run.start()
        extra = {"variant": variant.name, "experiment": variant.experiment}
        if body.stream:
            return StreamingResponse(chat_stream(run, body, extra, given.calls, passages),
                                     media_type="text/event-stream", headers=headers(run))
        await until_done(request, run)
        if (failure := run.failure()) is not None:
            return failure.response()
        choices = []
        for c in run.choices:
            message = {"role": "assistant", "content": c.text}
            if given.calls:
                message = CallStream(c.text).message()
            choices.append({"index": c.index, "message": message,
                            "logprobs": chat_logprobs(variant.tokenizer, c.tokens) if body.logprobs else None,
                            "finish_reason": finish_reason(c.finish, message),
                            **({"cited": cited(c.text, passages)} if passages is not None else {})})
        if passages is not None:
            extra["sources"] = sources(passages)
        return JSONResponse({"id": run.id, "object": "chat.completion", "created": run.created, "model": body.model,
                             "choices": choices, "usage": run.usage(), **extra}, headers=headers(run))

    def finish_reason(finish: str, message: dict) -> str:
        return "tool_calls" if finish == "stop" and message.get("tool_calls") else finish

    async def chat_stream(run: Run, body: ChatRequest, extra: dict, calls: bool, passages=None):
        """OpenAI's chunks; from a variant with an index, the first chunk also carries `sources` and each
        choice's last chunk (the one with its finish_reason) the numbers it `cited`."""
        head = {"id": run.id, "object": "chat.completion.chunk", "created": run.created, "model": body.model, **extra}
        for choice in run.choices:
            first = {"sources": sources(passages)} if passages is not None and choice.index == 0 else {}
            yield sse({**head, "choices": [{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}], **first})
        sent = [0] * len(run.choices)
        closed = [False] * len(run.choices)
        readers = [CallStream() for _ in run.choices] if calls else None
        async for choice, piece in run.events():
            if closed[choice.index]:  # an event after its end (a stop string matched, then the job was cancelled)
                continue
            ended = choice.finish in ("stop", "length")
            if readers is None:
                deltas = [{"content": piece}] if piece else []
            else:
                deltas = readers[choice.index].feed(piece, final=ended)
            new_tokens = choice.tokens[sent[choice.index]:]
            sent[choice.index] = len(choice.tokens)
            if body.logprobs and new_tokens and not deltas:
                deltas = [{"content": ""}]
            for i, delta in enumerate(deltas):  # the new tokens' log-probs go with the first delta
                logprobs = chat_logprobs(run.variant.tokenizer, new_tokens) if body.logprobs and i == 0 else None
                yield sse({**head, "choices": [{"index": choice.index, "delta": delta,
                                                "logprobs": logprobs, "finish_reason": None}]})
            if ended:
                closed[choice.index] = True
                message = readers[choice.index].message() if readers else {}
                citing = {"cited": cited(choice.text, passages)} if passages is not None else {}
                yield sse({**head, "choices": [{"index": choice.index, "delta": {}, "logprobs": None,
                                                "finish_reason": finish_reason(choice.finish, message), **citing}]})
        for line in stream_end(run, body, head):
            yield line

    @app.post("/v1/completions", responses=documented(Completion, COMPLETION_STREAM))
    async def completions(request: Request, body: CompletionRequest):
        variant = server.route(body.model, user_of(request, body.user))
        tokenizer = variant.tokenizer
        prompts, texts = [], []
        for prompt in body.prompts():
            if isinstance(prompt, str):
                prompts.append(tokenizer.encode(prompt))
                texts.append(prompt)
            else:
                bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
                if bad:
                    raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                                   param="prompt")
                prompts.append(list(prompt))
                texts.append(tokenizer.decode(prompt))
        max_new = server.max_tokens(body.max_tokens, 16)
        echo_lp = body.logprobs if body.echo and body.logprobs is not None else None
        prompts = [ids for ids in prompts for _ in range(body.n)]
        texts = [text for text in texts for _ in range(body.n)]
        run = Run(server, variant, "completions", prompts, job_args(body, max_new, body.logprobs, echo_lp, variant),
                  body.stop, user_of(request, body.user), "\n".join(dict.fromkeys(texts)))
        run.start()
        extra = {"variant": variant.name, "experiment": variant.experiment}
        if body.stream:
            return StreamingResponse(completion_stream(run, body, texts, extra), media_type="text/event-stream",
                                     headers=headers(run))
        await until_done(request, run)
        if (failure := run.failure()) is not None:
            return failure.response()
        choices = []
        for choice, text in zip(run.choices, texts):
            prefix = text if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(tokenizer, choice, body.echo)
            choices.append({"index": choice.index, "text": prefix + choice.text, "logprobs": logprobs,
                            "finish_reason": choice.finish})
        return JSONResponse({"id": run.id, "object": "text_completion", "created": run.created, "model": body.model,
                             "choices": choices, "usage": run.usage(), **extra}, headers=headers(run))

    async def completion_stream(run: Run, body: CompletionRequest, texts: list[str], extra: dict):
        head = {"id": run.id, "object": "text_completion", "created": run.created, "model": body.model, **extra}
        if body.echo:
            for choice, text in zip(run.choices, texts):
                yield sse({**head, "choices": [{"index": choice.index, "text": text, "logprobs": None,
                                                "finish_reason": None}]})
        async for choice, piece in run.events():
            if piece:
                yield sse({**head, "choices": [{"index": choice.index, "text": piece, "logprobs": None,
                                                "finish_reason": None}]})
            if choice.finish in ("stop", "length"):
                yield sse({**head, "choices": [{"index": choice.index, "text": "", "logprobs": None,
                                                "finish_reason": choice.finish}]})
        for line in stream_end(run, body, head):
            yield line

    @app.post("/v1/embeddings", responses=documented(EmbeddingList))
    async def embeddings(body: EmbeddingRequest):
        """OpenAI's embeddings: unit vectors (sentence-transformers' normalized encode) of each input, as
        floats or as base64 of little-endian float32."""
        answer = await server.library.embeddings(body)
        server.metrics.embeddings(answer["model"], len(answer["data"]), answer["usage"]["prompt_tokens"])
        return JSONResponse(answer)

    @app.post("/v1/feedback", responses=documented(FeedbackResponse))
    async def feedback(body: FeedbackRequest):
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(server._writer, server.log.variant_of, body.id)
        if found is None:
            raise APIError(404, f"no response with id {body.id!r} is in the request log", param="id",
                           code="response_not_found")
        variant_name, experiment = found
        feedback_id = await loop.run_in_executor(server._writer, server.log.add_feedback, body.id, body.score(),
                                                 body.comment)
        variant = server.variants.get(variant_name)
        server.metrics.vote(variant_name, variant.spec.model if variant else "", body.score())
        return {"id": feedback_id, "object": "feedback", "response_id": body.id, "variant": variant_name,
                "experiment": experiment, "rating": "up" if body.score() > 0 else "down"}

    @app.post("/v1/arena/votes", responses=documented(ArenaVoteResponse))
    async def arena_vote(body: ArenaVoteRequest):
        loop = asyncio.get_running_loop()
        variants = {}
        for side in ("left", "right"):
            found = await loop.run_in_executor(server._writer, server.log.variant_of, getattr(body, side))
            if found is None:
                raise APIError(404, f"no response with id {getattr(body, side)!r} is in the request log", param=side,
                               code="response_not_found")
            variants[side] = found[0]
        if body.left == body.right:
            raise APIError(400, "left and right are the same response; an arena vote compares two answers",
                           param="right")
        vote_id = await loop.run_in_executor(server._writer, server.log.add_arena_vote, body.left, body.right,
                                             body.winner)
        return {"id": vote_id, "object": "arena.vote", "left_variant": variants["left"],
                "right_variant": variants["right"], "winner": body.winner}

    @app.get("/api/stats", responses=documented())
    async def stats():
        loop = asyncio.get_running_loop()
        try:
            report = await loop.run_in_executor(server._writer, ab_report, server.log)
        except PocketLMError:  # nothing logged yet: the live figures alone
            report = None
        live = {name: {"queue_depth": v.scheduler.queue_depth, "active_sequences": v.scheduler.active,
                       "model": v.spec.model, "experiment": v.experiment} for name, v in server.variants.items()}
        return {"report": report, "live": live, "experiment": server.experiment}

    @app.get("/api/pipelines", responses=documented())
    async def pipelines():
        return {"runs": pipeline_runs(server.config.pipelines)}

    @app.get("/pipelines/{run}/report", include_in_schema=False)
    async def pipeline_report(run: str):
        path = report_path(server.config.pipelines, run)
        if path is None:
            raise APIError(404, f"no pipeline run {run!r} with a report under this server's `pipelines:` folder",
                           param="run")
        return FileResponse(path, media_type="text/html")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# A body over the limit is read and thrown away, up to these bounds, before the 413 is sent: a client that
# writes its whole body before it reads (Python's urllib, requests) sees its connection reset otherwise.
DRAIN_BYTES = 256 * 2**20
DRAIN_SECONDS = 30.0


class GuardMiddleware:
    """Refuses, before any route runs: a body over the size limit (413) and, when API keys are set, a
    /v1 or /api request without a valid `Authorization: Bearer KEY` (401). The body is read here so
    a chunked upload without Content-Length is held to the same limit."""

    def __init__(self, app, max_body: int, keys: set[str]):
        self.app, self.max_body, self.keys = app, max_body, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.keys and (path.startswith("/v1") or path.startswith("/api")):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or key.strip() not in self.keys:
                message = "missing API key: send 'Authorization: Bearer KEY'" if not auth else "the API key is not valid"
                return await APIError(401, message, code="invalid_api_key").response()(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            # a client that asked to hear first (Expect: 100-continue) has sent nothing: answer at once
            waits = headers.get(b"expect", b"").lower() == b"100-continue"
            return await self._too_large(scope, receive, send, more_body=not waits)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self._too_large(scope, receive, send, more_body=message.get("more_body", False))
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, more_body: bool):
        """413, after reading what the client is still sending (up to DRAIN_BYTES and DRAIN_SECONDS)."""
        loop = asyncio.get_running_loop()
        deadline, drained = loop.time() + DRAIN_SECONDS, 0
        while more_body and drained < DRAIN_BYTES:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                break
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))
            more_body = message.get("more_body", False)
        error = APIError(413, f"the request body is over this server's limit of {self.max_body} bytes",
                         code="request_too_large")
        return await error.response()(scope, receive, send)
