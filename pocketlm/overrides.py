"""`key=value` overrides on the command line (`pocketlm train RECIPE train.max_steps=100`, `pocketlm run
PIPELINE stages.eval.limit=50`): a dotted path into a YAML document and a YAML value."""

from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, for example train.max_steps=100")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value
