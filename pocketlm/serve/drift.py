"""`pocketlm drift`: are the prompts the server sees now unlike the ones it saw before?

Two windows of the request log are compared: a reference window and a recent one. By default the
recent window is the latest `recent_fraction` of the requests (by arrival time) and the reference is
everything before it; `reference` / `recent` take explicit [start, end) unix-time windows instead
(give only `recent=(t, inf)` to split at time t: the reference is then everything before t).

Figures:
- prompt length (the `prompt_tokens` column, always logged): PSI over the reference's quantile bins,
  and the two-sample Kolmogorov-Smirnov statistic and p-value;
- token ids (needs `prompt_text`, logged only with `log_prompts: true`, and a tokenizer): PSI and
  KL(recent || reference) of the token frequencies;
- with a model: its perplexity on the recent and on the reference prompts, and their ratio (a model
  surprised by its new prompts is being used for something it was not tuned for).

Smoothing: every distribution is a vector of proportions p (bins, or the token ids seen in either
window); `epsilon` is added to each proportion and the vector renormalised, p' = (p + eps) / (1 + k*eps),
so a bin empty in one window costs a large but finite amount. Token ids seen in neither window are
left out (they would add exactly nothing).

Drift is flagged when a PSI exceeds `psi_threshold` (the usual reading: < 0.1 none, 0.1-0.2
moderate, > 0.2 large, customarily "significant", a word left here to the p-value) and is unlikely to
be chance (`psi_p` below `alpha`), or when the perplexity ratio exceeds `ppl_ratio_threshold`.

Chance matters for small windows: two samples of one distribution differ by a PSI of about
(bins - 1) * (1/n_reference + 1/n_recent) on average, and a bin left empty by a small sample costs
ln(1/epsilon) times its share, so a dozen requests against forty clear 0.2 easily.
`psi_p` is a permutation test: the requests of both windows are dealt into two windows of the same sizes
at random, `PERMUTATIONS` times, and psi_p is the share of deals whose PSI (computed the same way, bins
and all) is at least the observed one. Whole requests are dealt, so the tokens of one prompt stay
together, as they are not independent draws.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .report import connect, load_requests

PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.2  # PSI's customary name for this level; the report says "large"
ALPHA = 0.01  # a PSI over the threshold trips only if chance would give one this large less often than this
PERMUTATIONS = 499  # random deals of the requests for psi_p: it resolves steps of 1/500, below ALPHA
EPSILON = 1e-6
NEEDS_PROMPTS = ("token and perplexity figures need the prompt text: start the server with `log_prompts: true` "
                 "and run again once new traffic is logged")


# ---- distribution distances ------------------------------------------------------------------------

def smooth(counts, epsilon: float = EPSILON) -> np.ndarray:
    """Counts as proportions with `epsilon` added to each and renormalised (never a zero)."""
    counts = np.asarray(counts, dtype=float)
    total = counts.sum()
    if total <= 0:
        raise ValueError("no observations to make a distribution of")
    p = counts / total + epsilon
    return p / p.sum()


def psi(reference_counts, recent_counts, epsilon: float = EPSILON) -> float:
    """Population stability index: sum (recent - reference) * ln(recent / reference) over the bins."""
    ref, rec = smooth(reference_counts, epsilon), smooth(recent_counts, epsilon)
    return float(np.sum((rec - ref) * np.log(rec / ref)))


def kl_divergence(recent_counts, reference_counts, epsilon: float = EPSILON) -> float:
    """KL(recent || reference) in nats: the surprise of the reference model at the recent data."""
    rec, ref = smooth(recent_counts, epsilon), smooth(reference_counts, epsilon)
    return float(np.sum(rec * np.log(rec / ref)))


def permutation_p(statistic, n_reference: int, n_recent: int, observed: float,
                  permutations: int = PERMUTATIONS, seed: int = 0) -> float:
    """The share of random deals of the n_reference + n_recent items into windows of those sizes whose
    `statistic(reference_indices, recent_indices)` is at least `observed` (counting the observed deal,
    so never 0)."""
    rng = np.random.default_rng(seed)
    items = np.arange(n_reference + n_recent)
    as_large = 0
    for _ in range(permutations):
        dealt = rng.permutation(items)
        as_large += statistic(dealt[:n_reference], dealt[n_reference:]) >= observed - 1e-12
    return (1 + as_large) / (1 + permutations)


def psi_level(value: float) -> str:
    return "none" if value < PSI_MODERATE else "moderate" if value <= PSI_SIGNIFICANT else "large"


def quantile_bin_counts(reference, recent, bins: int = 10) -> tuple[list[float], np.ndarray, np.ndarray]:
    """Counts of both samples in bins cut at the reference's quantiles (repeated cut points merged,
    as integer lengths often repeat): (interior edges, reference counts, recent counts).
    Bin i holds values in (edge[i-1], edge[i]]; the outer bins are open-ended."""
    reference = np.asarray(reference, dtype=float)
    recent = np.asarray(recent, dtype=float)
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    count = lambda values: np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)  # noqa: E731
    return edges.tolist(), count(reference), count(recent)


# ---- windows ---------------------------------------------------------------------------------------

def _in(row: dict, window: tuple[float, float]) -> bool:
    return window[0] <= row["created"] < window[1]


def split_windows(rows: list[dict], reference: tuple[float, float] | None, recent: tuple[float, float] | None,
                  recent_fraction: float) -> tuple[list[dict], list[dict], tuple[float, float], tuple[float, float]]:
    """(reference rows, recent rows, reference window, recent window); rows are oldest first."""
    if reference is None and recent is None:
        if not 0.0 < recent_fraction < 1.0:
            raise ConfigError(f"recent_fraction is {recent_fraction}; expected a number between 0 and 1 (e.g. 0.25)")
        if len(rows) < 2:
            raise ConfigError(f"the request log has {len(rows)} request(s) with a prompt; drift needs at least two "
                              f"(a reference and a recent one): serve more traffic first")
        cut = min(len(rows) - 1, max(1, round(len(rows) * (1.0 - recent_fraction))))
        ref_rows, rec_rows = rows[:cut], rows[cut:]
        return ref_rows, rec_rows, (ref_rows[0]["created"], rec_rows[0]["created"]), \
            (rec_rows[0]["created"], math.inf)
    if recent is None:
        recent = (reference[1], math.inf)
    if reference is None:
        reference = (-math.inf, recent[0])
    for name, (start, end) in (("reference", reference), ("recent", recent)):
        if not start < end:
            raise ConfigError(f"the {name} window starts at {start} and ends at {end}; expected start < end")
    return [r for r in rows if _in(r, reference)], [r for r in rows if _in(r, recent)], reference, recent


# ---- figures ---------------------------------------------------------------------------------------

def length_figures(ref_lengths: list[int], rec_lengths: list[int], bins: int, epsilon: float) -> dict[str, Any]:
    from scipy.stats import ks_2samp

    edges, ref_counts, rec_counts = quantile_bin_counts(ref_lengths, rec_lengths, bins)
    value = psi(ref_counts, rec_counts, epsilon)
    ks = ks_2samp(ref_lengths, rec_lengths)
    pooled = np.asarray(list(ref_lengths) + list(rec_lengths), dtype=float)
    p = permutation_p(lambda ref, rec: psi(*quantile_bin_counts(pooled[ref], pooled[rec], bins)[1:], epsilon),
                      len(ref_lengths), len(rec_lengths), value)
    return {"psi": value, "psi_p": p, "level": psi_level(value), "ks_statistic": float(ks.statistic),
            "ks_p": float(ks.pvalue),
            "bin_edges": edges, "reference_counts": ref_counts.tolist(), "recent_counts": rec_counts.tolist(),
            "reference_mean": float(np.mean(ref_lengths)), "recent_mean": float(np.mean(rec_lengths)),
            "reference_median": float(np.median(ref_lengths)), "recent_median": float(np.median(rec_lengths))}


TOKEN_BINS = 50


def bin_tokens(ref_counts: np.ndarray, rec_counts: np.ndarray, token_bins: int = TOKEN_BINS):
    """Both windows' token counts (dense, indexed by token id) in bins: the reference's most frequent
    tokens, one each (ties by id), and one bin for all the rest. Over a whole vocabulary, a few hundred
    prompts leave most ids unseen on one side, and smoothing those zeros alone would make two samples of
    the same traffic look drifted. Returns (the binned token ids, reference counts, recent counts)."""
    seen = np.flatnonzero(ref_counts)
    support = seen[np.lexsort((seen, -ref_counts[seen]))][:token_bins]
    ref_v = np.append(ref_counts[support], ref_counts.sum() - ref_counts[support].sum())
    rec_v = np.append(rec_counts[support], rec_counts.sum() - rec_counts[support].sum())
    return support, ref_v, rec_v


def token_figures(ref_texts: list[str], rec_texts: list[str], tokenizer, epsilon: float,
                  token_bins: int = TOKEN_BINS) -> dict[str, Any]:
    from scipy.sparse import csr_matrix

    # one row of token counts per prompt (no special tokens added), reference prompts first
    encoded = [tokenizer.encode(text, add_special_tokens=False) for text in ref_texts + rec_texts]
    rows = np.repeat(np.arange(len(encoded)), [len(ids) for ids in encoded])
    cols = np.fromiter((i for ids in encoded for i in ids), dtype=np.int64, count=len(rows))
    width = int(cols.max()) + 1 if len(cols) else 1
    per_prompt = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(encoded), width))
    n_ref = len(ref_texts)
    ref = np.asarray(per_prompt[:n_ref].sum(0)).ravel()
    rec = np.asarray(per_prompt[n_ref:].sum(0)).ravel()
    if not ref.sum() or not rec.sum():
        raise ConfigError(f"the {'reference' if not ref.sum() else 'recent'} prompts encode to no tokens; "
                          f"check that the tokenizer belongs to the served model")
    support, ref_v, rec_v = bin_tokens(ref, rec, token_bins)
    value = psi(ref_v, rec_v, epsilon)

    def dealt_psi(ref_idx, rec_idx) -> float:
        ref_c = np.asarray(per_prompt[ref_idx].sum(0)).ravel()
        rec_c = np.asarray(per_prompt[rec_idx].sum(0)).ravel()
        if not ref_c.sum() or not rec_c.sum():
            return 0.0
        return psi(*bin_tokens(ref_c, rec_c, token_bins)[1:], epsilon)

    p = permutation_p(dealt_psi, n_ref, len(rec_texts), value)
    return {"psi": value, "psi_p": p, "level": psi_level(value), "kl": kl_divergence(rec_v, ref_v, epsilon),
            "reference_tokens": int(ref_v.sum()), "recent_tokens": int(rec_v.sum()),
            "distinct_tokens": int(np.count_nonzero(ref + rec)), "bins": len(support) + 1,
            "new_tokens": int(np.count_nonzero((rec > 0) & (ref == 0)))}


def _spread(items: list, limit: int | None) -> list:
    """At most `limit` items, evenly spaced over the list (deterministic, covers the whole window)."""
    if limit is None or len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def mean_nll(model, tokenizer, texts: list[str]) -> tuple[float, int]:
    """(mean next-token negative log-likelihood in nats, tokens scored) over the texts, each cut to
    the model's context; the mean is over tokens, so long prompts weigh more."""
    import torch
    import torch.nn.functional as F

    total, scored = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer.encode(text)[: model.context_length]
            if len(ids) < 2:
                continue
            ids_t = torch.tensor([ids])
            logits = model(ids_t)[0, :-1].float()
            total += float(F.cross_entropy(logits, ids_t[0, 1:], reduction="sum"))
            scored += len(ids) - 1
    return (total / scored if scored else math.nan), scored


