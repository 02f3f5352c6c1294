"""Sliding-window attention against transformers' own classes: Mistral (every layer windowed) and Ministral with
`layer_types` (sliding and full layers mixed), imported from Hugging Face directories; prompts, cached decoding,
batched decoding, packed scoring and training all attend through the window."""

from __future__ import annotations

import json

import pytest
import torch

from pocketlm.checkpoint import load_model
from pocketlm.config import ModelConfig
from pocketlm.convert import import_model
from pocketlm.engine import SamplingParams, generate_batch, generate_tokens
from pocketlm.errors import ConfigError, UnsupportedModelError

from helpers import byte_level_tokenizer, tiny_config

WINDOW = 8
MIXED = ["sliding_attention", "full_attention", "sliding_attention"]


def _hf_dir(path, kind: str):
    """A random tiny Mistral (window on every layer) or Ministral (windowed and full layers mixed) saved by
    transformers with a tokenizer, as `pocketlm import` meets it."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    if kind == "mistral":
        config = transformers.MistralConfig(**tiny_config(sliding_window=WINDOW))
        hf = transformers.MistralForCausalLM(config)
    else:
        config = transformers.MinistralConfig(**tiny_config(sliding_window=WINDOW, num_hidden_layers=3, head_dim=16,
                                                            layer_types=MIXED))
        hf = transformers.MinistralForCausalLM(config)
    hf.eval()
    with torch.no_grad():  # norms away from 1, so a mix-up of norm weights would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path)
    tok = byte_level_tokenizer()
    PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<s>", eos_token="</s>",
                            chat_template=tok.chat_template).save_pretrained(path)
    return hf


@pytest.fixture(scope="module", params=["mistral", "ministral"])
def pair(request, tmp_path_factory):
    """(transformers' model, pocketlm's import of it)."""
    root = tmp_path_factory.mktemp(request.param)
    hf = _hf_dir(root / "hf", request.param)
    model, _ = load_model(import_model(root / "hf", root / "ours"))
    return hf, model


def test_config_names_the_windowed_layers():
    mixed = ModelConfig.from_dict(tiny_config(sliding_window=8, num_hidden_layers=3, layer_types=MIXED))
    assert [mixed.window(i) for i in range(3)] == [8, None, 8] and mixed.windowed
    assert not ModelConfig.from_dict(tiny_config(sliding_window=128)).windowed  # as long as the context
    assert not ModelConfig.from_dict(tiny_config(sliding_window=8, use_sliding_window=False)).windowed  # Qwen2's switch
    assert ModelConfig.from_dict(tiny_config(sliding_window=None)).to_hf_dict()["sliding_window"] is None  # kept null


@pytest.mark.parametrize("bad, message", [({"sliding_window": 0}, "sliding_window must be a positive"),
                                          ({"sliding_window": 8, "layer_types": ["sliding_attention"]}, "names 1 layers"),
                                          ({"sliding_window": 8, "layer_types": ["chunked", "full_attention"]}, "unknown")])
def test_bad_windows_are_one_line(bad, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(tiny_config(**bad))


def test_logits_match_transformers_on_three_windows(pair):
    hf, model = pair
    ids = torch.randint(0, 300, (2, 4 * WINDOW))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_greedy_generation_matches_transformers(pair):
    hf, model = pair
    prompt = torch.randint(0, 300, (1, 2 * WINDOW)).tolist()[0]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, len(prompt):]
    ours = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=32, ignore_eos=True)))
    assert ours == expected.tolist()


def test_batched_decoding_and_a_cached_prompt_continue_as_one_pass(pair):
    _, model = pair
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 2 * WINDOW + 1)]
    outs = generate_batch(model, prompts, SamplingParams(max_new_tokens=3 * WINDOW, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        whole = prompt + list(out)
        with torch.no_grad():  # teacher-forced through one uncached pass: each greedy token is the argmax there
            logits = model(torch.tensor([whole]))[0, len(prompt) - 1:-1]
        assert logits.argmax(-1).tolist() == list(out)


def test_a_prompt_prefilled_in_chunks_equals_one_pass(pair):
    _, model = pair
    ids = torch.randint(0, 300, (1, 3 * WINDOW))
    with torch.no_grad():
        whole = model.hidden_states(ids)
        model.setup_cache(1, 4 * WINDOW)
        try:
            parts = [model.hidden_states(ids[:, a:b], start=a) for a, b in ((0, 5), (5, 2 * WINDOW), (2 * WINDOW, 3 * WINDOW))]
        finally:
            model.clear_cache()
    assert (torch.cat(parts, dim=1) - whole).abs().max().item() <= 1e-5


def test_a_quantized_windowed_model_decodes_through_the_window(pair):
    """The whole-step kernel decodes a quantized windowed model (rolling caches included); its greedy tokens
    past the window are those of its own uncached passes (the kernel is held to the Python step in
    tests/test_native_decode.py)."""
    import copy

    from pocketlm.kernels import cpu_ops
    from pocketlm.quant import QuantScheme, quantize_model

    _, model = pair
    quantized = copy.deepcopy(model)
    quantize_model(quantized, QuantScheme("int8"))
    quantized.setup_cache(1, 4 * WINDOW)
    assert quantized._native_step is not None or not cpu_ops.available()
    quantized.clear_cache()
    prompt = torch.randint(0, 300, (WINDOW + 3,)).tolist()
    out = list(generate_tokens(quantized, prompt, SamplingParams(max_new_tokens=2 * WINDOW, ignore_eos=True)))
    with torch.no_grad():
        logits = quantized(torch.tensor([prompt + out]))[0, len(prompt) - 1:-1]
    assert logits.argmax(-1).tolist() == out


@pytest.mark.parametrize("rolling", [True, False])
def test_decoding_far_past_the_window_equals_uncached_passes(pair, rolling):
    """Rolling: a windowed layer's cache holds a window whatever the length (its memory does not grow); kept
    whole (speculative decoding rewinds positions), the mask narrows to the window instead."""
    _, model = pair
    ids = torch.randint(0, 300, (1, 12 * WINDOW))
    with torch.no_grad():
        expected = model(ids)[0]
        for length in (4 * WINDOW, 12 * WINDOW):
            model.setup_cache(1, length, rolling=rolling)
            sizes = [layer.self_attn.cache.k.shape[2] for layer in model.model.layers]
            windowed = [layer.self_attn.window is not None for layer in model.model.layers]
            assert sizes == [WINDOW if w and rolling else length for w in windowed]
        model.hidden_states(ids[:, :WINDOW + 1])  # a prompt longer than the window, then one token a step
        steps = []
        for t in range(WINDOW + 1, ids.shape[1]):
            pos = torch.tensor([t])
            steps.append(model.decode_step(ids[:, t:t + 1], pos, model.decode_mask(pos))[0])
        model.clear_cache()
    assert (torch.stack(steps) - expected[WINDOW + 1:]).abs().max().item() <= 1e-4


def test_packed_scoring_equals_plain_passes(pair):
    from pocketlm.evaluate.scoring import loglikelihoods

    _, model = pair
    context = torch.randint(0, 300, (2 * WINDOW,)).tolist()
    pairs = [(context, torch.randint(0, 300, (n,)).tolist()) for n in (1, WINDOW, 2 * WINDOW)]
    got = loglikelihoods(model, pairs)
    with torch.inference_mode():
        for (ctx, cont), (score, _) in zip(pairs, got):
            logits = model(torch.tensor([ctx + cont[:-1]]))[0, -len(cont):]
            ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum().item()
            assert score == pytest.approx(ref, abs=1e-4)


def test_training_gradients_match_transformers(pair):
    hf, model = pair
    ids = torch.randint(0, 300, (2, 3 * WINDOW))
    ours = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1))
    ours.backward()
    theirs = hf(ids, labels=ids).loss
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    name = "model.layers.0.self_attn.q_proj.weight"
    ours_grad = dict(model.named_parameters())[name].grad
    assert torch.allclose(ours_grad, dict(hf.named_parameters())[name].grad, atol=1e-5)
    model.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)


def test_exports_that_would_run_wrong_are_refused(pair, tmp_path):
    from pocketlm.checkpoint import save_model_dir
    from pocketlm.convert.gguf_export import export_gguf
    from pocketlm.convert.llama2c import export_llama2c

    _, model = pair
    out = save_model_dir(tmp_path / "m", model.config.to_hf_dict(), model.state_dict(), byte_level_tokenizer())
    assert json.loads((out / "config.json").read_text())["sliding_window"] == WINDOW
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        export_gguf(out, tmp_path / "m.gguf")
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        export_llama2c(out, tmp_path / "m.bin")


def test_prefix_tuning_is_refused(pair):
    from pocketlm.adapt.adapters import attach, prefix_config

    _, model = pair
    with pytest.raises(ConfigError, match="sliding-window"):
        attach(model, prefix_config(model, 4))


def test_the_model_directory_loads_unchanged_in_transformers(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from pocketlm.checkpoint import save_model_dir

    hf, model = pair
    out = save_model_dir(tmp_path / "m", model.config.to_hf_dict(), model.state_dict(), byte_level_tokenizer())
    theirs = AutoModelForCausalLM.from_pretrained(out)
    assert type(theirs) is type(hf)
    ids = torch.randint(0, 300, (1, 4 * WINDOW))
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max().item() <= 1e-4
