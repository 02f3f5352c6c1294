"""The pipeline's report: DIR/report.md and a self-contained DIR/report.html (plots embedded) with a table per
stage (time, memory, size, metrics), the lineage from the data to each model, quality against size and against
speed with the Pareto front across the models, sample generations side by side, and links to the model cards.
Rewritten only when the lock file or the report's settings changed."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..fsio import atomic_write_text
from .hashing import digest
from .spec import Pipeline
from .stages import STAGE_TYPES

LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss")
QUALITY_ORDER = ("acc_norm", "acc", "exact_match", "contains", "word_perplexity", "token_perplexity", "bits_per_byte")


@dataclass
class ModelRow:
    name: str  # the stage variant that made it
    path: str
    metrics: dict = field(default_factory=dict)  # its own (size, parameters, training) and its evaluations'
    lineage: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


def write_report(pipeline: Pipeline, lock: dict, progress=None) -> Path:
    directory = pipeline.directory
    md_path, html_path = directory / "report.md", directory / "report.html"
    key = digest({"stages": {n: {k: e.get(k) for k in ("key", "output_hash", "metrics", "wall_s", "peak_rss_mb")}
                             for n, e in lock["stages"].items()},
                  "prompts": pipeline.prompts, "max_tokens": pipeline.max_tokens, "version": __version__})
    key_path = directory / ".cache" / "report.key"
    if md_path.is_file() and html_path.is_file() and key_path.is_file() and key_path.read_text() == key:
        return md_path
    if progress:
        progress("report", "start", {"reason": "the stages' records changed", "command": ""})
    models = collect_models(pipeline, lock)
    if pipeline.prompts:
        add_samples(pipeline, models, lock)
    quality = quality_metric(models)
    plots = {}
    if quality:
        plots = {axis: plot(models, quality, axis) for axis in ("size_mb", "decode_tokens_per_s")
                 if sum(axis in m.metrics and quality in m.metrics for m in models) >= 1}
    for axis, png in plots.items():
        if png:
            (directory / f"report-{axis}.png").write_bytes(png)
    atomic_write_text(md_path, markdown(pipeline, lock, models, quality, plots))
    atomic_write_text(html_path, page(pipeline, lock, models, quality, plots))
    atomic_write_text(key_path, key)
    if progress:
        progress("report", "done", {"status": "ran"})
    return md_path


def collect_models(pipeline: Pipeline, lock: dict) -> list[ModelRow]:
    """Every model a stage made, with the scores and speeds of the eval and bench stages that read it."""
    stages = lock["stages"]
    models = {}
    for name, stage in pipeline.stages.items():
        entry = stages.get(name)
        if entry and STAGE_TYPES[stage.type].makes_model:
            models[name] = ModelRow(name, entry["output"], dict(entry.get("metrics") or {}), lineage(pipeline, name))
    for name, stage in pipeline.stages.items():
        entry = stages.get(name)
        if entry and stage.type in ("eval", "bench"):
            for ref in stage.references:
                if ref in models:
                    models[ref].metrics.update(entry.get("metrics") or {})
    return list(models.values())


def lineage(pipeline: Pipeline, name: str) -> list[str]:
    """Every stage `name` comes from, grouped by depth: ["base, data", "sft", "quant@int8"] for a model
    trained from a pulled base on prepared data, then quantized (stages of one depth in pipeline order)."""
    depth: dict[str, int] = {}

    def visit(stage: str) -> int:
        if stage not in depth:
            reads = [d for d in pipeline.stages[stage].references if d in pipeline.stages]
            depth[stage] = 1 + max((visit(d) for d in reads), default=-1)
        return depth[stage]

    visit(name)
    levels = [[s for s in pipeline.stages if depth.get(s) == level] for level in range(depth[name] + 1)]
    return [", ".join(level) for level in levels if level]


def quality_metric(models: list[ModelRow]) -> str | None:
    """The score the plots use: the first task's accuracy where there is one, else its perplexity."""
    keys = {k for m in models for k in m.metrics if "." in k}
    for wanted in QUALITY_ORDER:
        found = sorted(k for k in keys if k.endswith("." + wanted))
        if found:
            return found[0]
    return None


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def pareto(points: list[tuple[float, float, str]], cost_lower: bool, quality_lower: bool) -> list[str]:
    """The names no other point beats on both axes (cost: size, lower better; or speed, higher better)."""
    def better_or_equal(a, b, lower):
        return a <= b if lower else a >= b

    front = []
    for x, y, name in points:
        dominated = any(better_or_equal(x2, x, cost_lower) and better_or_equal(y2, y, quality_lower)
                        and (x2, y2) != (x, y) for x2, y2, _ in points)
        if not dominated:
            front.append(name)
    return front


