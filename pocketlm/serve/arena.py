"""The arena's leaderboard: Bradley-Terry ratings of the variants from the arena's pairwise votes, with bootstrap
confidence intervals, on the Elo scale the LMSYS Chatbot Arena reports (a 400-point lead is 10:1 odds).

Under Bradley-Terry, variant i beats j with probability p_i / (p_i + p_j). The strengths are fitted by maximum
likelihood by Newton's method; a tie, or a vote that both answers were bad, counts half a win to
each side, as the arena counts ties. Ratings are 400 * log10(p), centred on 1000. Where a variant won or lost
every battle its maximum-likelihood rating is infinite; then one virtual tie per pair that met keeps every rating
finite, and the leaderboard says so. The confidence interval is the 2.5-97.5 percentile of the ratings refitted
on battles resampled with replacement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine

from .store import arena_table, requests_table

SCALE, BASE, CENTRE = 400.0, 10.0, 1000.0
SCORES = {"left": (1.0, 0.0), "right": (0.0, 1.0), "tie": (0.5, 0.5), "bad": (0.5, 0.5)}


@dataclass(frozen=True)
class Battle:
    left: str  # the variants that answered
    right: str
    winner: str  # left, right, tie or bad


class _Votes:
    """The battles as arrays: the two sides' indices and scores (ties half each), for weighting by resampling."""

    def __init__(self, battles: list[Battle], names: list[str]):
        index = {name: i for i, name in enumerate(names)}
        self.n = len(names)
        self.left = np.array([index[b.left] for b in battles], dtype=np.int64)
        self.right = np.array([index[b.right] for b in battles], dtype=np.int64)
        scores = np.array([SCORES[b.winner] for b in battles], dtype=float).reshape(-1, 2)
        self.left_score, self.right_score = scores[:, 0], scores[:, 1]

    def tables(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(wins: each variant's, ties counting half; games: battles between each pair), each battle counted
        `weights` times."""
        w = np.ones(len(self.left)) if weights is None else weights
        wins = (np.bincount(self.left, w * self.left_score, self.n) + np.bincount(self.right, w * self.right_score, self.n))
        pairs = np.bincount(self.left * self.n + self.right, w, self.n * self.n).reshape(self.n, self.n)
        return wins, pairs + pairs.T


def fit(battles: list[Battle], names: list[str] | None = None) -> tuple[dict[str, float], bool]:
    """({variant: rating}, whether virtual ties were needed). Battles of a variant with itself are left out."""
    battles = [b for b in battles if b.left != b.right]
    names = names or sorted({b.left for b in battles} | {b.right for b in battles})
    theta, smoothed = _fit(*_Votes(battles, names).tables())
    return {name: float(r) for name, r in zip(names, _ratings(theta))}, smoothed


def _ratings(theta: np.ndarray) -> np.ndarray:
    """Log strengths on the Elo scale, centred on 1000."""
    return CENTRE + SCALE * np.asarray(theta) / np.log(BASE)


def _fit(wins: np.ndarray, games: np.ndarray, tol: float = 1e-10, max_iter: int = 100) -> tuple[np.ndarray, bool]:
    played = games.sum(axis=1)
    smoothed = bool(np.any((played > 0) & ((wins <= 0) | (wins >= played))))
    if smoothed:  # one virtual tie for every pair that met: half a win each way
        met = (games > 0).astype(float)
        wins, games = wins + 0.5 * met.sum(axis=1), games + met
    theta = np.zeros(len(wins))  # log strengths; only differences matter, so their mean is held at 0
    for _ in range(max_iter):  # Newton's method on the concave log-likelihood, halving a step that overshoots
        step = _newton_step(theta, wins, games)
        scale, before = 1.0, _log_likelihood(theta, wins, games)
        while _log_likelihood(theta + scale * step, wins, games) < before - 1e-12 and scale > 1e-6:
            scale /= 2
        theta = theta + scale * step
        theta -= theta.mean()
        if np.max(np.abs(scale * step)) < tol:
            break
    return theta, smoothed


def _win_probability(theta: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))  # [i, j]: i beats j


def _log_likelihood(theta: np.ndarray, wins: np.ndarray, games: np.ndarray) -> float:
    # sum over pairs of games * log(1 + e^(theta_j - theta_i)) counted once each way, plus the wins' terms
    return float(wins @ theta - 0.5 * np.sum(games * np.logaddexp(theta[:, None], theta[None, :])))


def _newton_step(theta: np.ndarray, wins: np.ndarray, games: np.ndarray) -> np.ndarray:
    p = _win_probability(theta)
    gradient = wins - (games * p).sum(axis=1)
    weight = games * p * (1 - p)
    hessian = np.diag(weight.sum(axis=1)) - weight  # minus the Hessian: a graph Laplacian, singular along 1
    return np.linalg.lstsq(hessian, gradient, rcond=None)[0]


def leaderboard(battles: list[Battle], rounds: int = 1000, seed: int = 0) -> dict[str, Any]:
    """`rounds` (at least 1) bootstrap refits give the intervals. {"variants": [{name, rating, ci_low, ci_high, battles, wins, ties, losses}, best first], "battles",
    "smoothed", "rounds"}."""
    battles = [b for b in battles if b.left != b.right]
    if not battles:
        return {"variants": [], "battles": 0, "smoothed": False, "rounds": 0}
    names = sorted({b.left for b in battles} | {b.right for b in battles})
    votes = _Votes(battles, names)
    theta, smoothed = _fit(*votes.tables())
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, len(names)))
    for r in range(rounds):  # a resample with replacement is each battle counted as often as it was drawn
        drawn = np.bincount(rng.integers(0, len(battles), len(battles)), minlength=len(battles)).astype(float)
        samples[r] = _fit(*votes.tables(drawn), tol=1e-8)[0]
    low, high = _ratings(np.percentile(samples, [2.5, 97.5], axis=0))
    rows = []
    for k, name in enumerate(names):
        mine = [b for b in battles if name in (b.left, b.right)]
        won = sum(1 for b in mine if (b.winner == "left" and b.left == name) or (b.winner == "right" and b.right == name))
        tied = sum(1 for b in mine if b.winner in ("tie", "bad"))
        rows.append({"name": name, "rating": round(float(_ratings(theta[k])), 1), "ci_low": round(float(low[k]), 1),
                     "ci_high": round(float(high[k]), 1), "battles": len(mine), "wins": won, "ties": tied,
                     "losses": len(mine) - won - tied})
    rows.sort(key=lambda row: -row["rating"])
    return {"variants": rows, "battles": len(battles), "smoothed": smoothed, "rounds": rounds}


def load_battles(engine: Engine, experiment: str | None = None, since: float | None = None) -> list[Battle]:
    """The arena's votes with the variants that gave each answer (an experiment: votes whose answers were both
    in it)."""
    left, right = requests_table.alias("l"), requests_table.alias("r")
    query = (select(left.c.variant, right.c.variant, arena_table.c.winner, left.c.experiment, right.c.experiment)
             .join(left, left.c.id == arena_table.c.left_id).join(right, right.c.id == arena_table.c.right_id)
             .order_by(arena_table.c.id))
    if since is not None:
        query = query.where(arena_table.c.created >= since)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [Battle(a, b, w) for a, b, w, ea, eb in rows
            if experiment is None or (ea == experiment and eb == experiment)]
