"""trec_eval's measures, computed as trec_eval computes them (and so equal to pytrec_eval's):
nDCG@k (`ndcg_cut_k`: gain = grade, discount log2(rank + 1), the ideal from the judgements), recall@k
(`recall_k`), MAP (`map`) and MRR (`recip_rank`). A grade of 0 or below is not relevant. A run ranks each
query's documents by score, highest first, and ties by document id, last first, as trec_eval does; the
mean is over the judged queries that have a relevant document, a query with no results counting 0.
"""

from __future__ import annotations

import math
from pathlib import Path

from .collection import Qrels

Run = dict[str, dict[str, float]]  # query id -> {document id: score}
MEASURES = ("ndcg@10", "recall@10", "recall@100", "map", "mrr")


def ranking(scores: dict[str, float]) -> list[str]:
    """Document ids in trec_eval's order: score descending, then id descending."""
    return [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def query_measures(judged: dict[str, int], scores: dict[str, float]) -> dict[str, float]:
    docs = ranking(scores)
    relevant = {doc for doc, grade in judged.items() if grade > 0}
    hits = [doc in relevant for doc in docs]
    out = {}
    for k in (10, 100):
        out[f"recall@{k}"] = sum(hits[:k]) / len(relevant)
    gains = [max(judged.get(doc, 0), 0) for doc in docs[:10]]
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:10]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    out["ndcg@10"] = dcg / idcg
    found, precision_sum = 0, 0.0
    for rank, hit in enumerate(hits, 1):
        if hit:
            found += 1
            precision_sum += found / rank
    out["map"] = precision_sum / len(relevant)
    out["mrr"] = next((1 / rank for rank, hit in enumerate(hits, 1) if hit), 0.0)
    return out


def evaluate_run(qrels: Qrels, run: Run) -> dict[str, dict[str, float]]:
    """Per query (those with a relevant document) and their mean under "all"."""
    per_query = {q: query_measures(judged, run.get(q, {})) for q, judged in qrels.items()
                 if any(g > 0 for g in judged.values())}
    mean = {m: sum(v[m] for v in per_query.values()) / len(per_query) for m in MEASURES} if per_query else {}
    return {**per_query, "all": mean}


def write_run(run: Run, path: str | Path, tag: str = "pocketlm") -> Path:
    """The run in TREC's format: `query Q0 doc rank score tag`, each query in trec_eval's order."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for query, scores in run.items():
            for rank, doc in enumerate(ranking(scores), 1):
                f.write(f"{query} Q0 {doc} {rank} {scores[doc]:.6f} {tag}\n")
    return path
