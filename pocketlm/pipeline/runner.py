"""Running a pipeline: each stage whose key changed runs its own command in a process of its own; the others are
skipped. A stage's key is a hash of everything it depends on: its type and settings, the files it names, the
outputs of the stages it reads, and pocketlm's version. The lock file (DIR/pipeline.lock) records per stage its
key, output and output hash, metrics, wall time and peak memory; it is rewritten after every stage, so a run
stopped midway keeps what finished, and a training stage stopped midway resumes from its last checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..datasets import is_dataset_ref, ref_sha256
from ..errors import PocketLMError
from ..fsio import atomic_write_text
from .hashing import HashCache, digest
from .metrics import stage_metrics
from .spec import Pipeline, PipelineError, Stage, resolve
from .stages import STAGE_TYPES, check_settings, command_line, output_name, recipe_document

LOCK = "pipeline.lock"


class StageFailed(PocketLMError):
    """A stage's command exited with an error; its log says why."""


@dataclass
class StageResult:
    name: str
    status: str  # "ran", "cached", "would run", "up to date" (dry run)
    reason: str = ""  # why it ran (or would)
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    output: str | None = None


@dataclass
class RunResult:
    pipeline: Pipeline
    stages: list[StageResult] = field(default_factory=list)
    report: Path | None = None

    @property
    def ran(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "ran"]


Progress = Callable[[str, str, dict], None]  # (stage, event: start | running | done, details)


def read_lock(directory: Path) -> dict:
    try:
        return json.loads((directory / LOCK).read_text())
    except (OSError, ValueError):
        return {"stages": {}}


def check_pipeline(pipeline: Pipeline, force: list[str] = (), only: list[str] = ()) -> None:
    """Everything that can be refused before any work: stage names given to --force or --only, each stage's
    settings, its recipe, the named datasets it reads. One line, naming the pipeline file."""
    try:
        for option, names in (("--force", force), ("--only", only)):
            for name in names:
                if name not in pipeline.stages and not pipeline.variants(name):
                    raise PipelineError(f"{option} {name}: no such stage (stages: {', '.join(pipeline.stages)})")
        for stage in pipeline.stages.values():
            check_settings(stage.name, stage.type, stage.settings)
            named = stage.settings
            if STAGE_TYPES[stage.type].trains:
                named = [named, recipe_document(stage.name, stage.type, stage.settings)]
            for ref in sorted(_named(named, is_dataset_ref)):
                try:
                    ref_sha256(ref)
                except PocketLMError as exc:
                    raise PipelineError(f"stage {stage.name!r}: {exc}") from None
    except PocketLMError as exc:
        raise PipelineError(f"{pipeline.path}: {exc}") from None


