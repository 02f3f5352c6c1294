"""What the lock file and the report record of each stage's output: a model's size, parameters and training
metrics (from its pocketlm.json), an evaluation's scores, a benchmark's speeds, the feedback export's counts, a
file's size."""

from __future__ import annotations

import json
from pathlib import Path

from .stages import STAGE_TYPES

BENCH_FIELDS = ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms", "load_s", "peak_rss_mb")


def stage_metrics(kind: str, output: Path) -> dict[str, float]:
    try:
        if STAGE_TYPES[kind].makes_model:
            return model_metrics(output)
        if kind == "eval":
            return eval_metrics(json.loads(output.read_text()))
        if kind == "bench":
            first = json.loads(output.read_text())["results"][0]
            return {k: round(float(first[k]), 3) for k in BENCH_FIELDS if first.get(k) is not None}
        if kind == "prepare":
            manifest = json.loads((output / "manifest.json").read_text())
            return {"train_tokens": manifest["tokens"]["train"], "val_tokens": manifest["tokens"]["val"],
                    "documents_kept": manifest["documents"]["kept"], "vocab_size": manifest["vocab_size"]}
        if kind == "feedback":  # requests, votes, arena votes, and the SFT examples and DPO pairs they made
            counts = json.loads((output / "counts.json").read_text())
            return {k: v for k, v in counts.items() if isinstance(v, int)}
        if output.is_file():
            return {"size_mb": round(output.stat().st_size / 2**20, 2)}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass  # an output without what we read leaves its metrics empty, never fails a finished stage
    return {}


def model_metrics(path: Path) -> dict[str, float]:
    """Weights on disk (MB), parameters, and the numbers its pocketlm.json records (training losses, steps)."""
    metrics: dict[str, float] = {}
    weights = sorted(path.glob("*.safetensors"))
    if weights:
        metrics["size_mb"] = round(sum(w.stat().st_size for w in weights) / 2**20, 2)
    try:
        record = json.loads((path / "pocketlm.json").read_text())
    except (OSError, ValueError):
        return metrics
    if isinstance(record.get("parameters"), int):
        metrics["parameters"] = record["parameters"]
    for key, value in (record.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = round(float(value), 4)
    return metrics


def eval_metrics(document: dict) -> dict[str, float]:
    """TASK.METRIC for every score (standard errors, counts and timings left out)."""
    out = {}
    for task, scores in (document.get("results") or {}).items():
        for metric, value in scores.items():
            if metric.endswith("stderr") or metric in ("n", "num_fewshot", "seconds") or isinstance(value, bool):
                continue
            if isinstance(value, float):  # scores; whole numbers are the task's settings (tokens, window)
                out[f"{task}.{metric}"] = round(value, 5)
    return out
