"""The benchmark scripts still run against the code they measure (one had stopped importing after a
refactoring and nothing noticed): a short run of the training benchmark, checked for sane figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_train_throughput_benchmark_runs(tmp_path):
    out = tmp_path / "train.json"
    run = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--steps", "30", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pocketlm speed-up" in run.stdout
    results = json.loads(out.read_text())["results"]
    for name in ("pocketlm", "nanoGPT-shaped peer"):
        figures = results[name]
        assert 0 < figures["ms_per_iter"] < 10_000
        # 30 steps from a uniform guess over 65 characters (ln 65 = 4.17) must already have learned something
        assert math.isfinite(figures["val_loss"]) and figures["val_loss"] < math.log(65)


def test_train_attention_benchmark_runs(tmp_path):
    from pocketlm.kernels import train_attention

    if not train_attention.available():
        pytest.skip("needs an x86 CPU with AVX2 and a C++ compiler")
    out = tmp_path / "attention.json"
    run = subprocess.run([sys.executable, "benchmarks/train_attention.py", "--steps", "12", "--repeats", "3",
                          "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert len(results["attention"]) == 8 and all(r["kernel_ms"] > 0 and r["pytorch_ms"] > 0 for r in results["attention"])
    assert 0 < results["step"]["kernel_ms"] < 10_000 and 0 < results["step"]["pytorch_ms"] < 10_000


def test_train_matmul_floor_benchmark_runs():
    run = subprocess.run([sys.executable, "benchmarks/train_matmul_floor.py"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    # the FLOP count is arithmetic on the recipe's shape: 4 layers x 3 products x 2 x 768 tokens x weights
    assert "3.64 GFLOP" in run.stdout and "SGEMM" in run.stdout


def test_decode_benchmark_compares_repeated_contenders_within_their_round():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from decode import rounds
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    class Run:
        def __init__(self, name):
            self.name = name

    runs = [Run(n) for n in ("int4", "llama.cpp", "transformers", "int4", "llama.cpp", "int8")]
    assert [[r.name for r in group] for group in rounds(runs)] == [
        ["int4", "llama.cpp", "transformers"], ["int4", "llama.cpp", "int8"]]
    assert rounds(runs[:2]) == [runs[:2]]


@pytest.mark.slow  # the real SmolLM2
def test_few_rows_benchmark_runs_and_batched_tokens_agree(smollm2_dir, tmp_path):
    out = tmp_path / "few_rows.json"
    run = subprocess.run([sys.executable, "benchmarks/few_rows.py", "--tokens", "12", "--repeats", "1",
                          "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert sorted(results["matmuls"]) == [str(rows) for rows in range(1, 9)]
    for batch, figures in results["batched_decode"].items():
        # SmolLM2's greedy tokens do not depend on which way round the few-row matmuls are computed
        assert figures["same_tokens"], f"batch {batch}: W @ x^T changed the greedy tokens"
        assert figures["on_tokens_per_s"] > 0 and figures["off_tokens_per_s"] > 0


@pytest.mark.slow  # the real SmolLM2
def test_bf16_cpu_benchmark_runs(smollm2_dir):
    run = subprocess.run([sys.executable, "benchmarks/bf16_cpu.py", "--repeats", "1"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "bfloat16 / float32 time: forward" in run.stdout


def test_serve_soak_benchmark_runs_and_counts_what_it_sends(tmp_path):
    """A short soak of pocketlm's server on a tiny model: every kind of request is sent, none gets a 5xx or
    loses its connection, canaries keep their answers, hostile bodies get 4xx, dropped streams are freed."""
    from helpers import tiny_model_dir

    tiny = tiny_model_dir(tmp_path / "tiny", seed=2, max_position_embeddings=512)
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, "benchmarks/serve_soak.py", "--servers", "pocketlm", "--model", str(tiny),
                          "--vocab", "300", "--max-context", "512", "--max-batch", "8", "--duration", "8",
                          "--clients", "6", "--settle", "2", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())["results"]["pocketlm"]
    assert result["requests"] > 20 and all(result["by_kind"][kind] for kind in result["by_kind"]), result["by_kind"]
    assert result["server_errors_5xx"] == 0 and result["transport_failures"] == 0, result["problem_samples"]
    assert result["canary_mismatches"] == 0 and result["hostile_4xx"] == result["hostile"]
    assert result["idle_after_s"] is not None and result["health_failures"] == 0


@pytest.mark.slow  # the real SmolLM2
def test_structured_benchmark_runs_and_decodes_the_same_tokens_both_ways(smollm2_dir, tmp_path):
    out = tmp_path / "structured.json"
    run = subprocess.run([sys.executable, "benchmarks/structured.py", "--tokens", "12", "--repeats", "1", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert 0 < result["mask_ms_p50"] <= result["mask_ms_p99"]
    assert result["batch1_tok_s"]["free"] > 0 and result["batch8_tok_s"]["constrained"] > 0


@pytest.mark.slow  # the real SmolLM2
def test_structured_eval_benchmark_compares_free_and_constrained_answers(smollm2_dir, tmp_path):
    out = tmp_path / "structured_eval.json"
    run = subprocess.run([sys.executable, "benchmarks/structured_eval.py", "--gsm8k", "1", "--arc", "6", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {(r["task"], r["decoding"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(t, d) for t in ("gsm8k", "arc_challenge_label") for d in ("free", "constrained")}
    assert rows["arc_challenge_label", "constrained"]["parsed"] == 1.0  # a label, always
    assert rows["gsm8k", "constrained"]["parsed"] == 1.0 and rows["gsm8k", "constrained"]["n"] == 1


def test_retrieval_benchmark_scores_three_retrievers(shared_data, tmp_path):
    from pocketlm.retrieval.collection import Collection, read_cranfield, write_beir

    full = read_cranfield(shared_data / "cranfield")  # a slice: ten queries over 120 documents
    queries = {q: full.queries[q] for q in list(full.queries)[:10]}
    docs = sorted({d for q in queries for d in full.qrels[q]} | {str(i) for i in range(1, 61)}, key=int)
    dataset = write_beir(Collection({d: full.corpus[d] for d in docs}, queries, {q: full.qrels[q] for q in queries}),
                         tmp_path / "slice")
    out = tmp_path / "retrieval.json"
    run = subprocess.run([sys.executable, "benchmarks/retrieval.py", "--dataset", str(dataset), "--repeats", "1",
                          "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    for name in ("bm25", "dense", "hybrid"):
        assert 0 < result[name]["ndcg@10"] <= 1 and 0 < result[name]["query_ms_p50"] <= result[name]["query_ms_p99"]
        assert 0 < result["index"][name]["ndcg@10"] <= 1
    assert result["index"]["chunks"] >= len(docs) and 0 < result["index"]["ask_search_ms_p50"] <= result["index"]["ask_search_ms_p99"]


@pytest.mark.slow
def test_rag_answers_benchmark_runs_closed_book_and_with_retrieval(tmp_path):
    out = tmp_path / "rag.json"
    run = subprocess.run([sys.executable, "benchmarks/rag_answers.py", "--limit", "2", "--cited-limit", "1",
                          "--small-corpus", "--work", str(tmp_path / "work"), "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"closed_book", "retrieval", "retrieval_cited"}
    assert result["runs"]["retrieval"]["retrieved_holds_answer"] == 1.0 and result["runs"]["retrieval"]["n"] == 2
    assert "retrieved_holds_answer" not in result["runs"]["closed_book"]
    assert 0 <= result["runs"]["retrieval_cited"]["cited_holds_answer"] <= result["runs"]["retrieval_cited"]["cited"] <= 1