def plot(models: list[ModelRow], quality: str, axis: str) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(m.metrics[axis], m.metrics[quality], m.name) for m in models if axis in m.metrics and quality in m.metrics]
    if not points:
        return None
    front = set(pareto(points, axis == "size_mb", lower_is_better(quality)))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for x, y, name in points:
        ax.scatter([x], [y], color="tab:red" if name in front else "tab:blue", zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    line = sorted((x, y) for x, y, n in points if n in front)
    if len(line) > 1:
        ax.plot(*zip(*line), color="tab:red", linestyle="--", linewidth=1, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel({"size_mb": "weights on disk (MB)", "decode_tokens_per_s": "decode tokens/s (batch 1)"}[axis])
    ax.set_ylabel(quality + (" (lower is better)" if lower_is_better(quality) else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def add_samples(pipeline: Pipeline, models: list[ModelRow], lock: dict) -> None:
    """Greedy continuations of the report's prompts by every model, remembered by the model's output hash."""
    cache_path = pipeline.directory / ".cache" / "samples.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    for model in models:
        wanted = digest({"model": model.path, "prompts": pipeline.prompts, "max_tokens": pipeline.max_tokens,
                         "hash": lock["stages"][model.name].get("output_hash")})
        if cache.get(model.name, {}).get("key") != wanted:
            cache[model.name] = {"key": wanted, "samples": generate_samples(model.path, pipeline.prompts,
                                                                            pipeline.max_tokens)}
        model.samples = cache[model.name]["samples"]
    atomic_write_text(cache_path, json.dumps(cache, indent=1))


def generate_samples(path: str, prompts: list[str], max_tokens: int) -> list[str]:
    from ..engine import SamplingParams
    from ..loading import open_model
    from ..streaming import chat_prompt, generate

    model, tokenizer = open_model(path)
    params = SamplingParams(max_new_tokens=max_tokens)
    out = []
    for prompt in prompts:
        source = chat_prompt(tokenizer, [{"role": "user", "content": prompt}]) if tokenizer.chat_template else prompt
        out.append(generate(model, tokenizer, source, params).text)
    return out


# ---------------------------------------------------------------------------------------------
# Markdown and HTML
# ---------------------------------------------------------------------------------------------
def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def stage_rows(pipeline: Pipeline, lock: dict) -> list[list[str]]:
    rows = []
    for name, stage in pipeline.stages.items():
        entry = lock["stages"].get(name)
        if entry is None:
            rows.append([name, stage.type, "not run", "", "", "", ""])
            continue
        metrics = dict(entry.get("metrics") or {})
        size = metrics.pop("size_mb", None)
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in list(metrics.items())[:6])
        rows.append([name, stage.type, entry.get("finished", ""), f"{entry.get('wall_s', 0):.1f}",
                     f"{entry.get('peak_rss_mb', 0):.0f}", "" if size is None else _fmt(size), shown])
    return rows


STAGE_HEADER = ["stage", "type", "finished", "wall s", "peak MB", "size MB", "metrics"]


def model_rows(models: list[ModelRow], quality: str | None) -> tuple[list[str], list[list[str]]]:
    header = ["model", "lineage", "parameters", "size MB", *([quality] if quality else []), "decode tok/s", "card"]
    rows = []
    for m in models:
        card = Path(m.path) / "README.md"
        rows.append([m.name, " → ".join(m.lineage), _fmt(m.metrics.get("parameters", "")),
                     _fmt(m.metrics.get("size_mb", "")), *([_fmt(m.metrics.get(quality, ""))] if quality else []),
                     _fmt(m.metrics.get("decode_tokens_per_s", "")), str(card) if card.is_file() else ""])
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)]


def markdown(pipeline: Pipeline, lock: dict, models: list[ModelRow], quality: str | None, plots: dict) -> str:
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# Pipeline {pipeline.name}", "",
             f"{pipeline.path} · pocketlm {__version__} · {_machine()} · written {when}", "", "## Stages", ""]
    lines += _md_table(STAGE_HEADER, stage_rows(pipeline, lock))
    total = sum(e.get("wall_s", 0) for e in lock["stages"].values())
    lines += ["", f"Total stage time {total:.1f} s (each stage's last run).", ""]
    for name, stage in pipeline.stages.items():
        if stage.type == "serve" and name in lock["stages"]:
            lines += [f"Serve {name}: `{' '.join(lock['stages'][name]['command'])}`", ""]
    if models:
        header, rows = model_rows(models, quality)
        lines += ["## Models", ""] + _md_table(header, [[r[0], r[1], *r[2:-1], f"[README]({r[-1]})" if r[-1] else ""]
                                                         for r in rows]) + [""]
    for axis, png in plots.items():
        if png:
            title = "size" if axis == "size_mb" else "speed"
            lines += [f"## Quality against {title}", "", f"![{quality} against {title}](report-{axis}.png)", "",
                      "Red points are the Pareto front: no other model is better on both axes.", ""]
    if pipeline.prompts and models:
        lines += ["## Samples", ""]
        for i, prompt in enumerate(pipeline.prompts):
            lines += [f"Prompt: `{prompt}`", ""]
            lines += _md_table(["model", "continuation"], [[m.name, m.samples[i] if i < len(m.samples) else ""]
                                                           for m in models]) + [""]
    return "\n".join(lines) + "\n"


