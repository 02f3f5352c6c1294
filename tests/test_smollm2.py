"""The real model: SmolLM2-135M-Instruct from its Q4_1 GGUF, against transformers and llama.cpp."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pocketlm.checkpoint import load_model
from pocketlm.engine import SamplingParams, chat_prompt, generate_tokens

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
]


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_model(smollm2_dir)


@pytest.fixture(scope="module")
def transformers_from_gguf(smollm2_gguf):
    """transformers' own GGUF loader (its dequantization and tokenizer conversion, not ours)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=smollm2_gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kwargs).eval()
    return model, tokenizer


@pytest.mark.parametrize("question", PROMPTS)
def test_greedy_chat_matches_transformers_gguf(ours, transformers_from_gguf, question):
    model, tokenizer = ours
    hf_model, hf_tokenizer = transformers_from_gguf
    messages = [{"role": "user", "content": question}]
    ids = chat_prompt(tokenizer, messages)
    assert ids == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ours_ids = list(generate_tokens(model, ids, SamplingParams(max_new_tokens=64, ignore_eos=True)))
    out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=2)
    theirs_ids = out[0, len(ids):].tolist()
    assert len(theirs_ids) == 64  # EOS does not stop either side: 64 tokens compared, past the end of the answer
    assert ours_ids == theirs_ids


def test_chat_command_keeps_the_conversation(smollm2_dir):
    """The main job: `pocketlm chat` on the pulled model, two turns piped in."""
    result = subprocess.run([sys.executable, "-m", "pocketlm", "chat", "smollm2-135m-instruct", "--max-tokens", "40"],
                            input="What is the capital of France?\nAnd what is its most famous tower?\n",
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    replies = [l for l in result.stdout.splitlines() if l.startswith("assistant> ")]
    assert len(replies) == 2
    assert "Paris" in replies[0]
    assert "Paris" in replies[1]  # the second question names no city: Paris comes from the first turn
