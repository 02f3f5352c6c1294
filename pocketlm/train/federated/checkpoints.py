"""The server's round checkpoints: after each round, the global weights, the strategy's state and the round
number, so that a run whose SuperLink died resumes at the next round (a restarted SuperLink marks the old run
failed; the launcher submits it again and the ServerApp starts from here).

    WORK/rounds/round-0003.safetensors   weights (+ FedAdam's m_t, v_t); metadata: the round
    WORK/rounds/latest                   the name of the newest one, replaced atomically after it is written
    WORK/rounds/log.jsonl                one record per round (clients that replied, losses, bytes, seconds)

Round 0 is the starting point `federate` writes before the processes start.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from ...fsio import atomic_write, atomic_write_text

LATEST = "latest"


def rounds_dir(work: str | Path) -> Path:
    return Path(work) / "rounds"


def save_round(work: str | Path, round_: int, weights: np.ndarray, state: dict[str, np.ndarray] | None = None,
               keep: int = 2) -> Path:
    root = rounds_dir(work)
    path = root / f"round-{round_:04d}.safetensors"
    tensors = {"weights": np.ascontiguousarray(weights, dtype=np.float32),
               **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in (state or {}).items()}}
    atomic_write(path, lambda f: f.write(save(tensors, metadata={"round": str(round_)})))
    atomic_write_text(root / LATEST, path.name)
    for old in sorted(root.glob("round-*.safetensors"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def latest_round(work: str | Path) -> tuple[int, np.ndarray, dict[str, np.ndarray]]:
    """(round, global weights, strategy state) of the newest checkpoint."""
    root = rounds_dir(work)
    name = (root / LATEST).read_text().strip()
    tensors = load_file(str(root / name))
    weights = tensors.pop("weights")
    return int(name.removeprefix("round-").removesuffix(".safetensors")), weights, tensors


def append_log(work: str | Path, record: dict) -> None:
    with open(rounds_dir(work) / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_log(work: str | Path) -> list[dict]:
    path = rounds_dir(work) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