def run_pipeline(pipeline: Pipeline, force: list[str] = (), dry_run: bool = False,
                 progress: Progress | None = None, only: list[str] = ()) -> RunResult:
    """Run what changed, in order; return what ran, what was skipped and why. `force` names stages (or variants)
    to run even when their key is unchanged; `only` names the stages wanted, which run with the stages they read
    and nothing else (as `dvc repro TARGET`), and then no report is written, since the rest may be out of date."""
    progress = progress or (lambda *_: None)
    check_pipeline(pipeline, force, only)
    wanted = upstream_of(pipeline, only) if only else None
    directory = pipeline.directory
    lock = read_lock(directory)
    hashes = HashCache(directory / ".cache" / "hashes.json")
    result = RunResult(pipeline)
    outputs: dict[str, str] = {}  # variant -> output path, for the stages after it
    output_hashes: dict[str, str | None] = {}  # None: will change in this (dry) run
    try:
        for stage in pipeline.stages.values():
            if wanted is not None and stage.name not in wanted:
                continue
            entry = lock["stages"].get(stage.name)
            pending = [d for d in stage.deps if output_hashes.get(d) is None]
            if pending:  # dry run: an upstream stage would run first, so this one's inputs change too
                result.stages.append(StageResult(stage.name, "would run", f"{pending[0]} runs before it"))
                output_hashes[stage.name] = None
                outputs[stage.name] = str(directory / stage.directory_name / "(not yet made)")
                continue
            parts = key_parts(stage, {d: output_hashes[d] for d in stage.deps}, hashes)
            key = digest(parts)
            reason = _why(stage, key, parts, entry, force, hashes)
            if reason is None:
                outputs[stage.name], output_hashes[stage.name] = entry["output"], entry["output_hash"]
                result.stages.append(StageResult(stage.name, "up to date" if dry_run else "cached",
                                                 output=entry["output"]))
                progress(stage.name, "done", {"status": "cached"})
                continue
            if dry_run:
                result.stages.append(StageResult(stage.name, "would run", reason))
                output_hashes[stage.name] = None
                outputs[stage.name] = str(directory / stage.directory_name / "(not yet made)")
                continue
            settings = resolve(stage.settings, outputs)
            done = _execute(stage, settings, key, directory, progress, reason)
            done_hash = hashes.of(done.output)
            outputs[stage.name], output_hashes[stage.name] = done.output, done_hash
            lock["stages"][stage.name] = {
                "key": key, "type": stage.type, "parts": parts, "deps": list(stage.deps),
                "command": ["pocketlm", *done.command], "output": done.output, "output_hash": done_hash,
                "metrics": stage_metrics(stage.type, Path(done.output)), "wall_s": round(done.wall_s, 2),
                "peak_rss_mb": round(done.peak_rss_mb, 1),
                "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            lock["pipeline"] = pipeline.name
            _write_lock(directory, lock)
            hashes.save()
            result.stages.append(StageResult(stage.name, "ran", reason, done.wall_s, done.peak_rss_mb, done.output))
    finally:
        hashes.save()
    if not dry_run and wanted is None:
        stale = [n for n in lock["stages"] if n not in pipeline.stages]
        for name in stale:  # a stage taken out of the file (or a variant out of a matrix) leaves the report
            del lock["stages"][name]
        if stale:
            _write_lock(directory, lock)
        from .report import write_report  # plots and samples: only when something is reported

        result.report = write_report(pipeline, lock, progress)
    return result


def upstream_of(pipeline: Pipeline, names: list[str]) -> set[str]:
    """The variants named (a stage's name stands for all its variants) and every variant they read, directly or
    through others."""
    todo = [v for name in names for v in ([name] if name in pipeline.stages else pipeline.variants(name))]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(pipeline.stages[name].deps)
    return seen


def key_parts(stage: Stage, upstream: dict[str, str], hashes: HashCache) -> dict[str, Any]:
    """Everything a stage's output depends on."""
    kind = STAGE_TYPES[stage.type]
    named = {k: v for k, v in stage.settings.items() if k not in kind.writes}  # what it writes is not an input
    if kind.trains:
        named = {"settings": stage.settings, "recipe": recipe_document(stage.name, stage.type, stage.settings)}
    inputs = {ref: ref_sha256(ref) for ref in _named(named, is_dataset_ref)}  # the published bytes' hash
    inputs.update({p: hashes.of(p) for p in _named(named, _is_local_path)})
    return {"type": stage.type, "settings": stage.settings, "upstream": upstream, "inputs": dict(sorted(inputs.items())),
            "version": __version__}


def _named(value: Any, wanted: Callable[[str], bool]) -> set[str]:
    """The strings among a stage's settings (and its recipe's, but for its out_dir) that `wanted` picks."""
    if isinstance(value, dict):
        return set().union(set(), *(_named(v, wanted) for k, v in value.items() if k != "out_dir"))
    if isinstance(value, list):
        return set().union(set(), *(_named(v, wanted) for v in value))
    return {value} if isinstance(value, str) and wanted(value) else set()


def _is_local_path(value: str) -> bool:
    """A file or folder here (a reference to a stage's output is keyed by that stage's output hash instead)."""
    if "${" not in value and value and len(value) < 4096 and not is_dataset_ref(value):
        try:
            return Path(value).exists()
        except OSError:
            pass
    return False


def _why(stage: Stage, key: str, parts: dict, entry: dict | None, force, hashes: HashCache) -> str | None:
    """Why the stage must run, or None when its recorded output is still what its key says."""
    if stage.name in force or stage.base in force:
        return "--force"
    if entry is None:
        return "no earlier run"
    if entry.get("key") != key:
        old = entry.get("parts", {})
        if old.get("version") != parts["version"]:
            return f"pocketlm {old.get('version')} -> {parts['version']}"
        changed = _changed_keys(old.get("settings", {}), parts["settings"])
        if changed:
            return f"settings changed: {', '.join(changed)}"
        changed = [u for u in parts["upstream"] if old.get("upstream", {}).get(u) != parts["upstream"][u]]
        if changed:
            return f"{', '.join(changed)} changed"
        changed = sorted(p for p in set(old.get("inputs", {})) | set(parts["inputs"])
                         if old.get("inputs", {}).get(p) != parts["inputs"].get(p))
        if changed:
            return f"input changed: {', '.join(changed)}"
        return "its recipe changed"
    if hashes.of(entry["output"]) != entry["output_hash"]:
        return f"its output {entry['output']} was changed or removed"
    return None


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ (set.train.max_steps, not just set)."""
    changed = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


@dataclass
class _Done:
    command: list[str]
    output: str
    wall_s: float
    peak_rss_mb: float


def _execute(stage: Stage, settings: dict, key: str, directory: Path, progress: Progress, reason: str) -> _Done:
    """Run the stage's command in its own process (its stdout and stderr to files in the stage directory) and wait,
    reporting the log's last line; a training stage stopped earlier with the same key resumes."""
    stage_dir = (directory / stage.directory_name).resolve()
    meta_path = stage_dir / "stage.json"
    resume = False
    if STAGE_TYPES[stage.type].command in ("train", "federate"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        resume = meta.get("key") == key and any((stage_dir / "run" / "checkpoints").glob("step-*"))
    if not resume:
        shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta_path, json.dumps({"key": key, "status": "running"}))
    log_path, stdout_path = stage_dir / "stage.log", stage_dir / "stdout.txt"
    if STAGE_TYPES[stage.type].local:
        return _execute_here(stage, settings, key, stage_dir, progress, reason)
    args = command_line(stage.type, settings, stage_dir, resume=resume)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    progress(stage.name, "start", {"reason": reason + ("; resuming from its last checkpoint" if resume else ""),
                                   "command": "pocketlm " + " ".join(args)})
    started = time.perf_counter()
    with open(log_path, "ab") as log, open(stdout_path, "wb") as stdout:
        child = subprocess.Popen([sys.executable, "-m", "pocketlm", *args], stdout=stdout, stderr=log, env=env,
                                 start_new_session=True)  # its own group: stopping the run stops all it started
        status, usage = _wait(child, stage.name, log_path, started, progress)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise StageFailed(f"stage {stage.name} failed (exit {code}): {_last_line(log_path) or 'no message'} "
                          f"(whole log: {log_path})")
    name = output_name(stage.type, settings)
    if name is None:
        printed = [line for line in stdout_path.read_text().splitlines() if line.strip()]
        output = printed[-1].strip() if printed else ""
    else:
        output = str(stage_dir / name)
    if not output or not Path(output).exists():
        raise StageFailed(f"stage {stage.name}: its command finished but left no output ({output or 'nothing printed'})")
    atomic_write_text(meta_path, json.dumps({"key": key, "status": "done"}))
    peak = usage.ru_maxrss / 1024  # kilobytes on Linux: the largest of the process and what it waited for
    progress(stage.name, "done", {"status": "ran", "wall_s": wall, "peak_rss_mb": peak})
    return _Done(args, output, wall, peak)


def _execute_here(stage: Stage, settings: dict, key: str, stage_dir: Path, progress: Progress, reason: str) -> _Done:
    """A stage the pipeline writes itself (the serve stage's serve.yaml)."""
    import resource

    from .serving import write_serve_config

    progress(stage.name, "start", {"reason": reason, "command": ""})
    started = time.perf_counter()
    output = write_serve_config(settings, stage_dir / output_name(stage.type, settings))
    wall = time.perf_counter() - started
    (stage_dir / "stage.log").write_text(f"wrote {output}; start it with: pocketlm serve --config {output}\n")
    atomic_write_text(stage_dir / "stage.json", json.dumps({"key": key, "status": "done"}))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    progress(stage.name, "done", {"status": "ran", "wall_s": wall, "peak_rss_mb": peak})
    return _Done(["serve", "--config", str(output)], str(output), wall, peak)


def _wait(child: subprocess.Popen, name: str, log_path: Path, started: float, progress: Progress):
    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum, frame):  # a stopped run stops its stage too; its checkpoints stay for the next run
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: the caller handles stopping
        previous = None
    try:
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                child.returncode = os.waitstatus_to_exitcode(status)
                return status, usage
            progress(name, "running", {"elapsed": time.perf_counter() - started, "line": _last_line(log_path)})
            time.sleep(0.2)
    except KeyboardInterrupt:
        try:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(child.pid, signal.SIGKILL)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _last_line(path: Path, size: int = 4096) -> str:
    """The log's last line with text (progress bars redraw with carriage returns: the last redraw)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.split("\r")[-1].strip() for line in tail.splitlines()]
    lines = [line for line in lines if line and not line.startswith("Traceback")]
    return lines[-1].removeprefix("error: ") if lines else ""


def _write_lock(directory: Path, lock: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / LOCK, json.dumps(lock, indent=2, sort_keys=True) + "\n")
