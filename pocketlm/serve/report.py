"""`pocketlm ab report`: how the variants of an A/B experiment compare, read from the request log.

Per variant: requests, errors, cancellations, latency and time-to-first-token percentiles, completion
length and thumbs up/down. Each variant is then tested against a baseline: a two-proportion z-test on
the thumbs-up rate and on the error rate, and a Mann-Whitney U test on latency (latencies are skewed,
so a rank test rather than a t-test), all three from scipy.stats; a p-value that cannot be computed is None
with a reason, never NaN.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from sqlalchemy import select
from sqlalchemy.engine import Engine

from ..errors import ConfigError
from .arena import Battle, leaderboard, load_battles
from .store import RequestLog, database_url, feedback_table, open_database, requests_table

ALPHA = 0.05
CLIENT_CLOSED = 499  # the client went away: neither a success nor the server's error


# ---- statistics ------------------------------------------------------------------------------------

def two_proportion_z_test(success_a: int, n_a: int, success_b: int, n_b: int) -> tuple[float, float]:
    """(z, two-sided p) for H0: the two success rates are equal, with the pooled proportion: scipy's
    chi-square test of the 2x2 table without continuity correction, whose statistic is z squared.

    z > 0 when a's rate is the higher. Raises ValueError when a group is empty or when the pooled rate
    is 0 or 1 (no variance: every trial in both groups came out the same)."""
    if n_a <= 0 or n_b <= 0:
        raise ValueError("a group has no trials")
    if not (0 <= success_a <= n_a and 0 <= success_b <= n_b):
        raise ValueError("successes must lie between 0 and the number of trials")
    pooled = (success_a + success_b) / (n_a + n_b)
    if pooled in (0.0, 1.0):
        raise ValueError(f"every trial in both groups has the same outcome (pooled rate {pooled:g})")
    table = np.array([[success_a, n_a - success_a], [success_b, n_b - success_b]])
    chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
    return math.copysign(math.sqrt(chi2), success_a / n_a - success_b / n_b), float(p)


def mann_whitney_u(x, y) -> tuple[float, float]:
    """(U of x, two-sided p): scipy's Mann-Whitney U by the normal approximation, with tie and continuity
    corrections. Raises ValueError for an empty sample or when every value is tied (no variance)."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if len(x) == 0 or len(y) == 0:
        raise ValueError("a sample is empty")
    if np.unique(np.concatenate([x, y])).size == 1:
        raise ValueError("every value is tied")
    result = stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic", use_continuity=True)
    return float(result.statistic), float(result.pvalue)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """The Wilson score interval for a proportion (sane at 0 and n, unlike the normal one), from scipy;
    None for n = 0."""
    if n <= 0:
        return None
    interval = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def _percentile(values: np.ndarray, q: float) -> float | None:
    return None if len(values) == 0 else float(np.percentile(values, q))


def _summary(values: list[float], quantiles: tuple[int, ...]) -> dict[str, float | int | None]:
    arr = np.asarray(values, dtype=float)
    out: dict[str, float | int | None] = {"n": int(len(arr))}
    out.update({f"p{q}": _percentile(arr, q) for q in quantiles})
    out["mean"] = float(arr.mean()) if len(arr) else None
    out["min"] = float(arr.min()) if len(arr) else None
    out["max"] = float(arr.max()) if len(arr) else None
    return out


# ---- reading the log -------------------------------------------------------------------------------

def connect(log_or_url: RequestLog | Engine | str | Path) -> Engine:
    """An engine for a RequestLog, an Engine, a SQLAlchemy URL or a SQLite path (which must exist:
    reading a mistyped path would otherwise create an empty database there)."""
    if isinstance(log_or_url, RequestLog):
        return log_or_url.engine
    if isinstance(log_or_url, Engine):
        return log_or_url
    url = database_url(log_or_url)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise ConfigError(f"no request log at {log_or_url}; pass the database the server writes "
                          f"(`database:` in serve.yaml, default pocketlm-serve.db)")
    return open_database(log_or_url)


