"""A pipeline file: named stages wired into a graph by `${stage}` references, fanned out into variants, and
checked before any work (an unknown type, a reference no stage makes, a cycle: one line each).

    name: quickstart
    stages:
      data:   {type: prepare, inputs: [dataset:tinyshakespeare/input.txt], tokenizer: char}
      base:   {type: train, recipe: recipes/shakespeare-char.yaml, set: {data.prepared: "${data}"}}
      quant:  {type: quantize, model: "${base}", matrix: {to: [int8, int4]}}
      eval:   {type: eval, model: "${quant}", tasks: tinyshakespeare}

A stage's settings are its command's arguments and options (stages.py). `${name}` is the path of stage
`name`'s output. Used as a setting's value, a reference to a stage with variants fans the stage out into one
variant per upstream variant (`eval@int8`, `eval@int4`); inside a list it stands for all of them. `matrix`
fans a stage out over its own settings; `after` orders a stage after others without reading their output.
"""

from __future__ import annotations

import copy
import difflib
import graphlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..overrides import apply_override, parse_override, read_mapping
from .stages import STAGE_TYPES

REF = re.compile(r"\$\{\s*([^}\s]*)\s*\}")
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*$")
RESERVED = ("type", "matrix", "after")  # the pipeline's keys in a stage; the rest are the command's settings
TOP_LEVEL = ("name", "dir", "stages", "report")
REPORT_KEYS = ("prompts", "max_tokens")


class PipelineError(ConfigError):
    """A pipeline file that cannot run: the message names the stage and what to change."""


@dataclass(frozen=True)
class Stage:
    name: str  # the variant's name: its stage's name, or NAME@SUFFIX for one of a fan-out
    base: str  # the stage in the file it comes from
    type: str
    settings: dict[str, Any]  # the command's settings; references name variants: ${quant@int8}
    deps: tuple[str, ...]  # the variants it reads (references) or runs after

    @property
    def references(self) -> list[str]:
        return sorted(set(_refs(self.settings)))

    @property
    def directory_name(self) -> str:
        return self.name.replace("@", "-")


@dataclass
class Pipeline:
    name: str
    path: Path
    directory: Path
    stages: dict[str, Stage]  # every variant, in an order that runs each after what it reads
    prompts: list[str] = field(default_factory=list)  # the report's side-by-side generations
    max_tokens: int = 48

    def variants(self, base: str) -> list[str]:
        return [s.name for s in self.stages.values() if s.base == base]


def load_pipeline(path: str | Path, overrides: list[str] = (), directory: str | Path | None = None) -> Pipeline:
    """Read, override (`stages.eval.limit=50`), check and expand a pipeline file."""
    path = Path(path)
    document = read_mapping(path, "pipeline", "a YAML mapping with name and stages")
    for text in overrides:
        apply_override(document, *parse_override(text))
    return build_pipeline(document, path, directory)


def build_pipeline(document: dict, path: Path, directory: str | Path | None = None) -> Pipeline:
    where = str(path)
    unknown = [k for k in document if k not in TOP_LEVEL]
    if unknown:
        raise PipelineError(f"{where}: {unknown[0]}: unknown key{_did_you_mean(unknown[0], TOP_LEVEL)} "
                            f"(expected {', '.join(TOP_LEVEL)})")
    name = document.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise PipelineError(f"{where}: name: give the pipeline a name of letters, digits, - and _")
    stages = document.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise PipelineError(f"{where}: stages: expected a mapping of stage names to their settings")
    for stage_name, spec in stages.items():
        _check_stage(where, str(stage_name), spec)
    order = _order(where, stages)
    expanded: dict[str, Stage] = {}
    for base in order:
        for stage in _expand(base, stages[base], expanded):
            if stage.name in expanded:
                raise PipelineError(f"{where}: stage {base!r}: two variants are both named {stage.name}; give its "
                                    "matrix values that differ in letters and digits")
            expanded[stage.name] = stage
    report = document.get("report") or {}
    if not isinstance(report, dict) or any(k not in REPORT_KEYS for k in report):
        raise PipelineError(f"{where}: report: expected a mapping with {' and '.join(REPORT_KEYS)}")
    prompts = report.get("prompts") or []
    if isinstance(prompts, str):
        prompts = [prompts]
    if not all(isinstance(p, str) for p in prompts):
        raise PipelineError(f"{where}: report.prompts: expected a list of prompts (text)")
    max_tokens = report.get("max_tokens", 48)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise PipelineError(f"{where}: report.max_tokens: expected a whole number of 1 or more")
    out = Path(directory or document.get("dir") or Path("runs") / name)
    return Pipeline(name, path, out, expanded, prompts, max_tokens)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def _check_stage(where: str, name: str, spec: Any) -> None:
    if not NAME.match(name):
        raise PipelineError(f"{where}: stage {name!r}: a stage's name is letters, digits, - and _, starting with a letter")
    if not isinstance(spec, dict) or "type" not in spec:
        raise PipelineError(f"{where}: stage {name!r}: expected a mapping with a type ({', '.join(STAGE_TYPES)})")
    kind = spec["type"]
    if kind not in STAGE_TYPES:
        raise PipelineError(f"{where}: stage {name!r}: unknown type {kind!r}{_did_you_mean(str(kind), STAGE_TYPES)} "
                            f"(expected one of {', '.join(STAGE_TYPES)})")
    matrix = spec.get("matrix")
    if matrix is not None and not (isinstance(matrix, dict) and matrix
                                   and all(isinstance(v, list) and v for v in matrix.values())):
        raise PipelineError(f"{where}: stage {name!r}: matrix: expected a mapping of settings to lists of values")
    after = spec.get("after", [])
    if not isinstance(after, (list, str)):
        raise PipelineError(f"{where}: stage {name!r}: after: expected a stage name or a list of them")


