"""Weight-only quantization: the quantizers, the quantized layers' kernels, save/load, GGUF export, and
the fast decoding paths (compiled step, batched decoding, speculative decoding) on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from helpers import tiny_model_dir

from pocketlm import quant
from pocketlm.checkpoint import load_model, save_model_dir
from pocketlm.convert.gguf_export import export_gguf
from pocketlm.engine import (
    SamplingParams,
    compile_decoder,
    generate_batch,
    generate_tokens,
)
from pocketlm.errors import CheckpointError, ConfigError, PocketLMError
from pocketlm.kernels import cpu_ops
from pocketlm.quant import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    QuantScheme,
    dense_tensors,
    dequantize_int4,
    dequantize_int8,
    int4_words,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
)
from pocketlm.quantize import quantize_dir
from pocketlm.speculative import speculative_generate

SCHEMES = [QuantScheme("int8"), QuantScheme("int4", 32), QuantScheme("int4", 64), QuantScheme("int4", 32, symmetric=True)]


def scheme_id(s: QuantScheme) -> str:
    return s.describe().replace(" ", "-")


# ---- quantizers ------------------------------------------------------------------------------
def test_int8_error_is_at_most_half_a_step():
    w = torch.randn(64, 96) * torch.logspace(-3, 0, 64)[:, None]  # rows of very different scales
    codes, scales = quantize_int8(w)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert torch.equal(scales, scales.half().float())  # fp16-exact, so a Q8_0 export is exact
    err = (dequantize_int8(codes, scales) - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-3) + 1e-9).all()
    assert (codes.abs().amax(1) >= 126).all()  # each row uses its full range


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step(group):
    w = torch.randn(16, 256) * 0.05 + 0.01
    packed, scales, mins = quantize_int4(w, group)
    assert packed.shape == (16, 128) and packed.dtype == torch.uint8
    deq = dequantize_int4(packed, scales, mins, group)
    step = scales.repeat_interleave(group, dim=1)
    assert ((deq - w).abs() <= step / 2 * 1.01 + 1e-3 * step).all()


def test_int4_symmetric_codes_are_centred():
    w = torch.randn(8, 64)
    packed, scales, mins = quantize_int4(w, 32, symmetric=True)
    assert torch.equal(mins, -8 * scales)


def test_pack_unpack_round_trip_and_layout():
    codes = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    packed = pack_int4(codes, 32)
    assert torch.equal(unpack_int4(packed, 32), codes)
    # llama.cpp's block layout: byte j of a 32-group holds code j (low nibble) and code j + 16 (high)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 16] << 4)


def test_scheme_validation():
    with pytest.raises(ConfigError, match="unknown quantization 'int3'"):
        QuantScheme("int3")
    with pytest.raises(ConfigError, match="group size"):
        QuantScheme("int4", 48)
    with pytest.raises(ConfigError, match="int4 only"):
        QuantScheme("int8", 32)
    with pytest.raises(ConfigError, match="unknown field 'bits'"):
        QuantScheme.from_dict({"method": "int8", "bits": 8})


# ---- kernels -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_linear_matches_dequantized_matmul(kind, rows):
    linear = torch.nn.Linear(128, 96, bias=True)
    q = Int8Linear.from_float(linear) if kind == "int8" else Int4Linear.from_float(linear, 32)
    x = torch.randn(rows, 128)
    reference = F.linear(x, q.dequantized(), q.bias)
    got = q(x)
    # few rows use bf16 activations in PyTorch's packed kernels, and pocketlm's qdot kernels int8 ones at any
    # row count; many rows outside qdot are exact fp32
    packed = q.kernel_weights()
    exact = rows >= 16 and not (packed is not None and packed.kind.startswith("qdot-"))
    tol = 1e-4 if exact else 0.02 * reference.abs().max().item()
    torch.testing.assert_close(got, reference, atol=tol, rtol=0)


def test_int4_words_layout():
    """Word [b, w, l] holds row b * LANES + l's codes at columns 8w .. 8w + 7, column 8w + k in bits 4k.."""
    codes = torch.randint(0, 16, (24, 64))
    words = int4_words(codes).view(torch.int32)
    assert words.shape == (24 // quant.LANES, 8, quant.LANES)
    for b, w, l, k in [(0, 0, 0, 0), (1, 3, 5, 7), (2, 7, 7, 4), (0, 5, 2, 1)]:
        code = (int(words[b, w, l]) >> (4 * k)) & 15
        assert code == codes[b * quant.LANES + l, 8 * w + k]


# int4 with the "bytes" layout runs PyTorch's int4 kernel on bf16 activations: not exact, and covered by the
# decoding tests instead
@pytest.mark.parametrize("layout,kind", [("bytes", "int8"), ("words", "int8"), ("words", "int4-g32"),
                                         ("words", "int4-g64-symmetric"), ("words", "int4-g32-bias")])
def test_compiled_single_row_products_are_exact(monkeypatch, layout, kind):
    """The compiled one-row products, in both code layouts whatever this CPU picks, against the
    dequantized weights in fp32 (inductor's loops: pocketlm's AVX2 kernels, tested in
    test_cpu_ops.py, are off here, as they are where they cannot be built)."""
    monkeypatch.setattr(quant, "ROW_LAYOUT", layout)
    monkeypatch.setitem(cpu_ops._loaded, "available", False)
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=kind.endswith("bias"))
    if kind == "int8":
        q = Int8Linear.from_float(linear)
    else:
        q = Int4Linear.from_float(linear, int(kind.split("-")[1][1:]), symmetric="symmetric" in kind)
    q.prepare_decode()
    assert ("_words" in q.__dict__) == (layout == "words")
    x = torch.randn(1, 1, 128)
    got = torch.compile(q, fullgraph=True, options={"realize_opcount_threshold": 100})(x)
    torch.testing.assert_close(got, F.linear(x, q.dequantized(), q.bias), atol=1e-5, rtol=1e-5)


