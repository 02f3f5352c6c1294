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
MMLU_LIMIT = 3  # per subject: 57 x 3 questions, 684 answers


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


def test_every_mmlu_subject_matches_lm_eval_hf(smollm2_dir, shared_data, tmp_path, monkeypatch):
    """The first 3 questions of each of the 57 MMLU subjects, the longest prompts included (the full
    14,042, about 55 minutes on 2 cores, are in BENCHMARKS.md): per-answer log-likelihoods as lm-eval's
    `hf` model gives them. Both sides are matmul-bound here, about 0.6 s a question each on AVX2."""
    from pocketlm.evaluate.loaders import mmlu_subjects

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    subjects = [f"mmlu_{s}" for s in mmlu_subjects(shared_data / "mmlu")]
    assert len(subjects) == 57
    mapping = write_local_tasks(tmp_path, subjects, shared_data)
    hf = run_lm_eval("hf", f"pretrained={smollm2_dir},dtype=float32", [mapping[s][0] for s in subjects], tmp_path,
                     MMLU_LIMIT)
    ours = run_pocketlm(smollm2_dir, [mapping[s][1] for s in subjects], MMLU_LIMIT)
    for subject in subjects:
        theirs = hf[mapping[subject][0]]
        assert len(theirs["lls"]) == len(ours[subject]["lls"]) == MMLU_LIMIT, subject
        assert max_ll_difference(theirs["lls"], ours[subject]["lls"]) < 2e-3, subject
        assert ours[subject]["acc"] == pytest.approx(theirs["acc"]), subject
