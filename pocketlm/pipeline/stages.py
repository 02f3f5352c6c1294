"""The stage types a pipeline can use: each runs one pocketlm command, configured as that command is (its
arguments and options by name), with its output placed under the stage's directory.

A setting `group_size: 64` becomes `--group-size 64`; `true` / `false` become `--flag` / `--no-flag`; a list
repeats the option (or, for a few options such as eval's tasks, joins it with commas). A train stage takes the
recipe and a `set:` mapping of recipe overrides, as `pocketlm train RECIPE key=value ...` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class StageType:
    command: str  # the pocketlm command it runs ("feedback export": a command and its subcommand)
    positional: tuple[str, ...] = ()  # settings given as arguments, in this order (a list spreads out)
    output: str | None = None  # the output's name under the stage directory; None: the path the command prints
    output_flag: str | None = None  # the option that names the output; None: the argument after the positionals
    makes_model: bool = False  # its output is a model directory (or adapter) other stages can load
    joined: tuple[str, ...] = ()  # list settings given as one comma-separated option
    objective: str | None = None  # train aliases: the objective the recipe must train
    about: str = ""
    local: bool = False  # written by the pipeline itself (no command of its own): the serve stage
    writes: tuple[str, ...] = ()  # settings naming files its product writes (the server's log), not inputs

    @property
    def trains(self) -> bool:
        """Its settings are a recipe and `set` overrides, its out_dir the stage's directory."""
        return self.command in ("train", "federate", "distill-cache")


def _train(objective: str | None, about: str) -> StageType:
    return StageType("train", ("recipe",), makes_model=True, objective=objective, about=about)


STAGE_TYPES: dict[str, StageType] = {
    "pull": StageType("pull", ("name",), makes_model=True, about="a known model, into the shared cache"),
    "import": StageType("import", ("src",), "model", makes_model=True, about="a GGUF, Hugging Face or llama2.c model"),
    "prepare": StageType("prepare", ("inputs",), "data", "--out", about="clean, scrub and tokenize text"),
    "split-task": StageType("split-task", ("task",), "split", about="a task's training split and held-out test"),
    "train": _train(None, "any recipe"),
    "pretrain": _train("pretrain", "a pretraining recipe"),
    "distill": _train("distill", "a distillation recipe"),
    "sft": _train("sft", "a supervised fine-tuning recipe (full or an adapter)"),
    "lora": _train("sft", "an SFT recipe with a LoRA adapter"),
    "dpo": _train("dpo", "a DPO recipe"),
    "federate": StageType("federate", ("recipe",), makes_model=True, about="a federated recipe on Flower"),
    "teacher": StageType("distill-cache", ("recipe",), objective="distill",
                         about="a distillation recipe's teacher top-k logits, read by its students"),
    "merge": StageType("merge", ("adapter",), "model", makes_model=True, about="fold a LoRA adapter into its base"),
    "quantize": StageType("quantize", ("model",), "model", makes_model=True, about="int8 or int4 weights"),
    "upcycle": StageType("upcycle", ("model",), "model", makes_model=True, about="a dense model into a mixture"),
    "eval": StageType("eval", ("model",), "results.json", "--output", joined=("tasks",), about="tasks' scores"),
    "bench": StageType("bench", ("model",), "bench.json", "--json", about="load, prefill and decode speed"),
    "export": StageType("export", ("model",), "model.gguf", about="GGUF (llama.cpp) or llama2.c's .bin"),
    "feedback": StageType("feedback export", (), "data", "--out", about="the server's votes as SFT and DPO data"),
    "serve": StageType("serve", (), "serve.yaml", local=True, writes=("database",),
                       about="the models in one A/B experiment (serve.yaml)"),
}
TRAIN_SETTINGS = ("recipe", "set")


