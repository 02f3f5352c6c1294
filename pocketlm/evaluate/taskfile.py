"""User-defined tasks in a YAML file, in the spirit of lm-evaluation-harness's task files.

    task: capitals
    type: multiple_choice          # or generate, perplexity
    data: capitals.jsonl           # .jsonl, .json or .csv; relative to this file
    prompt: "Question: What is the capital of {{country}}?\\nAnswer:"
    choices: "{{options}}"          # a list of templates, or one template giving a list
    target: "{{answer}}"            # an index into the choices, or the text of the right choice
    constraint: {regex: "[0-9]+"}   # generate: decode the answer under a json_schema, regex, grammar or choice
    chat: true                      # generate: the prompt is a user turn in the model's chat template...
    answer_prefix: "{{start}}"      # ...and the assistant's reply begins with this (the model continues it)
    until: ["{{stop}}", "\n"]        # stop strings; templates are rendered per record
    retrieval: {index: INDEX, k: 4, retriever: hybrid, query: "{{question}}"}  # answer from an index's passages

Templates are Jinja, as in lm-evaluation-harness (`doc_to_text`, `doc_to_choice`, `doc_to_target`).
A typo in a key, a missing key, a missing data file or a template naming a field the records lack
is one error line, before any model is loaded.
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path
from typing import Any, Literal

import jinja2
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..constrain import Constraint
from ..errors import ConfigError
from ..validation import validation_message
from .records import read_records
from .tasks import GENERATE, MULTIPLE_CHOICE, PERPLEXITY, Example, Retrieval, Task


class RetrievalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str | None = None  # relative to the task file; or given by `pocketlm eval --index`
    k: int = Field(default=4, ge=1, le=64)
    retriever: Literal["bm25", "dense", "hybrid"] = "hybrid"
    query: str | None = None  # a template: what is looked up (default: the prompt)


class TaskFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str
    type: Literal["multiple_choice", "generate", "perplexity"] = "multiple_choice"
    data: str
    fewshot_data: str | None = None
    description: str = ""
    prompt: str | None = None
    choices: str | list[str] | None = None
    target: str | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = Field(default=0, ge=0)
    until: list[str] = Field(default_factory=list)
    max_new_tokens: int = Field(default=256, gt=0)
    # generate: decode the answer under one of json_schema (a schema), regex, grammar (Lark) or choice (a list)
    constraint: dict[Literal["json_schema", "regex", "grammar", "choice"], Any] | None = Field(
        default=None, min_length=1, max_length=1)
    chat: bool = False
    answer_prefix: str | None = None
    retrieval: RetrievalSpec | None = None


_jinja = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _render(template: str, record: dict, key: str, where: str) -> str:
    try:
        return _jinja.from_string(template).render(**record)
    except jinja2.UndefinedError as e:
        raise ConfigError(f"{where}: '{key}' template: {e.message}; the record's fields are: {', '.join(record)}") from None
    except jinja2.TemplateError as e:
        raise ConfigError(f"{where}: '{key}' template is not valid Jinja ({e})") from None


def _records(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    return read_records(path)


class _Renderer:
    def __init__(self, spec: TaskFile, source: str):
        self.spec, self.source = spec, source
        self.templated_until = any("{{" in u or "{%" in u for u in spec.until)

    def choices(self, record: dict, where: str) -> list[str]:
        spec = self.spec.choices
        if isinstance(spec, list):
            return [_render(t, record, "choices", where) for t in spec]
        if spec in record:  # a field holding the list
            value = record[spec]
        else:
            text = _render(spec, record, "choices", where)
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ConfigError(f"{where}: 'choices' rendered to {text[:80]!r}, which is not a list") from None
        if not isinstance(value, (list, tuple)) or len(value) < 2:
            raise ConfigError(f"{where}: 'choices' must give a list of at least two answers, got {value!r}")
        return [str(v) for v in value]

    def example(self, record: dict, index: int) -> Example:
        where = f"{self.source}: record {index}"
        query = _render(self.spec.prompt, record, "prompt", where)
        target = _render(self.spec.target, record, "target", where).strip()
        if self.spec.type == GENERATE:
            spec = self.spec
            return Example(query, answer=target,
                           prefix=_render(spec.answer_prefix, record, "answer_prefix", where) if spec.answer_prefix else "",
                           until=[_render(u, record, "until", where) for u in spec.until] if self.templated_until else None,
                           search=_render(spec.retrieval.query, record, "retrieval.query", where)
                           if spec.retrieval and spec.retrieval.query else "")
        choices = self.choices(record, where)
        if target.lstrip("-").isdigit():
            gold = int(target)
        elif target in choices:
            gold = choices.index(target)
        else:
            raise ConfigError(f"{where}: target {target!r} is neither an index nor one of the choices {choices}")
        if not 0 <= gold < len(choices):
            raise ConfigError(f"{where}: target index {gold} is outside the {len(choices)} choices")
        return Example(query, choices, gold)

    def load(self, path: Path) -> list[Example]:
        return [self.example(record, i) for i, record in enumerate(_records(path))]


def load_task_file(path: Path) -> Task:
    if not path.is_file():
        raise ConfigError(f"{path}: no such task file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a task file is a YAML mapping (task, type, data, prompt, choices, target, ...)")
    try:
        spec = TaskFile.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {validation_message(e, TaskFile)}") from None
    data_path = (path.parent / spec.data).resolve()
    if not data_path.is_file():
        raise ConfigError(f"{path}: data: {spec.data}: no such file (looked at {data_path})")
    if spec.type == PERPLEXITY:
        return Task(name=spec.task, kind=PERPLEXITY, text_path=data_path, source=str(data_path))
    needed = ["prompt", "target"] + (["choices"] if spec.type == MULTIPLE_CHOICE else [])
    for key in needed:
        if getattr(spec, key) is None:
            raise ConfigError(f"{path}: {key}: missing (required for type {spec.type})")
    fewshot_path = (path.parent / spec.fewshot_data).resolve() if spec.fewshot_data else None
    if fewshot_path is not None and not fewshot_path.is_file():
        raise ConfigError(f"{path}: fewshot_data: {spec.fewshot_data}: no such file (looked at {fewshot_path})")
    if spec.type != GENERATE and (spec.chat or spec.answer_prefix or spec.retrieval):
        raise ConfigError(f"{path}: chat, answer_prefix and retrieval are for generate tasks (this one is {spec.type})")
    if spec.answer_prefix and not spec.chat:
        raise ConfigError(f"{path}: answer_prefix begins the assistant's reply, so it needs chat: true")
    retrieval = None
    if spec.retrieval:
        index = str((path.parent / spec.retrieval.index).resolve()) if spec.retrieval.index else None
        retrieval = Retrieval(index, spec.retrieval.k, spec.retrieval.retriever)
    constraint = None
    if spec.constraint:
        if spec.type != GENERATE:
            raise ConfigError(f"{path}: constraint: only generate tasks decode their answers (this one is {spec.type})")
        constraint = Constraint(*next(iter(spec.constraint.items())))
        try:
            constraint.grammar_text()  # a schema that is not JSON, or not a list of choices: now, before the model loads
        except ConfigError as e:
            raise ConfigError(f"{path}: constraint: {e}") from None
    renderer = _Renderer(spec, str(path))
    first = _records(data_path)[:1]
    if not first:
        raise ConfigError(f"{path}: data: {data_path} holds no records")
    renderer.example(first[0], 0)  # template errors now, not after the model has loaded
    return Task(
        name=spec.task, kind=spec.type, source=str(data_path),
        load=lambda: renderer.load(data_path),
        load_fewshot=(lambda: renderer.load(fewshot_path)) if fewshot_path else None,
        description=spec.description, target_delimiter=spec.target_delimiter,
        fewshot_delimiter=spec.fewshot_delimiter, default_fewshot=spec.num_fewshot,
        until=spec.until, max_new_tokens=spec.max_new_tokens,
        constraint=constraint, chat=spec.chat, retrieval=retrieval,
    )
