"""The dashboard's list of pipeline runs: every folder under the serve config's `pipelines:` that holds a
pipeline.lock (`pocketlm run`), with its report. Read from the files alone: serving imports nothing of the
pipeline layer above it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def pipeline_runs(root: str | Path | None) -> list[dict[str, Any]]:
    """[{run, pipeline, stages, finished, wall_s, report}] for each run folder, the latest first."""
    if root is None or not Path(root).is_dir():
        return []
    runs = []
    for folder in sorted(p for p in Path(root).iterdir() if (p / "pipeline.lock").is_file()):
        try:
            lock = json.loads((folder / "pipeline.lock").read_text())
            stages = lock.get("stages") or {}
        except (OSError, ValueError, AttributeError):
            continue  # a lock being rewritten, or not one of ours: left out of the list, never an error
        runs.append({"run": folder.name, "pipeline": lock.get("pipeline", folder.name), "stages": len(stages),
                     "finished": max((s.get("finished", "") for s in stages.values()), default=""),
                     "wall_s": round(sum(s.get("wall_s", 0) for s in stages.values()), 1),
                     "report": (folder / "report.html").is_file()})
    return sorted(runs, key=lambda r: r["finished"], reverse=True)


def report_path(root: str | Path | None, run: str) -> Path | None:
    """The report.html of run folder `run` (a name the listing gave, never a path), or None."""
    known = {r["run"] for r in pipeline_runs(root) if r["report"]}
    return Path(root) / run / "report.html" if run in known else None