def check_settings(name: str, kind: str, settings: dict[str, Any]) -> None:
    """Refuse, before any work, settings a stage's command cannot take."""
    spec = STAGE_TYPES[kind]
    missing = [p for p in spec.positional if settings.get(p) in (None, "", [])]
    if missing:
        raise ConfigError(f"stage {name!r} ({kind}): set {missing[0]}")
    if spec.trains:
        extra = [k for k in settings if k not in TRAIN_SETTINGS]
        if extra:
            raise ConfigError(f"stage {name!r} ({kind}): {extra[0]}: unknown setting; a training stage takes "
                              "recipe and set (recipe overrides, as key: value)")
    if "set" in settings and not isinstance(settings["set"], dict):
        raise ConfigError(f"stage {name!r} ({kind}): set: expected a mapping of recipe keys to values")
    if spec.output is not None and spec.output_flag is not None and _flag_key(spec.output_flag) in settings:
        raise ConfigError(f"stage {name!r} ({kind}): {_flag_key(spec.output_flag)}: the pipeline places the output "
                          "under the stage's directory; leave it out")


def recipe_overrides(settings: dict[str, Any]) -> dict[str, Any]:
    """A training stage's `set` as dotted keys: `set: {train.max_steps: 200}` and the nested form a command-line
    override writes (`stages.model.set.train.max_steps=600` makes `set: {train: {max_steps: 600}}`) both mean
    train.max_steps, and the later one wins."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat.pop(prefix, None)  # re-inserted last: the order the overrides apply in
            flat[prefix] = value

    for key, value in (settings.get("set") or {}).items():
        walk(str(key), value)
    return flat


def recipe_document(name: str, kind: str, settings: dict[str, Any]) -> dict:
    """A training stage's recipe as it will run: the file with the stage's `set` overrides applied; a recipe
    that trains another objective than the stage's type says is refused."""
    from ..overrides import apply_override, read_mapping

    path = Path(settings["recipe"])
    try:
        document = read_mapping(path, "recipe", "a YAML mapping of sections (name, out_dir, data, train, optim, ...)")
    except ConfigError as exc:
        raise ConfigError(f"stage {name!r} ({kind}): {exc}") from None
    for key, value in recipe_overrides(settings).items():
        apply_override(document, key.split("."), value)
    wanted = STAGE_TYPES[kind].objective
    objective = (document.get("train") or {}).get("objective", "pretrain")
    if wanted is not None and objective != wanted:
        raise ConfigError(f"stage {name!r} is a {kind} stage but its recipe {path} trains {objective}; use type: "
                          f"{objective if objective in STAGE_TYPES else 'train'} or another recipe")
    if kind == "lora" and (document.get("adapter") or {}).get("type") != "lora":
        raise ConfigError(f"stage {name!r} is a lora stage but its recipe {path} has no LoRA adapter "
                          "(adapter.type: lora); use type: sft")
    return document


def output_name(kind: str, settings: dict[str, Any]) -> str | None:
    if kind == "export" and settings.get("format") == "llama2c":
        return "model.bin"
    return STAGE_TYPES[kind].output


def command_line(kind: str, settings: dict[str, Any], stage_dir: Path, resume: bool = False) -> list[str]:
    """The pocketlm command (without `pocketlm`) that runs this stage, its settings' references already resolved
    to paths."""
    spec = STAGE_TYPES[kind]
    args: list[str] = spec.command.split()
    for key in spec.positional:
        value = settings[key]
        args += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    if spec.trains:
        args += [f"{key}={json.dumps(value)}" for key, value in recipe_overrides(settings).items()]
        args.append(f"out_dir={json.dumps(str(stage_dir / 'run'))}")
        if kind == "federate":
            args += ["--work", str(stage_dir / "work")]
        if resume:
            args.append("resume=true")
        return args
    out = output_name(kind, settings)
    if out is not None:
        args += [spec.output_flag, str(stage_dir / out)] if spec.output_flag else [str(stage_dir / out)]
    for key, value in settings.items():
        if key in spec.positional or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list) and key in spec.joined:
            args += [flag, ",".join(map(str, value))]
        elif isinstance(value, list):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args


def _flag_key(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