def load_requests(engine: Engine, experiment: str | None = None, since: float | None = None,
                  variant: str | None = None) -> list[dict[str, Any]]:
    """Rows of the requests table (oldest first), optionally one experiment / variant / from a time on."""
    query = select(requests_table).order_by(requests_table.c.created, requests_table.c.id)
    if experiment is not None:
        query = query.where(requests_table.c.experiment == experiment)
    if variant is not None:
        query = query.where(requests_table.c.variant == variant)
    if since is not None:
        query = query.where(requests_table.c.created >= since)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def latest_votes(engine: Engine, request_ids: set[str]) -> dict[str, int]:
    """The last rating (+1/-1) given to each request: a user who changes their mind counts once."""
    query = (select(feedback_table.c.request_id, feedback_table.c.rating)
             .order_by(feedback_table.c.created, feedback_table.c.id))
    votes: dict[str, int] = {}
    with engine.connect() as conn:
        for request_id, rating in conn.execute(query):
            if request_id in request_ids:
                votes[request_id] = int(rating)
    return votes


def _experiments(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted({r[0] for r in conn.execute(select(requests_table.c.experiment).distinct()) if r[0]})


# ---- the report ------------------------------------------------------------------------------------

def _variant_stats(rows: list[dict], votes: dict[str, int]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] < 400]
    errors = sum(1 for r in rows if r["status"] >= 400 and r["status"] != CLIENT_CLOSED)
    cancelled = sum(1 for r in rows if r["status"] == CLIENT_CLOSED)
    completed = len(rows) - cancelled
    up = sum(1 for r in rows if votes.get(r["id"]) == 1)
    down = sum(1 for r in rows if votes.get(r["id"]) == -1)
    latencies = [r["latency_ms"] for r in ok if r["latency_ms"] is not None]
    ttfts = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
    interval = wilson_interval(up, up + down)
    return {
        "requests": len(rows), "completed": completed, "successes": len(ok), "errors": errors,
        "cancelled": cancelled, "error_rate": errors / completed if completed else None,
        "latency_ms": _summary(latencies, (25, 50, 75, 90, 99)), "ttft_ms": _summary(ttfts, (50, 99)),
        "mean_completion_tokens": (sum(r["completion_tokens"] or 0 for r in ok) / len(ok)) if ok else None,
        "thumbs_up": up, "thumbs_down": down, "thumbs_up_rate": up / (up + down) if up + down else None,
        "thumbs_up_ci95": list(interval) if interval else None,
        "_latencies": latencies,  # for the rank test; dropped from the report
    }


def _test_result(p: float | None, reason: str | None = None, **figures) -> dict[str, Any]:
    return {**figures, "p": p, "significant": (p < ALPHA) if p is not None else False, "reason": reason}


def _proportion_test(s_var: int, n_var: int, s_base: int, n_base: int, what: str) -> dict[str, Any]:
    rates = {"rate": s_var / n_var if n_var else None, "baseline_rate": s_base / n_base if n_base else None}
    if n_var == 0 or n_base == 0:
        return _test_result(None, f"no {what} in {'this variant' if n_var == 0 else 'the baseline'}", z=None, **rates)
    try:
        z, p = two_proportion_z_test(s_var, n_var, s_base, n_base)
    except ValueError as exc:
        return _test_result(None, str(exc), z=None, **rates)
    return _test_result(p, z=z, **rates)


def _latency_test(var: list[float], base: list[float]) -> dict[str, Any]:
    medians = {"median_ms": _percentile(np.asarray(var), 50), "baseline_median_ms": _percentile(np.asarray(base), 50)}
    if not var or not base:
        where = "this variant" if not var else "the baseline"
        return _test_result(None, f"no successful requests with a latency in {where}", u=None, **medians)
    try:
        u, p = mann_whitney_u(var, base)
    except ValueError as exc:
        return _test_result(None, str(exc), u=None, **medians)
    return _test_result(p, u=u, **medians)


