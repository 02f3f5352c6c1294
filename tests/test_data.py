"""pocketlm.data: ingest, cleaning, PII scrubbing, tokenizer training, shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pocketlm.fsio import file_sha256
from pocketlm.data import (
    NearDuplicateIndex,
    PrepareReport,
    clean_documents,
    load_shards,
    prepare,
    read_documents,
    scrub_pii,
)
from pocketlm.errors import PocketLMError
from pocketlm.tokenizer import Tokenizer, train_bpe, train_char

STORY = (
    "Once upon a time there was a little fox named Red who lived at the edge of a quiet forest. "
    "Every morning Red ran down to the river to drink and to watch the fish jump in the sun. "
    "One day he met an old turtle who told him stories about the sea far away, where the water "
    "never ends and the birds are white. Red listened all afternoon and dreamed of the sea that "
    "night. The next morning he packed a small bag and said goodbye to the forest, because he "
    "wanted to see the endless water with his own eyes before the summer was over."
)
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"


def _prepare(tmp_path, inputs, **kw):
    kw.setdefault("tokenizer", "char")
    kw.setdefault("progress", False)
    return prepare(inputs, tmp_path / "out", **kw)


# ---- PII ---------------------------------------------------------------------------------
def test_scrub_pii_replaces_each_kind():
    text = (
        "Mail jane.doe+news@example.co.uk or bob@mail.example.com. "
        "Call +44 20 7946 0958, (415) 555-2671, 415-555-2671 or +1 415 555 2671. "
        "Server 192.168.1.20 and fe80::1ff:fe23:4567:890a, also 2001:db8::8a2e:370:7334 and ::ffff:192.0.2.1. "
        "Card 4111 1111 1111 1111, 5500-0000-0000-0004 and 378282246310005."
    )
    scrubbed, counts = scrub_pii(text)
    assert counts == {"email": 2, "phone": 4, "ip": 4, "credit_card": 3}
    for secret in ("jane.doe", "bob@", "7946", "555-2671", "192.168", "fe80", "2001:db8", "4111", "5500", "378282"):
        assert secret not in scrubbed, secret
    assert scrubbed.count("<EMAIL>") == 2 and scrubbed.count("<PHONE>") == 4
    assert scrubbed.count("<IP>") == 4 and scrubbed.count("<CREDIT_CARD>") == 3


@pytest.mark.parametrize(
    "text",
    [
        "In 2024 we sold 3 boats; in 1999 only 12.",
        "Version 999.1.1.1 and build 1.2.3.4.5 and 256.0.0.1 shipped.",
        "Order 4111 1111 1111 1112 was refused.",  # 16 digits that fail Luhn
        "Serial 1234567890123456 on the box.",
        "It costs $1,299.99 or 45.50 EUR; 3.14159 is pi.",
        "We met at 12:30:45 on 2024-01-15; MAC 00:1a:2b:3c:4d:5e; std::vector and a::b.",
        "Years 2019 2020 2021 2022 were good.",
    ],
)
def test_scrub_pii_leaves_ordinary_text(text):
    scrubbed, counts = scrub_pii(text)
    assert scrubbed == text
    assert sum(counts.values()) == 0


def test_pii_counts_in_prepare_report(tmp_path):
    (tmp_path / "a.txt").write_text("write to ann@example.org or call 415-555-2671 today, friends")
    report = _prepare(tmp_path, [tmp_path / "a.txt"])
    assert report.pii == {"email": 1, "phone": 1, "ip": 0, "credit_card": 0}
    shards = load_shards(tmp_path / "out")
    text = shards.tokenizer.decode(np.concatenate([shards.train, shards.val]).tolist())
    assert "<EMAIL>" in text and "<PHONE>" in text and "ann@" not in text
    assert any("PII replaced" in line and "email 1" in line for line in report.summary_lines())


# ---- bad files -----------------------------------------------------------------------------
def _bad_files(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("a perfectly good document")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "image.txt").write_bytes(PNG)
    (tmp_path / "noise.md").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    return ["good.txt", "empty.txt", "image.txt", "noise.md", "latin1.txt"]


def test_bad_files_are_skipped_and_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _bad_files(src)
    report = _prepare(tmp_path, [src])
    skipped = {name.split("/")[-1]: reason for name, reason in report.skipped_files}
    assert set(skipped) == {"empty.txt", "image.txt", "noise.md", "latin1.txt"}
    assert "empty" in skipped["empty.txt"]
    assert "binary" in skipped["image.txt"] and "binary" in skipped["noise.md"]
    assert "UTF-8" in skipped["latin1.txt"]
    assert report.kept == report.documents_in == 1
    lines = "\n".join(report.summary_lines())
    assert "skipped files: 4" in lines and "latin1.txt" in lines


@pytest.mark.parametrize("bad", ["empty.txt", "image.txt", "latin1.txt"])
def test_strict_stops_on_a_bad_file(tmp_path, bad):
    _bad_files(tmp_path)
    with pytest.raises(PocketLMError, match=bad):
        _prepare(tmp_path, [tmp_path / "good.txt", tmp_path / bad], strict=True)
    assert not (tmp_path / "out").exists()


# ---- cleaning --------------------------------------------------------------------------------
def test_exact_and_near_duplicates_removed(tmp_path):
    near = STORY.replace("quiet forest", "silent forest")
    other = "A completely different story about a robot who learned to bake bread in a small town by the sea."
    docs = [STORY, STORY, near, other]
    path = tmp_path / "stories.txt"
    path.write_text("<|endoftext|>".join(docs))
    report = _prepare(tmp_path, [path], doc_separator="<|endoftext|>")
    assert report.documents_in == 4 and report.kept == 2
    assert report.dropped["exact_duplicate"] == 1 and report.dropped["near_duplicate"] == 1
    # a lower bar than the pair's similarity keeps both; dedupe=False keeps everything
    assert _prepare(tmp_path, [path], doc_separator="<|endoftext|>", near_dup_threshold=0.99).kept == 3
    assert _prepare(tmp_path, [path], doc_separator="<|endoftext|>", dedupe=False).kept == 4


def test_near_duplicate_index_is_deterministic():
    a, b = NearDuplicateIndex(), NearDuplicateIndex()
    assert np.array_equal(a.signature(STORY), b.signature(STORY))
    assert not a.is_duplicate(STORY)
    assert a.is_duplicate(STORY.replace("river", "lake"))
    assert not a.is_duplicate("Tom had a red ball. " * 3)


def test_length_filters_and_empty(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("short\n\n" + "x" * 50 + "\n\n" + "medium length text here\n\n \n\n" + "y" * 500)
    report = PrepareReport()
    docs = read_documents([path], doc_separator="blank-line", report=report)
    kept = list(clean_documents(docs, report, min_chars=10, max_chars=100))
    assert kept == ["x" * 50, "medium length text here"]
    assert report.dropped["too_short"] == 1 and report.dropped["too_long"] == 1
    assert report.documents_in == report.kept + sum(report.dropped.values())


def test_normalization(tmp_path):
    path = tmp_path / "n.txt"
    path.write_text("cafe\u0301 \ufb01ne")  # decomposed é, "fi" ligature
    for form, expected in (("NFC", "caf\u00e9 \ufb01ne"), ("NFKC", "caf\u00e9 fine")):
        report = PrepareReport()
        assert list(clean_documents(read_documents([path]), report, normalization=form)) == [expected]


# ---- jsonl / json ------------------------------------------------------------------------------
def test_jsonl_field(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"body": "first document", "id": 1}, {"body": "second document", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    texts = [d.text for d in read_documents([path], field="body")]
    assert texts == ["first document", "second document"]
    with pytest.raises(PocketLMError, match=r"d\.jsonl:1.*'text'"):
        list(read_documents([path]))
    with pytest.raises(PocketLMError, match=r"d\.jsonl:1"):
        _prepare(tmp_path, [path])


def test_json_list_and_glob(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "alpha doc"}, {"text": "beta doc"}]))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "gamma doc"}) + "\n")
    texts = [d.text for d in read_documents([str(tmp_path / "*.json*")])]
    assert texts == ["alpha doc", "beta doc", "gamma doc"]


def test_missing_input(tmp_path):
    with pytest.raises(PocketLMError, match="no such file"):
        _prepare(tmp_path, [tmp_path / "nope.txt"])


def test_parquet_and_hf_datasets_from_local_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"text": ["first story about a cat", "second story about a dog"], "id": [1, 2]}
    pq.write_table(pa.table(rows), tmp_path / "d.parquet")
    assert [d.text for d in read_documents([tmp_path / "d.parquet"])] == rows["text"]
    with pytest.raises(PocketLMError, match="cannot read column 'body'"):
        list(read_documents([tmp_path / "d.parquet"], field="body"))
    # the same rows through Hugging Face datasets (a local file: no hub access)
    assert [d.text for d in read_documents([f"hf:{tmp_path / 'd.parquet'}"])] == rows["text"]
    with pytest.raises(PocketLMError, match="no 'body' column"):
        list(read_documents([f"hf:{tmp_path / 'd.parquet'}"], field="body"))


# ---- tokenizers ----------------------------------------------------------------------------------
def test_train_char_ids_and_roundtrip(tmp_path):
    tok = train_char(["hello world\n", "abc"])
    chars = sorted(set("hello world\nabc"))
    assert tok.encode("hello") == [chars.index(c) for c in "hello"]
    assert tok.eos_token_id == len(chars) and tok.vocab_size == len(chars) + 1
    text = "a cold world\n\nbe"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).encode(text) == tok.encode(text)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.decode(hf.encode(text)) == text


def test_train_bpe_tinystories(tmp_path, shared_data):
    text = (shared_data / "tinystories" / "tinystories_train_head_197k.txt").read_text()
    tok = train_bpe([text], vocab_size=2048)
    assert tok.vocab_size == 2048 and tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    for sample in (text[:5000], "  Ünïcode ✓ 🤗\n\n\ttabs <|endoftext|> end  ", ""):
        assert tok.decode(tok.encode(sample)) == sample
    tok.save(tmp_path)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path)
    sample = text[:3000]
    assert hf.encode(sample) == tok.encode(sample) == Tokenizer.load(tmp_path).encode(sample)
    assert hf.decode(hf.encode(sample)) == sample
    assert hf.eos_token_id == tok.eos_token_id


def test_train_bpe_vocab_too_small():
    with pytest.raises(PocketLMError, match="vocab_size"):
        train_bpe(["abc"], vocab_size=100)


# ---- shards ----------------------------------------------------------------------------------------
def test_tinyshakespeare_char_matches_nanogpt(tmp_path, shared_data):
    path = shared_data / "tinyshakespeare" / "input.txt"
    report = prepare([path], tmp_path / "shakespeare", tokenizer="char", val_fraction=0.1, progress=False)
    # nanoGPT data/shakespeare_char/prepare.py
    text = path.read_text()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = len(data)
    shards = load_shards(tmp_path / "shakespeare")
    assert len(chars) == 65 and shards.tokenizer.eos_token_id == 65
    assert shards.manifest["vocab_size"] == 66 and shards.manifest["eos_id"] == 65
    assert shards.train.dtype == np.uint16 and isinstance(shards.train, np.memmap)
    assert len(shards.train) == 1_003_854 == int(n * 0.9) and len(shards.val) == 111_540
    assert np.array_equal(shards.train, data[: int(n * 0.9)])
    assert np.array_equal(shards.val, data[int(n * 0.9):])
    assert report.tokens_train == 1_003_854 and report.tokens_val == 111_540


def test_manifest_records_hashes_and_eos_between_docs(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc here\n\nsecond doc there\n\nthird doc everywhere")
    _prepare(tmp_path, [path], doc_separator="blank-line", val_fraction=0.0)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"] == [{"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}]
    assert manifest["tokenizer"]["sha256"] == file_sha256(out / "tokenizer" / "tokenizer.json")
    assert manifest["files"]["train.bin"]["sha256"] == file_sha256(out / "train.bin")
    assert manifest["options"]["doc_separator"] == "blank-line"
    assert manifest["documents"]["kept"] == 3 and manifest["report"]["kept"] == 3
    shards = load_shards(out)
    assert len(shards.val) == 0
    ids = shards.train.tolist()
    eos = shards.manifest["eos_id"]
    assert ids.count(eos) == 2 and ids[-1] != eos  # between documents, not after the last
    assert shards.tokenizer.decode(ids) == "first doc here<|endoftext|>second doc there<|endoftext|>third doc everywhere"


def test_reuse_tokenizer_from_model_dir(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    train_bpe(["hello there, general kenobi. " * 20], vocab_size=300).save(model_dir)
    (tmp_path / "a.txt").write_text("hello there")
    _prepare(tmp_path, [tmp_path / "a.txt"], tokenizer=model_dir, val_fraction=0.0)
    shards = load_shards(tmp_path / "out")
    assert shards.tokenizer.decode(shards.train.tolist()) == "hello there"
    assert shards.manifest["tokenizer"]["sha256"] == file_sha256(model_dir / "tokenizer.json")


def test_load_shards_fails_clearly(tmp_path):
    (tmp_path / "a.txt").write_text("some text to tokenize, long enough to have a val split")
    _prepare(tmp_path, [tmp_path / "a.txt"])
    out = tmp_path / "out"
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-3])
    with pytest.raises(PocketLMError, match="train.bin.*truncated"):
        load_shards(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(PocketLMError, match="corrupt"):
        load_shards(out)
    with pytest.raises(PocketLMError, match="missing"):
        load_shards(tmp_path / "nowhere")


def test_nothing_left_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("tiny")
    with pytest.raises(PocketLMError, match="too short"):
        _prepare(tmp_path, [tmp_path / "a.txt"], min_chars=100)


