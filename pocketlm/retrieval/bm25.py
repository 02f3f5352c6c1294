"""BM25 over a corpus with bm25s (sparse-matrix BM25, Lucene's scoring by default)."""

from __future__ import annotations

import bm25s
import numpy as np

from ..errors import ConfigError


class BM25:
    """Index documents once; `search` gives each query's top k (document id -> score)."""

    def __init__(self, ids: list[str], texts: list[str], k1: float = 1.5, b: float = 0.75, stopwords: str = "en"):
        if not ids:
            raise ConfigError("the corpus is empty: there is nothing to index")
        self.ids, self.stopwords = ids, stopwords
        self.index = bm25s.BM25(k1=k1, b=b)
        self.index.index(bm25s.tokenize(texts, stopwords=stopwords, show_progress=False), show_progress=False)

    def search(self, queries: list[str], k: int = 100) -> list[dict[str, float]]:
        k = min(k, len(self.ids))
        tokens = bm25s.tokenize(queries, stopwords=self.stopwords, show_progress=False)
        docs, scores = self.index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [{self.ids[int(d)]: float(s) for d, s in zip(row_docs, row_scores) if s > 0}
                for row_docs, row_scores in zip(np.asarray(docs), np.asarray(scores))]
