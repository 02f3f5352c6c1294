"""GGUF import/export, checked against references nobody here wrote: llama.cpp's tokenizer tests
(gguf_vocab/*.out), SentencePiece and Hugging Face tokenizers, transformers' own GGUF loader and Llama
implementation, and (where installed) llama.cpp itself through llama-cpp-python."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, TokenType
from gguf.quants import dequantize, quantize

from pocketlm.checkpoint import load_config, load_tensors, read_provenance
from pocketlm.convert.gguf import import_gguf, tokenizer_from_gguf
from pocketlm.convert.gguf_export import export_gguf
from pocketlm.errors import CheckpointError, PocketLMError, UnsupportedModelError
from pocketlm.llamacpp import open_llama
from pocketlm.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("POCKETLM_SHARED_DATA", REPO.parent / "shared" / "data"))
ROPE_THETA = 10000.0
VOCABS = ["ggml-vocab-gpt-2.gguf", "ggml-vocab-llama-spm.gguf"]

TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello world! It's 2024, and we've 12345 tokens to test.\n"
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.\n"
    "  indented\tline with tabs\n\nÜnïcödé, emoji 🙂 and 中文 text; 'quoted' \"double\" (parens) [brackets].\n"
) * 3
SAMPLES = ["", " ", "Hello world", " Hello  World!\n\n", "It's 12345 o'clock", "Ünïcödé 🙂 中文", "\t\ttabs\n", "x" * 40]


# ---------------------------------------------------------------------------------------------
# llama.cpp's tokenizer tests
# ---------------------------------------------------------------------------------------------
def llama_cpp_cases(gguf: Path) -> list[tuple[str, list[int]]]:
    """Cases as llama.cpp's test-tokenizer-0 reads them: the .inp split on "\\n__ggml_vocab_test__\\n",
    one .out line of ids per case, tokenized with add_special = false."""
    raw = Path(f"{gguf}.inp").read_text(encoding="utf-8")
    texts = raw.split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts.pop()
    outs = Path(f"{gguf}.out").read_text(encoding="utf-8").split("\n")[: len(texts)]
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


@pytest.fixture(scope="module", params=VOCABS)
def vocab_file(request, gguf_vocab_dir) -> Path:
    return gguf_vocab_dir / request.param


@pytest.fixture(scope="module")
def vocab_tokenizer(vocab_file) -> Tokenizer:
    return tokenizer_from_gguf(vocab_file)


def test_llama_cpp_vocab_cases(vocab_file, vocab_tokenizer):
    cases = llama_cpp_cases(vocab_file)
    assert len(cases) == 46
    wrong = [(text, ids, vocab_tokenizer.encode(text, add_special_tokens=False)) for text, ids in cases
             if vocab_tokenizer.encode(text, add_special_tokens=False) != ids]
    assert not wrong, f"{len(wrong)} of 46 cases differ, first: {wrong[0]}"


def test_vocab_special_tokens(vocab_file, vocab_tokenizer):
    if "spm" in vocab_file.name:
        assert (vocab_tokenizer.bos_token, vocab_tokenizer.eos_token, vocab_tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
        assert vocab_tokenizer.encode("Hello world") == [1, 15043, 3186]  # llama.cpp adds BOS for this vocab
        assert vocab_tokenizer.decode([1, 15043, 3186], skip_special_tokens=True) == "Hello world"
    else:
        assert vocab_tokenizer.bos_token == vocab_tokenizer.eos_token == "<|endoftext|>"
        assert vocab_tokenizer.encode("Hello world") == [15496, 995]
        assert vocab_tokenizer.encode("a<|endoftext|>b", add_special_tokens=False) == [64, 50256, 65]
    assert vocab_tokenizer.decode(vocab_tokenizer.encode(TEXT, add_special_tokens=False)) == TEXT


def test_vocab_round_trip_through_export(vocab_file, vocab_tokenizer, tmp_path):
    """export_gguf writes the vocabulary back (SentencePiece scores rebuilt from merges); re-importing it,
    and llama.cpp reading it, still give llama.cpp's expected ids."""
    model_dir = tiny_model_dir(tmp_path / "m", vocab_tokenizer)
    out = export_gguf(model_dir, tmp_path / "v.gguf", "f32")
    again = tokenizer_from_gguf(out)
    for text, ids in llama_cpp_cases(vocab_file):
        assert again.encode(text, add_special_tokens=False) == ids, text
    assert again.encode("Hi") == vocab_tokenizer.encode("Hi")
    pytest.importorskip("llama_cpp")
    llm = open_llama(out, vocab_only=True, verbose=False)
    for text, ids in llama_cpp_cases(vocab_file):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text


