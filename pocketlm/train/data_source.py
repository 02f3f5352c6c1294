"""The recipe's data section -> tokenized shards: a prepared directory, or raw files prepared on first use
into OUT_DIR/data and reused while the sources and options stay the same."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..data import load_shards, prepare, resolve_inputs
from ..errors import ConfigError
from ..fsio import atomic_write, file_sha256
from .batches import Rows, Windows
from .instruct import RowsReport, preference_rows, sft_rows
from .recipe import Recipe, tokenizer_source


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
    stamp = out / "recipe-data.json"
    current = json.loads(stamp.read_text()) if stamp.is_file() else None
    if current == fingerprint and (out / "manifest.json").is_file():
        return
    d = recipe.data
    report = prepare(d.sources(), out, tokenizer=tokenizer_source(d.tokenizer), vocab_size=d.vocab_size, field=d.field,
                     doc_separator=d.doc_separator, dedupe=d.dedupe, scrub_pii=d.scrub_pii,
                     min_chars=d.min_chars, val_fraction=d.val_fraction, progress=recipe.log.progress)
    from rich.console import Console

    console = Console(stderr=True)
    for line in report.summary_lines():
        console.print(line, highlight=False)
    atomic_write(stamp, lambda f: f.write(json.dumps(fingerprint).encode()))


# ---------------------------------------------------------------------------------------------
# every objective's data
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainingData:
    train: Windows | Rows
    val: Windows | Rows
    tokenizer: object
    provenance: dict  # data hashes and counts for the model card
    shards: object | None = None  # the token shards (pretrain, distill)


def load_data(recipe: Recipe, is_main: bool, barrier: Callable[[], None], is_local_main: bool,
              per_step: int, model_tokenizer=None, corpus: Path | None = None) -> TrainingData:
    """Token windows for pretraining and distillation (aligned chunks when the teacher's logits are
    cached), packed example rows for SFT, pair rows for DPO. `corpus` replaces data.source with the
    teacher's text in sequence-level distillation."""
    objective = recipe.train.objective
    block = recipe.train.block_size
    if objective in ("sft", "dpo"):
        return _example_data(recipe, model_tokenizer, per_step)
    if corpus is not None:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"source": str(corpus), "field": "text",
                                                                                   "prepared": None})})
    shards = load_training_data(recipe, is_main, barrier, is_local_main)
    # private training samples from a fixed set of rows: whole chunks, not windows at any offset
    aligned = (recipe.distill is not None and recipe.distill.cache_top_k is not None) or recipe.privacy is not None
    hashes = {s["path"]: s.get("sha256") for s in shards.manifest.get("sources", []) if "path" in s}
    return TrainingData(Windows(shards.train, block, aligned), Windows(shards.val, block), shards.tokenizer,
                        {"data_hashes": hashes}, shards)


def _example_data(recipe: Recipe, tokenizer, per_step: int) -> TrainingData:
    paths = resolve_inputs(recipe.data.sources())
    report = RowsReport()
    t = recipe.train
    if t.objective == "sft":
        rows = sft_rows(paths, tokenizer, t.block_size, recipe.sft.prompt_format, recipe.sft.system,
                        recipe.sft.packing, report)
    else:
        rows = preference_rows(paths, tokenizer, t.block_size, recipe.sft.prompt_format, recipe.sft.system, report)
    n = len(next(iter(rows.values())))
    order = np.random.default_rng(recipe.seed).permutation(n)
    n_val = max(1, round(n * recipe.data.val_fraction)) if n > 1 else 0
    if n_val == 0:
        raise ConfigError(f"{recipe.train.objective}: only {n} row of data; a validation split needs at least 2")
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    train = Rows({k: v[train_idx] for k, v in rows.items()}, per_step)
    val = Rows({k: v[val_idx] for k, v in rows.items()}, per_step)
    from rich.console import Console

    Console(stderr=True).print(f"{t.objective} data: {report.summary()}; {len(train_idx)} train / {len(val_idx)} "
                               "validation rows", highlight=False)
    provenance = {"data_hashes": {p: file_sha256(p) for p in paths}, "examples": report.examples,
                  "rows": report.rows, "truncated": report.truncated, "dropped": len(report.dropped)}
    return TrainingData(train, val, tokenizer, provenance)
