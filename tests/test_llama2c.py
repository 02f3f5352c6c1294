"""llama2.c interop: import / export of legacy .bin checkpoints and SentencePiece tokenizers.

References nobody here wrote: llama2.c's documented stories260K sample, sentencepiece's own encoder, the
original .bin / tokenizer.bin bytes, and a direct transcription of llama2.c's run.c forward pass.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pocketlm.checkpoint import WEIGHTS, expected_shapes, load_config, load_tensors, save_model_dir
from pocketlm.config import ModelConfig
from pocketlm.convert.llama2c import (
    HEADER,
    Llama2cHeader,
    export_llama2c,
    export_llama2c_tokenizer,
    freq_cis,
    import_llama2c,
    read_llama2c,
    tokenizer_from_sentencepiece,
)
from pocketlm.errors import CheckpointError
from pocketlm.tokenizer import Tokenizer

SHARED = Path(os.environ.get("POCKETLM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
LLAMA2C = SHARED / "llama2c"
STORIES_BIN, TOK_MODEL, TOK_BIN = LLAMA2C / "stories260K.bin", LLAMA2C / "tok512.model", LLAMA2C / "tok512.bin"
PROMPT = "Once upon a time"
REFERENCE = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."

needs_data = pytest.mark.skipif(not STORIES_BIN.is_file(), reason=f"shared data not found at {LLAMA2C}")


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    if not STORIES_BIN.is_file():
        pytest.skip(f"shared data not found at {LLAMA2C}")
    return import_llama2c(STORIES_BIN, tmp_path_factory.mktemp("llama2c") / "stories260K", TOK_MODEL)


# ---------------------------------------------------------------------------------------------
# stories260K: the documented greedy sample, and byte-identical export
# ---------------------------------------------------------------------------------------------
def test_stories260k_greedy_sample_with_transformers(stories):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(stories)
    model = LlamaForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id == 1
    out = model.generate(ids, max_new_tokens=40, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True).startswith(REFERENCE)


def test_stories260k_greedy_sample_with_pocketlm_engine(stories):
    from pocketlm.checkpoint import load_model
    from pocketlm.engine import SamplingParams
    from pocketlm.streaming import generate

    model, tokenizer = load_model(stories)
    result = generate(model, tokenizer, PROMPT, SamplingParams(max_new_tokens=40))
    assert (PROMPT + result.text).startswith(REFERENCE)


def test_stories260k_model_dir_contents(stories):
    config = load_config(stories)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 172, 5)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (8, 4, 512)
    assert config.max_position_embeddings == 512 and config.tie_word_embeddings
    assert config.rms_norm_eps == 1e-5 and config.rope_theta == 10000.0
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    source = json.loads((stories / "pocketlm.json").read_text())["source"]
    assert source["format"] == "llama2c" and len(source["sha256"]) == 64


def test_stories260k_export_is_byte_identical(stories, tmp_path):
    out = export_llama2c(stories, tmp_path / "stories260K.bin")
    assert out.read_bytes() == STORIES_BIN.read_bytes()


def test_stories260k_tokenizer_export_is_byte_identical(stories, tmp_path):
    out = export_llama2c_tokenizer(stories, tmp_path / "tok512.bin")
    assert out.read_bytes() == TOK_BIN.read_bytes()


def test_export_then_import_is_bit_identical(stories, tmp_path):
    bin_path = export_llama2c(stories, tmp_path / "again.bin")
    again = import_llama2c(bin_path, tmp_path / "again", TOK_MODEL)
    config = load_config(stories)
    first, second = load_tensors(stories / WEIGHTS, config), load_tensors(again / WEIGHTS, load_config(again))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


# ---------------------------------------------------------------------------------------------
# tokenizer parity with sentencepiece itself
# ---------------------------------------------------------------------------------------------
TRICKY = [
    "", " ", "   ", "Hello", " Hello", "  Hello  world  ", "a\nb", "\n\nx\n", " \n ", "line one\n line two",
    "tab\there", "café naïve 日本語 🙂", "Ünïcödé—dash “quotes”", "12345 678.9", "x  \n  y", "\u200a hair",
    "trailing ▁", "a ▁ b", "aaaaaaa", "<0x41>", "end. ", "Once upon a time, there was a little girl named Lily.",
]


def _parity_texts(seed: int = 0) -> list[str]:
    texts = list(TRICKY)
    stories_text = SHARED / "tinystories" / "tinystories_val_head.txt"
    if stories_text.is_file():
        texts += stories_text.read_text().split("\n")[:1000]
    rng = random.Random(seed)
    alphabet = " \n\tabcdeABC.,!?'é日😀\u200aＡ①0123"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(1000)]
    return texts


def _assert_parity(model_file: Path, texts: list[str]) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tok = tokenizer_from_sentencepiece(model_file)
    for text in texts:
        expected = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == expected, repr(text)
        assert tok.encode(text) == [sp.bos_id()] + expected, repr(text)
        if "▁" not in text:  # sentencepiece strips every leading "▁" when decoding; HF strips one space
            assert tok.decode(expected) == sp.decode(expected), repr(text)


@needs_data
def test_tokenizer_parity_with_sentencepiece():
    _assert_parity(TOK_MODEL, _parity_texts())


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_parity_on_freshly_trained_models(tmp_path, model_type):
    """Default SentencePiece settings (NFKC charsmap, dummy prefix), both algorithms."""
    import sentencepiece as spm

    texts = _parity_texts(seed=1)
    corpus = [t for t in texts[:len(TRICKY) + 1000] if t.strip()] * 2  # real text; random strings stay unseen
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   hard_vocab_limit=False, model_type=model_type, byte_fallback=True, minloglevel=2)
    if model_type == "unigram":  # HF's Unigram lattice matches literal "<0x41>" text to the byte piece; sp never does
        texts = [t for t in texts if "<0x" not in t]
    _assert_parity(tmp_path / "sp.model", texts)


@needs_data
def test_transformers_autotokenizer_adds_bos(stories):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories)
    ours = Tokenizer.load(stories)
    for text in TRICKY[3:12]:
        assert tok(text).input_ids == ours.encode(text), repr(text)
        assert ours.encode(text)[0] == 1


# ---------------------------------------------------------------------------------------------
# a tiny random model: untied classifier, grouped-query attention
# ---------------------------------------------------------------------------------------------
TINY = Llama2cHeader(dim=48, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=512, seq_len=32,
                     shared_classifier=False)


def _random_bin(path: Path, header: Llama2cHeader, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    cos, sin = freq_cis(header.head_size, header.seq_len)
    with open(path, "wb") as f:
        f.write(header.pack())
        for name, shape in header.layout():
            data = {"freq_cis_real": cos, "freq_cis_imag": sin}.get(name)
            if data is None:
                data = torch.randn(shape, generator=gen) * (1.0 if name.startswith("rms") else 0.3)
            f.write(data.numpy().astype("<f4").tobytes())
    return path


def _run_c_logits(h: Llama2cHeader, a: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """llama2.c's run.c forward for a whole sequence: interleaved RoPE pairs, kv head = head / kv_mul."""
    T, hs = len(ids), h.head_size
    freq = 1.0 / 10000.0 ** (torch.arange(0, hs, 2).float() / hs)
    angle = torch.arange(T).float()[:, None] * freq[None]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]

    def rope(v: torch.Tensor, heads: int) -> torch.Tensor:
        v = v.view(T, heads, hs // 2, 2)
        v0, v1 = v[..., 0], v[..., 1]
        return torch.stack([v0 * cos - v1 * sin, v0 * sin + v1 * cos], dim=-1).view(T, heads, hs).transpose(0, 1)

    def rms(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    x = a["token_embedding_table"][ids]
    kv_mul = h.n_heads // h.n_kv_heads
    mask = torch.full((T, T), float("-inf")).triu(1)
    for layer in range(h.n_layers):
        xb = rms(x, a["rms_att_weight"][layer])
        q = rope(xb @ a["wq"][layer].T, h.n_heads)
        k = rope(xb @ a["wk"][layer].T, h.n_kv_heads).repeat_interleave(kv_mul, 0)
        v = (xb @ a["wv"][layer].T).view(T, h.n_kv_heads, hs).transpose(0, 1).repeat_interleave(kv_mul, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hs) + mask, dim=-1)
        x = x + (att @ v).transpose(0, 1).reshape(T, -1) @ a["wo"][layer].T
        xb = rms(x, a["rms_ffn_weight"][layer])
        x = x + (F.silu(xb @ a["w1"][layer].T) * (xb @ a["w3"][layer].T)) @ a["w2"][layer].T
    x = rms(x, a["rms_final_weight"])
    return x @ (a["token_embedding_table"] if h.shared_classifier else a["wcls"]).T


@needs_data
def test_random_untied_gqa_matches_run_c_and_round_trips(tmp_path):
    from transformers import LlamaForCausalLM

    original = _random_bin(tmp_path / "tiny.bin", TINY)
    model_dir = import_llama2c(original, tmp_path / "tiny", TOK_MODEL)
    config = load_config(model_dir)
    assert not config.tie_word_embeddings and config.num_key_value_heads == 2

    header, arrays = read_llama2c(original)
    ids = [1, 403, 407, 261, 378, 5, 300, 42, 511, 7]
    expected = _run_c_logits(header, arrays, ids)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    exported = export_llama2c(model_dir, tmp_path / "tiny_again.bin")
    assert exported.read_bytes() == original.read_bytes()
    assert struct.unpack("<7i", exported.read_bytes()[:HEADER.size])[5] == -512  # untied: negative vocab


@needs_data
def test_random_hf_model_dir_round_trips_bit_identically(tmp_path):
    config = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=72, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(3)
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in expected_shapes(config).items()}
    src = save_model_dir(tmp_path / "src", config, tensors, tokenizer_from_sentencepiece(TOK_MODEL))
    back = import_llama2c(export_llama2c(src, tmp_path / "src.bin"), tmp_path / "back", TOK_MODEL)
    loaded = load_tensors(back / WEIGHTS, load_config(back))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


