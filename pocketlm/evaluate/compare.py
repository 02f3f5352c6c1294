"""`pocketlm compare A B ...`: quality, efficiency and generations of several models, side by side.

Each model is measured in its own process (so load time and peak memory are its own): its tasks'
scores, parameters, file size, load time, decode tokens/s, time to first token, peak memory, and its
greedy answers to the same prompts. The report is Markdown with two plots (mean accuracy against
file size and against decode speed, the Pareto front marked), and every run is appended to a
leaderboard JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from ..bench import bench_pocketlm
from ..engine import SamplingParams
from ..errors import ConfigError, PocketLMError
from ..hub import resolve_model
from ..loading import open_model
from ..streaming import generate
from .loaders import resolve_tasks
from .report import PERCENT
from .runner import evaluate

DEFAULT_PROMPTS = ["The capital of France is", "Once upon a time, there was a little robot who"]


def measure_one(model_dir: Path, tasks: list[str], limit: int | None, prompts: list[str], new_tokens: int,
                compile: bool) -> dict:
    """Everything compare reports about one model (run in a fresh process by `compare`)."""
    speed = bench_pocketlm(model_dir, new_tokens=64, prompt_tokens=64, batches=(), repeats=2, compile=compile)
    model, tokenizer = open_model(model_dir)
    document = evaluate(model, tokenizer, tasks, limit=limit, model_dir=model_dir)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    generations = [generate(model, tokenizer, prompt, params).text for prompt in prompts]
    return {
        "name": model_dir.name, "path": str(model_dir), "weights": speed.weights,
        "parameters": document["model"]["parameters"], "file_mb": round(speed.file_mb, 2),
        "load_s": round(speed.load_s, 3), "decode_tokens_per_s": round(speed.decode_tokens_per_s, 2),
        "ttft_ms": round(speed.ttft_ms, 1), "prefill_tokens_per_s": round(speed.prefill_tokens_per_s, 1),
        "peak_rss_mb": round(speed.peak_rss_mb, 1), "threads": speed.threads,
        "results": document["results"], "groups": document["groups"], "generations": generations,
    }


def headline(entry: dict) -> dict[str, float]:
    """One accuracy per task (acc; groups replace their members), for tables and plots."""
    groups = {name for name, g in entry["groups"].items() if g["tasks"] > 1}  # one MMLU subject stays itself
    scores = {name: r["acc"] for name, r in entry["results"].items() if "acc" in r and r.get("group") not in groups}
    scores.update({name: entry["groups"][name]["acc"] for name in groups})
    return scores


def mean_accuracy(entry: dict) -> float:
    scores = headline(entry)
    return sum(scores.values()) / len(scores) if scores else float("nan")


def pareto_front(points: list[tuple[float, float]], lower_x_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (y: higher is better)."""
    def beats(a, b):
        x_ok = a[0] <= b[0] if lower_x_better else a[0] >= b[0]
        return x_ok and a[1] >= b[1] and a != b
    return [i for i, p in enumerate(points) if not any(beats(q, p) for q in points)]


