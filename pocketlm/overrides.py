"""YAML documents given on the command line: reading one that must be a mapping, and `key=value` overrides
(`pocketlm train RECIPE train.max_steps=100`, `pocketlm run PIPELINE stages.eval.limit=50`): a dotted path into
the document and a YAML value."""

from __future__ import annotations

from pathlib import Path
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


def read_mapping(path: str | Path, what: str, shape: str) -> dict:
    """The YAML mapping in `path`; a missing file, bad YAML or another shape is one line (`a WHAT is SHAPE`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what} file")
    try:
        document = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: a {what} is {shape}")
    return document