def _order(where: str, stages: dict) -> list[str]:
    """The stages in an order that runs each after every stage it names; a name no stage has, or a cycle, is
    refused."""
    graph: dict[str, set[str]] = {}
    for name, spec in stages.items():
        settings = {k: v for k, v in spec.items() if k not in ("type", "after")}  # matrix values may be references
        after = spec.get("after", [])
        named = [(ref, f"${{{ref}}}") for ref in _refs(settings)]
        named += [(a, f"after: {a}") for a in ([after] if isinstance(after, str) else after)]
        deps = set()
        for ref, shown in named:
            upstream = ref.split("@", 1)[0]
            if upstream not in stages:
                raise PipelineError(f"{where}: stage {name!r} names {shown}, which no stage makes"
                                    f"{_did_you_mean(upstream, list(stages))} (stages: {', '.join(stages)})")
            if upstream == name:
                raise PipelineError(f"{where}: stage {name!r} names its own output ({shown}); a stage reads only "
                                    "what earlier stages make")
            deps.add(upstream)
        graph[name] = deps
    try:
        return list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        cycle = list(reversed(exc.args[1]))
        raise PipelineError(f"{where}: stages form a cycle: {' -> '.join(cycle)}; each stage may read only what "
                            "comes before it") from None


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------
# fan-out
# ---------------------------------------------------------------------------------------------
def _expand(base: str, spec: dict, done: dict[str, Stage]) -> list[Stage]:
    """The variants of stage `base`: one per combination of its matrix values and, within each, of the variants
    of every fanned-out stage it reads in a setting's value (not inside a list, where a reference means all of
    them). A matrix value may itself be a reference (`model: ["${base}", "${quant}"]`)."""
    settings = {k: v for k, v in spec.items() if k not in RESERVED}
    matrix = spec.get("matrix") or {}
    after = spec.get("after", [])
    after = [after] if isinstance(after, str) else after
    after_variants = [s.name for a in after for s in done.values() if s.base == a]
    out = []
    for values in itertools.product(*matrix.values()):
        mine = copy.deepcopy(settings)
        for key, value in zip(matrix, values):
            apply_override(mine, key.split("."), value)
        variants = {b: [s for s in done.values() if s.base == b] for b in {r.split("@", 1)[0] for r in _refs(mine)}}
        for ref in _refs(mine):
            if "@" in ref and ref not in done:
                upstream = ref.split("@", 1)[0]
                raise PipelineError(f"stage {base!r} names ${{{ref}}}, which no stage makes (variants of "
                                    f"{upstream!r}: {', '.join(s.name for s in variants[upstream])})")
        fanned = sorted(b for b in _scalar_refs(mine) if len(variants[b]) > 1)
        for upstream in itertools.product(*(variants[b] for b in fanned)):
            bound = _bind(mine, {b: v.name for b, v in zip(fanned, upstream)}, variants)
            suffix = [_slug(v) for v in values] + [v.name.split("@", 1)[1] for v in upstream]
            name = f"{base}@{'-'.join(suffix)}" if suffix else base
            deps = tuple(dict.fromkeys([*(_refs(bound)), *after_variants]))
            out.append(Stage(name, base, spec["type"], bound, deps))
    return out


def _bind(value: Any, chosen: dict[str, str], variants: dict[str, list[Stage]]) -> Any:
    """References resolved to variants: a fanned-out stage to the variant `chosen`, a stage with one variant to
    it; inside a list, a reference to a stage with several variants becomes one item per variant."""
    if isinstance(value, dict):
        return {k: _bind(v, chosen, variants) for k, v in value.items()}
    if isinstance(value, list):
        items = []
        for item in value:
            if isinstance(item, str) and len(_refs(item)) == 1 and "@" not in _refs(item)[0] \
                    and len(variants[_refs(item)[0]]) > 1 and _refs(item)[0] not in chosen:
                ref = _refs(item)[0]
                items += [item.replace(f"${{{ref}}}", f"${{{s.name}}}") for s in variants[ref]]
            else:
                items.append(_bind(item, chosen, variants))
        return items
    if isinstance(value, str):
        def one(match: re.Match) -> str:
            ref = match.group(1)
            if "@" in ref:
                return match.group(0)
            if ref in chosen:
                return f"${{{chosen[ref]}}}"
            (only, *more) = variants[ref]
            if more:  # two variant references in one list item: name one variant with NAME@SUFFIX
                raise PipelineError(f"${{{ref}}} has variants ({', '.join(s.name for s in variants[ref])}); in this "
                                    f"place name one of them, for example ${{{variants[ref][0].name}}}")
            return f"${{{only.name}}}"
        return REF.sub(one, value)
    return value


def _refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, str):
        return [m.strip() for m in REF.findall(value)]
    return []


def _scalar_refs(value: Any) -> set[str]:
    """The stages referenced outside lists (those fan a stage out)."""
    if isinstance(value, dict):
        return set().union(*(_scalar_refs(v) for v in value.values())) if value else set()
    if isinstance(value, str):
        return {r.split("@", 1)[0] for r in _refs(value) if "@" not in r}
    return set()


def _slug(value: Any) -> str:
    """A matrix value as part of a variant's name: a reference by the stage it names."""
    text = str(value)
    refs = _refs(text) if isinstance(value, str) else []
    if len(refs) == 1 and REF.fullmatch(text.strip()):
        text = refs[0].replace("@", "-")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def resolve(value: Any, outputs: dict[str, str]) -> Any:
    """Settings with every `${variant}` replaced by that variant's output path."""
    if isinstance(value, dict):
        return {k: resolve(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, outputs) for v in value]
    if isinstance(value, str):
        return REF.sub(lambda m: outputs[m.group(1).strip()], value)
    return value
