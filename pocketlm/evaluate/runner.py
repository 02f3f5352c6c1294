"""`pocketlm eval`: run tasks on a model and collect the figures, with the model's provenance."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..checkpoint import read_provenance
from ..constrain import Constraint
from ..engine import SamplingParams
from ..errors import ConfigError
from ..fsio import timestamp
from ..loading import open_model
from ..model import expected_shapes
from ..streaming import chat_prompt, compile_constraint, generate
from .loaders import resolve_tasks
from .perplexity import perplexity
from .scoring import BATCH_TOKENS, encode_pair, loglikelihoods
from .tasks import (
    GENERATE,
    INVALID,
    MULTIPLE_CHOICE,
    Example,
    Retrieval,
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


def _searcher(retrieval: Retrieval | None):
    if retrieval is None:
        return None
    from ..retrieval.index import Index
    from ..retrieval.search import Searcher

    return Searcher(Index.open(retrieval.index), retrieval.retriever)


def generation_prompt(tokenizer, task: Task, example: Example, shots: list[Example], passages: list,
                      context: int, reserve: int) -> tuple[list[int], list]:
    """Prompt ids (and the passages that fit): the task's text with the passages before it, or, for a chat
    task, the demonstrations as earlier turns, the passages and question as the user's turn (as `pocketlm
    ask` builds it) and the reply begun with the example's prefix."""
    from ..retrieval.answer import fit_passages, numbered_passages

    if not task.chat:
        prompt = task.context(example, shots) + example.query
        if passages:
            prompt = f"Passages:\n\n{numbered_passages(passages)}\n\n{prompt}"
        return tokenizer.encode(prompt)[-(context - reserve):], passages  # keep the question, drop early shots
    if not tokenizer.chat_template:
        raise ConfigError(f"task {task.name} is a chat task and the model has no chat template")
    history = [turn for shot in shots for turn in ({"role": "user", "content": shot.query},
                                                    {"role": "assistant", "content": shot.prefix + shot.answer})]
    prefix = tokenizer.encode(example.prefix, add_special_tokens=False) if example.prefix else []
    if passages:
        ids, passages = fit_passages(tokenizer, example.query, passages, context, reserve + len(prefix), history)
    else:
        ids = chat_prompt(tokenizer, history + [{"role": "user", "content": example.query}])
    return ids + prefix, passages


def run_generation(model, tokenizer, task: Task, examples: list[Example], num_fewshot: int,
                   progress: TaskProgress | None, constraint: Constraint | None = None,
                   retrieval: Retrieval | None = None) -> tuple[dict, list[dict]]:
    """Greedy answers scored by exact match of the whole answer, and by whether the answer contains the
    gold one, and, where the gold answers end in '#### N' (GSM8K's form), after extraction as
    lm-evaluation-harness does (strict '#### N', flexible last number), with `strict_found`, the share with a
    strict answer. Under a constraint (`constraint`, else the task's own) the answers are decoded under its
    grammar. With `retrieval`, each prompt carries the index's top passages; citations ([n]) are dropped
    before matching, and `retrieved_holds_answer`, `cited` and `cited_holds_answer` say how often a passage
    given, any citation, and a passage cited hold the gold answer."""
    from ..retrieval.answer import cited

    constraint = constraint or task.constraint
    grammar = compile_constraint(model, tokenizer, constraint) if constraint is not None else None
    searcher = _searcher(retrieval)
    context = model.context_length
    scores: dict[str, list[float]] = {name: [] for name in ("strict", "flexible", "whole", "contains", "found",
                                                             "retrieved", "cited", "cited_holds")}
    samples = []
    for i, example in enumerate(examples):
        passages = searcher.search(example.search or example.query, retrieval.k) if searcher else []
        ids, passages = generation_prompt(tokenizer, task, example, fewshot_examples(task, examples, i, num_fewshot),
                                          passages, context, task.max_new_tokens)
        params = SamplingParams(max_new_tokens=task.max_new_tokens, temperature=0.0, grammar=grammar,
                                stop=example.until if example.until is not None else task.until)
        generation = generate(model, tokenizer, ids, params)
        text = generation.text
        answer = re.sub(r"\s*\[\d+(?:\s*,\s*\d+)*\]", "", text) if searcher else text
        gold = normalize_number(example.answer)
        got_strict, got_flexible = extract_answer(answer)
        scores["strict"].append(float(normalize_number(got_strict) == gold))
        scores["flexible"].append(float(normalize_number(got_flexible) == gold))
        scores["whole"].append(float(normalize_number(answer) == gold))
        scores["contains"].append(float(gold in normalize_number(answer)))
        scores["found"].append(float(got_strict != INVALID))
        sample = {"query": example.query, "gold": gold, "completion": text, "finish": generation.finish_reason,
                  "strict": got_strict, "flexible": got_flexible}
        if searcher:
            holds = {p.number for p in passages if gold in normalize_number(p.text)}
            numbers = cited(text, passages)
            scores["retrieved"].append(float(bool(holds)))
            scores["cited"].append(float(bool(numbers)))
            scores["cited_holds"].append(float(bool(holds & set(numbers))))
            sample.update(passages=[p.doc_id for p in passages], holding=sorted(holds), cited=numbers)
        samples.append(sample)
        if progress:
            progress(task.name, i + 1, len(examples))
    named = [("exact_match", "whole"), ("contains", "contains")]
    if any("####" in example.answer for example in examples):
        named = [("exact_match_strict", "strict"), ("exact_match_flexible", "flexible"), *named,
                 ("strict_found", "found")]
    if searcher:
        named += [("retrieved_holds_answer", "retrieved"), ("cited", "cited"), ("cited_holds_answer", "cited_holds")]
    metrics = {}
    for name, key in named:
        metrics[name], metrics[name + "_stderr"] = mean_and_stderr(scores[key])
    if constraint is not None:
        metrics["constraint"] = {"kind": constraint.kind, "value": constraint.value}
    if searcher:
        metrics["retrieval"] = {"index": retrieval.index, "k": retrieval.k, "retriever": retrieval.retriever}
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


def task_retrieval(task: Task, override: Retrieval | None, closed_book: bool) -> Retrieval | None:
    """What a task retrieves from: nothing when closed-book or when no index is named (a task file's
    retrieval section may say only how to retrieve); else the task's settings, with the override's index,
    k and retriever (from `pocketlm eval --index`) where they are not None."""
    if closed_book or task.kind != GENERATE or (task.retrieval is None and override is None):
        return None
    base = task.retrieval or Retrieval()
    if override is not None:
        base = Retrieval(override.index or base.index, override.k or base.k, override.retriever or base.retriever)
    return base if base.index else None


def run_task(model, tokenizer, task: Task, num_fewshot: int | None = None, limit: int | None = None,
             max_tokens: int | None = None, batch_tokens: int = BATCH_TOKENS, progress: TaskProgress | None = None,
             constraint: Constraint | None = None, retrieval: Retrieval | None = None,
             closed_book: bool = False) -> tuple[dict, list[dict]]:
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
            metrics, samples = run_generation(model, tokenizer, task, examples, shots, progress, constraint,
                                              task_retrieval(task, retrieval, closed_book))
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
             max_tokens: int | None = None, batch_tokens: int = BATCH_TOKENS, model_dir: Path | None = None,
             progress: TaskProgress | None = None, log_samples: bool = False,
             constraint: Constraint | None = None, retrieval: Retrieval | None = None,
             closed_book: bool = False) -> dict:
    """Run `tasks` (names, `NAME=PATH`, task files, or Task objects) and return the results document;
    `constraint` decodes the generation tasks' answers under it; `retrieval` answers them from an index
    (`closed_book` turns a task's own retrieval off)."""
    tasks = resolve_tasks(tasks) if tasks and isinstance(tasks[0], str) else list(tasks)
    if not tasks:
        raise ConfigError("no tasks given; name at least one (see `pocketlm eval --list-tasks`)")
    results, samples = {}, {}
    for task in tasks:
        results[task.name], samples[task.name] = run_task(model, tokenizer, task, num_fewshot, limit, max_tokens,
                                                          batch_tokens, progress, constraint, retrieval, closed_book)
    document = {
        "pocketlm_version": __version__,
        "date": timestamp(),
        "model": model_facts(model, model_dir),
        "settings": {"num_fewshot": num_fewshot, "limit": limit, "max_tokens": max_tokens, "batch_tokens": batch_tokens,
                     "constraint": None if constraint is None else {"kind": constraint.kind, "value": constraint.value},
                     "retrieval": None if retrieval is None else asdict(retrieval), "closed_book": closed_book},
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
