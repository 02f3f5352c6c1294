"""Results as text: the table `pocketlm eval` prints and the compare report reuses."""

from __future__ import annotations

# the metrics shown per task kind, in order
SHOWN = ("acc", "acc_norm", "exact_match_strict", "exact_match_flexible", "exact_match", "strict_found",
         "word_perplexity", "token_perplexity", "bits_per_byte")
PERCENT = ("acc", "acc_norm", "exact_match_strict", "exact_match_flexible", "exact_match", "strict_found",
           "acc_subject_mean")


def format_value(metric: str, value: float) -> str:
    return f"{100 * value:.2f}" if metric in PERCENT else f"{value:.4f}"


def results_table(document: dict, show_members: bool = False) -> str:
    """A Markdown table: task, metric, value (± standard error), examples, seconds. Group members
    (the 57 MMLU subjects) are folded into their group's row unless `show_members`."""
    groups = {name for name, g in document["groups"].items() if g["tasks"] > 1}  # one MMLU subject stays itself
    grouped = {name for name, r in document["results"].items() if r.get("group") in groups}
    lines = ["| task | metric | value | ± | n | s |", "|---|---|---|---|---|---|"]
    for name, r in document["results"].items():
        if name in grouped and not show_members:
            continue
        for metric in SHOWN:
            if metric in r:
                err = r.get(f"{metric}_stderr")
                err_text = format_value(metric, err) if err is not None else ""
                lines.append(f"| {name} | {metric} | {format_value(metric, r[metric])} | {err_text} | "
                             f"{r.get('n', r.get('tokens', ''))} | {r['seconds']:.0f} |")
    for name in groups:
        g = document["groups"][name]
        for metric in ("acc", "acc_norm", "acc_subject_mean"):
            lines.append(f"| {name} ({g['tasks']} tasks) | {metric} | {format_value(metric, g[metric])} | | {g['n']} | "
                         f"{g['seconds']:.0f} |")
    return "\n".join(lines)
