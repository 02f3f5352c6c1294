"""Data: ingest text / jsonl / json / parquet / `datasets`, clean it, scrub PII, tokenize into shards.

    prepare(["corpus/"], "data/corpus")  ->  data/corpus/{train.bin, val.bin, tokenizer/, manifest.json}

`train.bin` and `val.bin` are flat arrays of token ids (uint16 when the vocabulary fits, else uint32)
that `np.memmap` reads directly, as in nanoGPT. Documents are joined with the end-of-text id between
them, and the validation split is the last `val_fraction` of that stream. `load_shards` reads them back.

Every document read is accounted for in the `PrepareReport`: kept, or dropped for a named reason;
files that are not UTF-8 text are skipped and named (or stop the run under strict=True).
"""

from __future__ import annotations

import glob
import hashlib
import ipaddress
import json
import os
import re
import shutil
import tempfile
import unicodedata
import zlib
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from . import __version__
from .fsio import atomic_write, file_sha256, replace_dir
from .errors import ConfigError, PocketLMError
from .datasets import is_dataset_ref, pull, resolve_data_path
from .tokenizer import Tokenizer, train_bpe, train_char

SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")
DROP_REASONS = ("empty", "too_short", "too_long", "exact_duplicate", "near_duplicate")
PII_KINDS = ("email", "phone", "ip", "credit_card")
MANIFEST_FORMAT = "pocketlm-shards"


class DataError(PocketLMError):
    """An input file or prepared data directory that cannot be used as it is."""


# =============================================================================================
# report
# =============================================================================================
@dataclass
class PrepareReport:
    documents_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    pii: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PII_KINDS, 0))
    tokens_train: int = 0
    tokens_val: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["skipped_files"] = [list(item) for item in self.skipped_files]
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "PrepareReport":
        record = dict(record)
        record["skipped_files"] = [tuple(item) for item in record.get("skipped_files", [])]
        return cls(**record)

    def summary_lines(self) -> list[str]:
        dropped = sum(self.dropped.values())
        lines = [f"documents: {self.documents_in:,} read, {self.kept:,} kept, {dropped:,} dropped"]
        for reason in DROP_REASONS:
            if self.dropped.get(reason):
                lines.append(f"  dropped ({reason.replace('_', ' ')}): {self.dropped[reason]:,}")
        if self.skipped_files:
            lines.append(f"skipped files: {len(self.skipped_files)}")
            lines.extend(f"  {name}: {reason}" for name, reason in self.skipped_files)
        pii = {kind: n for kind, n in self.pii.items() if n}
        if pii:
            lines.append("PII replaced: " + ", ".join(f"{kind} {n:,}" for kind, n in pii.items()))
        else:
            lines.append("PII replaced: none found")
        if self.tokens_train or self.tokens_val:
            lines.append(f"tokens: {self.tokens_train:,} train, {self.tokens_val:,} val")
        return lines


# =============================================================================================
# ingest
# =============================================================================================
@dataclass
class Document:
    text: str
    where: str  # "file", "file:line" or "file[item]", for messages


def resolve_inputs(inputs: Iterable[str | Path], report: PrepareReport | None = None) -> list[str]:
    """Expand folders (recursively, supported suffixes) and globs into a sorted, de-duplicated list.

    `hf:NAME[@split]` entries (Hugging Face `datasets`) pass through unchanged; `dataset:NAME/FILE` (or
    `dataset:NAME`, all its files) is a named dataset's file, fetched where needed (pocketlm.datasets).
    """
    resolved: list[str] = []
    for item in inputs:
        text = str(item)
        if text.startswith("hf:"):
            resolved.append(text)
        elif is_dataset_ref(text):
            name = text[len("dataset:"):]
            resolved += [str(p) for p in pull(name)] if "/" not in name else [str(resolve_data_path(text))]
        elif any(ch in text for ch in "*?["):
            matches = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{text}: the pattern matches no files")
            resolved.extend(matches)
        elif Path(text).is_dir():
            files = sorted(p for p in Path(text).rglob("*") if p.is_file())
            for path in files:
                if path.suffix.lower() in SUFFIXES:
                    resolved.append(str(path))
                elif report is not None:
                    report.skipped_files.append((str(path), f"not a supported file type ({', '.join(SUFFIXES)})"))
        elif Path(text).is_file():
            resolved.append(text)  # a file named explicitly is read whatever its suffix (as text)
        else:
            raise DataError(f"{text}: no such file or folder")
    return list(dict.fromkeys(resolved))


