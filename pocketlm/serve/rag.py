"""Answering from documents: variants whose spec names an index, and the embedding models of /v1/embeddings.

A variant with `index:` answers each chat request from that index: the last user message is the question,
the passages it retrieves go before it, numbered (pocketlm.retrieval.answer's prompt, the one `pocketlm ask`
uses), and the response names them as `sources`, with the numbers each answer cites.

Everything that touches an index or an embedding model runs on one worker thread of its own (`Library.run`):
an index's SQLite connection belongs to the thread that opened it, and a fast tokenizer must not be used
by two threads at once. The event loop only awaits it.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ContextLengthError
from ..retrieval.answer import cited, fit_passages
from ..retrieval.dense import embedder_path, load_embedder
from ..retrieval.index import Index, embedder_name
from ..retrieval.search import Passage, Searcher
from .config import ServeConfig, VariantSpec, model_name
from .protocol import APIError, ChatRequest, EmbeddingRequest


@dataclass
class Embedder:
    """An embedding model as /v1/embeddings serves it."""
    name: str  # what requests name it by
    ref: str  # the registry name or folder it was loaded from
    model: object  # a SentenceTransformer
    tokenizer: object  # its fast tokenizer, untruncated: counts each input's tokens
    dimension: int
    max_tokens: int  # the most tokens an input may have (special tokens included); longer ones are refused

    def encode(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Unit vectors as sentence-transformers' encode(normalize_embeddings=True) gives them, and the number
        of tokens read; an input longer than the model reads (which it would cut silently) is an APIError."""
        counts = [len(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        longest = max(range(len(counts)), key=counts.__getitem__)
        if counts[longest] > self.max_tokens:
            where = "input" if len(texts) == 1 else f"input[{longest}]"
            raise APIError(400, f"{where} has {counts[longest]} tokens; {self.name} reads at most {self.max_tokens}: "
                                f"split it into shorter pieces", param="input", code="context_length_exceeded")
        vectors = self.model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False,
                                    convert_to_numpy=True)
        return np.ascontiguousarray(vectors, dtype=np.float32), sum(counts)


def _embedder(ref: str, model) -> Embedder:
    from ..retrieval.chunking import untruncated

    return Embedder(model_name(ref), ref, model, untruncated(model.tokenizer.backend_tokenizer),
                    int(model.get_embedding_dimension()), int(model.max_seq_length))


def _identity(ref: str) -> str:
    """What tells two embedders apart: the folder a registry name or a path comes to (a hub name as it is)."""
    try:
        path = Path(embedder_path(ref))  # a registry name: its cached folder (fetched now if it is not there)
    except Exception:  # not fetched: loading it says why
        return ref
    return str(path.resolve()) if path.exists() else ref


@dataclass
class Shelf:
    """A variant's index, opened once: its searcher and how many passages to fetch."""
    index: Index
    searcher: Searcher
    k: int


class Library:
    """The indexes of the variants that name one and the embedding models served, with the one thread that
    uses them. Opening is done at construction: a missing or unreadable index is a ConfigError (one line)."""

    def __init__(self, config: ServeConfig):
        self.shelves: dict[str, Shelf] = {}
        self.embedders: dict[str, Embedder] = {}
        wanted = [spec for spec in config.variants() if spec.index is not None]
        self._executor = None
        if not wanted and config.embedder is None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pocketlm-retrieval")
        try:
            self._executor.submit(self._open, wanted, config.embedder).result()
        except BaseException:
            self.close()
            raise

    def _open(self, specs: list[VariantSpec], embedder: str | None) -> None:
        loaded: dict[str, tuple[str, object]] = {}  # an embedder's folder -> (how it was named, its model)
        for spec in specs:
            try:
                index = Index.open(spec.index)
                searcher = Searcher(index, spec.retriever)
                ref = index.meta["embedder"]
                identity = _identity(ref)
                if identity not in loaded:
                    loaded[identity] = (ref, index.embedder())  # loaded now: a request never waits for it
                else:  # the same model as another index's: one copy in memory (used from this thread only)
                    index.share_embedder(loaded[identity][1])
            except ConfigError as e:
                raise ConfigError(f"variant {spec.name}: {e}") from None
            except (OSError, ValueError, KeyError, sqlite3.Error) as e:
                raise ConfigError(f"variant {spec.name}: the index {spec.index} cannot be opened "
                                  f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
            self.shelves[spec.name] = Shelf(index, searcher, spec.k)
        if embedder is not None and _identity(embedder) not in loaded:
            loaded[_identity(embedder)] = (embedder_name(embedder), load_embedder(embedder))
        for ref, model in loaded.values():
            served = _embedder(ref, model)
            other = self.embedders.get(served.name)
            if other is not None:
                raise ConfigError(f"two embedding models would both be served as {served.name!r} ({other.ref} and "
                                  f"{ref}); rebuild one index with the other's embedder")
            self.embedders[served.name] = served

    async def run(self, function, *args):
        """`function(*args)` on the retrieval thread, awaited."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def close(self) -> None:
        if self._executor is None:
            return
        for shelf in self.shelves.values():
            self._executor.submit(shelf.index.close)
        self._executor.shutdown(wait=True)
        self._executor = None

    # -- chat ------------------------------------------------------------------------------------
    async def prompt(self, body: ChatRequest, variant, reserve: int) -> tuple[list[int], list[Passage]]:
        """The prompt for a chat request to a variant with an index, and the passages in it."""
        question, history = conversation(body, variant.name)
        shelf = self.shelves[variant.name]
        try:
            return await self.run(_retrieve, shelf, question, history, variant.tokenizer, variant.scheduler.context,
                                  reserve)
        except ContextLengthError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None

    # -- embeddings ------------------------------------------------------------------------------
    async def embeddings(self, body: EmbeddingRequest) -> dict:
        embedder = self.embedders.get(body.model)
        if embedder is None:
            served = ", ".join(self.embedders) or "none (name one as `embedder:` in serve.yaml)"
            raise APIError(404, f"the model {body.model!r} is not an embedding model of this server; it serves: "
                                f"{served}", param="model", code="model_not_found")
        texts = body.texts()
        if body.dimensions is not None and body.dimensions != embedder.dimension:
            raise APIError(400, f"dimensions is {body.dimensions} but {embedder.name} gives {embedder.dimension}-"
                                f"dimensional vectors and does not shorten them; leave dimensions out",
                           param="dimensions")
        vectors, tokens = await self.run(embedder.encode, texts)
        if body.encoding_format == "base64":
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            data = vectors.tolist()
        return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                "model": embedder.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _retrieve(shelf: Shelf, question: str, history: list[dict], tokenizer, context: int,
              reserve: int) -> tuple[list[int], list[Passage]]:
    passages = shelf.searcher.search(question, shelf.k)
    return fit_passages(tokenizer, question, passages, context, reserve, history)


def conversation(body: ChatRequest, name: str) -> tuple[str, list[dict]]:
    """The question (the last message, the user's) and the turns before it. System messages are left out: the
    instructions to answer from the passages take their place."""
    if body.tools or (body.response_format is not None and body.response_format.type != "text"):
        param = "tools" if body.tools else "response_format"
        raise APIError(400, f"{param}: {name} answers from documents and does not take {param}; ask a model "
                            f"without an index", param=param)
    last = body.messages[-1]
    if last.role != "user":
        raise APIError(400, f"messages: {name} answers from documents, and the last message is the question: it "
                            f"must be the user's, not {last.role!r}", param="messages")
    question = last.text().strip()
    if not question:
        raise APIError(400, "messages: the last user message is empty; ask a question", param="messages")
    history = []
    for message in body.messages[:-1]:
        if message.role in ("system", "developer"):
            continue
        if message.role == "tool" or message.tool_calls:
            raise APIError(400, f"messages: {name} answers from documents and takes no tool calls or results",
                           param="messages")
        history.append({"role": message.role, "content": message.text()})
    return question, history


def sources(passages: list[Passage]) -> list[dict]:
    """The passages as a response's `sources`."""
    return [p.as_dict() for p in passages]


__all__ = ["Embedder", "Library", "cited", "conversation", "sources"]