# ---------------------------------------------------------------------------------------------
# user mistakes: one clear CheckpointError naming the file
# ---------------------------------------------------------------------------------------------
def _import_error(bin_path: Path, tmp_path: Path, tokenizer: Path = TOK_MODEL) -> str:
    with pytest.raises(CheckpointError) as info:
        import_llama2c(bin_path, tmp_path / "out", tokenizer)
    assert not (tmp_path / "out").exists()
    message = str(info.value)
    assert str(bin_path if tokenizer == TOK_MODEL else tokenizer) in message
    return message


def test_text_file_as_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("Once upon a time there was a text file that was not a checkpoint.\n")
    assert "text file" in _import_error(path, tmp_path)


@needs_data
def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes(STORIES_BIN.read_bytes()[:500_000])
    message = _import_error(path, tmp_path)
    assert "truncated" in message and "500,000" in message


def test_too_short_for_a_header(tmp_path):
    path = tmp_path / "tiny.bin"
    path.write_bytes(b"\x00\x01\x02")
    assert "too short" in _import_error(path, tmp_path)


def test_header_with_nonsense_sizes(tmp_path):
    path = tmp_path / "nonsense.bin"
    path.write_bytes(struct.pack("<7i", 64, 172, 5, 7, 4, 512, 512) + bytes(1000))  # 7 heads don't divide 64
    assert "impossible sizes" in _import_error(path, tmp_path)
    path.write_bytes(struct.pack("<7i", -64, 0, 5, 8, 4, 512, 512) + bytes(1000))
    assert "dim=-64" in _import_error(path, tmp_path)


@needs_data
def test_sizes_that_do_not_add_up(tmp_path):
    path = tmp_path / "extra.bin"
    path.write_bytes(STORIES_BIN.read_bytes() + bytes(4 * 64))
    assert "do not add up" in _import_error(path, tmp_path)


def test_newer_llama2c_format_is_named(tmp_path):
    path = tmp_path / "v1.bin"
    path.write_bytes(struct.pack("<Ii", 0x616B3432, 1) + bytes(248))
    assert "--version 0" in _import_error(path, tmp_path)


@needs_data
def test_tokenizer_that_is_not_sentencepiece(tmp_path):
    for wrong in (TOK_BIN, LLAMA2C / "tok512.vocab"):
        assert "not a SentencePiece" in _import_error(STORIES_BIN, tmp_path, tokenizer=wrong)


@needs_data
def test_tokenizer_of_the_wrong_size(tmp_path):
    import sentencepiece as spm

    corpus = (SHARED / "tinystories" / "tinystories_sample.txt").read_text().split("\n")[:2000]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "small"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2)
    message = _import_error(STORIES_BIN, tmp_path, tokenizer=tmp_path / "small.model")
    assert "400 tokens" in message and "512" in message
