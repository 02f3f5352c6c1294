"""Where a training step's examples come from, as a function of (seed, step) only: that is what makes
resume exact and lets every DDP process pick its own share of the same global batch.

    Windows  random windows of one token stream (pretraining, logit distillation)
    Rows     fixed rows (packed SFT examples, DPO pairs), reshuffled every epoch
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError


def batch_starts(seed: int, step: int, count: int, n_tokens: int, block: int) -> np.ndarray:
    """Start offsets of the `count` windows of optimizer step `step` (same in every process)."""
    if n_tokens <= block + 1:
        raise ConfigError(f"the data has {n_tokens} tokens, fewer than train.block_size + 2 = {block + 2}; "
                          "use more data or a smaller block_size")
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - block - 1, size=count)


def windows(tokens: np.ndarray, starts: np.ndarray, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([tokens[s:s + block + 1] for s in starts]).astype(np.int64)
    batch = torch.from_numpy(rows).to(device)
    return batch[:, :-1], batch[:, 1:]


class Windows:
    """Windows of block_size + 1 tokens at random offsets. `aligned` draws whole chunks (offsets that
    are multiples of block_size) instead, so a teacher's outputs can be cached per chunk."""

    def __init__(self, tokens: np.ndarray, block: int, aligned: bool = False):
        self.tokens, self.block, self.aligned = tokens, block, aligned
        self.chunks = (len(tokens) - 1) // block
        if aligned and self.chunks < 1:
            batch_starts(0, 0, 1, len(tokens), block)  # raises the too-little-data error

    def picks(self, seed: int, step: int, count: int) -> np.ndarray:
        if self.aligned:
            return np.random.default_rng([seed, step]).integers(0, self.chunks, size=count)
        return batch_starts(seed, step, count, len(self.tokens), self.block)

    def eval_picks(self, seed: int, index: int, count: int) -> np.ndarray | None:
        return self.picks(seed + 1, index, count)

    @property
    def row_count(self) -> int:
        """The whole chunks an aligned draw picks from (the rows private training samples)."""
        return self.chunks

    def batch(self, picks: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        starts = picks * self.block if self.aligned else picks
        x, y = windows(self.tokens, starts, self.block, device)
        return {"input_ids": x, "labels": y}

    @property
    def tokens_per_row(self) -> int:
        return self.block


class Rows:
    """Fixed rows of equal length (each array's first axis indexes rows). Epoch e visits the rows in
    the order of a permutation seeded by (seed, e); step s takes the next `count` of that sequence."""

    def __init__(self, arrays: dict[str, np.ndarray], per_step: int):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))
        self.per_step = per_step
        self._order_cache: tuple[tuple[int, int], np.ndarray] | None = None

    def picks(self, seed: int, step: int, count: int) -> np.ndarray:
        first = step * self.per_step
        out = []
        for g in range(first, first + count):
            epoch, i = divmod(g, self.n)
            out.append(self._order(seed, epoch)[i])
        return np.array(out)

    def _order(self, seed: int, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != (seed, epoch):
            self._order_cache = ((seed, epoch), np.random.default_rng([seed, epoch]).permutation(self.n))
        return self._order_cache[1]

    @property
    def row_count(self) -> int:
        return self.n

    def eval_picks(self, seed: int, index: int, count: int) -> np.ndarray | None:
        """Validation goes through the rows in order, once."""
        start = index * count
        return np.arange(start, min(start + count, self.n)) if start < self.n else None

    def batch(self, picks: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v[picks])).to(device) for k, v in self.arrays.items()}

    def labelled_tokens(self, picks: np.ndarray) -> int:
        return int((self.arrays["labels"][picks] != -100).sum())

    @property
    def tokens_per_row(self) -> int:
        first = next(iter(self.arrays.values()))
        return first.shape[1] if first.ndim > 1 else 1