def perplexity_figures(model, tokenizer, ref_texts: list[str], rec_texts: list[str],
                       max_prompts: int | None) -> dict[str, Any]:
    ref_nll, ref_n = mean_nll(model, tokenizer, _spread(ref_texts, max_prompts))
    rec_nll, rec_n = mean_nll(model, tokenizer, _spread(rec_texts, max_prompts))
    if not ref_n or not rec_n:
        raise ConfigError(f"no {'reference' if not ref_n else 'recent'} prompt has two or more tokens to score; "
                          f"perplexity needs longer prompts")
    ref_ppl, rec_ppl = math.exp(ref_nll), math.exp(rec_nll)
    return {"reference": ref_ppl, "recent": rec_ppl, "ratio": rec_ppl / ref_ppl,
            "reference_tokens": ref_n, "recent_tokens": rec_n}


# ---- the report ------------------------------------------------------------------------------------

def _window_text(window: tuple[float, float]) -> list[float | None]:
    return [None if math.isinf(t) else t for t in window]


def drift_report(log_or_url, tokenizer=None, model=None, *, reference: tuple[float, float] | None = None,
                 recent: tuple[float, float] | None = None, recent_fraction: float = 0.25,
                 experiment: str | None = None, variant: str | None = None, psi_threshold: float = PSI_SIGNIFICANT,
                 alpha: float = ALPHA, ppl_ratio_threshold: float = 1.5, bins: int = 10, epsilon: float = EPSILON,
                 max_prompts: int | None = 200) -> dict[str, Any]:
    """The drift report as a JSON-ready dict: {"drift", "tripped", "windows", "length", "tokens",
    "perplexity", "notes", "thresholds"}; "tokens" / "perplexity" are None when they could not be
    computed (the notes say why). Only requests with prompt_tokens > 0 count (0: never tokenized).
    `max_prompts` caps the prompts per window the model scores (evenly spaced; None: all)."""
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha is {alpha}; expected a number between 0 and 1, e.g. 0.01")
    for name, value, example in (("psi_threshold", psi_threshold, 0.2),
                                 ("ppl_ratio_threshold", ppl_ratio_threshold, 1.5)):
        if not value > 0:
            raise ConfigError(f"{name} is {value}; expected a number above 0, e.g. {example}")
    engine = connect(log_or_url)
    rows = [r for r in load_requests(engine, experiment, variant=variant) if (r["prompt_tokens"] or 0) > 0]
    if not rows:
        where = "".join(f" for {k} {v!r}" for k, v in (("experiment", experiment), ("variant", variant)) if v)
        raise ConfigError(f"the request log has no requests with a prompt{where}; serve some traffic "
                          f"(or check the experiment / variant name) and run again")
    ref_rows, rec_rows, ref_window, rec_window = split_windows(rows, reference, recent, recent_fraction)
    for name, part, window in (("reference", ref_rows, ref_window), ("recent", rec_rows, rec_window)):
        if not part:
            raise ConfigError(f"the {name} window {_window_text(window)} holds no requests with a prompt "
                              f"(the log spans {rows[0]['created']:.0f} to {rows[-1]['created']:.0f}); "
                              f"choose windows inside that span")

    notes: list[str] = []
    length = length_figures([r["prompt_tokens"] for r in ref_rows], [r["prompt_tokens"] for r in rec_rows],
                            bins, epsilon)
    ref_texts = [r["prompt_text"] for r in ref_rows if r["prompt_text"]]
    rec_texts = [r["prompt_text"] for r in rec_rows if r["prompt_text"]]
    tokens = perplexity = None
    if not ref_texts or not rec_texts:
        notes.append(f"no prompt text logged in the {'reference' if not ref_texts else 'recent'} window; "
                     + NEEDS_PROMPTS)
    elif tokenizer is None and model is None:
        notes.append("token and perplexity figures need the served model's tokenizer (and the model for perplexity)")
    else:
        if tokenizer is None:
            raise ConfigError("a model was given without its tokenizer; pass both, as open_model returns them")
        tokens = token_figures(ref_texts, rec_texts, tokenizer, epsilon)
        if model is not None:
            perplexity = perplexity_figures(model, tokenizer, ref_texts, rec_texts, max_prompts)
        else:
            notes.append("perplexity needs the model: pass one to compare the model's surprise at the two windows")
        missing = (len(ref_rows) - len(ref_texts)) + (len(rec_rows) - len(rec_texts))
        if missing:
            notes.append(f"{missing} request(s) without prompt text left out of the token figures")

    tripped = []
    windows = {"length": (len(ref_rows), len(rec_rows)), "tokens": (len(ref_texts), len(rec_texts))}
    for name, figures in (("length", length), ("tokens", tokens)):
        if figures is None or figures["psi"] <= psi_threshold:
            continue
        if figures["psi_p"] < alpha:
            tripped.append(f"{name}_psi")
        else:
            notes.append(f"{name} PSI {figures['psi']:.3f} is over {psi_threshold}, but {windows[name][0]} and "
                         f"{windows[name][1]} requests are too few to tell it from chance (p {figures['psi_p']:.2g}, "
                         f"needs < {alpha}): not flagged; compare larger windows")
    if perplexity is not None and perplexity["ratio"] > ppl_ratio_threshold:
        tripped.append("perplexity_ratio")
    return {
        "drift": bool(tripped), "tripped": tripped,
        "thresholds": {"psi": psi_threshold, "alpha": alpha, "perplexity_ratio": ppl_ratio_threshold,
                       "epsilon": epsilon},
        "windows": {"reference": {"start": _window_text(ref_window)[0], "end": _window_text(ref_window)[1],
                                  "requests": len(ref_rows), "prompts_with_text": len(ref_texts)},
                    "recent": {"start": _window_text(rec_window)[0], "end": _window_text(rec_window)[1],
                               "requests": len(rec_rows), "prompts_with_text": len(rec_texts)}},
        "experiment": experiment, "variant": variant,
        "length": length, "tokens": tokens, "perplexity": perplexity, "notes": notes,
    }


