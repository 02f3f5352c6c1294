"""`pocketlm eval-retrieval`: a retriever's run over a test collection, scored with trec_eval's measures."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import ConfigError
from ..hub import DEFAULT_EMBEDDER
from .bm25 import BM25
from .collection import Collection, Qrels, judged, read_beir, read_cranfield, read_qrels, read_queries
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


def _check_retrievers(retrievers) -> None:
    unknown = [r for r in retrievers if r not in RETRIEVERS]
    if unknown:
        raise ConfigError(f"unknown retriever {unknown[0]!r}; choose from {', '.join(RETRIEVERS)}")


def _judged(queries: dict[str, str], qrels: Qrels, source) -> dict[str, str]:
    found = judged(queries, qrels)
    if not found:
        raise ConfigError(f"{source}: no query has a relevant document in the judgements")
    return found


def _score(name: str, qrels: Qrels, run: dict, run_dir, extra: dict) -> dict:
    result = {**evaluate_run(qrels, run)["all"], **extra}
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        result["run"] = str(write_run(run, Path(run_dir) / f"{name}.trec", tag=name))
    return result


def evaluate_index(index_dir: str | Path, queries_file: str | Path, qrels_file: str | Path,
                   retrievers: list[str] | tuple[str, ...] = ("bm25",), k: int = 100, run_dir: str | Path | None = None,
                   embedder: str | None = None) -> dict:
    """Retrievers over an index (`pocketlm index build`) scored against TREC qrels naming its document ids
    (a jsonl record's `_id`, or a file's path under the folder indexed); a document scores as its best
    passage. `embedder`, when given, must be the index's."""
    from .index import Index
    from .search import Searcher

    _check_retrievers(retrievers)
    index = Index.open(index_dir, embedder)
    qrels = read_qrels(Path(qrels_file))
    queries = _judged(read_queries(Path(queries_file)), qrels, qrels_file)
    stats, results = index.stats(), {}
    for name in retrievers:
        started = time.perf_counter()
        searcher = Searcher(index, name)
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        run = dict(zip(queries, searcher.search_documents(list(queries.values()), k=k)))
        results[name] = _score(name, qrels, run, run_dir, {
            "queries": len(queries), "documents": stats["documents"], "chunks": stats["chunks"],
            "index_s": round(load_s, 3), "search_s": round(time.perf_counter() - started, 3)})
        if name != "bm25":
            results[name]["embedder"] = index.meta["embedder"]
    return {"dataset": str(index_dir), "k": k, "results": results}


def evaluate_retrieval(dataset: str | Path, retrievers: list[str] | tuple[str, ...] = ("bm25",), k: int = 100,
                       run_dir: str | Path | None = None, embedder: str = DEFAULT_EMBEDDER) -> dict:
    """Per retriever (bm25, dense: `embedder`'s cosine similarity, hybrid: the two fused by reciprocal
    rank): the mean measures over the judged queries, index and query times, and (with `run_dir`) its run
    file in TREC's format. The hybrid's times are the sum of its two retrievers'."""
    _check_retrievers(retrievers)
    collection = load_collection(dataset)
    queries = _judged(collection.queries, collection.qrels, dataset)
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
        results[name] = _score(name, collection.qrels, runs[name], run_dir, {
            "queries": len(queries), "documents": len(ids),
            "index_s": round(times[name][0], 3), "search_s": round(times[name][1], 3)})
        if name != "bm25":
            results[name]["embedder"] = embedder
    return {"dataset": str(dataset), "k": k, "results": results}
