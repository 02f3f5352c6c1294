"""`pocketlm eval-retrieval`: a retriever's run over a test collection, scored with trec_eval's measures."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import ConfigError
from .bm25 import BM25
from .collection import Collection, read_beir, read_cranfield
from .measures import evaluate_run, write_run

RETRIEVERS = ("bm25",)


def load_collection(path: str | Path) -> Collection:
    """A BEIR-layout directory, or the Cranfield files themselves (cran.all.1400, cran.qry, cranqrel)."""
    path = Path(path)
    if (path / "cran.all.1400").is_file():
        return read_cranfield(path)
    return read_beir(path)


def document_text(doc: dict[str, str]) -> str:
    return f"{doc['title']}\n{doc['text']}" if doc["title"] else doc["text"]


def evaluate_retrieval(dataset: str | Path, retrievers: list[str] | tuple[str, ...] = RETRIEVERS, k: int = 100,
                       run_dir: str | Path | None = None) -> dict:
    """Per retriever: the mean measures over the judged queries, index and query times, and (with
    `run_dir`) its run file in TREC's format."""
    unknown = [r for r in retrievers if r not in RETRIEVERS]
    if unknown:
        raise ConfigError(f"unknown retriever {unknown[0]!r}; choose from {', '.join(RETRIEVERS)}")
    collection = load_collection(dataset)
    queries = collection.judged_queries()
    if not queries:
        raise ConfigError(f"{dataset}: no query has a relevant document in the judgements")
    ids = list(collection.corpus)
    results = {}
    for name in retrievers:
        started = time.perf_counter()
        retriever = BM25(ids, [document_text(collection.corpus[i]) for i in ids])
        index_s = time.perf_counter() - started
        started = time.perf_counter()
        run = dict(zip(queries, retriever.search(list(queries.values()), k=k)))
        search_s = time.perf_counter() - started
        scores = evaluate_run(collection.qrels, run)
        results[name] = {**scores["all"], "queries": len(queries), "documents": len(ids), "index_s": round(index_s, 3),
                         "search_s": round(search_s, 3)}
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            results[name]["run"] = str(write_run(run, Path(run_dir) / f"{name}.trec", tag=name))
    return {"dataset": str(dataset), "k": k, "results": results}
