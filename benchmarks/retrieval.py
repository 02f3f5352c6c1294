"""Retrieval on Cranfield (../shared/data/cranfield, 1,400 abstracts, 225 queries): trec_eval's measures for
each retriever (BM25 through bm25s; dense: all-MiniLM-L6-v2's cosine similarity; hybrid: the two fused by
reciprocal rank), index build time, and query latency p50 / p99 (one query at a time, every query,
--repeats times; the hybrid's is its two retrievers' and the fusion). Then the same collection through
`pocketlm index build` (its corpus.jsonl, chunked): build time, the measures over the index (a document
scores as its best passage), and the latency of one `ask`-sized search (top 4 passages, hybrid).

    .venv/bin/python benchmarks/retrieval.py [--repeats 5] [--no-index] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CRANFIELD = Path(__file__).resolve().parents[2] / "shared" / "data" / "cranfield"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=str(CRANFIELD))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-index", action="store_true", help="skip the index's figures")
    ap.add_argument("--json")
    args = ap.parse_args()

    from benchmarks.structured import _machine
    from pocketlm.retrieval.bm25 import BM25
    from pocketlm.retrieval.dense import Dense, reciprocal_rank_fusion
    from pocketlm.retrieval.evaluate import document_text, evaluate_retrieval, load_collection

    scores = evaluate_retrieval(args.dataset, ["bm25", "dense", "hybrid"])["results"]
    collection = load_collection(args.dataset)
    ids = list(collection.corpus)
    texts = [document_text(collection.corpus[i]) for i in ids]
    builds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        bm25 = BM25(ids, texts)
        builds.append(time.perf_counter() - started)
    dense = Dense(ids, texts)  # its build is the evaluation's (index_s): one build, about a minute
    latencies: dict[str, list[float]] = {"bm25": [], "dense": [], "hybrid": []}
    for _ in range(args.repeats):
        for text in collection.queries.values():
            started = time.perf_counter()
            sparse = bm25.search([text], k=100)[0]
            middle = time.perf_counter()
            semantic = dense.search([text], k=100)[0]
            end = time.perf_counter()
            reciprocal_rank_fusion([sparse, semantic], k=100)
            latencies["bm25"].append((middle - started) * 1000)
            latencies["dense"].append((end - middle) * 1000)
            latencies["hybrid"].append((time.perf_counter() - started) * 1000)
    result = {"machine": _machine(), "dataset": args.dataset, "documents": len(ids), "queries": len(collection.queries)}
    for name, measured in scores.items():
        times = sorted(latencies[name])
        result[name] = {**{k: round(v, 4) for k, v in measured.items() if isinstance(v, float)},
                        "query_ms_p50": round(times[len(times) // 2], 3),
                        "query_ms_p99": round(times[int(len(times) * 0.99)], 3)}
    result["bm25"]["index_s_median"] = round(statistics.median(builds), 3)
    if not args.no_index:
        result["index"] = index_figures(collection, dense.model, args.repeats)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def index_figures(collection, embedder, repeats: int) -> dict:
    import tempfile

    from pocketlm.retrieval.collection import write_beir
    from pocketlm.retrieval.evaluate import evaluate_index
    from pocketlm.retrieval.index import Index
    from pocketlm.retrieval.search import Searcher

    with tempfile.TemporaryDirectory() as tmp:
        beir = write_beir(collection, Path(tmp) / "beir")
        index = Index.create(Path(tmp) / "index")
        index.share_embedder(embedder)
        build = index.update([beir / "corpus.jsonl"])
        figures = {"chunks": index.stats()["chunks"], "build_s": round(build.seconds, 1)}
        scores = evaluate_index(Path(tmp) / "index", beir / "queries.jsonl", beir / "qrels" / "test.tsv",
                                ["bm25", "dense", "hybrid"])["results"]
        for name, measured in scores.items():
            figures[name] = {m: round(measured[m], 4) for m in ("ndcg@10", "recall@100", "map")}
        searcher = Searcher(index, "hybrid")
        times = []
        for _ in range(repeats):
            for text in collection.queries.values():
                started = time.perf_counter()
                searcher.search(text, 4)
                times.append((time.perf_counter() - started) * 1000)
        times.sort()
        figures["ask_search_ms_p50"] = round(times[len(times) // 2], 2)
        figures["ask_search_ms_p99"] = round(times[int(len(times) * 0.99)], 2)
        index.close()
    return figures


if __name__ == "__main__":
    main()
