"""The A/B report and the prompt-drift report, checked against scipy and direct numpy computations."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from helpers import byte_level_tokenizer, tiny_model_dir
from scipy.stats import chi2_contingency, mannwhitneyu
from sqlalchemy import insert

from pocketlm.errors import ConfigError
from pocketlm.serve.drift import (
    drift_metrics,
    drift_report,
    format_drift,
    kl_divergence,
    permutation_p,
    psi,
    quantile_bin_counts,
    write_drift_metrics,
)
from pocketlm.serve.report import (
    ab_report,
    format_report,
    mann_whitney_u,
    plot_report,
    two_proportion_z_test,
    wilson_interval,
)
from pocketlm.serve.store import RequestLog, RequestRecord, requests_table


def scipy_two_sided_p(s_a, n_a, s_b, n_b) -> float:
    return float(chi2_contingency(np.array([[s_a, n_a - s_a], [s_b, n_b - s_b]]), correction=False)[1])


# ---- statistics ------------------------------------------------------------------------------------

@pytest.mark.parametrize("s_a,n_a,s_b,n_b", [(30, 50, 20, 50), (5, 200, 15, 180), (1, 7, 6, 9), (40, 100, 40, 100)])
def test_two_proportion_z_test_matches_chi2(s_a, n_a, s_b, n_b):
    z, p = two_proportion_z_test(s_a, n_a, s_b, n_b)
    assert p == pytest.approx(scipy_two_sided_p(s_a, n_a, s_b, n_b), rel=1e-9, abs=1e-12)
    assert math.copysign(1, z) == math.copysign(1, s_a / n_a - s_b / n_b) or z == 0
    chi2 = chi2_contingency(np.array([[s_a, n_a - s_a], [s_b, n_b - s_b]]), correction=False)[0]
    assert z * z == pytest.approx(chi2, rel=1e-9, abs=1e-12)


def test_two_proportion_z_test_and_mann_whitney_known_values():
    """Worked by hand: 30/50 against 20/50 pools to 0.5, so z = 0.2 / sqrt(0.25 * (1/50 + 1/50)) = 2 and p is
    2 * (1 - Phi(2)); [1, 2, 3] against [4, 5, 6] gives U = 0, and with the continuity correction
    z = (9 - 4.5 - 0.5) / sqrt(3 * 3 * 7 / 12) = 1.7457, p = 2 * (1 - Phi(1.7457))."""
    z, p = two_proportion_z_test(30, 50, 20, 50)
    assert z == pytest.approx(2.0, abs=1e-12) and p == pytest.approx(math.erfc(2.0 / math.sqrt(2.0)), rel=1e-12)
    u, p = mann_whitney_u([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert u == 0.0 and p == pytest.approx(math.erfc(4.0 / math.sqrt(5.25) / math.sqrt(2.0)), rel=1e-12)


def test_two_proportion_z_test_degenerate():
    with pytest.raises(ValueError):
        two_proportion_z_test(0, 0, 1, 5)
    with pytest.raises(ValueError):
        two_proportion_z_test(0, 10, 0, 12)  # no successes anywhere: no variance


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mann_whitney_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 12, size=37).astype(float)  # few distinct values: many ties
    y = rng.integers(2, 15, size=23).astype(float)
    u, p = mann_whitney_u(x, y)
    ref = mannwhitneyu(x, y, alternative="two-sided", method="asymptotic", use_continuity=True)
    assert u == pytest.approx(ref.statistic, abs=1e-9)
    assert p == pytest.approx(ref.pvalue, abs=1e-9)


def test_wilson_interval_known_values():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.27753, abs=1e-5)
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(0, 0) is None


def test_mann_whitney_degenerate():
    with pytest.raises(ValueError):
        mann_whitney_u([], [1.0])
    with pytest.raises(ValueError):
        mann_whitney_u([3.0, 3.0], [3.0])


# ---- the A/B report --------------------------------------------------------------------------------

def _add(log, rid, variant, status, latency, created, ttft=None, tokens=10):
    log.add_request(RequestRecord(id=rid, variant=variant, model=f"model-{variant}", endpoint="chat", status=status,
                                  experiment="exp1", latency_ms=latency, ttft_ms=ttft, prompt_tokens=5,
                                  completion_tokens=tokens, created=created))


@pytest.fixture()
def ab_log(tmp_path):
    log = RequestLog(tmp_path / "log.db")
    rng = random.Random(0)
    data = {}
    # baseline "a": 36 ok, 3 errors (500, 504, 429), 1 client disconnect; "b": 42 ok, 5 errors, 3 disconnects
    for variant, ok, errors, cancelled, base in (("a", 36, [500, 504, 429], 1, 100), ("b", 42, [500] * 5, 3, 130)):
        latencies = [float(base + 10 * rng.randint(0, 8)) for _ in range(ok)]  # coarse values: ties
        ids = []
        for i, lat in enumerate(latencies):
            rid = f"{variant}-ok-{i}"
            _add(log, rid, variant, 200, lat, 1000.0 + i, ttft=lat / 4, tokens=10 + i % 3)
            ids.append(rid)
        for i, status in enumerate(errors):
            _add(log, f"{variant}-err-{i}", variant, status, 5.0, 2000.0 + i, tokens=0)
        for i in range(cancelled):
            _add(log, f"{variant}-cancel-{i}", variant, 499, 50.0, 3000.0 + i, tokens=3)
        data[variant] = {"latencies": latencies, "ids": ids, "errors": len(errors), "completed": ok + len(errors)}
    # votes: a 10 up / 8 down, b 20 up / 5 down; one b request voted down then up: its latest vote (up) counts
    for variant, up, down in (("a", 10, 8), ("b", 19, 5)):
        ids = data[variant]["ids"]
        for rid in ids[:up]:
            log.add_feedback(rid, 1)
        for rid in ids[up:up + down]:
            log.add_feedback(rid, -1)
    changed = data["b"]["ids"][30]
    log.add_feedback(changed, -1)
    log.add_feedback(changed, 1, "changed my mind")
    # a different experiment, which must not leak into exp1's numbers
    log.add_request(RequestRecord(id="other-1", variant="a", model="m", endpoint="chat", status=500,
                                  experiment="exp2", latency_ms=1.0, created=5000.0))
    return log, data


def test_ab_report_end_to_end(ab_log, tmp_path):
    log, data = ab_log
    report = ab_report(str(tmp_path / "log.db"), experiment="exp1")
    json.dumps(report, allow_nan=False)
    a, b = report["variants"]["a"], report["variants"]["b"]
    assert report["baseline"] == "a"
    assert (a["requests"], a["errors"], a["cancelled"], a["completed"]) == (40, 3, 1, 39)
    assert (b["requests"], b["errors"], b["cancelled"], b["completed"]) == (50, 5, 3, 47)
    assert a["error_rate"] == pytest.approx(3 / 39) and b["error_rate"] == pytest.approx(5 / 47)
    assert (a["thumbs_up"], a["thumbs_down"]) == (10, 8)
    assert (b["thumbs_up"], b["thumbs_down"]) == (20, 5)
    assert b["thumbs_up_rate"] == pytest.approx(20 / 25)
    lat_a = np.array(data["a"]["latencies"])
    assert a["latency_ms"]["p50"] == pytest.approx(np.percentile(lat_a, 50))
    assert a["latency_ms"]["p99"] == pytest.approx(np.percentile(lat_a, 99))
    assert a["ttft_ms"]["p50"] == pytest.approx(np.percentile(lat_a / 4, 50))
    assert a["mean_completion_tokens"] == pytest.approx(np.mean([10 + i % 3 for i in range(36)]))

    (cmp,) = report["comparisons"]
    assert cmp["variant"] == "b" and cmp["baseline"] == "a"
    assert cmp["thumbs_up_rate"]["p"] == pytest.approx(scipy_two_sided_p(20, 25, 10, 18), rel=1e-9)
    assert cmp["thumbs_up_rate"]["z"] > 0  # b's rate is higher
    assert cmp["error_rate"]["p"] == pytest.approx(scipy_two_sided_p(5, 47, 3, 39), rel=1e-9)
    ref = mannwhitneyu(data["b"]["latencies"], data["a"]["latencies"], alternative="two-sided",
                       method="asymptotic", use_continuity=True)
    assert cmp["latency"]["u"] == pytest.approx(ref.statistic)
    assert cmp["latency"]["p"] == pytest.approx(ref.pvalue, abs=1e-9)
    assert cmp["latency"]["significant"] == (ref.pvalue < 0.05)

    text = format_report(report)
    assert "a (baseline)" in text and "b" in text
    png = plot_report(report, tmp_path / "plots" / "ab.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ab_report_baseline_and_pooling(ab_log):
    log, _ = ab_log
    report = ab_report(log, experiment="exp1", baseline="b")
    assert [c["variant"] for c in report["comparisons"]] == ["a"]
    pooled = ab_report(log)
    assert pooled["variants"]["a"]["requests"] == 41 and any("several experiments" in n for n in pooled["notes"])
    late = ab_report(log, experiment="exp1", since=1500.0)  # only the errors and disconnects came later
    assert late["variants"]["b"]["requests"] == 8 and late["variants"]["b"]["latency_ms"]["n"] == 0
    with pytest.raises(ConfigError, match="exp1"):
        ab_report(log, experiment="nope")
    with pytest.raises(ConfigError, match="baseline"):
        ab_report(log, experiment="exp1", baseline="c")


def test_ab_report_zero_counts(tmp_path):
    """No votes, no errors, a variant with only failures: p-values are None with a reason, JSON stays valid."""
    log = RequestLog(tmp_path / "log.db")
    for i in range(5):
        _add(log, f"a{i}", "a", 200, 100.0 + i, 1000.0 + i)
        _add(log, f"b{i}", "b", 200, 120.0 + i, 1000.0 + i)
    _add(log, "c0", "c", 503, None, 1000.0)
    report = ab_report(log)
    text = json.dumps(report, allow_nan=False)
    assert "NaN" not in text
    b, c = report["comparisons"]
    assert b["thumbs_up_rate"]["p"] is None and "votes" in b["thumbs_up_rate"]["reason"]
    assert b["error_rate"]["p"] is None and b["error_rate"]["reason"]
    assert b["latency"]["p"] is not None
    assert c["latency"]["p"] is None and c["latency"]["significant"] is False
    assert c["error_rate"]["p"] is not None  # 1/1 against 0/5
    assert report["variants"]["c"]["latency_ms"]["p50"] is None
    assert report["variants"]["a"]["thumbs_up_rate"] is None
    format_report(report)
    assert plot_report(report, tmp_path / "z.png").is_file()


def test_ab_report_missing_or_empty_db(tmp_path):
    with pytest.raises(ConfigError, match="no request log"):
        ab_report(tmp_path / "missing.db")
    RequestLog(tmp_path / "empty.db")
    with pytest.raises(ConfigError, match="no requests"):
        ab_report(tmp_path / "empty.db")


# ---- drift -----------------------------------------------------------------------------------------

def test_psi_kl_against_direct_numpy():
    ref_counts, rec_counts, eps = [5, 3, 2, 0], [1, 1, 4, 4], 1e-6
    p = np.array(ref_counts) / 10 + eps
    q = np.array(rec_counts) / 10 + eps
    p, q = p / p.sum(), q / q.sum()
    assert psi(ref_counts, rec_counts, eps) == pytest.approx(float(((q - p) * np.log(q / p)).sum()), rel=1e-12)
    assert kl_divergence(rec_counts, ref_counts, eps) == pytest.approx(float((q * np.log(q / p)).sum()), rel=1e-12)
    assert psi([1, 2, 3], [1, 2, 3]) == pytest.approx(0.0, abs=1e-15)


def test_quantile_bins_merge_repeated_edges():
    edges, ref, rec = quantile_bin_counts([1, 1, 1, 1, 2, 3, 4, 5], [0, 1, 6, 6], bins=4)
    assert edges == sorted(set(edges))
    assert sum(ref) == 8 and sum(rec) == 4
    assert rec[-1] == 2 and ref[0] == 4  # lengths above every edge land in the open top bin


def _insert(log, prompts, start, tokenizer, with_text=True, variant="a"):
    rows = [RequestRecord(id=f"{variant}-{start}-{i}", variant=variant, model="m", endpoint="completions", status=200,
                          prompt_tokens=len(tokenizer.encode(p)), prompt_text=p if with_text else None,
                          created=float(start + i)).__dict__ for i, p in enumerate(prompts)]
    with log.engine.begin() as conn:
        conn.execute(insert(requests_table), rows)


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def stories(shared_data):
    lines = [line.strip() for line in (shared_data / "tinystories" / "tinystories_val_head.txt")
             .read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(0).shuffle(lines)
    return [line[:400] for line in lines]


def test_hand_made_drift_numbers(tmp_path, tok):
    log = RequestLog(tmp_path / "d.db")
    ref, rec = ["aab", "abc", "ab"], ["ccd", "cd"]
    _insert(log, ref, 1000, tok)
    _insert(log, rec, 2000, tok)
    report = drift_report(log, tok, recent=(2000.0, math.inf))
    json.dumps(report, allow_nan=False)
    ref_c, rec_c = Counter("".join(ref)), Counter("".join(rec))
    support = sorted(set(ref_c) | set(rec_c))
    p = np.array([ref_c[s] for s in support], float)
    q = np.array([rec_c[s] for s in support], float)
    p, q = p / p.sum() + 1e-6, q / q.sum() + 1e-6
    p, q = p / p.sum(), q / q.sum()
    assert report["tokens"]["psi"] == pytest.approx(float(((q - p) * np.log(q / p)).sum()), rel=1e-9)
    assert report["tokens"]["kl"] == pytest.approx(float((q * np.log(q / p)).sum()), rel=1e-9)
    assert report["tokens"]["new_tokens"] == 1  # "d"
    assert report["windows"]["reference"]["requests"] == 3 and report["windows"]["recent"]["requests"] == 2
    # a PSI of 5 is far over 0.2, but 5 requests can be dealt into windows of 3 and 2 only 10 ways: chance
    assert report["tokens"]["psi"] > 1 and report["tokens"]["psi_p"] >= 0.1
    assert not report["drift"] and any("too few to tell it from chance" in n for n in report["notes"])


def test_permutation_p_matches_enumerating_every_deal():
    # 7 values dealt 4 / 3: all 35 deals enumerated against the random deals drift uses
    values = np.array([1.0, 2.0, 2.5, 4.0, 7.0, 8.0, 9.5])
    statistic = lambda ref, rec: abs(values[ref].mean() - values[rec].mean())  # noqa: E731
    observed = statistic(np.arange(4), np.arange(4, 7))
    deals = [(np.array(ref), np.array([i for i in range(7) if i not in ref])) for ref in combinations(range(7), 4)]
    exact = np.mean([statistic(ref, rec) >= observed - 1e-12 for ref, rec in deals])
    p = permutation_p(statistic, 4, 3, observed, permutations=4999)
    assert exact == pytest.approx(1 / 35)  # the four lowest against the three highest: the one extreme deal
    assert p == pytest.approx(exact, abs=0.015)


def test_drift_small_windows_of_the_same_traffic_not_flagged(tmp_path, tok, stories):
    # 40 against 12 prompts of the same traffic: PSI alone clears 0.2 nearly every time (empty bins),
    # the permutation test almost never
    over_threshold = flagged = 0
    for trial in range(20):
        pick = random.Random(trial).sample(stories, 52)
        log = RequestLog(tmp_path / f"d{trial}.db")
        _insert(log, pick[:40], 1000, tok)
        _insert(log, pick[40:], 5000, tok)
        report = drift_report(log, tok, recent=(5000.0, math.inf))
        over_threshold += report["length"]["psi"] > 0.2 or report["tokens"]["psi"] > 0.2
        flagged += report["drift"]
    assert over_threshold >= 15 and flagged <= 1


def test_drift_small_windows_of_different_prompts_flagged(tmp_path, tok, stories):
    log = RequestLog(tmp_path / "d.db")
    _insert(log, stories[:40], 1000, tok)
    rng = random.Random(1)
    _insert(log, [f"def f{i}(x):\n    return x * {rng.randint(10**12, 10**18)}\n" * 8 for i in range(12)], 5000, tok)
    report = drift_report(log, tok, recent=(5000.0, math.inf))
    assert set(report["tripped"]) == {"length_psi", "tokens_psi"}
    assert report["length"]["psi_p"] < 0.01 and report["tokens"]["psi_p"] < 0.01


def test_drift_same_distribution_not_flagged(tmp_path, tok, stories):
    log = RequestLog(tmp_path / "d.db")
    _insert(log, stories[:600], 1000, tok)
    _insert(log, stories[600:800], 5000, tok)
    report = drift_report(log, tok)  # default: the latest quarter against the rest
    assert report["windows"]["recent"]["requests"] == 200
    assert not report["drift"], format_drift(report)
    assert report["length"]["psi"] < 0.2 and report["tokens"]["psi"] < 0.2
    assert report["length"]["ks_p"] > 0.01


def test_drift_different_prompts_flagged(tmp_path, tok, stories):
    log = RequestLog(tmp_path / "d.db")
    _insert(log, stories[:300], 1000, tok)
    rng = random.Random(1)
    code = [f"def f{i}(x):\n    return x * {rng.randint(10**12, 10**18)} + {rng.randint(0, 10**9)}\n" * 8
            for i in range(100)]
    _insert(log, code, 5000, tok)
    report = drift_report(log, tok, recent=(5000.0, math.inf))
    assert report["drift"]
    assert report["length"]["psi"] > 0.2 and report["tokens"]["psi"] > 0.2
    assert set(report["tripped"]) >= {"length_psi", "tokens_psi"}
    assert "drift: YES" in format_drift(report)

    registry = drift_metrics(report)
    assert registry.get_sample_value("pocketlm_drift_psi", {"distribution": "tokens"}) == pytest.approx(
        report["tokens"]["psi"])
    assert registry.get_sample_value("pocketlm_drift_kl_tokens") == pytest.approx(report["tokens"]["kl"])
    assert registry.get_sample_value("pocketlm_drift_flag") == 1.0
    assert registry.get_sample_value("pocketlm_drift_psi_p", {"distribution": "length"}) == report["length"]["psi_p"]
    text = write_drift_metrics(report, tmp_path / "textfile" / "drift.prom").read_text()
    assert 'pocketlm_drift_psi{distribution="length"}' in text and "pocketlm_drift_flag 1.0" in text


def test_drift_without_prompt_text(tmp_path, tok, stories):
    log = RequestLog(tmp_path / "d.db")
    _insert(log, stories[:100], 1000, tok, with_text=False)
    _insert(log, ["9" * 300] * 50, 5000, tok, with_text=False)
    report = drift_report(log, tok, reference=(0.0, 5000.0), recent=(5000.0, 6000.0))
    assert report["tokens"] is None and report["perplexity"] is None
    assert any("log_prompts: true" in n for n in report["notes"])
    assert report["drift"] and report["tripped"] == ["length_psi"]
    registry = drift_metrics(report)
    assert registry.get_sample_value("pocketlm_drift_kl_tokens") is None
    assert "log_prompts: true" in format_drift(report)


def test_drift_perplexity_with_tiny_model(tmp_path, tok, stories):
    from pocketlm.checkpoint import load_model

    model, tokenizer = load_model(tiny_model_dir(tmp_path / "tiny"))
    log = RequestLog(tmp_path / "d.db")
    _insert(log, stories[:12], 1000, tokenizer)
    _insert(log, ["1234567890 " * 20] * 6, 5000, tokenizer)
    report = drift_report(log, tokenizer, model, recent=(5000.0, math.inf), max_prompts=5)
    ppl = report["perplexity"]
    assert math.isfinite(ppl["ratio"]) and ppl["ratio"] > 0
    assert ppl["reference"] > 1 and ppl["recent"] > 1
    assert ppl["recent_tokens"] == 5 * (model.context_length - 1)  # capped at the context, 5 prompts scored
    json.dumps(report, allow_nan=False)
    assert drift_metrics(report).get_sample_value("pocketlm_drift_perplexity_ratio") == pytest.approx(ppl["ratio"])


def test_drift_bad_input(tmp_path, tok):
    log = RequestLog(tmp_path / "d.db")
    with pytest.raises(ConfigError, match="no requests"):
        drift_report(log, tok)
    _insert(log, ["hello there", "general kenobi"], 1000, tok)
    with pytest.raises(ConfigError, match="recent window"):
        drift_report(log, tok, recent=(9000.0, 9999.0))
    with pytest.raises(ConfigError, match="reference window"):
        drift_report(log, tok, reference=(0.0, 10.0), recent=(1000.0, 2000.0))
    with pytest.raises(ConfigError, match="recent_fraction"):
        drift_report(log, tok, recent_fraction=1.5)
    with pytest.raises(ConfigError, match="alpha is 0; expected a number between 0 and 1"):
        drift_report(log, tok, alpha=0)
    with pytest.raises(ConfigError, match="psi_threshold is -1; expected a number above 0"):
        drift_report(log, tok, psi_threshold=-1)


def test_drift_cli_thresholds(tmp_path, tok, stories):
    db = tmp_path / "d.db"
    log = RequestLog(db)
    _insert(log, stories[:40], 1000, tok)
    _insert(log, stories[40:52], 5000, tok)

    def drift(*args):
        return subprocess.run([sys.executable, "-m", "pocketlm", "drift", "--db", str(db), "--recent-fraction", "0.23",
                               *args], capture_output=True, text=True)

    default = drift()
    assert default.returncode == 0 and "drift: no" in default.stdout and "too few to tell" in default.stdout
    loose = drift("--alpha", "0.99")  # any PSI over 0.2 now counts: these small windows trip on prompt length
    assert loose.returncode == 1 and "length_psi" in loose.stdout and "p < 0.99" in loose.stdout
    strict = drift("--alpha", "0.99", "--psi-threshold", "1000")
    assert strict.returncode == 0 and "PSI > 1000.0" in strict.stdout
    bad = drift("--alpha", "1.5")
    assert bad.returncode == 1
    assert bad.stderr.strip() == "error: alpha is 1.5; expected a number between 0 and 1, e.g. 0.01"
