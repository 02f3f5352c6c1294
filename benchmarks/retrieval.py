"""Retrieval on Cranfield (../shared/data/cranfield, 1,400 abstracts, 225 queries): trec_eval's measures for
each retriever, index build time, and query latency p50 / p99 (one query at a time, every query, --repeats
times). So far the retriever is BM25 (bm25s); the dense and hybrid retrievers of issue 29 join it here.

    .venv/bin/python benchmarks/retrieval.py [--repeats 5] [--json out.json]
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
    ap.add_argument("--json")
    args = ap.parse_args()

    from benchmarks.structured import _machine
    from pocketlm.retrieval.bm25 import BM25
    from pocketlm.retrieval.evaluate import document_text, evaluate_retrieval, load_collection

    scores = evaluate_retrieval(args.dataset)["results"]
    collection = load_collection(args.dataset)
    ids = list(collection.corpus)
    builds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        bm25 = BM25(ids, [document_text(collection.corpus[i]) for i in ids])
        builds.append(time.perf_counter() - started)
    latencies = []
    for _ in range(args.repeats):
        for text in collection.queries.values():
            started = time.perf_counter()
            bm25.search([text], k=100)
            latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    result = {"machine": _machine(), "dataset": args.dataset, "documents": len(ids),
              "queries": len(collection.queries),
              "bm25": {**{k: round(v, 4) for k, v in scores["bm25"].items() if isinstance(v, float)},
                       "index_s_median": round(statistics.median(builds), 3),
                       "query_ms_p50": round(latencies[len(latencies) // 2], 3),
                       "query_ms_p99": round(latencies[int(len(latencies) * 0.99)], 3)}}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