def read_text_file(path: Path) -> str:
    """Decode a file as UTF-8 text; DataError says why it is not text (empty, binary, invalid UTF-8)."""
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: empty file")
    if b"\x00" in raw[:1 << 20]:
        raise DataError(f"{path}: binary file (contains NUL bytes), not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start}); convert it to UTF-8 first") from None
    return text.removeprefix("\ufeff")


def split_documents(text: str, doc_separator: str | None) -> list[str]:
    """One document per file (None), per blank-line-separated block ("blank-line"), or per separator.

    With a separator, whitespace around each piece is stripped and whitespace-only pieces (e.g. after
    a trailing separator) are not documents at all.
    """
    if doc_separator is None:
        return [text]
    pieces = re.split(r"\n[ \t\r\f\v]*\n", text) if doc_separator == "blank-line" else text.split(doc_separator)
    return [piece.strip() for piece in pieces if piece.strip()]


def _record_text(record: Any, field_name: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a {field_name!r} field, got {type(record).__name__}")
    if field_name not in record:
        keys = ", ".join(list(record)[:10])
        raise DataError(f"{where}: no {field_name!r} field (fields: {keys}); choose one with --field")
    value = record[field_name]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field_name!r} is {type(value).__name__}, not text")
    return value


def _iter_jsonl(path: Path, text: str, field_name: str) -> Iterator[Document]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        yield Document(_record_text(record, field_name, where), where)


def _iter_json(path: Path, text: str, field_name: str) -> Iterator[Document]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); JSON Lines files should end in .jsonl") from None
    records = data if isinstance(data, list) else [data]
    for index, record in enumerate(records):
        where = f"{path}[{index}]"
        yield Document(_record_text(record, field_name, where), where)


def _iter_parquet(path: Path, field_name: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow; run `pip install pyarrow`") from None
    try:
        table = pq.read_table(path, columns=[field_name])
    except Exception as exc:  # pyarrow raises several error types for a bad file or column
        raise DataError(f"{path}: cannot read column {field_name!r} ({exc})") from None
    for index, value in enumerate(table.column(field_name).to_pylist()):
        yield Document(_record_text({field_name: value}, field_name, f"{path}[{index}]"), f"{path}[{index}]")


def _iter_hf(spec: str, field_name: str) -> tuple[Iterator[Document], dict[str, Any]]:
    """`hf:NAME[@split]`: a hub dataset name, a local folder, or a local data file."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: reading Hugging Face datasets needs the `datasets` package; run `pip install datasets`") from None
    name, _, split = spec[3:].partition("@")
    split = split or "train"
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
    try:
        if Path(name).is_file() and Path(name).suffix.lower() in builders:
            ds = datasets.load_dataset(builders[Path(name).suffix.lower()], data_files=name, split=split)
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many kinds (offline, missing split, bad files)
        raise DataError(f"{spec}: could not load the dataset ({exc})") from None
    if field_name not in ds.column_names:
        raise DataError(f"{spec}: no {field_name!r} column (columns: {', '.join(ds.column_names)}); choose one with --field")
    info = {"path": spec, "fingerprint": getattr(ds, "_fingerprint", None), "rows": len(ds)}
    docs = (Document(_record_text(row, field_name, f"{spec}[{i}]"), f"{spec}[{i}]") for i, row in enumerate(ds))
    return docs, info


def read_documents(
    inputs: Iterable[str | Path],
    *,
    field: str = "text",
    doc_separator: str | None = None,
    strict: bool = False,
    report: PrepareReport | None = None,
    sources: list[dict[str, Any]] | None = None,
) -> Iterator[Document]:
    """Yield the documents of every input in order. Unreadable files go to `report.skipped_files`
    (or raise under strict=True); `sources` collects each file's path, size and sha256."""
    report = report if report is not None else PrepareReport()
    for item in resolve_inputs(inputs, report):
        if item.startswith("hf:"):
            docs, info = _iter_hf(item, field)
            if sources is not None:
                sources.append(info)
            yield from docs
            continue
        path = Path(item)
        suffix = path.suffix.lower()
        if sources is not None:
            sources.append({"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)})
        if suffix == ".parquet":
            yield from _iter_parquet(path, field)
            continue
        try:
            text = read_text_file(path)
        except DataError as exc:
            if strict:
                raise DataError(f"{exc} (strict mode stops here; leave out --strict to skip such files)") from None
            report.skipped_files.append((str(path), str(exc).removeprefix(f"{path}: ")))
            continue
        if suffix == ".jsonl":
            yield from _iter_jsonl(path, text, field)
        elif suffix == ".json":
            yield from _iter_json(path, text, field)
        else:
            for piece in split_documents(text, doc_separator):
                yield Document(piece, str(path))


# =============================================================================================
# PII
# =============================================================================================
EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# not part of a longer dotted number: "999.1.1.1" and "1.2.3.4.5" stay as they are
IPV4_RE = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)(?!\w)")
# candidates only; ipaddress decides (so times like 12:30:45 and MAC addresses are left alone)
IPV6_RE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)")
# 13-19 digits, plain or in groups of four (or Amex 4-6-5) with one kind of separator
CARD_RE = re.compile(r"(?<![\w-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{5})(?![\w-])")
PHONE_INTL_RE = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,6}(?![\w-])")
PHONE_US_RE = re.compile(
    r"(?<![\w+-])(?:1[ .-]?)?(?:\(\d{3}\)[ ]?\d{3}[ .-]\d{4}|\d{3}([ .-])\d{3}\1\d{4})(?![\w-])"
)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(digits: str) -> bool:
    # a card number starts with a known issuer digit (2221-2720 for Mastercard's 2-series): this
    # keeps runs of years or ids that happen to pass Luhn from being taken for cards
    issuer = digits[0] in "3456" or 2221 <= int(digits[:4]) <= 2720
    return 13 <= len(digits) <= 19 and issuer and luhn_valid(digits)


