"""A windowed mixture of experts (Mixtral's layers with a sliding window), quantized, through the stages after
training: the OpenAI-compatible server (concurrent requests with prompts past the window, each answered as
generation answers it alone), `pocketlm eval` (scores equal to the model's own log-likelihoods), `bench` and
`compare`."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from pocketlm.checkpoint import load_model
from pocketlm.engine import SamplingParams, generate_tokens
from pocketlm.quant import QuantScheme
from pocketlm.quantize import quantize_dir

from helpers import tiny_mixture_dir
from serve_helpers import running_server

WINDOW = 8


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> tuple[Path, Path]:
    """(the float mixture, its int4 copy): 4 experts, top 2, every layer windowed. Its output head is scaled up
    so greedy choices win by clear margins (a random model's near-ties would flip on rounding)."""
    from pocketlm.checkpoint import save_model_dir

    root = tmp_path_factory.mktemp("sparse")
    random_dir = tiny_mixture_dir(root / "random", intermediate_size=192, sliding_window=WINDOW,
                                  max_position_embeddings=256)
    model, tokenizer = load_model(random_dir)
    state = model.state_dict()
    state["lm_head.weight"] = state["lm_head.weight"] * 30
    float_dir = save_model_dir(root / "moe-sw", model.config.to_hf_dict(), state, tokenizer)
    return float_dir, quantize_dir(float_dir, root / "moe-sw-int4", QuantScheme("int4", 32))


def test_the_server_answers_each_request_as_generation_does(mixture, tmp_path, monkeypatch):
    """With fp32 activations in the kernels: with int8 ones (qdot) one row and many round differently, and a
    random router's near-ties then send a token to another expert."""
    import openai

    from pocketlm.kernels import cpu_ops

    monkeypatch.setenv(cpu_ops.SWITCH, "exact")

    from pocketlm.serve.app import create_app
    from pocketlm.serve.config import load_serve_config

    _, int4 = mixture
    model, tokenizer = load_model(int4)
    # 25, 78 and 138 tokens, each ending differently within the window
    prompts = ["the theory of everything " * k + end for k, end in ((1, "and more"), (3, "or less"), (5, "at all"))]
    new = 3 * WINDOW
    expected = []  # each answer's tokens (as the server names them: each one decoded alone) and their log-probs
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        out = list(generate_tokens(model, ids, SamplingParams(max_new_tokens=new, ignore_eos=True)))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids + out]))[0, len(ids) - 1:-1].float(), -1)
        expected.append(([tokenizer.decode([t]) for t in out], [float(logprobs[i, t]) for i, t in enumerate(out)]))
    app = create_app(load_serve_config(None, [str(int4)], database=str(tmp_path / "log.db")))
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")

        def complete(prompt: str):
            reply = client.completions.create(model=int4.name, prompt=prompt, max_tokens=new, temperature=0, logprobs=1,
                                              extra_body={"ignore_eos": True})
            return reply.choices[0].logprobs

        with ThreadPoolExecutor(len(prompts)) as pool:
            served = list(pool.map(complete, prompts))
    for got, (tokens, logprobs) in zip(served, expected):
        assert got.tokens == tokens
        assert got.token_logprobs == pytest.approx(logprobs, abs=1e-3)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pocketlm", *map(str, args)], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def _task(tmp_path: Path) -> Path:
    rows = [{"q": "the theory of everything and more the theory of", "options": ["everything", "nothing", "more"],
             "answer": 0},
            {"q": "a", "options": ["cat sat on the mat and then the dog came", "b"], "answer": 1}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text("task: t\ntype: multiple_choice\ndata: t.jsonl\nprompt: '{{q}}'\n"
                                     "choices: '{{options}}'\ntarget: '{{answer}}'\n")
    return tmp_path / "t.yaml"


def test_eval_scores_are_the_models_own_loglikelihoods(mixture, tmp_path):
    """Packed scoring (a question's choices in one row, each seeing the context and itself) under the window:
    every choice's log-likelihood equals one uncached pass over context and choice, some of them past the window."""
    from pocketlm.evaluate.scoring import encode_pair
    from pocketlm.evaluate.taskfile import load_task_file

    float_dir, _ = mixture
    task_file = _task(tmp_path)
    run = _cli("eval", float_dir, "--tasks", task_file, "-o", tmp_path / "r.json", "--log-samples")
    assert run.returncode == 0, run.stderr
    logged = json.loads((tmp_path / "r.json").read_text())
    samples = next(v for k, v in logged.items() if k.startswith("samples"))
    samples = samples["t"] if isinstance(samples, dict) else samples
    model, tokenizer = load_model(float_dir)
    task = load_task_file(task_file)
    longest = 0
    for example, sample in zip(task.load(), samples, strict=True):
        for (context, continuation), got in zip(task.requests(example, []), sample["loglikelihoods"], strict=True):
            ctx, cont = encode_pair(tokenizer, context, continuation)
            whole = ctx + cont
            longest = max(longest, len(whole))
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole]))[0].float(), -1)
            want = sum(float(logprobs[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
            assert got == pytest.approx(want, abs=1e-4)
    assert longest > WINDOW


def test_bench_and_compare_run_on_the_mixture(mixture, tmp_path):
    float_dir, int4 = mixture
    bench = _cli("bench", int4, "-n", "6", "--prompt-tokens", "12", "--batch", "2", "--repeats", "1", "--no-compile",
                 "--json", tmp_path / "bench.json")
    assert bench.returncode == 0, bench.stderr
    result = json.loads((tmp_path / "bench.json").read_text())["results"][0]
    assert result["decode_tokens_per_s"] > 0 and set(result["batch_tokens_per_s"]) == {"2"}
    compare = _cli("compare", float_dir, int4, "--tasks", _task(tmp_path), "--out", tmp_path / "report",
                   "--prompt", "the theory", "--new-tokens", "4")
    assert compare.returncode == 0, compare.stderr
    rows = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [r["path"] for r in rows] == [str(float_dir), str(int4)] and all(r["decode_tokens_per_s"] > 0 for r in rows)