# ---------------------------------------------------------------------------------------------
# tiny models written with gguf.GGUFWriter, the way convert_hf_to_gguf.py writes them
# ---------------------------------------------------------------------------------------------
def train_byte_level_vocab() -> dict:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers, trainers
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    import json
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"reference": tok, "model": "gpt2", "pre": "gpt-2", "tokens": tokens, "merges": merges,
            "types": [TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens],
            "bos": 0, "eos": 2, "add_bos": False, "template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"}


def train_spm_vocab(tmp: Path) -> dict:
    """A SentencePiece BPE model with byte fallback, written out as convert_hf_to_gguf.py does."""
    import sentencepiece as spm
    (tmp / "text.txt").write_text(TEXT)
    spm.SentencePieceTrainer.train(input=str(tmp / "text.txt"), model_prefix=str(tmp / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity")  # as Llama's
    sp = spm.SentencePieceProcessor(model_file=str(tmp / "sp.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                     else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL)
    return {"reference": sp, "model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "types": types,
            "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "add_bos": True, "template": None}


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory) -> dict[str, dict]:
    return {"bpe": train_byte_level_vocab(), "spm": train_spm_vocab(tmp_path_factory.mktemp("spm"))}


def tiny_hf_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=ROPE_THETA, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, copied independently of pocketlm."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(path: Path, model, vocab: dict, qtype: Q, arch: str = "llama") -> dict[str, np.ndarray]:
    """Write `model` as llama.cpp would; return the HF-layout weights the file really holds (dequantized)."""
    cfg = model.config
    w = GGUFWriter(path, arch)
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(1)
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    if "unk" in vocab:
        w.add_unk_token_id(vocab["unk"])
    w.add_add_bos_token(vocab["add_bos"])
    if vocab["template"]:
        w.add_chat_template(vocab["template"])
    held = {}
    for name, t in model.state_dict().items():
        t = t.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{layer}.{HF_TO_GGUF[rest.removesuffix('.weight')]}.weight"
        qt = qtype if t.ndim == 2 else Q.F32
        # what the file holds; each row is rounded alone, so HF and permuted layouts agree
        held[name] = t if qt == Q.F32 else t.astype(np.float16).astype(np.float32) if qt == Q.F16 \
            else dequantize(quantize(t, qt), qt)
        if ".q_proj." in name:
            t = llama_cpp_permute(t, cfg.num_attention_heads)
        elif ".k_proj." in name:
            t = llama_cpp_permute(t, cfg.num_key_value_heads)
        data = t if qt == Q.F32 else t.astype(np.float16) if qt == Q.F16 else quantize(t, qt)
        w.add_tensor(gname, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def tiny_model_dir(out: Path, tokenizer: Tokenizer) -> Path:
    """A pocketlm model directory with random tiny weights around `tokenizer` (for tokenizer round trips)."""
    from pocketlm.checkpoint import save_model_dir
    model = tiny_hf_model(tokenizer.vocab_size)
    cfg = model.config
    config = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "rms_norm_eps")}
    config["rope_theta"] = ROPE_THETA
    return save_model_dir(out, config, dict(model.state_dict()), tokenizer)


def logits(model_or_dir, ids: list[int]) -> torch.Tensor:
    from transformers import LlamaForCausalLM
    model = model_or_dir if not isinstance(model_or_dir, (str, Path)) else \
        LlamaForCausalLM.from_pretrained(str(model_or_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


QTYPES = [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_import_tiny_model(vocabs, kind, qtype, tmp_path):
    vocab = vocabs[kind]
    model = tiny_hf_model(len(vocab["tokens"]))
    held = write_tiny_gguf(tmp_path / "tiny.gguf", model, vocab, qtype)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")

    # the weights are the ones in the file, back in Hugging Face's layout
    tensors = load_tensors(out / "model.safetensors", load_config(out))
    for name, ref in held.items():
        assert torch.equal(tensors[name], torch.from_numpy(ref)), name

    # and give the logits of transformers' Llama on those same weights
    reference = tiny_hf_model(len(vocab["tokens"]))
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in held.items()})
    ids = list(range(3, 40))
    assert (logits(out, ids) - logits(reference, ids)).abs().max() < 1e-4

    record = read_provenance(out)["source"]
    assert record["format"] == "gguf" and len(record["sha256"]) == 64
    assert sum(record["tensor_types"].values()) == 21  # 16 matrices, 5 norms
    assert record["tensor_types"][qtype.name] == (21 if qtype == Q.F32 else 16)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_import_matches_transformers_gguf_loader(vocabs, qtype, tmp_path):
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    from transformers import AutoModelForCausalLM
    model = tiny_hf_model(len(vocabs["bpe"]["tokens"]))
    write_tiny_gguf(tmp_path / "tiny.gguf", model, vocabs["bpe"], qtype)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = list(range(3, 40))
    assert (logits(out, ids) - logits(theirs, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_tokenizer_matches_its_reference(vocabs, kind, tmp_path):
    vocab = vocabs[kind]
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model(len(vocab["tokens"])), vocab, Q.F32)
    tok = tokenizer_from_gguf(tmp_path / "tiny.gguf")
    for text in SAMPLES + TEXT.splitlines():
        if kind == "spm":  # SentencePiece itself, and llama.cpp's BOS
            expected = vocab["reference"].encode(text)
            assert tok.encode(text) == [vocab["bos"]] + expected, text
        else:
            expected = vocab["reference"].encode(text).ids
            assert tok.encode(text) == expected, text
        assert tok.encode(text, add_special_tokens=False) == expected, text
        assert tok.decode(expected, skip_special_tokens=True) == text


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_model_dir_loads_in_transformers(vocabs, kind, tmp_path):
    from transformers import AutoTokenizer
    vocab = vocabs[kind]
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model(len(vocab["tokens"])), vocab, Q.Q8_0)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    ours, auto = Tokenizer.load(out), AutoTokenizer.from_pretrained(str(out))
    for text in SAMPLES:
        assert auto(text)["input_ids"] == ours.encode(text), text
    if vocab["template"]:
        messages = [{"role": "user", "content": "Hi there"}]
        text = ours.apply_chat_template(messages, add_generation_prompt=False)
        assert text == auto.apply_chat_template(messages, tokenize=False)
        assert ours.encode(text)[0] == vocab["tokens"].index("<|im_start|>")


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_export_import_round_trip(vocabs, kind, tmp_path):
    vocab = vocabs[kind]
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model(len(vocab["tokens"])), vocab, Q.F32)
    first = import_gguf(tmp_path / "tiny.gguf", tmp_path / "first")
    weights = load_tensors(first / "model.safetensors")

    # f32 is exact, the tokenizer survives
    again = import_gguf(export_gguf(first, tmp_path / "f32.gguf", "f32"), tmp_path / "again")
    for name, t in load_tensors(again / "model.safetensors").items():
        assert torch.equal(t, weights[name]), name
    tok1, tok2 = Tokenizer.load(first), Tokenizer.load(again)
    for text in SAMPLES + TEXT.splitlines():
        assert tok2.encode(text) == tok1.encode(text), text
    assert tok2.chat_template == tok1.chat_template
    assert (tok2.bos_token, tok2.eos_token) == (tok1.bos_token, tok1.eos_token)

    # quantized exports hold llama.cpp's quantization of each row; norms stay F32
    for outtype, qtype in [("f16", Q.F16), ("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)]:
        back = load_tensors(import_gguf(export_gguf(first, tmp_path / f"{outtype}.gguf", outtype), tmp_path / outtype)
                            / "model.safetensors")
        for name, t in weights.items():
            if t.ndim == 1:
                assert torch.equal(back[name], t), name
                continue
            if qtype == Q.Q4_0 and name == "lm_head.weight":
                qtype_here = Q.Q8_0  # llama-quantize keeps the output projection at higher precision
            else:
                qtype_here = qtype
            expected = t.half().float() if qtype_here == Q.F16 else torch.from_numpy(dequantize(quantize(t.numpy(), qtype_here), qtype_here))
            assert torch.equal(back[name], expected), (outtype, name)


def test_export_runs_in_llama_cpp(vocabs, tmp_path):
    """llama.cpp loads the export, tokenizes as we do, and its logits match transformers' on our directory."""
    pytest.importorskip("llama_cpp")
    vocab = vocabs["bpe"]
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model(len(vocab["tokens"])), vocab, Q.F32)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    path = export_gguf(out, tmp_path / "export.gguf", "f32")
    llm = open_llama(path, n_threads=2, n_ctx=128, logits_all=True, verbose=False)
    tok = Tokenizer.load(out)
    text = "Once upon a time, there was a little girl named Lily."
    ids = tok.encode(text)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    assert (theirs - logits(out, ids)).abs().max() < 1e-3  # llama.cpp's own kernels, not bitwise PyTorch


def test_safe_settings_turn_extra_buffers_off_and_back(monkeypatch):
    """On an AMX CPU llama.cpp's extra buffer types are off while a model opens, and the library's
    defaults are restored afterwards (other code keeps llama.cpp's own behaviour)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import llama_cpp.llama as high_level

    from pocketlm import llamacpp

    monkeypatch.setattr(llamacpp, "cpu_has_amx", lambda: True)
    with llamacpp.safe_settings():
        assert high_level.llama_cpp.llama_model_default_params().use_extra_bufts is False
    assert high_level.llama_cpp.llama_model_default_params is llama_cpp.llama_model_default_params
    assert llama_cpp.llama_model_default_params().use_extra_bufts is True


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_text_file_is_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is a text file, not a model\n")
    with pytest.raises(CheckpointError, match="model.gguf.*not a GGUF file"):
        import_gguf(path, tmp_path / "out")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        tokenizer_from_gguf(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.gguf: no such file"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_gpt2_architecture_is_refused(vocabs, tmp_path):
    vocab = vocabs["bpe"]
    write_tiny_gguf(tmp_path / "gpt2.gguf", tiny_hf_model(len(vocab["tokens"])), vocab, Q.F32, arch="gpt2")
    with pytest.raises(UnsupportedModelError, match=r"gpt2.gguf: architecture 'gpt2' is not supported; pocketlm imports llama"):
        import_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [0.5, 0.999, 0.01])
def test_truncated_file(vocabs, tmp_path, cut):
    vocab = vocabs["spm"]
    write_tiny_gguf(tmp_path / "full.gguf", tiny_hf_model(len(vocab["tokens"])), vocab, Q.Q8_0)
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match=r"cut.gguf: .*(truncated|damaged)"):
        import_gguf(tmp_path / "cut.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vocab_only_file_is_not_a_model(vocab_file, tmp_path):
    with pytest.raises(PocketLMError, match=vocab_file.name):
        import_gguf(vocab_file, tmp_path / "out")


def test_bad_outtype(vocabs, tmp_path):
    vocab = vocabs["bpe"]
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model(len(vocab["tokens"])), vocab, Q.F32)
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    with pytest.raises(UnsupportedModelError, match="outtype 'q3_k'"):
        export_gguf(out, tmp_path / "x.gguf", "q3_k")
    assert not (tmp_path / "x.gguf").exists()
