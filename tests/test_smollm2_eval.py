"""SmolLM2-135M-Instruct through `pocketlm eval`, lm-evaluation-harness's `hf` model and the `pocketlm`
adapter inside lm-eval, on slices of ARC-Challenge, PIQA and MMLU anatomy (the full sets are in
benchmarks/eval_vs_lm_eval.py and BENCHMARKS.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.eval_vs_lm_eval import (
    max_ll_difference,
    run_lm_eval,
    run_pocketlm,
    write_local_tasks,
)

pytestmark = pytest.mark.slow
TASKS = ["arc_challenge", "piqa", "mmlu_anatomy"]
LIMIT = 25


@pytest.fixture(scope="module")
def three_runs(smollm2_dir, shared_data, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    tmp = tmp_path_factory.mktemp("lm_eval_tasks")
    mapping = write_local_tasks(tmp, TASKS, shared_data)
    names = [mapping[t][0] for t in TASKS]
    hf = run_lm_eval("hf", f"pretrained={smollm2_dir},dtype=float32", names, tmp, LIMIT)
    adapter = run_lm_eval("pocketlm", f"path={smollm2_dir},dtype=float32", names, tmp, LIMIT)
    ours = run_pocketlm(smollm2_dir, [mapping[t][1] for t in TASKS], LIMIT)
    return mapping, hf, adapter, ours


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("task", TASKS)
def test_pocketlm_eval_matches_lm_eval_hf(three_runs, task):
    mapping, hf, _, ours = three_runs
    name = mapping[task][0]
    assert len(hf[name]["lls"]) == len(ours[task]["lls"]) == LIMIT
    assert max_ll_difference(hf[name]["lls"], ours[task]["lls"]) < 2e-3  # per-choice log-likelihoods, in nats
    assert ours[task]["acc"] == pytest.approx(hf[name]["acc"])
    assert ours[task]["acc_norm"] == pytest.approx(hf[name]["acc_norm"])


@pytest.mark.parametrize("task", TASKS)
def test_lm_eval_adapter_gives_the_numbers_of_pocketlm_eval(three_runs, task):
    mapping, _, adapter, ours = three_runs
    name = mapping[task][0]
    # the same scorer; lm-eval hands it all tasks' requests at once, so batches are padded differently
    assert max_ll_difference(adapter[name]["lls"], ours[task]["lls"]) < 5e-4
    assert (adapter[name]["acc"], adapter[name]["acc_norm"]) == pytest.approx((ours[task]["acc"], ours[task]["acc_norm"]))
