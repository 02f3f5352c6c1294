"""GGUF export and import of Mixtral-style mixtures of experts, checked against llama.cpp itself (through
llama-cpp-python) and against gguf-py's own reader and quantizer; and why windowed models stay refused:
llama.cpp's `llama` architecture ignores `llama.attention.sliding_window`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from pocketlm.checkpoint import load_config, load_model, load_tensors, save_model_dir
from pocketlm.config import ModelConfig
from pocketlm.convert import gguf_export
from pocketlm.convert.gguf import import_gguf
from pocketlm.convert.gguf_export import export_gguf, write_gguf
from pocketlm.errors import CheckpointError, UnsupportedModelError
from pocketlm.llamacpp import open_llama
from pocketlm.model import LlamaForCausalLM

from helpers import byte_level_tokenizer, llama_cpp_agreement, tiny_config

EXPERTS, TOP_K = 4, 2
ROUTER = "block_sparse_moe.gate.weight"


def random_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """pocketlm's own initialisation (Mixtral names when the config has experts), norms moved off 1."""
    model = LlamaForCausalLM(ModelConfig.from_dict(config)).init_weights(std=0.05, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) if "norm" in k else v for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A random Mixtral: 4 experts, top 2, hidden 64, 2 layers, the tests' byte-level tokenizer (300 tokens)."""
    config = tiny_config(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    return save_model_dir(tmp_path_factory.mktemp("moe") / "mixtral", config, random_weights(config),
                          byte_level_tokenizer())


def held(weights: dict[str, torch.Tensor], qtype: Q) -> dict[str, torch.Tensor]:
    """What a GGUF of `qtype` holds, by gguf-py's quantizer: norms and routers exact (F32), matrices rounded."""
    out = {}
    for name, t in weights.items():
        if t.dim() == 1 or name.endswith(ROUTER) or qtype == Q.F32:
            out[name] = t
        elif qtype == Q.F16:
            out[name] = t.half().float()
        else:
            out[name] = torch.from_numpy(dequantize(quantize(t.numpy(), qtype), qtype))
    return out


# ---------------------------------------------------------------------------------------------
# export: llama.cpp's layout, and llama.cpp runs it
# ---------------------------------------------------------------------------------------------
def test_export_writes_llama_cpp_mixtral_layout(mixtral, tmp_path):
    """As convert_hf_to_gguf.py writes Mixtral: expert counts in the metadata, an F32 router, and each
    projection's experts stacked first (ne = {d, ff, E} for gate/up, {ff, d, E} for down)."""
    reader = GGUFReader(export_gguf(mixtral, tmp_path / "m.gguf", "f16"))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert (meta["general.architecture"], meta["llama.expert_count"], meta["llama.expert_used_count"]) == ("llama", 4, 2)
    tensors = {t.name: t for t in reader.tensors}
    assert not [n for n in tensors if n.startswith("blk.0.ffn_") and n.split(".")[3].isdigit()]  # no per-expert tensors
    weights = load_tensors(mixtral / "model.safetensors")
    ne = {"gate": (64, 160, 4), "up": (64, 160, 4), "down": (160, 64, 4)}
    for layer in range(2):
        router = tensors[f"blk.{layer}.ffn_gate_inp.weight"]
        assert (router.tensor_type, tuple(int(d) for d in router.shape)) == (Q.F32, (64, 4))
        for kind, w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            t = tensors[f"blk.{layer}.ffn_{kind}_exps.weight"]
            assert (t.tensor_type, tuple(int(d) for d in t.shape)) == (Q.F16, ne[kind])
            stacked = torch.stack([weights[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]
                                   for e in range(EXPERTS)])
            values = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(tuple(reversed(ne[kind]))))
            assert torch.equal(values, stacked.half().float()), (layer, kind)


@pytest.mark.parametrize("outtype, qtype, agreement", [("f32", Q.F32, 1.0), ("f16", Q.F16, 1.0), ("q8_0", Q.Q8_0, 0.90)],
                         ids=["f32", "f16", "q8_0"])