def _html_table(header: list[str], rows: list[list[str]], raw_last: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = ""
    for row in rows:
        cells = [html.escape(str(c)) for c in row]
        if raw_last:
            cells[-1] = row[-1]
        body += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
         "table{border-collapse:collapse;margin:0.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:4px 8px;"
         "text-align:left;vertical-align:top;font-size:0.9rem}th{background:#f3f3f3}code,pre{background:#f6f6f6}"
         "td pre{white-space:pre-wrap;margin:0}")


def page(pipeline: Pipeline, lock: dict, models: list[ModelRow], quality: str | None, plots: dict) -> str:
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    parts = [f"<h1>Pipeline {html.escape(pipeline.name)}</h1>",
             f"<p>{html.escape(str(pipeline.path))} · pocketlm {__version__} · {html.escape(_machine())} · "
             f"written {when}</p>", "<h2>Stages</h2>", _html_table(STAGE_HEADER, stage_rows(pipeline, lock))]
    if models:
        header, rows = model_rows(models, quality)
        linked = [[*r[:-1], f'<a href="file://{html.escape(r[-1])}">README</a>' if r[-1] else ""] for r in rows]
        parts += ["<h2>Models</h2>", _html_table(header, linked, raw_last=True)]
    for axis, png in plots.items():
        if png:
            title = "size" if axis == "size_mb" else "speed"
            parts += [f"<h2>Quality against {title}</h2>",
                      f'<img alt="{html.escape(str(quality))} against {title}" '
                      f'src="data:image/png;base64,{base64.b64encode(png).decode()}">',
                      "<p>Red points are the Pareto front: no other model is better on both axes.</p>"]
    if pipeline.prompts and models:
        parts.append("<h2>Samples</h2>")
        for i, prompt in enumerate(pipeline.prompts):
            rows = [[m.name, f"<pre>{html.escape(m.samples[i] if i < len(m.samples) else '')}</pre>"] for m in models]
            parts += [f"<p>Prompt: <code>{html.escape(prompt)}</code></p>",
                      _html_table(["model", "continuation"], rows, raw_last=True)]
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>Pipeline {html.escape(pipeline.name)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
