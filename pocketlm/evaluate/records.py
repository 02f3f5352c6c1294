"""Reading a task's data: examples as JSON records, from a .json list or a .jsonl file."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def read_records(path: Path) -> list[dict]:
    """Records from a .json list or a .jsonl file, with the line of any malformed record named."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{number}: not a JSON record ({e.msg})") from None
    if not records or not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"{path}: expected a list of JSON objects, one per example")
    return records