def test_export_runs_in_llama_cpp(mixtral, tmp_path, outtype, qtype, agreement):
    """Importing the file gives exactly the weights it holds (gguf-py's rounding of ours), and along pocketlm's
    greedy continuation on those weights llama.cpp picks the same next tokens. At Q8_0 llama.cpp also rounds
    activations to 8 bits, so, as for dense models (test_smollm2.py), a near-tie may part: >= 90% of positions
    (measured: 100% on these prompts, 98% over 20 random prompts; F16: 100% here, 99.8% over those)."""
    pytest.importorskip("llama_cpp")
    path = export_gguf(mixtral, tmp_path / f"m-{outtype}.gguf", outtype)
    expected = held(load_tensors(mixtral / "model.safetensors"), qtype)
    back = load_tensors(import_gguf(path, tmp_path / "back") / "model.safetensors")
    for name, t in expected.items():
        assert torch.equal(back[name], t), name
    model, _ = load_model(save_model_dir(tmp_path / "held", load_config(mixtral), expected, byte_level_tokenizer()))
    llm = open_llama(path, n_threads=2, n_ctx=128, logits_all=True, verbose=False)
    prompts = [list(range(5, 17)), byte_level_tokenizer().encode("the theme of the day")]
    fraction, widest_tie = llama_cpp_agreement(llm, model, prompts, 32)
    assert fraction >= agreement and widest_tie < 1.0, (fraction, widest_tie)


