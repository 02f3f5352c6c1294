"""An index of local documents: passages in SQLite, their vectors in a memory-mapped file beside it.

    INDEX/index.sqlite    meta (provenance: embedder, its dimension, chunking, pocketlm's version),
                          sources (each file's path, sha256, size, documents),
                          chunks (source, document id, title, character offsets, text, vector row)
    INDEX/vectors-N.f32   float32 rows, one unit vector per chunk (row = chunks.row)

Adding a file appends its vectors and inserts its chunks; removing one deletes its chunks, leaving dead
rows that a compaction drops once they outnumber the live ones (written to vectors-(N+1).f32 and switched
in the same transaction that renumbers the rows, so a crash leaves the old, consistent pair). A file whose
sha256 is unchanged is skipped, so rebuilding costs only what changed. The vectors are written before
the chunks that point at them are committed: a crash leaves unreferenced rows, never a dangling one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import ConfigError
from ..fsio import file_sha256, fsync_file
from ..hub import DEFAULT_EMBEDDER, EMBEDDERS
from .chunking import Chunking, chunk_spans, untruncated
from .readers import UnreadableDocument, find_files, read_documents

FORMAT = 1
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sources (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, documents INTEGER NOT NULL,
                      added REAL NOT NULL);
CREATE TABLE chunks (id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL REFERENCES sources(path),
                     doc_id TEXT NOT NULL, title TEXT NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
                     text TEXT NOT NULL, row INTEGER NOT NULL);
CREATE INDEX chunks_source ON chunks(source);
CREATE INDEX chunks_doc ON chunks(doc_id);
"""


def embedder_name(name_or_dir: str) -> str:
    """How an index records its embedder: a registry name as it is, a folder by its absolute path, a hub name
    as given, so the same model asked for two ways is recognised."""
    if name_or_dir in EMBEDDERS or not Path(name_or_dir).exists():
        return name_or_dir
    return str(Path(name_or_dir).resolve())


def passage_text(title: str, text: str) -> str:
    """What is embedded and matched for a passage: its document's title, then the passage."""
    return f"{title}\n{text}" if title else text


@dataclass
class UpdateReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line each: the file and why
    chunks: int = 0  # chunks embedded by this update
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{len(self.added)} added, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
                f"{len(self.removed)} removed, {len(self.skipped)} skipped; {self.chunks} chunk{'s' * (self.chunks != 1)} embedded "
                f"in {self.seconds:.1f} s")


