"""The whole decode step in one kernel call (pocketlm/decode_step.py, csrc/decode_step.cpp) against
the Python step it replaces: the same logits and cache contents, the same tokens in generation (one
sequence, several of different lengths, behind a prefix adapter), and the models it must leave alone."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model_dir

from pocketlm.kernels import cpu_ops, decode_step
from pocketlm.checkpoint import load_model
from pocketlm.engine import SamplingParams, compile_decoder, decode_fn, generate_batch, generate_tokens
from pocketlm.quant import QuantScheme
from pocketlm.quantize import quantize_dir

pytestmark = pytest.mark.skipif(not cpu_ops.load(), reason="needs an x86 CPU with AVX2 and a C++ compiler")

SCHEMES = {"int8": QuantScheme("int8"), "int4-g32": QuantScheme("int4", 32),
           "int4-g64-symmetric": QuantScheme("int4", 64, symmetric=True)}


@pytest.fixture
def kernels_on(monkeypatch):
    """The kernels serve the model whatever this CPU would pick (they run on any AVX2 CPU), with fp32
    activations: the step must then compute what the Python step computes (the qdot kernels, which
    quantize activations, are held to the Python step in tests/test_qdot.py)."""
    monkeypatch.setitem(cpu_ops._loaded, "available", True)
    monkeypatch.setenv(cpu_ops.SWITCH, "exact")


def quantized(tmp_path, scheme: str, **overrides):
    src = tiny_model_dir(tmp_path / "fp32", intermediate_size=192, **overrides)
    model, tokenizer = load_model(quantize_dir(src, tmp_path / scheme, SCHEMES[scheme]))
    return model, tokenizer


def _steps(model, ids: torch.Tensor, pos: torch.Tensor, span: int, native: bool):
    """Logits of one decode step (batch = the first rows of the cache, attending over `span` positions)
    and the caches after it, from a copy of the current caches."""
    layers = model.model.layers
    saved = [(layer.self_attn.cache.k.clone(), layer.self_attn.cache.v.clone()) for layer in layers]
    step, model._native_step = model._native_step, (model._native_step if native else None)
    try:
        logits = model.decode_step(ids, pos, model.decode_mask(pos, span))
        caches = [(layer.self_attn.cache.k.clone(), layer.self_attn.cache.v.clone()) for layer in layers]
    finally:
        model._native_step = step
        for layer, (k, v) in zip(layers, saved):
            layer.self_attn.cache.k.copy_(k)
            layer.self_attn.cache.v.copy_(v)
    return logits, caches


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
@torch.inference_mode()
def test_the_step_equals_the_python_step(kernels_on, tmp_path, scheme, bias):
    model, _ = quantized(tmp_path, scheme, attention_bias=bias, mlp_bias=bias)
    model.setup_cache(4, 64)
    assert model._native_step is not None
    lengths = [5, 17, 30]  # three rows at their own positions; the fourth cache row is idle
    for row, n in enumerate(lengths):
        model(torch.randint(0, 300, (1, n)), start=0, cache_row=row)
    ids, pos = torch.randint(0, 300, (3, 1)), torch.tensor(lengths)
    got, got_caches = _steps(model, ids, pos, span=40, native=True)  # as a server steps its busy rows
    want, want_caches = _steps(model, ids, pos, span=40, native=False)
    assert got.shape == want.shape == (3, 300)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for (k, v), (k_want, v_want) in zip(got_caches, want_caches):
        torch.testing.assert_close(k, k_want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v_want, atol=1e-5, rtol=1e-5)
    assert got_caches[0][0][2, :, 30].abs().sum() > 0  # the new keys were written at each row's position


def _greedy(model, ids, n=24):
    return list(generate_tokens(model, ids, SamplingParams(max_new_tokens=n, ignore_eos=True)))


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_generation_gives_the_python_steps_tokens(kernels_on, tmp_path, scheme):
    model, tokenizer = quantized(tmp_path, scheme, tie_word_embeddings=True)
    prompts = [tokenizer.encode(p) for p in ("the theory of", "a", "once upon a time there was")]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    native = [_greedy(model, ids) for ids in prompts], generate_batch(model, prompts, params)
    model.native_decoding = False
    python = [_greedy(model, ids) for ids in prompts], generate_batch(model, prompts, params)
    assert native == python
    assert len({tuple(t) for t in native[0]}) > 1


def test_generation_behind_a_prefix_adapter(kernels_on, tmp_path):
    from pocketlm.adapt.adapters import attach, prefix_config

    model, tokenizer = quantized(tmp_path, "int4-g32")
    attach(model, prefix_config(model, 6, False))
    with torch.no_grad():
        model.prefix.encoder.embedding.weight.normal_()
    ids = tokenizer.encode("the theory of")
    native = _greedy(model, ids)
    model.setup_cache(1, 64)
    assert model._native_step is not None
    model.native_decoding = False
    assert native == _greedy(model, ids)


def test_models_it_does_not_serve_keep_the_python_step(tmp_path, monkeypatch):
    monkeypatch.setitem(cpu_ops._loaded, "available", True)
    fp32, _ = load_model(tiny_model_dir(tmp_path / "fp32"))
    assert decode_step.step_weights(fp32) is None  # float weights
    model, _ = quantized(tmp_path / "q", "int4-g32")
    model.setup_cache(1, 64, dtype=torch.bfloat16)
    assert model._native_step is None  # a bf16 cache
    model.native_decoding = False
    model.setup_cache(1, 64)
    assert model._native_step is None  # switched off
    monkeypatch.setitem(cpu_ops._loaded, "available", False)
    assert decode_step.step_weights(model) is None  # a CPU the kernels are not for


def test_compiling_a_model_the_step_serves_compiles_nothing(kernels_on, tmp_path):
    model, tokenizer = quantized(tmp_path, "int8")
    compile_decoder(model)
    assert model._compiled_step is None and decode_fn(model) == model.decode_step
    assert len(_greedy(model, tokenizer.encode("the"), 4)) == 4


@torch.inference_mode()
def test_bad_inputs_are_refused_with_what_was_expected(kernels_on, tmp_path):
    model, _ = quantized(tmp_path, "int4-g32")
    model.setup_cache(1, 64)
    step = model._native_step
    ids, pos = torch.tensor([[3]]), torch.tensor([70])
    with pytest.raises(RuntimeError, match="position 70 is outside the 64 cache positions"):
        step(ids, pos, torch.ones(1, 64, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="tensors per layer"):
        torch.ops.pocketlm.decode_step(torch.zeros(1, 64), torch.tensor([0]), torch.ones(1, 8, dtype=torch.bool),
                                       *model.rope(torch.device("cpu")), step.weights[:-1], [], 4, 2, 1e-5)
    with pytest.raises(RuntimeError, match="two input rows write the same cache row and position"):
        step(torch.tensor([[3], [4]]), torch.tensor([5, 5]), torch.ones(2, 64, dtype=torch.bool), torch.tensor([0, 0]))
    with pytest.raises(RuntimeError, match="uses cache row 3 but the cache has 1"):
        step(ids, torch.tensor([5]), torch.ones(1, 64, dtype=torch.bool), torch.tensor([3]))


@torch.inference_mode()
def test_steps_from_several_threads_and_a_forked_child(kernels_on, tmp_path):
    """The step's thread pool (csrc/spin_pool.h) is shared by the process: steps called from two threads at
    once (two models served side by side) take turns and give each one's own logits, and a child forked
    after the pool was made (which has none of its workers) still steps, on one thread."""
    import os
    import threading
    import time

    models = [quantized(tmp_path / str(i), "int4-g32")[0] for i in range(2)]
    ids, pos = torch.tensor([[3]]), torch.tensor([0])

    def step(model):
        model.setup_cache(1, 16)
        return model.decode_step(ids, pos, model.decode_mask(pos))

    alone = [step(m) for m in models]
    count = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the caller alone, the workers left asleep
    try:
        assert torch.equal(step(models[0]), alone[0])
    finally:
        torch.set_num_threads(count)
    together: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    threads = [threading.Thread(target=lambda i=i: together[i].extend(step(models[i]) for _ in range(20)))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert len(together[i]) == 20 and all(torch.equal(t, alone[i]) for t in together[i])
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe and exits
        ok = torch.equal(step(models[0]), alone[0])
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    for _ in range(600):  # a child waiting for workers it does not have would hang: give it 60 s
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the forked child's step did not finish")
    assert status == 0 and os.read(read, 1) == b"1"


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
@torch.inference_mode()
def test_a_prompt_fed_as_rows_of_the_step_fills_the_cache_as_a_prefill_does(kernels_on, tmp_path, scheme):
    """One call of the step decodes two running rows and feeds a third sequence's 7 prompt tokens into cache
    row 2 at positions 0..6 (causally, within the call): the cache and the next step's logits equal those
    after a normal prefill, and only the running rows get logits."""
    model, _ = quantized(tmp_path, scheme)
    model.setup_cache(3, 64)
    prompts = [torch.randint(0, 300, (1, n)) for n in (5, 9)]
    new = torch.randint(0, 300, (1, 8))
    for row, ids in enumerate(prompts):
        model(ids, start=0, cache_row=row)
    ids = torch.tensor([[11], [12]] + [[t] for t in new[0, :7].tolist()])
    pos = torch.tensor([5, 9, *range(7)])
    rows = torch.tensor([0, 1, 2, 2, 2, 2, 2, 2, 2])
    mixed = model.decode_step(ids, pos, model.decode_mask(pos, 32), rows=rows, logit_rows=2)
    assert mixed.shape == (2, 300)
    cache_after = [(layer.self_attn.cache.k[2, :, :7].clone(), layer.self_attn.cache.v[2, :, :7].clone())
                   for layer in model.model.layers]
    step = torch.tensor([7])  # the sequence then decodes on from its prompt
    next_mixed = model.decode_step(new[:, 7:8], step, model.decode_mask(step, 32), rows=torch.tensor([2]))
    # the reference: the same decode rows alone, and the prompt prefilled the usual way
    model.setup_cache(3, 64)
    for row, ids_ in enumerate(prompts):
        model(ids_, start=0, cache_row=row)
    alone = model.decode_step(ids[:2], pos[:2], model.decode_mask(pos[:2], 32))
    model(new[:, :7], start=0, cache_row=2)
    torch.testing.assert_close(mixed, alone, atol=1e-4, rtol=1e-4)
    for layer, (k, v) in zip(model.model.layers, cache_after):
        torch.testing.assert_close(k, layer.self_attn.cache.k[2, :, :7], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v, layer.self_attn.cache.v[2, :, :7], atol=1e-4, rtol=1e-4)
    next_alone = model.decode_step(new[:, 7:8], step, model.decode_mask(step, 32), rows=torch.tensor([2]))
    torch.testing.assert_close(next_mixed, next_alone, atol=1e-4, rtol=1e-4)


def quantized_mixture(tmp_path, scheme: str, **overrides):
    from helpers import tiny_mixture_dir

    return load_model(quantize_dir(tiny_mixture_dir(tmp_path / "fp32", intermediate_size=192, **overrides),
                                   tmp_path / scheme, SCHEMES[scheme]))


QWEN2_MOE = dict(model_type="qwen2_moe", moe_intermediate_size=64, shared_expert_intermediate_size=0,
                 norm_topk_prob=False)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
@torch.inference_mode()
def test_a_mixture_of_experts_step_equals_the_python_step(kernels_on, tmp_path, scheme, family):
    """Rows routed to different experts, top-k weights renormalised (Mixtral) or not (Qwen2-MoE): the same
    logits and caches as the Python step, and the same tokens in generation."""
    model, tokenizer = quantized_mixture(tmp_path, scheme, **(QWEN2_MOE if family == "qwen2_moe" else {}))
    collected: list = []
    model(torch.randint(0, 300, (1, 40)), router_logits=collected)
    assert len(set(collected[0].topk(2).indices.flatten().tolist())) == 4  # the routing spreads over every expert
    model.setup_cache(4, 64)
    assert model._native_step is not None
    _step_and_generation_equal_the_python_steps(model, tokenizer, [5, 17, 30], span=40, new_tokens=16)


def test_mixtures_it_does_not_serve_keep_the_python_step(kernels_on, tmp_path):
    shared, _ = quantized_mixture(tmp_path / "shared", "int8", **{**QWEN2_MOE, "shared_expert_intermediate_size": 64})
    dense_first, _ = quantized_mixture(tmp_path / "dense", "int8", **{**QWEN2_MOE, "mlp_only_layers": [0]})
    for model in (shared, dense_first):
        assert decode_step.step_weights(model) is None
        ids = torch.randint(0, 300, (8,)).tolist()
        out = _greedy(model, ids, 8)
        with torch.no_grad():
            assert model(torch.tensor([ids + out]))[0, len(ids) - 1:-1].argmax(-1).tolist() == out


@pytest.mark.parametrize("rolling", [True, False], ids=["rolling", "whole-caches"])
@pytest.mark.parametrize("layer_types", [None, ["sliding_attention", "full_attention"]], ids=["mistral", "mixed"])
@torch.inference_mode()
def test_windowed_layers_step_as_the_python_step(kernels_on, tmp_path, layer_types, rolling):
    """A window of 8 (every layer, or the first of two) with rows before, at and far past it: the kernel
    attends to what the Python step does, in rolling caches or whole ones, and generates its tokens."""
    model, tokenizer = quantized(tmp_path, "int4-g32", sliding_window=8, layer_types=layer_types)
    model.setup_cache(4, 64, rolling=rolling)
    assert model._native_step is not None and model.steps_any_rows == (not rolling)
    _step_and_generation_equal_the_python_steps(model, tokenizer, [5, 7, 30], span=model.cache_positions,
                                                new_tokens=24)


def test_a_rolling_cache_refuses_two_rows_of_one_cache_row(kernels_on, tmp_path):
    model, _ = quantized(tmp_path, "int8", sliding_window=8)
    model.setup_cache(2, 64)
    pos = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="a rolling cache takes one input row per cache row"):
        model._native_step(torch.tensor([[1], [2]]), pos, model.decode_mask(pos), torch.tensor([0, 0]), 0)


def _step_and_generation_equal_the_python_steps(model, tokenizer, lengths: list[int], span: int, new_tokens: int):
    """Rows of the cache filled to `lengths`, one step: the kernel's logits and caches are the Python step's;
    then greedy generation (one prompt at a time and batched) gives the Python step's tokens."""
    for row, n in enumerate(lengths):
        model(torch.randint(0, 300, (1, n)), start=0, cache_row=row)
    ids, pos = torch.randint(0, 300, (len(lengths), 1)), torch.tensor(lengths)
    got, got_caches = _steps(model, ids, pos, span=span, native=True)
    want, want_caches = _steps(model, ids, pos, span=span, native=False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for (k, v), (k_want, v_want) in zip(got_caches, want_caches):
        torch.testing.assert_close(k, k_want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v_want, atol=1e-5, rtol=1e-5)
    prompts = [tokenizer.encode(p) for p in ("the theory of", "a", "once upon a time there was")]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    native = [_greedy(model, ids, new_tokens) for ids in prompts], generate_batch(model, prompts, params)
    model.native_decoding = False
    assert native == ([_greedy(model, ids, new_tokens) for ids in prompts], generate_batch(model, prompts, params))