def _compare(name: str, var: dict, baseline: str, base: dict) -> dict[str, Any]:
    return {
        "variant": name, "baseline": baseline,
        "thumbs_up_rate": _proportion_test(var["thumbs_up"], var["thumbs_up"] + var["thumbs_down"],
                                           base["thumbs_up"], base["thumbs_up"] + base["thumbs_down"], "votes"),
        "error_rate": _proportion_test(var["errors"], var["completed"], base["errors"], base["completed"],
                                       "completed requests"),
        "latency": _latency_test(var["_latencies"], base["_latencies"]),
    }


def ab_report(log_or_url: RequestLog | Engine | str | Path, experiment: str | None = None, since: float | None = None,
              baseline: str | None = None) -> dict[str, Any]:
    """The A/B report as a JSON-ready dict: {"experiment", "since", "baseline", "alpha", "variants":
    {name: stats}, "comparisons": [each other variant against the baseline], "notes"}.

    Error rate is errors / completed requests (client disconnects, status 499, are counted as
    `cancelled` and left out of both). Latency, TTFT and completion tokens are over successful
    requests (status < 400). Test statistics are signed variant-minus-baseline: z > 0 means the
    variant's rate is higher, U is the variant's (U > n1*n2/2: the variant tends to be slower).
    """
    engine = connect(log_or_url)
    rows = load_requests(engine, experiment, since)
    if not rows:
        known = _experiments(engine)
        where = f" for experiment {experiment!r}" if experiment is not None else ""
        hint = f"experiments in the log: {', '.join(known)}" if known else "serve some traffic first"
        raise ConfigError(f"no requests in the log{where}{' since ' + str(since) if since else ''}; {hint}")
    by_variant: dict[str, list[dict]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    names = sorted(by_variant)
    baseline = names[0] if baseline is None else baseline
    if baseline not in by_variant:
        raise ConfigError(f"baseline variant {baseline!r} has no requests; variants in the log: {', '.join(names)}")
    votes = latest_votes(engine, {r["id"] for r in rows})
    stats = {name: _variant_stats(by_variant[name], votes) for name in names}
    comparisons = [_compare(name, stats[name], baseline, stats[baseline]) for name in names if name != baseline]
    notes = []
    if not comparisons:
        notes.append(f"only one variant ({baseline}); nothing to compare")
    if experiment is None and len(_experiments(engine)) > 1:
        notes.append("requests of several experiments are pooled; pass an experiment to separate them")
    for s in stats.values():
        s.pop("_latencies")
    arena = cached_leaderboard(tuple(load_battles(engine, experiment, since)))
    if arena["smoothed"]:
        notes.append("a variant won or lost every arena battle: one virtual tie per pair that met keeps its rating "
                     "finite (collect more votes)")
    return {"experiment": experiment, "since": since, "baseline": baseline, "alpha": ALPHA,
            "variants": stats, "comparisons": comparisons, "arena": arena, "notes": notes}


@lru_cache(maxsize=16)
def cached_leaderboard(battles: tuple[Battle, ...]) -> dict[str, Any]:
    """The leaderboard, refitted only when the votes change (the dashboard asks every few seconds)."""
    return leaderboard(list(battles))


# ---- output ----------------------------------------------------------------------------------------

def _fmt(value, spec: str = ".1f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _p_cell(test: dict) -> str:
    if test["p"] is None:
        return f"n/a ({test['reason']})"
    return f"{test['p']:.4g}{' *' if test['significant'] else ''}"


def _versus(test: dict, key: str, spec: str) -> str:
    return f"{_fmt(test[key], spec)} vs {_fmt(test['baseline_' + key], spec)}"


def format_report(report: dict) -> str:
    """The report as plain-text tables: one row per variant, then one per comparison (* : p < alpha)."""
    title = f"A/B report{' for ' + report['experiment'] if report.get('experiment') else ''}"
    out = [title, ""]
    rows = []
    for name, v in report["variants"].items():
        lat, ttft = v["latency_ms"], v["ttft_ms"]
        rows.append([name + (" (baseline)" if name == report["baseline"] else ""), str(v["requests"]), str(v["errors"]),
                     str(v["cancelled"]), _fmt(v["error_rate"], ".1%"), _fmt(lat["p50"]), _fmt(lat["p90"]),
                     _fmt(lat["p99"]), _fmt(ttft["p50"]), _fmt(ttft["p99"]), _fmt(v["mean_completion_tokens"]),
                     f"{v['thumbs_up']}/{v['thumbs_down']}", _fmt(v["thumbs_up_rate"], ".1%")])
    out += _table(["variant", "requests", "errors", "cancelled", "err rate", "p50 ms", "p90 ms", "p99 ms",
                   "ttft p50", "ttft p99", "tokens", "up/down", "up rate"], rows)
    if report["comparisons"]:
        out += ["", f"against {report['baseline']} (* : p < {report['alpha']})"]
        rows = [[c["variant"], _versus(c["thumbs_up_rate"], "rate", ".1%"), _p_cell(c["thumbs_up_rate"]),
                 _versus(c["error_rate"], "rate", ".1%"), _p_cell(c["error_rate"]),
                 _versus(c["latency"], "median_ms", ".1f"), _p_cell(c["latency"])] for c in report["comparisons"]]
        out += _table(["variant", "up rate", "p (z)", "err rate", "p (z)", "median ms", "p (U)"], rows)
    arena = report.get("arena") or {}
    if arena.get("variants"):
        out += ["", f"arena leaderboard: Bradley-Terry ratings from {arena['battles']} votes (95% bootstrap interval, "
                    f"{arena['rounds']} resamples)"]
        rows = [[str(k + 1), v["name"], f"{v['rating']:.0f}", f"{v['ci_low']:.0f} - {v['ci_high']:.0f}", str(v["battles"]),
                 f"{v['wins']}/{v['ties']}/{v['losses']}"] for k, v in enumerate(arena["variants"])]
        out += _table(["rank", "variant", "rating", "95% interval", "battles", "won/tied/lost"], rows)
    out += [""] + [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(out).rstrip() + "\n"


def plot_report(report_or_log: dict | RequestLog | Engine | str | Path, path: str | Path,
                experiment: str | None = None) -> Path:
    """A PNG: latency per variant (box p25-p75, median line, whiskers min-p99, dot at the max) and the
    thumbs-up rate with its 95% Wilson interval. Takes a report or anything ab_report reads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = report_or_log if isinstance(report_or_log, dict) else ab_report(report_or_log, experiment)
    names = list(report["variants"])
    variants = [report["variants"][n] for n in names]
    fig, (ax_lat, ax_up) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)

    boxes, positions = [], []
    for i, v in enumerate(variants):
        lat = v["latency_ms"]
        if lat["n"]:
            boxes.append({"label": names[i], "med": lat["p50"], "q1": lat["p25"], "q3": lat["p75"],
                          "whislo": lat["min"], "whishi": lat["p99"],
                          "fliers": [lat["max"]] if lat["max"] > lat["p99"] else []})
            positions.append(i)
    if boxes:
        ax_lat.bxp(boxes, positions=positions, showfliers=True)
    ax_lat.set_xticks(range(len(names)), names)
    ax_lat.set_xlim(-0.6, len(names) - 0.4)
    ax_lat.set_ylabel("latency (ms), successful requests")
    ax_lat.set_title("Latency: box p25-p75, whiskers min-p99, o max")

    for i, v in enumerate(variants):
        rate, ci = v["thumbs_up_rate"], v["thumbs_up_ci95"]
        if rate is None:
            ax_up.annotate("no votes", (i, 0.5), ha="center", fontsize=8, color="grey")
            continue
        ax_up.errorbar([i], [rate], yerr=[[max(0.0, rate - ci[0])], [max(0.0, ci[1] - rate)]], fmt="o", capsize=6)
        ax_up.annotate(f"{rate:.0%} (n={v['thumbs_up'] + v['thumbs_down']})", (i, rate),
                       textcoords="offset points", xytext=(8, 0), fontsize=8)
    ax_up.set_xticks(range(len(names)), names)
    ax_up.set_xlim(-0.6, len(names) - 0.4)
    ax_up.set_ylim(0, 1)
    ax_up.set_ylabel("thumbs-up rate")
    ax_up.set_title("Thumbs up, 95% Wilson interval")
    title = "A/B report" + (f": {report['experiment']}" if report.get("experiment") else "")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
