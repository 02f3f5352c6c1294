"""Test collections in the BEIR layout, and Cranfield converted to it.

BEIR's layout: `corpus.jsonl` ({"_id", "title", "text"} per line), `queries.jsonl` ({"_id", "text"}) and
`qrels/test.tsv` (a `query-id  corpus-id  score` header, then one judgement per line; a score of 0 or
below is not relevant, as trec_eval reads it).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

Qrels = dict[str, dict[str, int]]  # query id -> {document id: grade}


@dataclass
class Collection:
    corpus: dict[str, dict[str, str]]  # document id -> {"title", "text"}
    queries: dict[str, str]  # query id -> text
    qrels: Qrels


def judged(queries: dict[str, str], qrels: Qrels) -> dict[str, str]:
    """The queries with at least one relevant document (trec_eval averages over those)."""
    return {q: text for q, text in queries.items() if any(g > 0 for g in qrels.get(q, {}).values())}


def json_lines(path: Path, lines, error: type[ConfigError] = ConfigError):
    """(line number, object) for each non-blank line; a line that is not a JSON object is `error`, naming it."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}: line {number} is not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise error(f"{path}: line {number} is not a JSON object")
        yield number, record


def _jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (a BEIR dataset has corpus.jsonl, queries.jsonl and qrels/test.tsv)")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, record in json_lines(path, f):
            missing = [k for k in fields if k not in record]
            if missing:
                raise ConfigError(f"{path}: line {number} lacks {', '.join(missing)}")
            records.append(record)
    if not records:
        raise ConfigError(f"{path}: empty; nothing to retrieve from or for")
    return records


def read_qrels(path: Path) -> Qrels:
    """TREC qrels (`query 0 doc grade`) or BEIR's tsv (`query-id corpus-id score`, a header first)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such qrels file")
    qrels: Qrels = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            cells = line.split()
            if not cells or (number == 1 and cells[0] == "query-id"):
                continue
            if len(cells) not in (3, 4):
                raise ConfigError(f"{path}: line {number}: expected `query doc grade` or `query 0 doc grade`")
            query, doc, grade = cells[0], cells[-2], cells[-1]
            try:
                qrels.setdefault(query, {})[doc] = int(grade)
            except ValueError:
                raise ConfigError(f"{path}: line {number}: the grade {grade!r} is not an integer") from None
    return qrels


def read_queries(path: Path) -> dict[str, str]:
    """Queries from BEIR's `queries.jsonl` ({"_id", "text"} per line) or a tsv of `id<TAB>text` lines."""
    if path.suffix == ".jsonl":
        return {str(r["_id"]): r["text"] for r in _jsonl(path, ("_id", "text"))}
    if not path.is_file():
        raise ConfigError(f"{path}: no such queries file")
    queries = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            query_id, tab, text = line.partition("\t")
            if not tab or not text.strip():
                raise ConfigError(f"{path}: line {number}: expected `id<TAB>text`")
            queries[query_id.strip()] = text.strip()
    if not queries:
        raise ConfigError(f"{path}: no queries in it")
    return queries


def read_beir(directory: str | Path, split: str = "test") -> Collection:
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such dataset directory")
    corpus = {str(r["_id"]): {"title": r.get("title") or "", "text": r["text"]}
              for r in _jsonl(directory / "corpus.jsonl", ("_id", "text"))}
    queries = read_queries(directory / "queries.jsonl")
    return Collection(corpus, queries, read_qrels(directory / "qrels" / f"{split}.tsv"))


def write_beir(collection: Collection, directory: str | Path, split: str = "test") -> Path:
    directory = Path(directory)
    (directory / "qrels").mkdir(parents=True, exist_ok=True)
    with open(directory / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc_id, doc in collection.corpus.items():
            f.write(json.dumps({"_id": doc_id, "title": doc["title"], "text": doc["text"]}, ensure_ascii=False) + "\n")
    with open(directory / "queries.jsonl", "w", encoding="utf-8") as f:
        for query_id, text in collection.queries.items():
            f.write(json.dumps({"_id": query_id, "text": text}, ensure_ascii=False) + "\n")
    with open(directory / "qrels" / f"{split}.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["query-id", "corpus-id", "score"])
        for query_id, judged in collection.qrels.items():
            for doc_id, grade in judged.items():
                writer.writerow([query_id, doc_id, grade])
    return directory


# ---------------------------------------------------------------------------------------------
# Cranfield
# ---------------------------------------------------------------------------------------------
def _smart_records(path: Path) -> list[dict[str, str]]:
    """SMART's tagged format: `.I id` opens a record, `.T`, `.A`, `.B`, `.W` open its fields."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")  # some lines end in CRLF
    records = []
    for chunk in re.split(r"^\.I ", text, flags=re.M)[1:]:
        head, _, body = chunk.partition("\n")
        fields = {"I": head.strip()}
        for tag, value in re.findall(r"^\.([TABW])\n(.*?)(?=^\.[TABW]\n|\Z)", body, flags=re.M | re.S):
            fields[tag] = " ".join(value.split())
        records.append(fields)
    return records


def read_cranfield(directory: str | Path) -> Collection:
    """The Cranfield collection (cran.all.1400, cran.qry, cranqrel) as a Collection, with its traps handled:
    - cran.qry numbers its queries 001, 002, 004, ... while cranqrel numbers them 1..225 in file order: the
      queries are numbered by position, as ir_datasets does;
    - grades run from 1 (a complete answer) to 4 (of minimum interest): the gain is 5 - grade, so 1 counts
      most, and every judged document counts as relevant;
    - each query has one judgement coded -1: kept as 0, not relevant (trec_eval's reading of grades below 1);
    - lines ending in CRLF are read as LF."""
    directory = Path(directory)
    docs = _smart_records(directory / "cran.all.1400")
    queries = _smart_records(directory / "cran.qry")
    corpus = {d["I"]: {"title": d.get("T", ""), "text": d.get("W", "")} for d in docs}
    query_texts = {str(position): q.get("W", "") for position, q in enumerate(queries, 1)}
    qrels: Qrels = {}
    for query, doc, grade in (line.split()[:3] for line in
                              (directory / "cranqrel").read_text(encoding="utf-8").splitlines() if line.strip()):
        if query not in query_texts or doc not in corpus:
            raise ConfigError(f"{directory / 'cranqrel'}: judgement ({query}, {doc}) names no query or document")
        qrels.setdefault(query, {})[doc] = 5 - int(grade) if int(grade) >= 1 else 0
    return Collection(corpus, query_texts, qrels)
