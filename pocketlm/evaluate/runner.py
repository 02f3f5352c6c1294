"""`pocketlm eval`: run tasks on a model and collect the figures, with the model's provenance."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..checkpoint import read_provenance
from ..constrain import Constraint
from ..engine import SamplingParams
from ..errors import ConfigError
from ..loading import open_model
from ..model import expected_shapes
from ..streaming import compile_constraint, generate
from .loaders import resolve_tasks
from .perplexity import perplexity
from .scoring import encode_pair, loglikelihoods
from .tasks import (
    GENERATE,
    INVALID,
    MULTIPLE_CHOICE,
    Example,
    Task,
    choose,
    extract_answer,
    mean_and_stderr,
    normalize_number,
)

# progress(task name, done, total)
TaskProgress = Callable[[str, int, int], None]


def fewshot_examples(task: Task, examples: list[Example], index: int, n: int) -> list[Example]:
    """The first n demonstrations of the task's few-shot split; without one, the first n of its own
    examples other than the one asked about."""
    if n == 0:
        return []
    if task.load_fewshot is not None:
        pool = task.load_fewshot()
        if len(pool) < n:
            raise ConfigError(f"task {task.name}: {n}-shot asked for but its few-shot data has only {len(pool)} examples")
        return pool[:n]
    return [e for i, e in enumerate(examples[: n + 1]) if i != index][:n]


def run_multiple_choice(model, tokenizer, task: Task, examples: list[Example], num_fewshot: int,
                        progress: TaskProgress | None, batch_tokens: int) -> tuple[dict, list[dict]]:
    requests, owners = [], []
    for i, example in enumerate(examples):
        for context, continuation in task.requests(example, fewshot_examples(task, examples, i, num_fewshot)):
            requests.append(encode_pair(tokenizer, context, continuation))
            owners.append(i)
    scores = loglikelihoods(model, requests, max_batch_tokens=batch_tokens,
                            progress=(lambda done, total: progress(task.name, done, total)) if progress else None)
    per_example: list[list[float]] = [[] for _ in examples]
    for owner, (score, _) in zip(owners, scores):
        per_example[owner].append(score)
    acc, acc_norm, samples = [], [], []
    for example, lls in zip(examples, per_example):
        by_ll, by_norm = choose(example, lls)
        acc.append(float(by_ll == example.gold))
        acc_norm.append(float(by_norm == example.gold))
        samples.append({"query": example.query, "choices": example.choices, "gold": example.gold,
                        "loglikelihoods": lls, "prediction": by_ll, "prediction_norm": by_norm})
    (a, a_err), (n, n_err) = mean_and_stderr(acc), mean_and_stderr(acc_norm)
    if any(e.partial for e in examples):  # choices are contexts there: their length means nothing (acc only, as lm-eval)
        return {"acc": a, "acc_stderr": a_err}, samples
    return {"acc": a, "acc_stderr": a_err, "acc_norm": n, "acc_norm_stderr": n_err}, samples


def run_generation(model, tokenizer, task: Task, examples: list[Example], num_fewshot: int,
                   progress: TaskProgress | None, constraint: Constraint | None = None) -> tuple[dict, list[dict]]:
    """Greedy answers scored by exact match of the whole answer and, where the gold answers end in
    '#### N' (GSM8K's form), after extraction as lm-evaluation-harness does (strict '#### N', flexible last
    number), with `strict_found`, the share with a strict answer. Under a constraint (`constraint`, else
    the task's own) the answers are decoded under its grammar."""
    constraint = constraint or task.constraint
    grammar = compile_constraint(model, tokenizer, constraint) if constraint is not None else None
    params = SamplingParams(max_new_tokens=task.max_new_tokens, temperature=0.0, stop=task.until, grammar=grammar)
    context = model.context_length
    strict, flexible, whole, found, samples = [], [], [], [], []
    for i, example in enumerate(examples):
        prompt = task.context(example, fewshot_examples(task, examples, i, num_fewshot)) + example.query
        ids = tokenizer.encode(prompt)[-(context - task.max_new_tokens):]  # keep the question, drop early shots
        generation = generate(model, tokenizer, ids, params)
        text = generation.text
        gold = normalize_number(example.answer)
        got_strict, got_flexible = extract_answer(text)
        strict.append(float(normalize_number(got_strict) == gold))
        flexible.append(float(normalize_number(got_flexible) == gold))
        whole.append(float(normalize_number(text) == gold))
        found.append(float(got_strict != INVALID))
        samples.append({"query": example.query, "gold": gold, "completion": text, "finish": generation.finish_reason,
                        "strict": got_strict, "flexible": got_flexible})
        if progress:
            progress(task.name, i + 1, len(examples))
    scored = [("exact_match", whole)]
    if any("####" in example.answer for example in examples):
        scored = [("exact_match_strict", strict), ("exact_match_flexible", flexible), *scored, ("strict_found", found)]
    metrics = {}
    for name, values in scored:
        metrics[name], metrics[name + "_stderr"] = mean_and_stderr(values)
    if constraint is not None:
        metrics["constraint"] = {"kind": constraint.kind, "value": constraint.value}
    return metrics, samples


def run_perplexity(model, tokenizer, task: Task, max_tokens: int | None, progress: TaskProgress | None) -> dict:
    try:
        text = task.text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"task {task.name}: {task.text_path} is not UTF-8 text") from None
    window = min(model.context_length, 2048)
    result = perplexity(model, tokenizer, text, window=window, stride=window // 2, max_tokens=max_tokens,
                        progress=(lambda done, total: progress(task.name, done, total)) if progress else None)
    return {"token_perplexity": result.token_perplexity, "word_perplexity": result.word_perplexity,
            "bits_per_byte": result.bits_per_byte, "tokens": result.tokens, "window": result.window,
            "stride": result.stride}