def test_f32_round_trip_is_exact(mixtral, tmp_path):
    back = import_gguf(export_gguf(mixtral, tmp_path / "m.gguf", "f32"), tmp_path / "back")
    config = load_config(back)
    assert (config.num_local_experts, config.num_experts_per_tok) == (EXPERTS, TOP_K)
    ours, theirs = load_tensors(mixtral / "model.safetensors"), load_tensors(back / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert torch.equal(theirs[name], t), name


@pytest.mark.parametrize("scheme, qtype", [(dict(method="int8"), Q.Q8_0), (dict(method="int4", group_size=32), Q.Q4_1)],
                         ids=["int8", "int4"])
def test_quantized_mixture_exports_block_for_block(mixtral, tmp_path, scheme, qtype):
    """A quantized mixture's experts stack as the model's own blocks; the router stays float (F32)."""
    from pocketlm.quant import QuantScheme, dense_tensors
    from pocketlm.quantize import quantize_dir

    quantized = quantize_dir(mixtral, tmp_path / "q", QuantScheme(**scheme))
    path = export_gguf(quantized, tmp_path / "q.gguf")
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert (types["blk.1.ffn_down_exps.weight"], types["blk.1.ffn_gate_inp.weight"]) == (qtype, Q.F32)
    model, _ = load_model(quantized)
    back = load_tensors(import_gguf(path, tmp_path / "back") / "model.safetensors")
    for name, t in dense_tensors(model):
        assert torch.equal(back[name], t.float()), name


def test_per_expert_layout_imports(mixtral, tmp_path, monkeypatch):
    """Older files hold one tensor per expert (blk.N.ffn_gate.E.weight): they import the same."""
    monkeypatch.setattr(gguf_export, "stack_experts", lambda arrays, n: arrays)
    path = export_gguf(mixtral, tmp_path / "m.gguf", "f32")
    assert "blk.1.ffn_down.3.weight" in {t.name for t in GGUFReader(path).tensors}
    back = load_tensors(import_gguf(path, tmp_path / "back") / "model.safetensors")
    for name, t in load_tensors(mixtral / "model.safetensors").items():
        assert torch.equal(back[name], t), name


# ---------------------------------------------------------------------------------------------
# the window: llama.cpp's llama architecture ignores it, so export refuses
# ---------------------------------------------------------------------------------------------
def test_llama_cpp_ignores_the_sliding_window_key(tmp_path, monkeypatch):
    """A llama GGUF carrying llama.attention.sliding_window = 8 runs in llama.cpp as full attention: its logits
    past the window match pocketlm without the window and not pocketlm with it. Should llama.cpp start
    honouring the key, this fails, and windowed export can be allowed."""
    pytest.importorskip("llama_cpp")
    windowed = tiny_config(sliding_window=8)
    weights = random_weights(tiny_config())
    sw_dir = save_model_dir(tmp_path / "sw", windowed, weights, byte_level_tokenizer())
    with pytest.raises(UnsupportedModelError, match=r"sw: sliding-window attention \(sliding_window 8\) cannot be "
                       r"written to GGUF: llama.cpp's llama architecture ignores llama.attention.sliding_window"):
        export_gguf(sw_dir, tmp_path / "sw.gguf", "f32")
    assert not (tmp_path / "sw.gguf").exists()

    write_metadata = gguf_export._write_llama_metadata

    def with_window(writer, config, name, file_type):
        write_metadata(writer, config, name, file_type)
        writer.add_sliding_window(config.sliding_window)

    monkeypatch.setattr(gguf_export, "_check_exportable", lambda config, name: None)
    monkeypatch.setattr(gguf_export, "_write_llama_metadata", with_window)
    path = export_gguf(sw_dir, tmp_path / "sw.gguf", "f32")
    assert GGUFReader(path).fields["llama.attention.sliding_window"].contents() == 8

    ids = list(range(3, 35))  # 32 tokens, 4x the window
    llm = open_llama(path, n_threads=2, n_ctx=128, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    full, _ = load_model(save_model_dir(tmp_path / "full", tiny_config(), weights, byte_level_tokenizer()))
    sliding, _ = load_model(sw_dir)
    with torch.no_grad():
        full_logits, sliding_logits = full(torch.tensor([ids]))[0], sliding(torch.tensor([ids]))[0]
    assert (theirs - full_logits).abs().max() < 1e-3
    assert (theirs[8:] - sliding_logits[8:]).abs().max() > 0.05


# ---------------------------------------------------------------------------------------------
# bad input: one line each
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [128, 0], ids=["shared-expert", "routed-only"])
def test_a_qwen2_moe_model_is_refused(tmp_path, shared):
    config = ModelConfig.from_dict(tiny_config(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=64, shared_expert_intermediate_size=shared))
    with pytest.raises(UnsupportedModelError, match=r"qwen2moe: GGUF export of a Qwen2-MoE model is not supported: "
                       r"llama.cpp's llama architecture has no shared expert"):
        write_gguf(tmp_path / "x.gguf", config, byte_level_tokenizer(), [], "f16", name="qwen2moe")
    assert not (tmp_path / "x.gguf").exists()


def bad_export(mixtral, tmp_path, monkeypatch, *, used=None, drop=None, add=None):
    """An F32 export of the mixture with its expert_used_count replaced, one tensor dropped or one added."""
    stack = gguf_export.stack_experts

    def edited(arrays, n):
        for gname, values, qtype in stack(arrays, n):
            if gname != drop:
                yield gname, values, qtype
        if add:
            yield add, np.zeros((160, 64), np.float32), Q.F32

    monkeypatch.setattr(gguf_export, "stack_experts", edited)
    if used != "keep":
        monkeypatch.setattr(GGUFWriter, "add_expert_used_count",
                            lambda self, n: None if used is None else self.add_uint32("llama.expert_used_count", used))
    return export_gguf(mixtral, tmp_path / "bad.gguf", "f32")


@pytest.mark.parametrize("used, message", [
    (None, "bad.gguf: llama.expert_used_count is None with llama.expert_count 4; a mixture routes each token to "
           "1 to expert_count experts, so the GGUF file is damaged"),
    (5, "bad.gguf: llama.expert_used_count is 5 with llama.expert_count 4"),
    (0, "bad.gguf: llama.expert_used_count is 0 with llama.expert_count 4"),
], ids=["missing", "above", "zero"])
def test_bad_expert_used_count(mixtral, tmp_path, monkeypatch, used, message):
    path = bad_export(mixtral, tmp_path, monkeypatch, used=used)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("drop", ["blk.1.ffn_up_exps.weight", "blk.0.ffn_gate_inp.weight"])
def test_missing_expert_tensor(mixtral, tmp_path, monkeypatch, drop):
    path = bad_export(mixtral, tmp_path, monkeypatch, used="keep", drop=drop)
    with pytest.raises(UnsupportedModelError, match=f"bad.gguf: a mixture of 4 experts without {drop}; pocketlm reads "
                       r"a router \(ffn_gate_inp\) and experts stacked \(ffn_gate_exps, ffn_up_exps, ffn_down_exps\) "
                       r"or one tensor per expert"):
        import_gguf(path, tmp_path / "out")


def test_shared_expert_tensors_are_refused(mixtral, tmp_path, monkeypatch):
    path = bad_export(mixtral, tmp_path, monkeypatch, used="keep", add="blk.0.ffn_up_shexp.weight")
    with pytest.raises(UnsupportedModelError, match=r"bad.gguf: shared experts \(blk.0.ffn_up_shexp.weight\) are "
                       "not supported; pocketlm imports Mixtral-style mixtures, whose experts are all routed"):
        import_gguf(path, tmp_path / "out")
