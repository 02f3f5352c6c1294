"""The server on the real SmolLM2-135M-Instruct: lm-evaluation-harness's `local-completions` against
`pocketlm eval` on real ARC-Challenge and PIQA questions, and concurrent chats decoded together."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serve_helpers import running_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.eval_vs_lm_eval import max_ll_difference, run_lm_eval, run_pocketlm, write_local_tasks  # noqa: E402
from pocketlm.checkpoint import load_model  # noqa: E402
from pocketlm.engine import SamplingParams, generate_tokens
from pocketlm.streaming import chat_prompt  # noqa: E402
from pocketlm.serve.app import create_app  # noqa: E402
from pocketlm.serve.config import load_serve_config  # noqa: E402

pytestmark = pytest.mark.slow
TASKS = ["arc_challenge", "piqa"]
LIMIT = 20


@pytest.fixture(scope="module")
def server_url(smollm2_dir, tmp_path_factory):
    database = tmp_path_factory.mktemp("serve") / "log.db"
    app = create_app(load_serve_config(None, [str(smollm2_dir)], database=str(database), max_context=1024))
    with running_server(app) as url:
        yield url


def test_lm_eval_local_completions_through_the_server_matches_pocketlm_eval(server_url, smollm2_dir, shared_data,
                                                                             tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    mapping = write_local_tasks(tmp_path, TASKS, shared_data)
    names = [mapping[t][0] for t in TASKS]
    args = (f"base_url={server_url}/v1/completions,model={smollm2_dir.name},tokenizer={smollm2_dir},"
            "tokenizer_backend=huggingface,num_concurrent=4,max_retries=1")
    served = run_lm_eval("local-completions", args, names, tmp_path, LIMIT)
    ours = run_pocketlm(smollm2_dir, [mapping[t][1] for t in TASKS], LIMIT)
    for task in TASKS:
        name = mapping[task][0]
        ours_task = ours[task if task in ours else name]
        assert served[name]["acc"] == pytest.approx(ours_task["acc"]), task
        assert served[name]["acc_norm"] == pytest.approx(ours_task["acc_norm"]), task
        assert max_ll_difference(served[name]["lls"], ours_task["lls"]) < 2e-3, task


def ask_streaming(url: str, model: str, question: str, max_tokens: int) -> str:
    """A greedy streamed chat reply through the official client, EOS ignored."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_concurrent_chats_each_get_their_own_greedy_reply(server_url, smollm2_dir):
    model, tokenizer = load_model(smollm2_dir)
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
                 "Give me a word that rhymes with cat.", "What do bees make?", "Which planet is the largest?"]
    expected = []
    for question in questions:
        ids = chat_prompt(tokenizer, [{"role": "user", "content": question}])
        tokens = list(generate_tokens(model, ids, SamplingParams(max_new_tokens=24, ignore_eos=True)))
        expected.append(tokenizer.decode(tokens))
    with ThreadPoolExecutor(len(questions)) as pool:
        replies = list(pool.map(lambda q: ask_streaming(server_url, smollm2_dir.name, q, 24), questions))
    assert replies == expected
    assert "Paris" in replies[0]


@pytest.fixture(scope="module")
def int4_dir(smollm2_dir, tmp_path_factory):
    from pocketlm.quant import QuantScheme
    from pocketlm.quantize import quantize_dir

    return quantize_dir(smollm2_dir, tmp_path_factory.mktemp("int4") / "smollm2-int4", QuantScheme("int4", 32))


def test_the_int4_model_served_to_concurrent_chats_answers_as_the_engine_does(int4_dir, tmp_path, monkeypatch):
    """The quantized model decodes through the whole-step kernel, and new prompts ride along in the running
    rows' steps (Scheduler._mixed_step); the kernel computes every row alone, so each greedy reply equals
    the engine's for that prompt alone, token for token."""
    from pocketlm.serve.scheduler import Scheduler

    mixed = []
    original = Scheduler._mixed_step
    monkeypatch.setattr(Scheduler, "_mixed_step", lambda self, batch: (mixed.append(len(batch)), original(self, batch)))
    model, tokenizer = load_model(int4_dir)
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
                 "Give me a word that rhymes with cat.", "What do bees make?", "Which planet is the largest?",
                 "Write one sentence about the sea.", "What is the opposite of hot?"]
    expected = []
    for question in questions:
        ids = chat_prompt(tokenizer, [{"role": "user", "content": question}])
        expected.append(tokenizer.decode(list(generate_tokens(model, ids, SamplingParams(max_new_tokens=32, ignore_eos=True)))))
    app = create_app(load_serve_config(None, [str(int4_dir)], database=str(tmp_path / "log.db"), max_context=512))
    with running_server(app) as url, ThreadPoolExecutor(len(questions)) as pool:
        replies = list(pool.map(lambda q: ask_streaming(url, int4_dir.name, q, 32), questions))
    assert replies == expected
    assert "Paris" in replies[0]
    assert mixed  # prompts were fed within decode steps
