"""The recipe's data section -> tokenized shards: a prepared directory, or raw files prepared on first use
into OUT_DIR/data and reused while the sources and options stay the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..checkpoint import atomic_write
from .recipe import Recipe


def _fingerprint(recipe: Recipe) -> dict:
    spec = recipe.data.model_dump(mode="json")
    files = []
    for item in recipe.data.sources():
        path = Path(item)
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                st = f.stat()
                files.append([str(f.resolve()), st.st_size, int(st.st_mtime)])
    return {"data": spec, "files": files}


def load_training_data(recipe: Recipe, is_main: bool, barrier: Callable[[], None] = lambda: None,
                       is_local_main: bool | None = None):
    """Shards for training. The global main process prepares them first; on other machines (no shared
    file system), each machine's first process then prepares its own identical copy."""
    from ..data import load_shards

    if recipe.data.prepared:
        return load_shards(recipe.data.prepared)
    out = Path(recipe.out_dir) / "data"
    fingerprint = _fingerprint(recipe)
    if is_main:
        _prepare_if_stale(recipe, out, fingerprint)
    barrier()
    if (is_main if is_local_main is None else is_local_main) and not is_main:
        _prepare_if_stale(recipe, out, fingerprint)
    barrier()
    return load_shards(out)


def _prepare_if_stale(recipe: Recipe, out: Path, fingerprint: dict) -> None:
    from ..data import prepare

    stamp = out / "recipe-data.json"
    current = json.loads(stamp.read_text()) if stamp.is_file() else None
    if current == fingerprint and (out / "manifest.json").is_file():
        return
    d = recipe.data
    report = prepare(d.sources(), out, tokenizer=d.tokenizer, vocab_size=d.vocab_size, field=d.field,
                     doc_separator=d.doc_separator, dedupe=d.dedupe, scrub_pii=d.scrub_pii,
                     min_chars=d.min_chars, val_fraction=d.val_fraction, progress=recipe.log.progress)
    from rich.console import Console

    console = Console(stderr=True)
    for line in report.summary_lines():
        console.print(line, highlight=False)
    atomic_write(stamp, lambda f: f.write(json.dumps(fingerprint).encode()))