class Index:
    """Open with `Index.open` (an existing index) or `Index.create`; `update` and `remove` change it."""

    def __init__(self, directory: Path, db: sqlite3.Connection, meta: dict):
        self.directory, self.db, self.meta = directory, db, meta
        self._embedder = self._tokenizer = None

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | Path, embedder: str = DEFAULT_EMBEDDER, chunking: Chunking = Chunking()) -> "Index":
        directory = Path(directory)
        if (directory / "index.sqlite").exists():
            raise ConfigError(f"{directory}: an index is already there; open it, or remove the folder to start over")
        chunking.check()
        directory.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(directory / "index.sqlite")
        db.executescript(SCHEMA)
        meta = {"format": FORMAT, "embedder": embedder_name(embedder), "dimension": None,
                "chunk_tokens": chunking.tokens, "chunk_overlap": chunking.overlap, "vectors": "vectors-0.f32",
                "rows": 0, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pocketlm_version": __version__}
        with db:
            db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        (directory / meta["vectors"]).touch()
        return cls(directory, db, meta)

    @classmethod
    def open(cls, directory: str | Path, embedder: str | None = None) -> "Index":
        """An existing index; `embedder`, when given, must be the one it was built with."""
        directory = Path(directory)
        if not (directory / "index.sqlite").is_file():
            raise ConfigError(f"{directory}: no index there (build one with `pocketlm index build DOCS --out {directory}`)")
        db = sqlite3.connect(directory / "index.sqlite")
        try:
            meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"{directory}/index.sqlite: not a pocketlm index ({e})") from None
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{directory}: index format {meta.get('format')!r}; this pocketlm reads format {FORMAT}")
        index = cls(directory, db, meta)
        if embedder is not None and embedder_name(embedder) != meta["embedder"]:
            raise ConfigError(f"{directory} was built with the embedder {meta['embedder']!r}, not {embedder!r}: "
                              f"leave the embedder out to use the index's, or rebuild the index with {embedder!r}")
        return index

    @classmethod
    def open_or_create(cls, directory: str | Path, embedder: str | None, chunking: Chunking | None) -> "Index":
        """`index build`: an index already at `directory` must have been built the same way."""
        if not (Path(directory) / "index.sqlite").is_file():
            return cls.create(directory, embedder or DEFAULT_EMBEDDER, chunking or Chunking())
        index = cls.open(directory, embedder)
        if chunking is not None and chunking != index.chunking:
            raise ConfigError(f"{directory} cuts chunks of {index.chunking.tokens} tokens overlapping by "
                              f"{index.chunking.overlap}: build into a new folder to chunk differently")
        return index

    @property
    def chunking(self) -> Chunking:
        return Chunking(self.meta["chunk_tokens"], self.meta["chunk_overlap"])

    def share_embedder(self, model) -> None:
        """Use an embedding model already loaded (the same one as the index's, loaded for another index)."""
        self._embedder = model

    def embedder(self):
        """The embedding model (sentence-transformers), loaded once, on first use."""
        if self._embedder is None:
            from .dense import load_embedder

            self._embedder = load_embedder(self.meta["embedder"])
        return self._embedder

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors = self.embedder().encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False,
                                         convert_to_numpy=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def vectors(self) -> np.ndarray:
        """Every row of the vectors file, memory-mapped (dead rows included; the chunks table says which live)."""
        rows, dimension = self.meta["rows"], self.meta["dimension"]
        if not rows:
            return np.zeros((0, dimension or 0), dtype=np.float32)
        return np.memmap(self.directory / self.meta["vectors"], dtype=np.float32, mode="r", shape=(rows, dimension))

    # -- contents --------------------------------------------------------------------------------
    def sources(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT path, sha256 FROM sources"))

    def stats(self) -> dict:
        chunks, documents = self.db.execute("SELECT count(*), count(DISTINCT doc_id) FROM chunks").fetchone()
        sources = self.db.execute("SELECT count(*) FROM sources").fetchone()[0]
        return {"index": str(self.directory), "sources": sources, "documents": documents, "chunks": chunks,
                **{k: v for k, v in self.meta.items() if k != "vectors"}}

    def chunks(self, ids: list[int] | None = None) -> list[dict]:
        query = 'SELECT id, source, doc_id, title, start, "end", text, row FROM chunks'
        if ids is None:
            rows = self.db.execute(query + " ORDER BY id").fetchall()
        else:
            found = {r[0]: r for r in self.db.execute(query + f" WHERE id IN ({','.join('?' * len(ids))})", ids)}
            rows = [found[i] for i in ids]
        keys = ("id", "source", "doc_id", "title", "start", "end", "text", "row")
        return [dict(zip(keys, r)) for r in rows]

    # -- changing --------------------------------------------------------------------------------
    def update(self, paths: list[str | Path], strict: bool = False, prune: bool = False) -> UpdateReport:
        """Index the files under `paths`: new ones added, changed ones replaced, unchanged ones skipped, and
        (with `prune`, as `index build` does) indexed files no longer among them removed. A file that cannot
        be read is named in `skipped`, or stops the update under `strict` (nothing of it written)."""
        started, report = time.perf_counter(), UpdateReport()
        files = find_files(paths)
        if not files:
            raise ConfigError(f"no documents under {', '.join(map(str, paths))} (.txt, .md, .html, .pdf or .jsonl)")
        known = self.sources()
        for path, doc_id in files:
            key = str(path)
            digest = file_sha256(path)
            if known.get(key) == digest:
                report.unchanged.append(key)
                continue
            try:
                documents = read_documents(path, doc_id)
                self._check_ids(key, [d.doc_id for d in documents])
                records = self._chunk(key, documents)
            except UnreadableDocument as e:
                if strict:
                    raise UnreadableDocument(f"{e} (--strict stops at the first unreadable document)") from None
                report.skipped.append(str(e))
                continue
            self._replace(key, digest, path.stat().st_size, len(documents), records)
            report.chunks += len(records)
            (report.updated if key in known else report.added).append(key)
        if prune:
            given = {str(path) for path, _ in files}
            report.removed = self.remove([p for p in known if p not in given], missing_ok=True)
        report.seconds = time.perf_counter() - started
        return report

    def _check_ids(self, source: str, doc_ids: list[str]) -> None:
        for doc_id in doc_ids:
            other = self.db.execute("SELECT source FROM chunks WHERE doc_id = ? AND source != ? LIMIT 1",
                                    (doc_id, source)).fetchone()
            if other:
                raise UnreadableDocument(f"{source}: its document id {doc_id!r} is already {other[0]}'s; "
                                         f"give the documents distinct names or ids")

    def _chunk(self, source: str, documents) -> list[tuple[str, str, int, int, str]]:
        """(document id, title, start, end, text) of every chunk of the documents."""
        if self._tokenizer is None:
            self._tokenizer = untruncated(self.embedder().tokenizer.backend_tokenizer)
        records = [(d.doc_id, d.title, start, end, d.text[start:end])
                   for d in documents for start, end in chunk_spans(d.text, self._tokenizer, self.chunking)]
        if not records:
            raise UnreadableDocument(f"{source}: no text the embedder's tokenizer reads")
        return records

    def _replace(self, source: str, digest: str, size: int, documents: int, records: list) -> None:
        vectors = self.embed([passage_text(title, text) for _, title, _, _, text in records])
        if self.meta["dimension"] is None:
            self._set_meta(dimension=int(vectors.shape[1]))
        elif vectors.shape[1] != self.meta["dimension"]:
            raise ConfigError(f"{self.directory}: its vectors have {self.meta['dimension']} dimensions, the embedder "
                              f"gives {vectors.shape[1]}: rebuild the index")
        first = self.meta["rows"]
        with open(self.directory / self.meta["vectors"], "ab") as f:
            f.truncate(first * 4 * self.meta["dimension"])  # drop rows a crash left unreferenced
            f.write(vectors.tobytes())
        fsync_file(self.directory / self.meta["vectors"])
        with self.db:
            self.db.execute("DELETE FROM chunks WHERE source = ?", (source,))
            self.db.execute("INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?, ?)",
                            (source, digest, size, documents, time.time()))
            self.db.executemany('INSERT INTO chunks (source, doc_id, title, start, "end", text, row) '
                                'VALUES (?, ?, ?, ?, ?, ?, ?)',
                                [(source, *r, first + i) for i, r in enumerate(records)])
            self._set_meta(rows=first + len(records), commit=False)
        self._compact_if_sparse()

    def remove(self, paths: list[str | Path], missing_ok: bool = False) -> list[str]:
        """Drop files (as indexed: their paths) and everything under folders given; returns what was removed.
        A path that names nothing in the index is an error, unless `missing_ok`."""
        known = self.sources()
        removed = []
        for wanted in (str(Path(p).resolve()) for p in paths):
            matched = [s for s in known if s == wanted or s.startswith(wanted.rstrip(os.sep) + os.sep)]
            if not matched and not missing_ok:
                raise ConfigError(f"{wanted}: not in the index {self.directory}; nothing removed")
            removed += [s for s in matched if s not in removed]
        with self.db:
            for source in removed:
                self.db.execute("DELETE FROM chunks WHERE source = ?", (source,))
                self.db.execute("DELETE FROM sources WHERE path = ?", (source,))
        self._compact_if_sparse()
        return removed

    def _compact_if_sparse(self) -> None:
        live = self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        if self.meta["rows"] <= 2 * live:
            return
        old = self.meta["vectors"]
        new = f"vectors-{int(old.split('-')[1].split('.')[0]) + 1}.f32"
        ids_rows = self.db.execute("SELECT id, row FROM chunks ORDER BY row").fetchall()
        vectors = self.vectors()
        with open(self.directory / new, "wb") as f:
            f.write(np.ascontiguousarray(vectors[[r for _, r in ids_rows]]).tobytes() if ids_rows else b"")
        fsync_file(self.directory / new)
        with self.db:
            self.db.executemany("UPDATE chunks SET row = ? WHERE id = ?", [(i, cid) for i, (cid, _) in enumerate(ids_rows)])
            self._set_meta(vectors=new, rows=len(ids_rows), commit=False)
        del vectors
        (self.directory / old).unlink(missing_ok=True)

    def _set_meta(self, commit: bool = True, **values) -> None:
        self.meta.update(values)
        statement = [("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, json.dumps(v))) for k, v in values.items()]
        if commit:
            with self.db:
                for sql, args in statement:
                    self.db.execute(sql, args)
        else:
            for sql, args in statement:
                self.db.execute(sql, args)

    def close(self) -> None:
        self.db.close()
