"""Knowledge distillation: the teacher, the vocabulary check, a top-k logit cache, and the synthetic
corpus of sequence-level distillation.

Logit distillation compares teacher and student distributions token by token, so both must share one
vocabulary; that is checked before any data is prepared. When they differ, sequence-level
distillation is the way: the teacher writes text, and the student learns that text with its own
tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from ..engine import SamplingParams, eos_ids, generate_batch
from ..errors import ConfigError
from ..hub import resolve_model
from ..loading import open_model
from ..quant import QuantScheme, prepare_kernels, quantize_model
from ..tokenizer import Tokenizer
from .console import console
from .recipe import tokenizer_source


def load_teacher(ref: str, quantize: str | None, device: torch.device):
    """(teacher model in eval mode with frozen weights, its tokenizer, its directory)."""
    path = resolve_model(ref)
    model, tokenizer = open_model(path, device=device)
    if quantize:
        scheme = QuantScheme(method=quantize, group_size=32 if quantize == "int4" else None)
        model = quantize_model(model.float(), scheme)
        prepare_kernels(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer, path


def student_tokenizer(recipe) -> tuple[Tokenizer | None, str]:
    """The tokenizer the student's data will use, known before any data is prepared; None when
    `pocketlm prepare` will train a new one (bpe, char)."""
    if recipe.data.prepared:  # `pocketlm prepare` keeps its tokenizer in a folder of its own
        return Tokenizer.load(Path(recipe.data.prepared) / "tokenizer"), f"data.prepared {recipe.data.prepared}"
    if recipe.data.tokenizer not in ("bpe", "char"):
        return Tokenizer.load(tokenizer_source(recipe.data.tokenizer)), f"data.tokenizer {recipe.data.tokenizer}"
    return None, f"data.tokenizer {recipe.data.tokenizer} (a new tokenizer trained on the data)"


def check_same_vocabulary(teacher_tok: Tokenizer, teacher_vocab: int, teacher_name: str, recipe) -> None:
    """Stop before any work when logit distillation cannot compare the two distributions."""
    student_tok, described = student_tokenizer(recipe)
    hint = (f"logit distillation needs the student to use the teacher's tokenizer: set data.tokenizer to the "
            f"teacher's directory ({teacher_name}), or use sequence-level distillation (distill.mode: sequence), "
            "where the teacher writes a corpus that the student learns with its own tokenizer")
    if student_tok is None:
        raise ConfigError(f"distill.teacher {teacher_name} has its own vocabulary of {teacher_vocab} tokens but the "
                          f"student's comes from {described}; {hint}")
    if student_tok.backend.get_vocab() != teacher_tok.backend.get_vocab():
        raise ConfigError(f"distill.teacher {teacher_name} ({teacher_tok.vocab_size} tokens) and the student's "
                          f"{described} ({student_tok.vocab_size} tokens) have different vocabularies; {hint}")
    model_vocab = recipe.model.vocab_size if recipe.model is not None else None
    if model_vocab is not None and model_vocab != teacher_vocab:
        raise ConfigError(f"model.vocab_size {model_vocab} differs from the teacher's {teacher_vocab}; logit "
                          "distillation compares distributions over the same ids: leave model.vocab_size unset")


def teacher_logits(teacher, student_vocab: int, input_ids: torch.Tensor) -> torch.Tensor:
    """The teacher's logits cut to the student's vocabulary (a padded embedding may add unused rows)."""
    return teacher(input_ids)[..., :student_vocab]


class TeacherCache:
    """The teacher's top-k logits for whole chunks of the training stream, memory-mapped on disk.

    The run's batches are known in advance (they depend only on seed and step), so `fill` computes
    exactly the chunks the remaining steps will read, once; a resumed run, or a second run with
    the same teacher and data, reuses them."""

    def __init__(self, root: Path, tokens: np.ndarray, block: int, k: int, key: dict, shared: bool = False):
        """`shared`: another run's cache (distill.cache_dir), opened read-only; one made for another teacher,
        k or token stream is refused instead of being overwritten."""
        self.root, self.tokens, self.block, self.k = Path(root), tokens, block, k
        chunks = (len(tokens) - 1) // block
        meta_path = self.root / "meta.json"
        meta = {"chunks": chunks, "block": block, "k": k, **key}
        fresh = not meta_path.is_file() or json.loads(meta_path.read_text()) != meta
        if shared and fresh:
            why = "it holds no cache (no meta.json)" if not meta_path.is_file() else "it was made for another teacher, k or data"
            raise ConfigError(f"distill.cache_dir {root}: {why}; fill it with `pocketlm distill-cache` on this recipe")
        self.root.mkdir(parents=True, exist_ok=True)
        mode = "w+" if fresh else ("r" if shared else "r+")
        self.ids = np.lib.format.open_memmap(self.root / "ids.npy", mode=mode, dtype=np.int32, shape=(chunks, block, k))
        self.logits = np.lib.format.open_memmap(self.root / "logits.npy", mode=mode, dtype=np.float16,
                                                shape=(chunks, block, k))
        self.done = np.lib.format.open_memmap(self.root / "done.npy", mode=mode, dtype=bool, shape=(chunks,))
        if fresh:
            meta_path.write_text(json.dumps(meta))

    def missing(self, chunks: np.ndarray) -> np.ndarray:
        chunks = np.unique(chunks)
        return chunks[~self.done[chunks]]

    @torch.no_grad()
    def fill(self, teacher, vocab: int, chunks: np.ndarray, batch: int, device, autocast=nullcontext,
             progress: bool = False) -> int:
        todo = self.missing(chunks)
        if len(todo) == 0:
            return 0
        bar = _bar(len(todo), "teacher top-k") if progress else None
        for i in range(0, len(todo), batch):
            part = todo[i:i + batch]
            rows = np.stack([self.tokens[c * self.block:(c + 1) * self.block] for c in part]).astype(np.int64)
            with autocast():
                logits = teacher_logits(teacher, vocab, torch.from_numpy(rows).to(device)).float()
            values, ids = logits.topk(self.k, dim=-1)
            self.ids[part] = ids.cpu().numpy().astype(np.int32)
            self.logits[part] = values.cpu().numpy().astype(np.float16)
            self.ids.flush()
            self.logits.flush()
            self.done[part] = True  # marked only after the values are on disk
            self.done.flush()
            if bar:
                bar[0].update(bar[1], advance=len(part))
        if bar:
            bar[0].stop()
        return len(todo)

    def lookup(self, chunks: np.ndarray, device) -> dict[str, torch.Tensor]:
        return {"teacher_ids": torch.from_numpy(self.ids[chunks].astype(np.int64)).to(device),
                "teacher_logits": torch.from_numpy(self.logits[chunks].astype(np.float32)).to(device)}


def cache_key(teacher_dir: Path, shards, quantize: str | None = None) -> dict:
    """What the cached values depend on: the teacher's weights, how it runs (quantized or not) and the token
    stream."""
    digest = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        path = Path(teacher_dir) / name
        if path.is_file():
            st = path.stat()
            digest.update(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    tokens = hashlib.sha256(np.ascontiguousarray(shards.train[:1 << 20]).tobytes()).hexdigest()
    return {"teacher": digest.hexdigest(), "teacher_quantize": quantize, "tokens": tokens,
            "n_tokens": int(len(shards.train))}


def _bar(total: int, label: str):
    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console)
    task = progress.add_task(label, total=total)
    progress.start()
    return progress, task


# ---------------------------------------------------------------------------------------------
# sequence-level distillation
# ---------------------------------------------------------------------------------------------
def corpus_prompts(spec) -> list[str]:
    if spec.prompts:
        lines = [line.strip() for line in Path(spec.prompts).read_text(encoding="utf-8").splitlines()]
        prompts = [line for line in lines if line]
        if not prompts:
            raise ConfigError(f"distill.prompts: {spec.prompts} holds no prompt (one per line)")
        return prompts
    return list(spec.seed_openings)


def write_corpus(spec, out: Path, device, seed: int, progress: bool = False) -> Path:
    """The teacher continues each prompt (cycled until num_sequences) with sampling, in batches, and
    appends {"prompt", "text"} lines to OUT/corpus.jsonl. Lines already there are kept, so an
    interrupted generation resumes where it stopped."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "corpus.jsonl"
    prompts = corpus_prompts(spec)
    done = 0
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        valid = [line for line in lines if _complete(line)]
        done = len(valid)
        if len(valid) != len(lines):  # a half-written last line from a kill
            path.write_text("".join(line + "\n" for line in valid), encoding="utf-8")
    if done >= spec.num_sequences:
        return path
    teacher, tokenizer, _ = load_teacher(spec.teacher, None, device)
    stops = eos_ids(teacher, tokenizer)
    bar = _bar(spec.num_sequences, "teacher writes") if progress else None
    if bar:
        bar[0].update(bar[1], completed=done)
    with open(path, "a", encoding="utf-8") as f:
        while done < spec.num_sequences:
            n = min(spec.generate_batch, spec.num_sequences - done)
            batch = [prompts[(done + i) % len(prompts)] for i in range(n)]
            params = SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=spec.sample_temperature,
                                    top_p=spec.top_p, seed=seed + done)
            outputs = generate_batch(teacher, [tokenizer.encode(p) for p in batch], params, stops)
            for prompt, ids in zip(batch, outputs):
                ids = [t for t in ids if t not in stops]
                f.write(json.dumps({"prompt": prompt, "text": prompt + tokenizer.decode(ids, skip_special_tokens=True)})
                        + "\n")
            f.flush()
            done += n
            if bar:
                bar[0].update(bar[1], completed=done)
    if bar:
        bar[0].stop()
    return path


def _complete(line: str) -> bool:
    try:
        return "text" in json.loads(line)
    except json.JSONDecodeError:
        return False