def plot(entries: list[dict], x_key: str, x_label: str, lower_x_better: bool, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(e[x_key], 100 * mean_accuracy(e)) for e in entries]
    front = sorted(pareto_front(points, lower_x_better), key=lambda i: points[i][0])
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for i, (entry, (x, y)) in enumerate(zip(entries, points)):
        ax.scatter([x], [y], s=60, marker="*" if i in front else "o", zorder=3)
        ax.annotate(entry["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="gray", linewidth=1,
            label="Pareto front")
    ax.set_xlabel(x_label)
    ax.set_ylabel("mean accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def report_markdown(entries: list[dict], prompts: list[str], tasks: list[str], limit: int | None) -> str:
    task_names = list(headline(entries[0]))
    lines = [f"# Model comparison ({datetime.date.today().isoformat()})", "",
             f"Tasks: {', '.join(tasks)}" + (f" (first {limit} examples each)" if limit else "") + ".", "",
             "## Quality (acc, %)", "", "| model | " + " | ".join(task_names) + " | mean |",
             "|---|" + "---|" * (len(task_names) + 1)]
    for e in entries:
        scores = headline(e)
        lines.append(f"| {e['label']} | " + " | ".join(f"{100 * scores[t]:.2f}" for t in task_names)
                     + f" | {100 * mean_accuracy(e):.2f} |")
    details = [(name, m) for name, r in entries[0]["results"].items() if not r.get("group")
               for m in ("acc_norm", "word_perplexity", "bits_per_byte", "exact_match_flexible") if m in r]
    if details:
        lines += ["", "| model | " + " | ".join(f"{n} {m}" for n, m in details) + " |", "|---|" + "---|" * len(details)]
        for e in entries:
            cells = [f"{100 * e['results'][n][m]:.2f}" if m in PERCENT else f"{e['results'][n][m]:.4f}" for n, m in details]
            lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    lines += ["", "## Efficiency", "",
              "| model | weights | parameters | file MB | load s | decode tok/s | TTFT ms | prefill tok/s | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['label']} | {e['weights']} | {e['parameters'] / 1e6:.1f}M | {e['file_mb']:.1f} | {e['load_s']:.2f} | "
                     f"{e['decode_tokens_per_s']:.1f} | {e['ttft_ms']:.0f} | {e['prefill_tokens_per_s']:.0f} | {e['peak_rss_mb']:.0f} |")
    lines += ["", f"Decode: batch 1, {entries[0]['threads']} threads. Peak RSS: growth of the measuring process.", "",
              "![accuracy against size](accuracy_vs_size.png)", "", "![accuracy against speed](accuracy_vs_speed.png)", "",
              "## Generations (greedy)", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"**{prompt}**", "", "| model | continuation |", "|---|---|"]
        for e in entries:
            text = e["generations"][i].replace("\n", " ").replace("|", "\\|").strip()
            lines.append(f"| {e['label']} | {text} |")
        lines.append("")
    return "\n".join(lines)


def update_leaderboard(path: Path, entries: list[dict], tasks: list[str], limit: int | None) -> list[dict]:
    """Append this run's entries to the leaderboard JSON (a list of runs) and return all entries."""
    board = json.loads(path.read_text()) if path.exists() else []
    if not isinstance(board, list):
        raise ConfigError(f"{path}: not a pocketlm leaderboard (expected a JSON list)")
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    for e in entries:
        board.append({"date": stamp, "model": e["label"], "path": e["path"], "weights": e["weights"], "tasks": tasks,
                      "limit": limit, "scores": headline(e), "mean_accuracy": mean_accuracy(e),
                      "file_mb": e["file_mb"], "decode_tokens_per_s": e["decode_tokens_per_s"],
                      "ttft_ms": e["ttft_ms"], "peak_rss_mb": e["peak_rss_mb"]})
    path.write_text(json.dumps(board, indent=2))
    return board


def compare(models: list[str], tasks: list[str], out_dir: Path, limit: int | None = None,
            prompts: list[str] | None = None, new_tokens: int = 32, compile: bool = False,
            leaderboard: Path | None = None, progress=None) -> Path:
    """Measure each model in its own process and write report.md, the plots and the leaderboard."""
    if len(models) < 2:
        raise ConfigError("compare needs at least two models")
    resolve_tasks(tasks)  # a bad task name fails now, not after the first model
    paths = [resolve_model(m) for m in models]
    prompts = prompts or DEFAULT_PROMPTS
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for model, path in zip(models, paths):
        if progress:
            progress(model)
        job = {"model": str(path), "tasks": tasks, "limit": limit, "prompts": prompts, "new_tokens": new_tokens,
               "compile": compile}
        proc = subprocess.run([sys.executable, "-m", "pocketlm.evaluate.compare"], input=json.dumps(job),
                              capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            raise PocketLMError(f"measuring {model} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        entry = json.loads(proc.stdout.strip().splitlines()[-1])
        entries.append(entry)
    for model, path, entry in zip(models, paths, entries):
        # a model's directory name, unless two share one; a known name (smollm2-...) as given
        same_name = sum(p.name == path.name for p in paths) > 1
        entry["label"] = model if same_name or not Path(model).exists() else path.name
    (out_dir / "results.json").write_text(json.dumps(entries, indent=2))
    plot(entries, "file_mb", "file size (MB)", True, out_dir / "accuracy_vs_size.png")
    plot(entries, "decode_tokens_per_s", "decode tokens/s (batch 1)", False, out_dir / "accuracy_vs_speed.png")
    report = out_dir / "report.md"
    report.write_text(report_markdown(entries, prompts, tasks, limit) + "\n")
    update_leaderboard(leaderboard or out_dir / "leaderboard.json", entries, tasks, limit)
    return report


def _measure_from_stdin() -> None:
    job = json.loads(sys.stdin.read())
    try:
        entry = measure_one(Path(job["model"]), job["tasks"], job["limit"], job["prompts"], job["new_tokens"], job["compile"])
    except PocketLMError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.exit(1)
    sys.stdout.write("\n" + json.dumps(entry) + "\n")


if __name__ == "__main__":
    _measure_from_stdin()
