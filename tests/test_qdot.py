"""pocketlm's integer-activation kernels (kernels/qdot.py, csrc/qdot*.cpp) against float references, on every
instruction set this CPU has (the others are skipped by name): products on random and SmolLM2's shapes, the
activation quantizer, the layers and the whole decode step that use them, and the choice of instruction set."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model_dir

from pocketlm import quant
from pocketlm.errors import ConfigError
from pocketlm.checkpoint import load_model
from pocketlm.kernels import cpu_ops, decode_step, qdot
from pocketlm.kernels.dispatch import fused_projections
from pocketlm.quant import Int4Linear, Int8Linear, QuantScheme
from pocketlm.quantize import quantize_dir

pytestmark = pytest.mark.skipif(not cpu_ops.load(), reason="needs an x86 CPU with AVX2 and a C++ compiler")

ISAS = [pytest.param(isa, marks=pytest.mark.skipif(not cpu_ops.load() or isa not in qdot.supported(),
                                                   reason=f"this CPU has no {isa}")) for isa in qdot.ISAS]
SHAPES = [(64, 256), (576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 576)]  # (out, in); SmolLM2's and a head's slice


@pytest.fixture
def isa(request, monkeypatch):
    previous = qdot.active()
    torch.ops.pocketlm.qdot_use(request.param)
    yield request.param
    torch.ops.pocketlm.qdot_use(previous)


@pytest.fixture
def qdot_on(monkeypatch):
    monkeypatch.setitem(cpu_ops._loaded, "available", True)
    monkeypatch.setenv(cpu_ops.SWITCH, "1")


def torch_quantized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantizer written in PyTorch: per block of 32, scale max|x| / 127, codes round(x * 127 / max|x|)."""
    blocks = x.reshape(x.shape[0], -1, qdot.BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    codes = torch.round(blocks * torch.where(amax > 0, 127.0 / amax, 0.0)).clamp(-127, 127)
    return codes.reshape(x.shape).to(torch.int8), (amax / 127).squeeze(-1)


def int4_reference(x: torch.Tensor, layer: Int4Linear) -> torch.Tensor:
    """The codes times the quantized input, plus the groups' mins times the exact input's sums (as the kernel
    takes them: the mins are large next to the codes' steps, so their products lose least that way)."""
    group = layer.group_size
    codes = quant.unpack_int4(layer.weight, group).double()
    scales, mins = (t.double().repeat_interleave(group, 1) for t in (layer.scales, layer.mins))
    return kernel_view(x) @ (codes * scales).T + x.double() @ mins.T


def kernel_view(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels quantized it, back in float64."""
    codes, scales = qdot.quantized_activations(x)
    return (codes.double().reshape(x.shape[0], -1, qdot.BLOCK) * scales.double()[..., None]).reshape(x.shape)


def test_the_activation_quantizer_matches_pytorch():
    x = torch.randn(7, 1536) * torch.logspace(-3, 2, 1536)  # blocks of very different magnitudes
    x[2, :64] = 0  # all-zero blocks: scale 0, codes 0
    codes, scales = qdot.quantized_activations(x)
    want_codes, want_scales = torch_quantized(x)
    assert torch.equal(scales, want_scales)
    # the same rounding, but 127 / max|x| may differ in the last bit, which can move a tie by one code
    assert (codes.int() - want_codes.int()).abs().max() <= 1
    assert (codes != want_codes).float().mean() < 1e-3
    assert (kernel_view(x) - x.double()).abs().le(scales.double().repeat_interleave(32, 1) / 2 + 1e-6).all()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_infinite_input_gives_nan_outputs_not_finite_ones(isa, bad):
    """The server ends a sequence whose logits are not finite; quantizing must not turn a NaN into codes."""
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(2, 64)
    x[1, 5] = bad
    for layer in (Int4Linear.from_float(linear, 32), Int8Linear.from_float(linear)):
        y = fused_projections_of(layer, x)
        assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 11])
@pytest.mark.parametrize("kind", ["int4-g32", "int4-g64", "int4-g128-symmetric", "int8"])
def test_products_equal_the_float_product_of_the_quantized_operands(isa, kind, rows):
    """Exact up to fp32 rounding: the integer sums are exact, so only the float steps around them differ."""
    g = torch.Generator().manual_seed(rows)
    for out_features, in_features in SHAPES:
        if kind != "int8" and in_features % int(kind.split("-")[1][1:]):
            continue
        linear = torch.nn.Linear(in_features, out_features)
        x = torch.randn(rows, in_features, generator=g) * 2
        if kind == "int8":
            layer = Int8Linear.from_float(linear)
            got = qdot.int8_linear(x, [qdot.pack_int8(layer.weight)], [layer.scales])
            want = kernel_view(x) @ layer.dequantized().double().T
        else:
            group = int(kind.split("-")[1][1:])
            layer = Int4Linear.from_float(linear, group, symmetric=kind.endswith("symmetric"))
            codes = quant.unpack_int4(layer.weight, group)
            got = qdot.int4_linear(x, *map(list, zip(qdot.pack_int4(codes, layer.scales, layer.mins, group))), group)
            want = int4_reference(x, layer)
        torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_the_products_error_is_that_of_int8_activations(isa, kind):
    """Against the dequantized weights in float64 with the exact input: the error the activations' int8 adds
    is small next to the weights' own quantization error (both relative to the output's size)."""
    linear = torch.nn.Linear(576, 1536)
    layer = Int4Linear.from_float(linear, 32) if kind == "int4" else Int8Linear.from_float(linear)
    x = torch.randn(4, 576)
    got = fused_projections_of(layer, x)
    exact = x.double() @ layer.dequantized().double().T
    unquantized = x.double() @ linear.weight.double().T
    activation_error = (got.double() - exact).norm() / exact.norm()
    weight_error = (exact - unquantized).norm() / unquantized.norm()
    print(f"{isa} {kind}: error from int8 activations {activation_error:.4f}, from the weights {weight_error:.4f}")
    assert activation_error < 0.03
    assert activation_error < weight_error / 2 if kind == "int4" else activation_error < 3 * weight_error


def fused_projections_of(layer, x):
    packed = layer.kernel_weights()
    if packed.kind == "qdot-int4":
        return qdot.int4_linear(x, [packed.codes], [packed.scales], packed.group_size)
    return qdot.int8_linear(x, [packed.codes], [packed.scales])


def test_layers_use_qdot_for_every_row_count_but_not_under_autograd(qdot_on):
    linear = torch.nn.Linear(256, 64, bias=True)
    for layer in (Int4Linear.from_float(linear, 32), Int8Linear.from_float(linear)):
        assert layer.kernel_weights().kind.startswith("qdot-")
        for rows in (3, 40):  # decoding, and a prompt
            x = torch.randn(rows, 256)
            got = layer(x)
            product = int4_reference(x, layer) if isinstance(layer, Int4Linear) else kernel_view(x) @ layer.dequantized().double().T
            torch.testing.assert_close(got.double(), product + linear.bias.double(), atol=1e-5, rtol=1e-5)
            outs = fused_projections(x, [layer, layer])
            assert torch.equal(outs[0], got) and torch.equal(outs[1], got)
        # an input whose gradient is wanted (an adapter below it trains): the dequantized matmul, exact fp32
        x = torch.randn(40, 256, requires_grad=True)
        assert fused_projections(x, [layer]) is None
        y = layer(x)
        y.sum().backward()
        torch.testing.assert_close(y.double(), x.double() @ layer.dequantized().double().T + linear.bias.double(),
                                   atol=1e-4, rtol=1e-4)
        assert x.grad is not None


def test_shapes_qdot_does_not_fit_keep_the_fp32_kernels(qdot_on):
    layer = Int4Linear.from_float(torch.nn.Linear(48, 40), 16)  # 40 rows: not whole blocks of 16; groups of 16
    assert layer.kernel_weights().kind == "int4"
    layer = Int8Linear.from_float(torch.nn.Linear(40, 48))  # 40 inputs: not whole blocks of 32
    assert layer.kernel_weights().kind == "int8"


@torch.inference_mode()
@pytest.mark.parametrize("mixture", [False, True], ids=["dense", "mixture"])
@pytest.mark.parametrize("scheme", [QuantScheme("int8"), QuantScheme("int4", 32)], ids=["int8", "int4"])
def test_the_whole_step_with_qdot_equals_the_python_step_with_qdot(qdot_on, tmp_path, scheme, mixture):
    """Both quantize the same activations, so they agree up to codes that a last-bit difference in the
    fp32 input moves by one (the exact kernels are held to 1e-4 in tests/test_native_decode.py)."""
    from helpers import tiny_mixture_dir

    make = tiny_mixture_dir if mixture else tiny_model_dir
    src = make(tmp_path / "fp32", hidden_size=64, intermediate_size=192)
    model, _ = load_model(quantize_dir(src, tmp_path / "q", scheme))
    model.setup_cache(3, 64)
    weights = decode_step.step_weights(model)
    assert weights is not None and all(t.dtype != torch.int32 for t in weights)  # qdot's layouts, not int4_words
    for row, n in enumerate([5, 17, 30]):
        model(torch.randint(0, 300, (1, n)), start=0, cache_row=row)
    ids, pos = torch.randint(0, 300, (3, 1)), torch.tensor([5, 17, 30])
    mask = model.decode_mask(pos, 40)
    saved = [(layer.self_attn.cache.k.clone(), layer.self_attn.cache.v.clone()) for layer in model.model.layers]
    native = model.decode_step(ids, pos, mask)
    for layer, (k, v) in zip(model.model.layers, saved):
        layer.self_attn.cache.k.copy_(k)
        layer.self_attn.cache.v.copy_(v)
    model._native_step = None
    python = model.decode_step(ids, pos, mask)
    assert (native - python).abs().max() < 2e-2 * python.abs().max()
    assert torch.equal(native.argmax(-1), python.argmax(-1))


def test_the_instruction_set_is_measured_once_and_can_be_named(monkeypatch, tmp_path):
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path))
    monkeypatch.setattr(qdot, "_choice", {})
    monkeypatch.delenv(qdot.SWITCH, raising=False)
    previous = qdot.active()
    try:
        decision = qdot.choose()
        isas = qdot.supported()
        assert decision["isa"] == qdot.active() and decision["isa"] in isas
        if len(isas) > 1:
            assert set(decision["timings_us"]) == set(isas) and "fastest measured" in decision["reason"]
            saved = json.loads(next((tmp_path / "cpu_kernels").glob("qdot-choice-*.json")).read_text())
            assert saved["isa"] == decision["isa"]
        monkeypatch.setattr(qdot, "_choice", {})
        monkeypatch.setenv(qdot.SWITCH, "avx2")
        assert qdot.choose() == {"isa": "avx2", "reason": "named by POCKETLM_QDOT", "timings_us": {}}
        assert qdot.active() == "avx2"
        monkeypatch.setattr(qdot, "_choice", {})
        monkeypatch.setenv(qdot.SWITCH, "sse9")
        with pytest.raises(ConfigError, match="POCKETLM_QDOT=sse9: this CPU runs pocketlm's qdot kernels with avx"):
            qdot.choose()
    finally:
        torch.ops.pocketlm.qdot_use(previous)


def test_bad_inputs_are_refused_with_what_was_expected():
    words, tables = torch.zeros(1, 8, 64, dtype=torch.uint8), torch.zeros(1, 2, 2, 16, dtype=torch.half)
    with pytest.raises(RuntimeError, match=r"input must be \(rows, 64\) with a multiple of 32 columns"):
        torch.ops.pocketlm.qdot_int4(torch.zeros(1, 32), [words], [tables], 32)
    with pytest.raises(RuntimeError, match="tables must be contiguous fp16"):
        torch.ops.pocketlm.qdot_int4(torch.zeros(1, 64), [words], [tables.float()], 32)
    with pytest.raises(RuntimeError, match="group size 16 must divide 64 in multiples of 32"):
        torch.ops.pocketlm.qdot_int4(torch.zeros(1, 64), [words], [tables], 16)
    with pytest.raises(RuntimeError, match="scales must be contiguous fp32"):
        torch.ops.pocketlm.qdot_int8(torch.zeros(1, 32), [torch.zeros(1, 8, 64, dtype=torch.uint8)], [torch.ones(8)])
    assert torch.ops.pocketlm.qdot_use("sse9") is False


def test_bench_explain_names_each_layers_kernel_and_why(tmp_path):
    import subprocess
    import sys

    src = tiny_model_dir(tmp_path / "fp32", hidden_size=64, intermediate_size=192)
    model_dir = quantize_dir(src, tmp_path / "int4", QuantScheme("int4", 32))
    env = {**__import__("os").environ, cpu_ops.SWITCH: "1", qdot.SWITCH: "avx2"}
    done = subprocess.run([sys.executable, "-m", "pocketlm", "bench", str(model_dir), "--explain"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "instruction set: avx2 (named by POCKETLM_QDOT)" in out
    assert "decoding: the whole-step kernel" in out
    assert "| model.layers.0-1.mlp.gate_proj, model.layers.0-1.mlp.up_proj | int4 group 32 | 192 x 64 | qdot int4 (avx2) |" in out
    done = subprocess.run([sys.executable, "-m", "pocketlm", "bench", str(src), "--explain"],
                          capture_output=True, text=True, env={**env, cpu_ops.SWITCH: "0"}, timeout=300)
    assert "switched off (POCKETLM_CPU_KERNELS=0)" in done.stdout and "| float32 |" in done.stdout


@torch.inference_mode()
def test_a_step_mixing_qdot_and_fp32_activation_layers(qdot_on, tmp_path):
    """A down projection of 80 inputs is not whole blocks of 32: qdot leaves it to the fp32-activation kernel,
    inside the same whole-step call, and prompts fed as rows of the step still fill the cache as a prefill does."""
    src = tiny_model_dir(tmp_path / "fp32", hidden_size=64, intermediate_size=80)
    model, tokenizer = load_model(quantize_dir(src, tmp_path / "q", QuantScheme("int8")))
    kinds = {m.kernel_weights().kind for m in model.modules() if isinstance(m, Int8Linear)}
    assert kinds == {"qdot-int8", "int8"}
    model.setup_cache(2, 64)
    assert decode_step.serves(model)
    from pocketlm.engine import SamplingParams, generate_batch, generate_tokens

    prompts = [tokenizer.encode("the theory of"), tokenizer.encode("once upon a time there was")]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = [list(generate_tokens(model, ids, params)) for ids in prompts]
    assert generate_batch(model, prompts, params) == alone  # each row computed alone: batching changes nothing


def test_int8_weights_written_after_packing_are_packed_again(qdot_on):
    layer = Int8Linear.from_float(torch.nn.Linear(64, 32, bias=False))
    x = torch.randn(2, 64)
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(-1)  # in place, as load_state_dict copies into a loaded model
    torch.testing.assert_close(layer(x), -before)


@pytest.mark.parametrize("scheme", [QuantScheme("int8"), QuantScheme("int4", 32)], ids=["int8", "int4"])
def test_the_scheduler_feeds_prompts_inside_decode_steps_and_answers_as_the_engine(qdot_on, tmp_path, monkeypatch, scheme):
    """Short prompts ride along whole, a long one a chunk per step (prefill_chunk 8), while other rows decode;
    no separate prefill pass runs, and each job's greedy tokens equal the engine's for its prompt alone."""
    import threading

    from pocketlm.engine import SamplingParams, generate_tokens
    from pocketlm.serve.scheduler import Finished, Job, Scheduler

    src = tiny_model_dir(tmp_path / "fp32", hidden_size=64, intermediate_size=192)
    model, _ = load_model(quantize_dir(src, tmp_path / "q", scheme))
    prompts = [list(range(10, 15)), list(range(40, 70)), list(range(100, 112)), [7, 8, 9]]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    expected = [list(generate_tokens(model, ids, params)) for ids in prompts]

    def apart(self, *args):
        raise AssertionError("a prefill pass of its own ran")

    monkeypatch.setattr(Scheduler, "_prefill_batch", apart)
    monkeypatch.setattr(Scheduler, "_prefill_chunk", apart)
    scheduler = Scheduler(model, max_batch=4, max_context=64, prefill_chunk=8)
    got = [[] for _ in prompts]
    done = threading.Semaphore(0)
    try:
        for i, ids in enumerate(prompts):
            def emit(event, i=i):
                if isinstance(event, Finished):
                    got[i].append(event.reason)
                    done.release()
                else:
                    got[i].append(event.token)
            scheduler.submit(Job(prompt_ids=ids, max_new_tokens=10), emit)
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        scheduler.close()
    assert got == [tokens + ["length"] for tokens in expected]