def run_task(model, tokenizer, task: Task, num_fewshot: int | None = None, limit: int | None = None,
             max_tokens: int | None = None, batch_tokens: int = 4096, progress: TaskProgress | None = None,
             constraint: Constraint | None = None) -> tuple[dict, list[dict]]:
    started = time.perf_counter()
    if task.load is None:  # perplexity over a text file
        metrics, samples = run_perplexity(model, tokenizer, task, max_tokens, progress), []
    else:
        examples = task.load()[:limit]
        if not examples:
            raise ConfigError(f"task {task.name}: no examples to evaluate")
        shots = task.default_fewshot if num_fewshot is None else num_fewshot
        if task.kind == MULTIPLE_CHOICE:
            metrics, samples = run_multiple_choice(model, tokenizer, task, examples, shots, progress, batch_tokens)
        elif task.kind == GENERATE:
            metrics, samples = run_generation(model, tokenizer, task, examples, shots, progress, constraint)
        else:
            raise ConfigError(f"task {task.name}: unknown kind {task.kind!r}")
        metrics.update(n=len(examples), num_fewshot=shots)
    metrics.update(seconds=round(time.perf_counter() - started, 2), source=task.source)
    if task.group:
        metrics["group"] = task.group
    return metrics, samples


def group_results(tasks: list[Task], results: dict[str, dict]) -> dict[str, dict]:
    """Per group (MMLU): accuracy over all its questions (as lm-evaluation-harness weights it) and
    the plain mean over its subjects."""
    groups: dict[str, list[str]] = {}
    for task in tasks:
        if task.group:
            groups.setdefault(task.group, []).append(task.name)
    out = {}
    for group, names in groups.items():
        members = [results[name] for name in names]
        total = sum(m["n"] for m in members)
        out[group] = {
            "acc": sum(m["acc"] * m["n"] for m in members) / total,
            "acc_norm": sum(m["acc_norm"] * m["n"] for m in members) / total,
            "acc_subject_mean": sum(m["acc"] for m in members) / len(members),
            "n": total, "tasks": len(members),
            "seconds": round(sum(m["seconds"] for m in members), 2),
        }
    return out


def model_facts(model, model_dir: Path | None) -> dict:
    """What identifies the evaluated model: its directory, size and provenance."""
    import math

    # counted from the shapes, so a quantized model (int8 buffers, not parameters) counts the same
    facts: dict = {"parameters": sum(math.prod(s) for s in expected_shapes(model.config).values()),
                   "quantization": asdict(model.quant_scheme) if getattr(model, "quant_scheme", None) else None}
    if model_dir is not None:
        files = [p for p in Path(model_dir).glob("*.safetensors")]
        facts.update(path=str(model_dir), name=Path(model_dir).name,
                     file_mb=round(sum(p.stat().st_size for p in files) / 2**20, 2),
                     provenance=read_provenance(model_dir))
    return facts


def evaluate(model, tokenizer, tasks: list[str] | list[Task], num_fewshot: int | None = None, limit: int | None = None,
             max_tokens: int | None = None, batch_tokens: int = 4096, model_dir: Path | None = None,
             progress: TaskProgress | None = None, log_samples: bool = False,
             constraint: Constraint | None = None) -> dict:
    """Run `tasks` (names, `NAME=PATH`, task files, or Task objects) and return the results document;
    `constraint` decodes the generation tasks' answers under it."""
    tasks = resolve_tasks(tasks) if tasks and isinstance(tasks[0], str) else list(tasks)
    if not tasks:
        raise ConfigError("no tasks given; name at least one (see `pocketlm eval --list-tasks`)")
    results, samples = {}, {}
    for task in tasks:
        results[task.name], samples[task.name] = run_task(model, tokenizer, task, num_fewshot, limit, max_tokens,
                                                          batch_tokens, progress, constraint)
    document = {
        "pocketlm_version": __version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": model_facts(model, model_dir),
        "settings": {"num_fewshot": num_fewshot, "limit": limit, "max_tokens": max_tokens, "batch_tokens": batch_tokens,
                     "constraint": None if constraint is None else {"kind": constraint.kind, "value": constraint.value}},
        "results": results,
        "groups": group_results(tasks, results),
    }
    if log_samples:
        document["samples"] = samples
    return document


DTYPES = ("float32", "bfloat16")


def evaluate_dir(model_dir: str | Path, tasks: list[str], dtype: str | None = None, **kwargs) -> dict:
    """Load a model directory (optionally in bfloat16, about 2x faster on CPUs with AVX512-BF16, with
    slightly different scores) and evaluate it (see `evaluate`)."""
    import torch

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(tasks, list) and tasks and isinstance(tasks[0], str):
        tasks = resolve_tasks(tasks)  # task errors before the model loads
    model, tokenizer = open_model(model_dir, dtype=getattr(torch, dtype) if dtype else None)
    document = evaluate(model, tokenizer, tasks, model_dir=Path(model_dir), **kwargs)
    document["settings"]["dtype"] = str(model.compute_dtype).removeprefix("torch.")
    return document
