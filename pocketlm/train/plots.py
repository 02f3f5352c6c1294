"""The loss curve of a run, and a mixture of experts' expert usage, drawn from its log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _records(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]


def plot_loss_curve(log_path: Path, out_png: Path) -> Path | None:
    records = _records(log_path)
    if not records:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train", linewidth=1)
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(log_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def plot_expert_usage(log_path: Path, out_png: Path) -> Path | None:
    """Left, each MoE layer's busiest expert over the steps (its share of the top-k choices over an even share:
    1 is balanced); right, the last logged step's shares, layer by expert. None for a run without experts."""
    records = [r for r in _records(log_path) if "expert_share" in r]
    if not records:
        return None
    plt = _pyplot()
    steps, last = [r["step"] for r in records], records[-1]["expert_share"]
    experts = len(last[0])
    fig, (lines, grid) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for layer in range(len(last)):
        lines.plot(steps, [max(r["expert_share"][layer]) * experts for r in records], label=f"layer {layer}",
                   linewidth=1)
    lines.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    lines.set_xlabel("step")
    lines.set_ylabel("busiest expert's share / even share")
    lines.set_title(Path(log_path).parent.name)
    lines.grid(alpha=0.3)
    lines.legend(fontsize="small", ncol=1 + len(last) // 9)
    image = grid.imshow(last, aspect="auto", cmap="viridis", vmin=0)
    if experts <= 16:  # a tick per expert and layer while they fit
        grid.set_xticks(range(experts))
        grid.set_yticks(range(len(last)))
    grid.set_xlabel("expert")
    grid.set_ylabel("MoE layer")
    grid.set_title(f"share of top-k choices, step {steps[-1]}")
    fig.colorbar(image, ax=grid)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
