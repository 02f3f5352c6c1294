"""Searching an index: BM25 over its passages, cosine similarity over its stored vectors, or both fused by
reciprocal rank. Results are passages (with their source and offsets) or, for evaluation, documents scored
by their best passage (MaxP, as passage-level retrieval of long documents is usually scored)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .bm25 import BM25
from .dense import reciprocal_rank_fusion
from .index import Index, passage_text
from .measures import ranking

RETRIEVERS = ("bm25", "dense", "hybrid")


@dataclass
class Passage:
    number: int  # its place in the results, from 1: the [n] an answer cites
    chunk: int
    doc_id: str
    source: str
    title: str
    start: int
    end: int
    text: str
    score: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Searcher:
    """Reads the index's passages once; `search` and `search_documents` answer queries from them."""

    def __init__(self, index: Index, retriever: str = "hybrid"):
        if retriever not in RETRIEVERS:
            raise ConfigError(f"unknown retriever {retriever!r}; choose from {', '.join(RETRIEVERS)}")
        self.index, self.retriever = index, retriever
        chunks = index.chunks()
        if not chunks:
            raise ConfigError(f"{index.directory}: the index is empty; add documents with `pocketlm index add`")
        self.ids = [str(c["id"]) for c in chunks]
        self.doc_of = {str(c["id"]): c["doc_id"] for c in chunks}
        self.rows = np.array([c["row"] for c in chunks])
        self.bm25 = BM25(self.ids, [passage_text(c["title"], c["text"]) for c in chunks]) if retriever != "dense" else None
        self.vectors = index.vectors() if retriever != "bm25" else None

    def _runs(self, queries: list[str], k: int) -> list[dict[str, float]]:
        """Each query's top k passages (chunk id -> score)."""
        k = min(k, len(self.ids))
        sparse = self.bm25.search(queries, k) if self.bm25 is not None else None
        dense = None
        if self.vectors is not None:
            scores = (self.index.embed(queries) @ np.asarray(self.vectors).T)[:, self.rows]
            # the k best of each row without sorting all of them (their order is `ranking`'s to give)
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(
                np.arange(scores.shape[1]), (len(queries), 1))
            dense = [{self.ids[i]: float(row[i]) for i in order} for row, order in zip(scores, top)]
        if self.retriever == "bm25":
            return sparse
        if self.retriever == "dense":
            return dense
        return [reciprocal_rank_fusion([s, d], k=k) for s, d in zip(sparse, dense)]

    def search(self, query: str, k: int = 4) -> list[Passage]:
        if not query.strip():
            raise ConfigError("the query is empty")
        run = self._runs([query], k)[0]
        ordered = ranking(run)
        chunks = self.index.chunks([int(i) for i in ordered])
        return [Passage(n, c["id"], c["doc_id"], c["source"], c["title"], c["start"], c["end"], c["text"], run[str(c["id"])])
                for n, c in enumerate(chunks, 1)]

    def search_documents(self, queries: list[str], k: int = 100) -> list[dict[str, float]]:
        """Each query's top k documents, a document scoring as its best passage; passages are retrieved
        five deep per document wanted so that a document's several passages do not crowd out others."""
        runs = []
        for run in self._runs(queries, k * 5):
            documents: dict[str, float] = {}
            for chunk in ranking(run):
                documents.setdefault(self.doc_of[chunk], run[chunk])
            runs.append(dict(list(documents.items())[:k]))
        return runs