# ---- model directories -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "fp32", hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tied") / "fp32", hidden_size=64, intermediate_size=128,
                          tie_word_embeddings=True)


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_quantized_save_load_round_trip(tiny, tiny_tied, tmp_path, scheme, which):
    src = tiny if which == "untied" else tiny_tied
    out = quantize_dir(src, tmp_path / "q", scheme)
    record = json.loads((out / "pocketlm.json").read_text())
    assert record["quantization"] == scheme.to_dict() and record["parent"] == str(src.resolve())

    model, tokenizer = load_model(out)
    # loaded straight into the quantized form: no float weight matrices anywhere
    float_matrices = [n for n, p in model.named_parameters() if p.dim() == 2]
    assert float_matrices == []
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.model.embed_tokens, Int8Embedding)
    if which == "tied":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    # the same numbers as quantizing in memory
    reference, _ = load_model(src)
    quantize_model(reference, scheme)
    ids = torch.tensor([tokenizer.encode("the theory of the thing")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), atol=1e-5, rtol=1e-5)
        float_model, _ = load_model(src)
        # and close to the float model (an untrained tiny model's logits are small; compare the error)
        err = (model(ids) - float_model(ids)).abs().max().item()
    assert err < (0.05 if scheme.method == "int8" else 0.5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_files_store_scales_as_fp16_and_load_them_exactly(tiny, tmp_path, symmetric):
    """The int4 scales and mins are fp16 values; the file keeps them as fp16 (as Q4_1 does), and a directory
    written before, with fp32 scales, loads to the same model."""
    from safetensors import safe_open

    from pocketlm.checkpoint import WEIGHTS, load_config, read_provenance

    scheme = QuantScheme("int4", 32, symmetric=symmetric)
    out = quantize_dir(tiny, tmp_path / "q4", scheme)
    with safe_open(str(out / WEIGHTS), framework="pt") as f:
        dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    assert {d for k, d in dtypes.items() if k.endswith(("_proj.scales", "_proj.mins"))} == {"F16"}
    assert {d for k, d in dtypes.items() if k.endswith("_proj.weight")} == {"U8"}

    model, tokenizer = load_model(out)
    reference, _ = load_model(tiny)
    quantize_model(reference, scheme)
    loaded, expected = model.state_dict(), reference.state_dict()
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert loaded[key].dtype == expected[key].dtype and torch.equal(loaded[key], expected[key]), key

    # a directory from before, with the scales and mins in fp32
    old = save_model_dir(tmp_path / "old", load_config(out), reference.state_dict(), tokenizer,
                         provenance=read_provenance(out))
    assert (old / WEIGHTS).stat().st_size > (out / WEIGHTS).stat().st_size
    ids = torch.tensor([tokenizer.encode("the theory of the thing")])
    with torch.no_grad():
        assert torch.equal(load_model(old)[0](ids), model(ids))


def test_quantizing_twice_and_bad_group_size_fail_clearly(tiny, tmp_path):
    out = quantize_dir(tiny, tmp_path / "q8", QuantScheme("int8"))
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_dir(out, tmp_path / "again", QuantScheme("int8"))
    wide = tiny_model_dir(tmp_path / "wide", hidden_size=96, intermediate_size=192)
    with pytest.raises(ConfigError, match="groups of 64; use --group-size 32"):
        quantize_dir(wide, tmp_path / "q4", QuantScheme("int4", 64))
    assert not (tmp_path / "q4").exists()


def test_quantized_weights_without_their_record_are_refused(tiny, tmp_path):
    out = quantize_dir(tiny, tmp_path / "q8", QuantScheme("int8"))
    record = json.loads((out / "pocketlm.json").read_text())
    record["quantization"] = None
    (out / "pocketlm.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="quantization"):
        load_model(out)
    record["quantization"] = {"method": "int8", "bits": 8}
    (out / "pocketlm.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="bad quantization record"):
        load_model(out)


def test_saving_a_quantized_tensor_of_the_wrong_shape_is_refused(tiny, tmp_path):
    model, tokenizer = load_model(tiny)
    scheme = QuantScheme("int4", 32)
    quantize_model(model, scheme)
    state = model.state_dict()
    state["model.layers.0.mlp.up_proj.scales"] = state["model.layers.0.mlp.up_proj.scales"][:, :1]
    with pytest.raises(CheckpointError, match="up_proj.scales has shape"):
        save_model_dir(tmp_path / "bad", model.config, state, tokenizer, provenance={"quantization": scheme.to_dict()})
    assert not (tmp_path / "bad").exists()


# ---- GGUF export -------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,qtype", [(SCHEMES[0], GGMLQuantizationType.Q8_0), (SCHEMES[1], GGMLQuantizationType.Q4_1),
                                          (SCHEMES[2], GGMLQuantizationType.Q4_1), (SCHEMES[3], GGMLQuantizationType.Q4_0)],
                         ids=lambda v: scheme_id(v) if isinstance(v, QuantScheme) else v.name)
def test_quantized_gguf_export_holds_exactly_the_models_weights(tiny_tied, tmp_path, scheme, qtype):
    """gguf-py's own dequantizer (an independent decoder of the block formats) recovers exactly the
    weights pocketlm computes with."""
    from pocketlm.convert.gguf import gguf_name, permute_qk

    qdir = quantize_dir(tiny_tied, tmp_path / "q", scheme)
    path = export_gguf(qdir, tmp_path / "model.gguf")
    model, _ = load_model(qdir)
    ours = dict(dense_tensors(model))
    reader = GGUFReader(path)
    types = {}
    for t in reader.tensors:
        types[t.name] = t.tensor_type
        values = gguf_dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        hf = next(k for k in ours if gguf_name(k) == t.name)
        expected = ours[hf].float()
        if ".q_proj." in hf:
            expected = permute_qk(expected, model.config.num_attention_heads)
        elif ".k_proj." in hf:
            expected = permute_qk(expected, model.config.num_key_value_heads)
        np.testing.assert_array_equal(values.astype(np.float32), expected.numpy(), err_msg=t.name)
    assert types["blk.0.ffn_down.weight"] == qtype
    assert types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32


def test_quantized_export_to_other_types(tiny, tmp_path):
    qdir = quantize_dir(tiny, tmp_path / "q", QuantScheme("int8"))
    with pytest.raises(PocketLMError, match="exports as q8_0"):
        export_gguf(qdir, tmp_path / "x.gguf", "q4_0")
    f16 = export_gguf(qdir, tmp_path / "f16.gguf", "f16")  # dequantized
    assert {t.tensor_type for t in GGUFReader(f16).tensors} == {GGMLQuantizationType.F16, GGMLQuantizationType.F32}


# ---- decoding ----------------------------------------------------------------------------------
PROMPTS = ["the theory", "he said that the", "t", "the the the he"]


def _greedy(model, ids, n=12):
    return list(generate_tokens(model, ids, SamplingParams(max_new_tokens=n, ignore_eos=True)))


@pytest.fixture(scope="module")
def tiny_int8(tiny_tied, tmp_path_factory):
    return load_model(quantize_dir(tiny_tied, tmp_path_factory.mktemp("q") / "int8", QuantScheme("int8")))


def test_batched_decoding_of_different_lengths_equals_one_at_a_time(tiny):
    model, tokenizer = load_model(tiny)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    batch = generate_batch(model, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert batch == [_greedy(model, ids) for ids in prompts]


def test_batched_decoding_stops_each_row_at_eos(tiny):
    model, tokenizer = load_model(tiny)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    free = generate_batch(model, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    stop = {free[0][3]}
    stopped = generate_batch(model, prompts, SamplingParams(max_new_tokens=12), stop_ids=stop)
    assert stopped[0] == free[0][: free[0].index(free[0][3]) + 1]
    assert stopped[0][-1] in stop


def test_compiled_decoding_equals_eager_for_several_models_and_cache_lengths(tmp_path):
    """Compiled steps skip dynamo's module guards; each model must still get its own graphs, and a new
    cache length a new graph: three models of one shape compiled side by side, two cache buckets each."""
    src = [tiny_model_dir(tmp_path / f"m{seed}", seed=seed, max_position_embeddings=1024)
           for seed in range(3)]
    models = [load_model(quantize_dir(src[0], tmp_path / "int8", QuantScheme("int8")))[0],
              load_model(quantize_dir(src[1], tmp_path / "int4", QuantScheme("int4", 32)))[0],
              load_model(src[2])[0]]
    for m in models:  # the compiled Python step, not the whole-step kernel (tests/test_decode_step.py)
        m.native_decoding = False
    _, tokenizer = load_model(src[0])
    ids = tokenizer.encode("the theory of")
    eager = [(_greedy(m, ids, 20), _greedy(m, ids, 300)) for m in models]
    assert len({tuple(e[0]) for e in eager}) > 1  # the three really differ
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    batched = [generate_batch(m, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True)) for m in models]
    for m in models:
        compile_decoder(m)
    assert [(_greedy(m, ids, 20), _greedy(m, ids, 300)) for m in models] == eager
    # batched decoding of different lengths goes through the compiled step too
    assert [generate_batch(m, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True)) for m in models] == batched


def test_speculative_decoding_gives_exactly_the_greedy_tokens(tiny, tmp_path):
    target, tokenizer = load_model(tiny)
    draft, _ = load_model(quantize_dir(tiny, tmp_path / "draft", QuantScheme("int4", 32)))
    for ids in [tokenizer.encode(p) for p in PROMPTS]:
        for k in (1, 3, 6):
            tokens, stats = speculative_generate(target, draft, ids, 20, k=k)
            assert tokens == _greedy(target, ids, 20)
            assert stats.drafted > 0 and 0 <= stats.accepted <= stats.drafted


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_speculative_decoding_with_itself_accepts_everything(tiny, tmp_path, weights):
    """The draft's proposals come from its decode step (for int4 on an AVX2 CPU, the whole-step kernel), the
    target's checks from a forward pass: as the same model they must agree on every token."""
    path = tiny if weights == "fp32" else quantize_dir(tiny, tmp_path / "int4", QuantScheme("int4", 32))
    model, tokenizer = load_model(path)
    tokens, stats = speculative_generate(model, model, tokenizer.encode("the theory"), 16, k=4)
    assert stats.acceptance_rate == 1.0 and tokens == _greedy(model, tokenizer.encode("the theory"), 16)


@pytest.mark.parametrize("draft_kind", ["int4", "other"])
def test_speculative_sampling_draws_from_the_targets_distribution(tiny, tmp_path, draft_kind):
    """Sampled speculative decoding must give each token exactly the target's sampling distribution, whatever
    the draft: an int4 copy, whose proposals are accepted about three times in four, or another random model,
    whose proposals are nearly always rejected. Top-k 5 keeps few tokens in play. The first three tokens of
    1,500 seeded runs are compared with their exact distribution (from the target's own probabilities) by
    total variation; a draw of the same size straight from that distribution sets the scale. Accepting every
    proposal fails this test with either draft, drawing a rejected position from p instead of max(0, p - q)
    with the int4 draft (checked by hand)."""
    from pocketlm.engine import token_probs

    target, tokenizer = load_model(tiny)
    draft, _ = load_model(quantize_dir(tiny, tmp_path / "int4", QuantScheme("int4", 32)) if draft_kind == "int4" else
                          tiny_model_dir(tmp_path / "other", seed=1, hidden_size=64, intermediate_size=128))
    prompt = tokenizer.encode("the theory")
    params = SamplingParams(temperature=1.0, top_k=5)

    def probs(ids):
        with torch.no_grad():
            return token_probs(target(torch.tensor([ids]))[0, -1], params)

    exact: dict[tuple[int, ...], float] = {}  # P(x1, x2, x3) under the target alone
    p1 = probs(prompt)
    for x1 in p1.nonzero().flatten().tolist():
        p2 = probs(prompt + [x1])
        for x2 in p2.nonzero().flatten().tolist():
            p3 = probs(prompt + [x1, x2])
            for x3 in p3.nonzero().flatten().tolist():
                exact[(x1, x2, x3)] = float(p1[x1] * p2[x2] * p3[x3])
    keys = list(exact)
    runs, seen, accepted, drafted = 1500, {}, 0, 0
    for seed in range(runs):
        sampling = SamplingParams(temperature=1.0, top_k=5, seed=seed)
        tokens, stats = speculative_generate(target, draft, prompt, 3, k=2, sampling=sampling)
        seen[tuple(tokens)] = seen.get(tuple(tokens), 0) + 1
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    assert set(seen) <= set(exact)  # nothing the target's top-5 would not produce

    def total_variation(counts, marginal):
        groups = {}
        for key in keys:
            groups.setdefault(marginal(key), [0.0, 0])
            groups[marginal(key)][0] += exact[key]
            groups[marginal(key)][1] += counts.get(key, 0)
        return 0.5 * sum(abs(p - n / runs) for p, n in groups.values())

    reference = torch.multinomial(torch.tensor([exact[key] for key in keys]), runs, replacement=True,
                                  generator=torch.Generator().manual_seed(0))
    direct = {}
    for i in reference.tolist():
        direct[keys[i]] = direct.get(keys[i], 0) + 1
    for marginal in (lambda key: key[:2], lambda key: key[2]):  # (x1, x2) jointly, and x3
        assert total_variation(seen, marginal) < 2 * total_variation(direct, marginal) + 0.02
    if draft_kind == "int4":
        assert 0.3 < accepted / drafted < 0.95  # both acceptance and rejection were exercised


def test_speculative_decoding_refuses_another_vocabulary(tiny, tmp_path):
    target, _ = load_model(tiny)
    other, _ = load_model(tiny_model_dir(tmp_path / "other", vocab_size=320))
    with pytest.raises(ConfigError, match="same tokenizer"):
        speculative_generate(target, other, [1, 2, 3], 8)