# ---- output ----------------------------------------------------------------------------------------

def drift_metrics(report: dict, registry=None):
    """Prometheus gauges for the report in `registry` (a fresh CollectorRegistry when None); returns it.
    Figures the report does not have (no prompt text, no model) are left out rather than exported as 0."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry() if registry is None else registry
    psi_gauge = Gauge("pocketlm_drift_psi", "Population stability index, recent vs reference prompts",
                      ["distribution"], registry=registry)
    p_gauge = Gauge("pocketlm_drift_psi_p", "Share of random deals of the requests into the two windows with a PSI "
                    "at least as large (small: not chance)", ["distribution"], registry=registry)
    for name in ("length", "tokens"):
        if report[name] is not None:
            psi_gauge.labels(distribution=name).set(report[name]["psi"])
            p_gauge.labels(distribution=name).set(report[name]["psi_p"])
    if report["tokens"] is not None:
        Gauge("pocketlm_drift_kl_tokens", "KL(recent || reference) of prompt token frequencies, nats",
              registry=registry).set(report["tokens"]["kl"])
    if report["perplexity"] is not None:
        Gauge("pocketlm_drift_perplexity_ratio", "Model perplexity on recent prompts / on reference prompts",
              registry=registry).set(report["perplexity"]["ratio"])
    Gauge("pocketlm_drift_flag", "1 when prompt drift is flagged, else 0", registry=registry).set(int(report["drift"]))
    return registry


def write_drift_metrics(report: dict, path: str | Path) -> Path:
    """The gauges in Prometheus text format, written atomically to `path` (for node-exporter's textfile
    collector: point --collector.textfile.directory at the folder, name the file *.prom)."""
    from prometheus_client import write_to_textfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), drift_metrics(report))
    return path


def format_drift(report: dict) -> str:
    """The drift report as plain text."""
    w, length = report["windows"], report["length"]
    out = [f"drift: {'YES (' + ', '.join(report['tripped']) + ')' if report['drift'] else 'no'}",
           f"windows: reference {w['reference']['requests']} requests, recent {w['recent']['requests']} requests",
           f"prompt length: PSI {length['psi']:.3f} ({length['level']}, p {length['psi_p']:.2g}), "
           f"KS {length['ks_statistic']:.3f} "
           f"(p {length['ks_p']:.3g}), mean {length['reference_mean']:.1f} -> {length['recent_mean']:.1f} tokens"]
    tokens, ppl = report["tokens"], report["perplexity"]
    if tokens is not None:
        out.append(f"tokens: PSI {tokens['psi']:.3f} ({tokens['level']}, p {tokens['psi_p']:.2g}), "
                   f"KL(recent||reference) {tokens['kl']:.3f} nats, "
                   f"{tokens['new_tokens']} token ids unseen in the reference; over the reference's "
                   f"{tokens['bins'] - 1} most frequent tokens and the rest")
    if ppl is not None:
        out.append(f"perplexity: reference {ppl['reference']:.2f}, recent {ppl['recent']:.2f}, "
                   f"ratio {ppl['ratio']:.2f}")
    t = report["thresholds"]
    out.append(f"thresholds: PSI > {t['psi']} with p < {t['alpha']}, perplexity ratio > {t['perplexity_ratio']}")
    out += [f"note: {n}" for n in report["notes"]]
    return "\n".join(out) + "\n"