def _is_ipv6(candidate: str) -> bool:
    groups = [group for group in candidate.split(":") if group]
    if len(groups) < 2 or len("".join(groups)) < 4 or not any(ch.isdigit() for ch in candidate):
        return False  # "::", "a::b" (C++ scopes) and the like are not addresses worth scrubbing
    try:
        ipaddress.IPv6Address(candidate)
        return True
    except ValueError:
        return False


def _phone_digits_ok(match: str) -> bool:
    return 8 <= sum(ch.isdigit() for ch in match) <= 15


# (kind, placeholder, pattern, check on the matched text or None)
_PII_RULES = (
    ("email", "<EMAIL>", EMAIL_RE, None),
    ("ip", "<IP>", IPV6_RE, _is_ipv6),
    ("ip", "<IP>", IPV4_RE, None),
    ("credit_card", "<CREDIT_CARD>", CARD_RE, lambda m: _is_card(re.sub(r"\D", "", m))),
    ("phone", "<PHONE>", PHONE_INTL_RE, _phone_digits_ok),
    ("phone", "<PHONE>", PHONE_US_RE, None),
)


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace e-mail addresses, IP addresses, card numbers and phone numbers by placeholders.

    Returns the new text and the number of replacements of each kind.
    """
    counts = dict.fromkeys(PII_KINDS, 0)
    for kind, placeholder, pattern, check in _PII_RULES:
        if kind == "email" and "@" not in text:
            continue  # cheap skips: most documents have no PII at all

        def replace(match: re.Match, kind=kind, placeholder=placeholder, check=check) -> str:
            if check is not None and not check(match.group(0)):
                return match.group(0)
            counts[kind] += 1
            return placeholder

        text = pattern.sub(replace, text)
    return text, counts


# =============================================================================================
# near duplicates: MinHash over word 5-gram shingles, LSH banding (numpy, deterministic)
# =============================================================================================
class NearDuplicateIndex:
    """Finds documents whose word 5-gram Jaccard similarity to an earlier kept one is >= threshold.

    Signatures use `num_perm` multiply-shift hashes of CRC32-based shingle hashes with a fixed seed,
    so results do not depend on Python's hash randomisation. Candidates from LSH banding are then
    checked against the signature-estimated Jaccard, so the threshold is the one that decides.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5, seed: int = 0):
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"near_dup_threshold={threshold}: expected a number in (0, 1]")
        self.threshold, self.num_perm, self.shingle = threshold, num_perm, shingle
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.rows = self._rows_per_band(threshold, num_perm)
        self.bands = num_perm // self.rows
        self.buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(self.bands)]
        self.signatures: list[np.ndarray] = []

    @staticmethod
    def _rows_per_band(threshold: float, num_perm: int) -> int:
        # the most rows per band whose LSH threshold (1/b)^(1/r) stays well below ours: high recall,
        # and the exact check on candidates removes the false positives
        target = max(threshold - 0.2, 0.05)
        best = 1
        for rows in range(1, num_perm + 1):
            if (1 / (num_perm // rows)) ** (1 / rows) <= target:
                best = rows
        return best

    def signature(self, text: str) -> np.ndarray:
        words = text.split()
        if not words:
            return np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        ids = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
        k = min(self.shingle, len(ids))
        shingles = np.zeros(len(ids) - k + 1, dtype=np.uint64)
        for offset in range(k):  # polynomial hash of k consecutive word hashes, wrapping at 2**64
            shingles = shingles * np.uint64(0x100000001B3) + ids[offset: len(ids) - k + 1 + offset]
        shingles = np.unique(shingles)
        signature = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), 4096):  # bounded memory for very long documents
            chunk = shingles[start: start + 4096, None]
            hashed = (chunk * self.a + self.b) >> np.uint64(32)
            signature = np.minimum(signature, hashed.min(axis=0))
        return signature

    def is_duplicate(self, text: str, add: bool = True) -> bool:
        """True when `text` is a near duplicate of a document added before; else add it (if add)."""
        signature = self.signature(text)
        keys = [signature[i * self.rows: (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        seen: set[int] = set()
        for band, key in enumerate(keys):
            for other in self.buckets[band].get(key, ()):
                if other in seen:
                    continue
                seen.add(other)
                if np.mean(self.signatures[other] == signature) >= self.threshold:
                    return True
        if add:
            index = len(self.signatures)
            self.signatures.append(signature)
            for band, key in enumerate(keys):
                self.buckets[band][key].append(index)
        return False


# =============================================================================================
# clean
# =============================================================================================
def clean_documents(
    documents: Iterable[Document],
    report: PrepareReport,
    *,
    normalization: str | None = "NFC",
    dedupe: bool = True,
    near_dup_threshold: float | None = 0.8,
    min_chars: int = 1,
    max_chars: int | None = None,
    scrub_pii_: bool = True,
) -> Iterator[str]:
    """Normalise, scrub, filter and de-duplicate documents, counting each one in `report`.

    Order: normalise -> empty? -> scrub PII -> length -> exact duplicate -> near duplicate. PII is
    scrubbed before de-duplication so that copies differing only in an address are caught, and PII
    counts are those of the documents kept.
    """
    if normalization not in (None, "none", "NFC", "NFKC"):
        raise ConfigError(f"normalization={normalization!r}: expected 'NFC', 'NFKC' or 'none'")
    exact: set[bytes] = set()
    near = NearDuplicateIndex(near_dup_threshold) if dedupe and near_dup_threshold else None
    for doc in documents:
        report.documents_in += 1
        text = doc.text
        if normalization not in (None, "none"):
            text = unicodedata.normalize(normalization, text)
        if not text.strip():
            report.drop("empty")
            continue
        counts = None
        if scrub_pii_:
            text, counts = scrub_pii(text)
        if len(text) < min_chars:
            report.drop("too_short")
            continue
        if max_chars is not None and len(text) > max_chars:
            report.drop("too_long")
            continue
        if dedupe:
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if digest in exact:
                report.drop("exact_duplicate")
                continue
            exact.add(digest)
            if near is not None and near.is_duplicate(text):
                report.drop("near_duplicate")
                continue
        report.kept += 1
        if counts:
            for kind, n in counts.items():
                report.pii[kind] += n
        yield text


# =============================================================================================
# tokenize into shards
# =============================================================================================
@dataclass
class Shards:
    train: np.ndarray
    val: np.ndarray
    manifest: dict[str, Any]
    tokenizer: Tokenizer


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _splittable(tokenizer: Tokenizer) -> bool:
    """Can a long text be cut into pieces at line starts and encoded piece by piece, same ids?

    True for byte-level BPE (its pre-tokenizer never joins a newline to the next word) and for the
    char tokenizer; other tokenizers (e.g. SentencePiece-style ones that mark word starts) are
    encoded one document at a time.
    """
    backend = tokenizer.backend
    pre = type(backend.pre_tokenizer).__name__ if backend.pre_tokenizer is not None else ""
    char_level = pre == "Split" and type(backend.model).__name__ == "WordLevel"
    return pre == "ByteLevel" or char_level


def _pieces(text: str, size: int = 1 << 16) -> list[str]:
    """Cut text into ~size-character pieces, each cut after a lone newline ("x\nY"): byte-level
    pre-tokenization makes that newline a pre-token of its own whether or not the text ends there."""
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) and not (
            text[cut - 1] == "\n" and not text[cut].isspace() and not text[cut - 2].isspace()
        ):
            cut += 1
        pieces.append(text[start:cut])
        start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _resolve_tokenizer(tokenizer: str | Path, documents: list[str], vocab_size: int) -> tuple[Tokenizer, str]:
    if str(tokenizer) == "bpe":
        splittable = [p for doc in documents for p in _pieces(doc)]  # lets the trainer use both cores
        return train_bpe(splittable, vocab_size), "bpe"
    if str(tokenizer) == "char":
        return train_char(documents), "char"
    path = Path(tokenizer)
    if not path.is_dir():
        raise ConfigError(f"tokenizer={str(tokenizer)!r}: expected 'bpe', 'char' or a model directory with a tokenizer.json")
    loaded = Tokenizer.load(path)
    return loaded, str(path)


def _encode_stream(tokenizer: Tokenizer, documents: list[str], out, dtype: np.dtype, eos_id: int, progress) -> tuple[int, list[int]]:
    """Encode documents in batches of about 1M characters (`encode_batch` uses every core) and write
    the ids to `out`, with `eos_id` between documents. Returns the token count and the offset of
    each document's first token."""
    pieces = _pieces if _splittable(tokenizer) else (lambda doc: [doc])
    task = progress.add_task("tokenizing", total=sum(map(len, documents))) if progress else None
    state = {"total": 0, "last": None}
    starts: list[int] = []
    batch: list[tuple[int, str]] = []  # (document index, piece of it)

    def flush() -> None:
        try:
            encodings = tokenizer.backend.encode_batch([piece for _, piece in batch], add_special_tokens=False)
        except Exception as exc:  # e.g. a char tokenizer meeting a character it never saw
            raise DataError(f"the tokenizer cannot encode this text ({exc}); train a new one on it") from None
        for (owner, _), encoding in zip(batch, encodings):
            if owner != state["last"]:  # a new document: EOS before it, unless it is the first
                if state["last"] is not None:
                    out.write(np.array([eos_id], dtype=dtype).tobytes())
                    state["total"] += 1
                starts.append(state["total"])
                state["last"] = owner
            out.write(np.asarray(encoding.ids, dtype=dtype).tobytes())
            state["total"] += len(encoding.ids)
        if progress:
            progress.advance(task, sum(len(piece) for _, piece in batch))
        batch.clear()

    size = 0
    for index, doc in enumerate(documents):
        for piece in pieces(doc):
            batch.append((index, piece))
            size += len(piece)
            if size >= 1 << 20:
                flush()
                size = 0
    if batch:
        flush()
    return state["total"], starts


def prepare(
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    tokenizer: str | Path = "bpe",
    vocab_size: int = 8192,
    field: str = "text",
    doc_separator: str | None = None,
    normalization: str | None = "NFC",
    dedupe: bool = True,
    near_dup_threshold: float | None = 0.8,
    min_chars: int = 1,
    max_chars: int | None = None,
    scrub_pii: bool = True,
    val_fraction: float = 0.1,
    strict: bool = False,
    progress: bool = True,
) -> PrepareReport:
    """Read, clean and tokenize `inputs` into `out_dir` (written atomically); return the report.

    `tokenizer` is "bpe" (byte-level BPE trained here with `vocab_size`), "char" (one id per
    character) or a model directory whose tokenizer is reused. `doc_separator` is None (a text file is
    one document), "blank-line", or a literal string such as "<|endoftext|>".
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction}: expected a number in [0, 1)")
    if not inputs:
        raise ConfigError("prepare: no inputs given")
    out_dir = Path(out_dir)
    options = {
        "tokenizer": str(tokenizer), "vocab_size": vocab_size, "field": field, "doc_separator": doc_separator,
        "normalization": normalization, "dedupe": dedupe, "near_dup_threshold": near_dup_threshold,
        "min_chars": min_chars, "max_chars": max_chars, "scrub_pii": scrub_pii, "val_fraction": val_fraction,
        "strict": strict,
    }
    report = PrepareReport()
    sources: list[dict[str, Any]] = []
    with _progress(progress) as bar:
        task = bar.add_task("reading and cleaning", total=None) if bar else None
        documents = []
        raw = read_documents(inputs, field=field, doc_separator=doc_separator, strict=strict, report=report, sources=sources)
        for text in clean_documents(raw, report, normalization=normalization, dedupe=dedupe,
                                    near_dup_threshold=near_dup_threshold, min_chars=min_chars,
                                    max_chars=max_chars, scrub_pii_=scrub_pii):
            documents.append(text)
            if bar:
                bar.advance(task)
        if not documents:
            raise DataError("no documents left to tokenize:\n  " + "\n  ".join(report.summary_lines()))

        if bar:
            bar.update(task, total=len(documents), completed=len(documents))
            train_task = bar.add_task(f"tokenizer ({tokenizer})", total=None)
        tok, tokenizer_source = _resolve_tokenizer(tokenizer, documents, vocab_size)
        if bar:
            bar.update(train_task, total=1, completed=1)
        eos_id = tok.eos_token_id
        if eos_id is None:
            raise ConfigError(f"tokenizer {tokenizer_source!r} has no eos_token; documents need one between them")
        vocab = max(tok.backend.get_vocab(with_added_tokens=True).values()) + 1
        dtype = _token_dtype(vocab)

        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            stream_path = tmp / "train.bin"
            with open(stream_path, "wb") as out:
                total, starts = _encode_stream(tok, documents, out, dtype, eos_id, bar)
            n_train = int(total * (1.0 - val_fraction))  # nanoGPT: first int(n*0.9) train, rest val
            _split_tail(stream_path, tmp / "val.bin", n_train * dtype.itemsize)
            report.tokens_train, report.tokens_val = n_train, total - n_train
            (tmp / "tokenizer").mkdir()
            tok.save(tmp / "tokenizer")
            manifest = {
                "format": MANIFEST_FORMAT,
                "version": 1,
                "pocketlm_version": __version__,
                "dtype": dtype.name,
                "vocab_size": vocab,
                "eos_id": eos_id,
                "tokens": {"train": n_train, "val": total - n_train},
                "documents": {
                    "in": report.documents_in,
                    "kept": report.kept,
                    "train": sum(1 for s in starts if s < n_train),
                    "val": sum(1 for s in starts if s >= n_train),
                },
                "tokenizer": {
                    "source": tokenizer_source,
                    "sha256": file_sha256(tmp / "tokenizer" / "tokenizer.json"),
                },
                "files": {name: {"sha256": file_sha256(tmp / name)} for name in ("train.bin", "val.bin")},
                "sources": sources,
                "options": options,
                "report": report.to_dict(),
            }
            atomic_write(tmp / "manifest.json", lambda f: f.write((json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()))
            replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return report


def _split_tail(path: Path, tail_path: Path, offset: int) -> None:
    """Move the bytes of `path` from `offset` on into `tail_path`, then truncate `path` there."""
    with open(path, "r+b") as src, open(tail_path, "wb") as dst:
        src.seek(offset)
        shutil.copyfileobj(src, dst, 1 << 22)
        dst.flush()
        os.fsync(dst.fileno())
        src.truncate(offset)
        src.flush()
        os.fsync(src.fileno())


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def load_shards(out_dir: str | Path) -> Shards:
    """Open a prepared data directory: memory-mapped train/val ids, the manifest and the tokenizer."""
    out_dir = Path(out_dir)
    path = out_dir / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; is {out_dir} a folder written by `pocketlm prepare`?")
    try:
        manifest = json.loads(path.read_text())
        dtype = np.dtype(manifest["dtype"])
        counts = {split: int(manifest["tokens"][split]) for split in ("train", "val")}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or not a pocketlm data manifest ({exc}); run prepare again") from None
    arrays = {}
    for split, count in counts.items():
        bin_path = out_dir / f"{split}.bin"
        if not bin_path.is_file():
            raise DataError(f"{bin_path}: missing; run prepare again")
        size, expected = bin_path.stat().st_size, count * dtype.itemsize
        if size != expected:
            raise DataError(
                f"{bin_path}: {size:,} bytes, but the manifest says {count:,} {dtype.name} tokens "
                f"({expected:,} bytes); the file is truncated or was changed, run prepare again"
            )
        arrays[split] = np.memmap(bin_path, dtype=dtype, mode="r") if count else np.zeros(0, dtype=dtype)
    tokenizer = Tokenizer.load(out_dir / "tokenizer")
    recorded = manifest.get("tokenizer", {}).get("sha256")
    if recorded and file_sha256(out_dir / "tokenizer" / "tokenizer.json") != recorded:
        raise DataError(f"{out_dir / 'tokenizer'}: tokenizer.json does not match the manifest's sha256; run prepare again")
    return Shards(train=arrays["train"], val=arrays["val"], manifest=manifest, tokenizer=tokenizer)
