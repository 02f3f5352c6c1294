"""`pocketlm eval-retrieval`: a retriever's run over a test collection, scored with trec_eval's measures."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import ConfigError
from ..hub import DEFAULT_EMBEDDER
from .bm25 import BM25
from .collection import Collection, read_beir, read_cranfield
from .dense import Dense, reciprocal_rank_fusion
from .measures import evaluate_run, write_run
from .search import RETRIEVERS


def load_collection(path: str | Path) -> Collection:
    """A BEIR-layout directory, or the Cranfield files themselves (cran.all.1400, cran.qry, cranqrel)."""
    path = Path(path)
    if (path / "cran.all.1400").is_file():
        return read_cranfield(path)
    return read_beir(path)


def document_text(doc: dict[str, str]) -> str:
    return f"{doc['title']}\n{doc['text']}" if doc["title"] else doc["text"]


def evaluate_retrieval(dataset: str | Path, retrievers: list[str] | tuple[str, ...] = ("bm25",), k: int = 100,
                       run_dir: str | Path | None = None, embedder: str = DEFAULT_EMBEDDER) -> dict:
    """Per retriever (bm25, dense: `embedder`'s cosine similarity, hybrid: the two fused by reciprocal
    rank): the mean measures over the judged queries, index and query times, and (with `run_dir`) its run
    file in TREC's format. The hybrid's times are the sum of its two retrievers'."""
    unknown = [r for r in retrievers if r not in RETRIEVERS]
    if unknown:
        raise ConfigError(f"unknown retriever {unknown[0]!r}; choose from {', '.join(RETRIEVERS)}")
    collection = load_collection(dataset)
    queries = collection.judged_queries()
    if not queries:
        raise ConfigError(f"{dataset}: no query has a relevant document in the judgements")
    ids = list(collection.corpus)
    texts = [document_text(collection.corpus[i]) for i in ids]
    runs, times, results = {}, {}, {}
    for name in ("bm25", "dense"):
        if name in retrievers or "hybrid" in retrievers:
            started = time.perf_counter()
            retriever = BM25(ids, texts) if name == "bm25" else Dense(ids, texts, embedder)
            index_s = time.perf_counter() - started
            started = time.perf_counter()
            runs[name] = dict(zip(queries, retriever.search(list(queries.values()), k=k)))
            times[name] = (index_s, time.perf_counter() - started)
    if "hybrid" in retrievers:
        runs["hybrid"] = {q: reciprocal_rank_fusion([runs["bm25"][q], runs["dense"][q]], k=k) for q in queries}
        times["hybrid"] = tuple(a + b for a, b in zip(times["bm25"], times["dense"]))
    for name in retrievers:
        scores = evaluate_run(collection.qrels, runs[name])
        results[name] = {**scores["all"], "queries": len(queries), "documents": len(ids),
                         "index_s": round(times[name][0], 3), "search_s": round(times[name][1], 3)}
        if name != "bm25":
            results[name]["embedder"] = embedder
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            results[name]["run"] = str(write_run(runs[name], Path(run_dir) / f"{name}.trec", tag=name))
    return {"dataset": str(dataset), "k": k, "results": results}
