"""Generation: pocketlm's sampling against transformers' generate, streaming, stop strings, errors."""

from __future__ import annotations

import pytest
import torch

from pocketlm.checkpoint import load_model
from pocketlm.engine import SamplingParams, generate_tokens
from pocketlm.streaming import StopStringFilter, TextAssembler, generate, stream
from pocketlm.errors import ConfigError, ContextLengthError

from helpers import byte_level_tokenizer, tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tiny_model_dir(tmp_path_factory.mktemp("engine") / "m", tie_word_embeddings=True)
    model, tokenizer = load_model(d)
    return d, model, tokenizer


def _hf_generate(model_dir, prompt_ids, **kwargs):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = hf.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                      pad_token_id=0, eos_token_id=None, **kwargs)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("settings", [
    dict(),
    dict(repetition_penalty=1.3),
])
def test_greedy_matches_transformers(tiny, settings):
    d, model, tokenizer = tiny
    prompt = tokenizer.encode("the theme of the")
    ours = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=24, **settings)))
    theirs = _hf_generate(d, prompt, max_new_tokens=24, do_sample=False, **settings)
    assert ours == theirs


def test_sampling_is_seeded_and_filters_apply(tiny):
    _, model, tokenizer = tiny
    prompt = tokenizer.encode("the")
    run = lambda **kw: list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=20, **kw)))
    assert run(temperature=1.0, seed=7) == run(temperature=1.0, seed=7)
    assert run(temperature=1.0, seed=7) != run(temperature=1.0, seed=8)
    greedy = run()
    assert run(temperature=1.5, top_k=1, seed=3) == greedy  # top-k 1 leaves only the argmax
    assert run(temperature=1.5, top_p=1e-6, seed=3) == greedy  # a tiny nucleus keeps only the top token


def test_top_k_and_top_p_distributions():
    from pocketlm.engine import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = lambda p: torch.stack([sample_next(logits, p, g) for _ in range(3000)]).flatten()
    top2 = draws(SamplingParams(temperature=1.0, top_k=2))
    assert set(top2.tolist()) == {0, 1}
    nucleus = draws(SamplingParams(temperature=1.0, top_p=0.8))  # 0.5 + 0.3 reach 0.8: tokens 2, 3 drop
    assert set(nucleus.tolist()) == {0, 1}
    assert abs((nucleus == 0).float().mean().item() - 0.5 / 0.8) < 0.04


def test_eos_and_max_tokens(tiny):
    _, model, tokenizer = tiny
    prompt = tokenizer.encode("the")
    first = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=5)))
    assert len(first) == 5
    # make the first greedy token the end-of-sequence token: generation stops there
    out = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=5), stop_ids={first[0]}))
    assert out == [first[0]]
    result = generate(model, tokenizer, "the", SamplingParams(max_new_tokens=7))
    assert result.finish_reason == "length" and len(result.token_ids) == 7


def test_utf8_characters_are_never_split():
    tokenizer = byte_level_tokenizer()
    text = "naïve 😀 日本"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # multi-byte characters are several byte tokens
    assembler = TextAssembler(tokenizer)
    pieces = [assembler.add(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # the emoji's first bytes were held back


def test_stop_string_filter_holds_back_partial_matches():
    f = StopStringFilter(["###", "END"])
    out = [f.feed(p) for p in ["Hello #", "# wor", "ld E", "N", "D tail"]]
    assert "".join(out) == "Hello ## world "
    assert f.hit
    assert out[0] == "Hello "  # '#' might start '###'


def test_stop_strings_end_generation(tiny):
    _, model, tokenizer = tiny
    full = generate(model, tokenizer, "the", SamplingParams(max_new_tokens=30)).text
    stop = full[5:8]
    cut = generate(model, tokenizer, "the", SamplingParams(max_new_tokens=30, stop=[stop]))
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_streamed_pieces_join_to_the_whole(tiny):
    _, model, tokenizer = tiny
    params = SamplingParams(max_new_tokens=30, temperature=0.8, seed=1)
    assert "".join(stream(model, tokenizer, "the", params)) == generate(model, tokenizer, "the", params).text


def test_bad_parameters_and_prompts(tiny):
    _, model, tokenizer = tiny
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=-1), dict(repetition_penalty=0)):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)
    with pytest.raises(ContextLengthError, match="prompt has 200 tokens but the model's context is 128"):
        list(generate_tokens(model, [5] * 200, SamplingParams()))
    with pytest.raises(ConfigError, match="empty"):
        list(generate_tokens(model, [], SamplingParams()))


def test_generation_stops_at_context_end(tiny):
    _, model, _ = tiny
    out = list(generate_tokens(model, [5] * 120, SamplingParams(max_new_tokens=50)))
    assert len(out) == 8


def test_chat_template_rendering(tiny):
    _, _, tokenizer = tiny
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s>user\nhi</s>\n<s>assistant\n"


def test_long_conversations_drop_their_oldest_exchanges(tiny):
    from pocketlm.streaming import fit_conversation

    _, _, tokenizer = tiny
    system = {"role": "system", "content": "be brief"}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " + "the " * 10}, {"role": "assistant", "content": "ok " * 5}]
    messages = [system] + turns + [{"role": "user", "content": "last question"}]
    ids, kept = fit_conversation(tokenizer, messages, context=128, reserve=16)
    assert len(ids) + 16 <= 128
    assert kept[0] == system and kept[-1] == messages[-1]
    assert len(kept) < len(messages) and kept[1]["role"] == "user"  # whole exchanges were dropped
    assert kept == [system] + messages[len(messages) - len(kept) + 1:]  # only the oldest ones
    with pytest.raises(ContextLengthError, match="does not fit the model's context of 128"):
        fit_conversation(tokenizer, [{"role": "user", "content": "the " * 200}], context=128, reserve=16)


def test_chat_command_survives_a_too_long_message(tmp_path):
    import subprocess
    import sys

    d = tiny_model_dir(tmp_path / "m", max_position_embeddings=64)
    result = subprocess.run([sys.executable, "-m", "pocketlm", "chat", str(d), "--max-tokens", "8"],
                            input="hello\n" + "the " * 200 + "\n" + "hello again\n" * 6,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "does not fit the model's context of 64" in result.stderr
    assert result.stdout.count("assistant> ") == 7  # every message that fits got an answer


def test_chat_command_with_a_draft_model_answers_as_without(tmp_path):
    """Speculative decoding in a conversation: an int4 copy drafts, the answers are the model's own."""
    import subprocess
    import sys

    from pocketlm.quant import QuantScheme
    from pocketlm.quantize import quantize_dir

    d = tiny_model_dir(tmp_path / "m")
    draft = quantize_dir(d, tmp_path / "int4", QuantScheme("int4", 32))
    chat = [sys.executable, "-m", "pocketlm", "chat", str(d), "--max-tokens", "12"]
    talk = "the theory\nof the cat\n"
    plain = subprocess.run(chat, input=talk, capture_output=True, text=True, timeout=300)
    spec = subprocess.run(chat + ["--draft", str(draft), "--draft-tokens", "3"], input=talk, capture_output=True,
                          text=True, timeout=300)
    assert plain.returncode == 0 and spec.returncode == 0, plain.stderr + spec.stderr
    assert spec.stdout == plain.stdout and spec.stdout.count("assistant> ") == 2
    assert "draft acceptance" in spec.stderr and "draft acceptance" not in plain.stderr
    sampled = subprocess.run(chat + ["--draft", str(draft), "-t", "0.7", "--seed", "1"], input=talk,
                             capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0 and sampled.stdout.count("assistant> ") == 2, sampled.stderr
