"""The command line: real runs end to end, and bad input as one clear line with a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from helpers import tiny_model_dir

from pocketlm.kernels import cpu_ops


def pocketlm(*args, env=None, stdin=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pocketlm", *map(str, args)], capture_output=True, text=True,
                          env=full_env, input=stdin, timeout=600)


def assert_clean_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    text = " ".join(lines[0].split())
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture
def model_dir(tmp_path):
    return tiny_model_dir(tmp_path / "m")


def test_truncated_safetensors(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4096])
    assert_clean_error(pocketlm("generate", model_dir, "hi"), "model.safetensors", "truncated")


def test_directory_missing_a_tensor(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors")
    assert_clean_error(pocketlm("generate", model_dir, "hi"), "missing tensor model.layers.0.self_attn.k_proj.weight")


def test_text_file_given_as_checkpoint(tmp_path):
    text = tmp_path / "notes.bin"
    text.write_text("hello, I am a text file and not a checkpoint\n" * 20)
    assert_clean_error(pocketlm("import", text, tmp_path / "out", "--tokenizer", text), "notes.bin")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert_clean_error(pocketlm("import", other, tmp_path / "out"), "notes.txt", "not a model pocketlm can import")


def test_gguf_of_another_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_clean_error(pocketlm("import", path, tmp_path / "out"), "gpt2", "llama")


def test_unknown_model_name_for_pull():
    assert_clean_error(pocketlm("pull", "no-such-model-7b"), "unknown model 'no-such-model-7b'", "smollm2-135m-instruct")


def test_hf_pull_offline_is_one_line(tmp_path):
    result = pocketlm("pull", "hf:SomeOrg/some-model", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                                                           "POCKETLM_CACHE": str(tmp_path / "cache")})
    assert_clean_error(result, "hf:SomeOrg/some-model", "HF_HUB_OFFLINE")


def test_bad_sampling_value(model_dir):
    assert_clean_error(pocketlm("generate", model_dir, "hi", "--temperature", "-1"), "temperature must be >= 0")
    assert_clean_error(pocketlm("generate", model_dir, "hi", "--temperature", "nan"), "temperature must be >= 0 and finite")
    assert_clean_error(pocketlm("generate", model_dir, "hi", "--repetition-penalty", "inf"), "repetition_penalty")


def test_generate_and_chat_take_every_extreme_the_sampler_accepts(shared_data, tmp_path):
    """stories260K (a real model): a temperature or top-p too small to divide by decodes greedily, and any
    integer seed works (folded into 64 bits: 2**70 + 5, 5 and 5 - 2**64 sample alike)."""
    llama2c = shared_data / "llama2c"
    model = tmp_path / "stories"
    assert pocketlm("import", llama2c / "stories260K.bin", model, "--tokenizer", llama2c / "tok512.model").returncode == 0
    greedy = pocketlm("generate", model, "Once upon a time", "--max-tokens", "20")
    assert greedy.returncode == 0, greedy.stderr
    for extreme in (["--temperature", "1e-60"], ["--temperature", "0.8", "--top-p", "1e-300"],
                    ["--temperature", "5e-324", "--seed", str(2**70)]):
        result = pocketlm("generate", model, "Once upon a time", "--max-tokens", "20", *extreme)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (extreme, result.stderr[-2000:])
        assert result.stdout == greedy.stdout, extreme
    # a repetition penalty near 0 pushes seen tokens' logits to infinity: still a token, the seen one repeated
    pushed = pocketlm("generate", model, "Once upon a time", "--max-tokens", "20", "--temperature", "0.7",
                      "--repetition-penalty", "1e-300")
    assert pushed.returncode == 0 and pushed.stdout.startswith("Once upon a time"), pushed.stderr[-2000:]
    seeded = [pocketlm("generate", model, "Once upon a time", "--max-tokens", "20", "--temperature", "1.0",
                       "--seed", str(seed)) for seed in (2**70 + 5, 5, -(2**64) + 5)]
    assert all(r.returncode == 0 for r in seeded) and seeded[0].stdout == seeded[1].stdout == seeded[2].stdout


def test_chat_takes_the_same_extremes(model_dir):
    plain = pocketlm("chat", model_dir, "--max-tokens", "8", stdin="hi\n")
    assert plain.returncode == 0, plain.stderr
    for extreme in (["--temperature", "1e-60"], ["--temperature", "0.5", "--top-p", "1e-300", "--seed", str(2**70)]):
        result = pocketlm("chat", model_dir, "--max-tokens", "8", *extreme, stdin="hi\n")
        assert result.returncode == 0 and "Traceback" not in result.stderr, (extreme, result.stderr[-2000:])
        assert result.stdout == plain.stdout, extreme


def test_generate_and_chat_on_stories260k(shared_data, tmp_path):
    llama2c = shared_data / "llama2c"
    imported = pocketlm("import", llama2c / "stories260K.bin", tmp_path / "stories", "--tokenizer", llama2c / "tok512.model")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == str(tmp_path / "stories")
    result = pocketlm("generate", tmp_path / "stories", "Once upon a time", "--max-tokens", "30")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside in the park.")
    assert "tokens/s" in result.stderr
    # a model without a chat template: chat refuses in one line
    assert_clean_error(pocketlm("chat", tmp_path / "stories", stdin="hi\n"), "no chat template")


def test_export_round_trip_via_cli(shared_data, tmp_path):
    llama2c = shared_data / "llama2c"
    pocketlm("import", llama2c / "stories260K.bin", tmp_path / "stories", "--tokenizer", llama2c / "tok512.model")
    result = pocketlm("export", tmp_path / "stories", tmp_path / "s.bin", "--format", "llama2c")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s.bin").read_bytes() == (llama2c / "stories260K.bin").read_bytes()
    assert_clean_error(pocketlm("export", tmp_path / "stories", tmp_path / "x", "--format", "onnx"), "unknown export format 'onnx'")


def test_prepare_reports_skipped_files_and_strict_stops(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Write to jane.doe@example.com or call +1 415 555 0100.\n\nAnother paragraph here.")
    (corpus / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00binary")
    (corpus / "c.txt").write_bytes("caf\xe9 latin-1 text".encode("latin-1"))
    result = pocketlm("prepare", corpus, "--out", tmp_path / "shards", "--tokenizer", "char", "--val-fraction", "0.2")
    assert result.returncode == 0, result.stderr
    report = " ".join(result.stderr.split())
    assert "b.txt" in report and "c.txt" in report
    assert (tmp_path / "shards" / "manifest.json").is_file()
    strict = pocketlm("prepare", corpus, "--out", tmp_path / "strict", "--tokenizer", "char", "--strict")
    assert_clean_error(strict, "b.txt")
    assert not (tmp_path / "strict").exists()


def test_quantize_export_and_bench_commands(model_dir, tmp_path):
    import json

    q = pocketlm("quantize", model_dir, tmp_path / "q4", "--to", "int4", "--group-size", "32")
    assert q.returncode == 0, q.stderr
    assert "int4 group 32 asymmetric" in q.stderr and "smaller" in q.stderr
    assert json.loads((tmp_path / "q4" / "pocketlm.json").read_text())["quantization"]["method"] == "int4"

    e = pocketlm("export", tmp_path / "q4", tmp_path / "q4.gguf")
    assert e.returncode == 0, e.stderr
    from gguf import GGUFReader

    assert {t.tensor_type.name for t in GGUFReader(tmp_path / "q4.gguf").tensors} == {"Q4_1", "Q8_0", "F32"}

    g = pocketlm("generate", tmp_path / "q4", "the theory", "-n", "5")
    assert g.returncode == 0, g.stderr and "5 tokens" in g.stderr

    b = pocketlm("bench", tmp_path / "q4", "-n", "6", "--prompt-tokens", "10", "--batch", "3", "--repeats", "1",
                 "--no-compile", "--vs", "transformers", "--json", tmp_path / "bench.json")
    assert b.returncode == 0, b.stderr
    assert "decode tok/s" in b.stdout and "pocketlm / transformers: decode" in b.stdout
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [r["name"] for r in results] == ["pocketlm", "transformers"]
    native = " native step" if cpu_ops.wanted() and cpu_ops.load() else ""  # see pocketlm.kernels.decode_step
    assert results[0]["weights"] == f"int4 group 32 asymmetric{native}" and results[0]["decode_tokens_per_s"] > 0
    assert set(results[0]["batch_tokens_per_s"]) == {"3"}


def test_quantize_and_bench_bad_input(model_dir, tmp_path):
    assert_clean_error(pocketlm("quantize", model_dir, tmp_path / "x", "--to", "int3"), "unknown quantization 'int3'")
    assert_clean_error(pocketlm("quantize", model_dir, tmp_path / "x", "--to", "int4", "--group-size", "48"),
                       "group size")
    assert_clean_error(pocketlm("bench", model_dir, "--vs", "vllm"), "unknown peer 'vllm'")
    assert not (tmp_path / "x").exists()


def test_generate_with_a_draft_model(model_dir, tmp_path):
    plain = pocketlm("generate", model_dir, "the theory", "-n", "12")
    spec = pocketlm("generate", model_dir, "the theory", "-n", "12", "--draft", model_dir, "--draft-tokens", "3")
    assert spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "draft acceptance 100%" in spec.stderr
    sampled = pocketlm("generate", model_dir, "the theory", "-n", "12", "--draft", model_dir, "-t", "0.8", "--seed", "3")
    assert sampled.returncode == 0 and "draft acceptance 100%" in sampled.stderr, sampled.stderr
    assert_clean_error(pocketlm("generate", model_dir, "x", "--draft", model_dir, "--repetition-penalty", "1.2"),
                       "repetition penalty")
