"""The feedback loop's first step: the server's thumbs and arena votes as training data (`pocketlm feedback
export`).

- SFT examples: every answer whose latest vote is a thumbs-up, and every arena winner.
- DPO pairs: each arena vote with a winner (the winner's answer chosen, the loser's rejected), and each
  thumbs-up answer against each thumbs-down answer to the same prompt.

Chat requests become chat records (the model's template is applied when training on them), completions plain
prompt / completion records, in the formats `pocketlm train` reads (train/instruct.py). The server logs the text
only with `log_prompts: true`; a chat's turns are logged joined, so a conversation becomes one user turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from ..errors import ConfigError
from ..fsio import atomic_write_text
from .report import connect, latest_votes, load_requests
from .store import arena_table


@dataclass
class FeedbackData:
    sft: list[dict[str, Any]] = field(default_factory=list)
    dpo: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def _prompt(row: dict) -> Any:
    return [{"role": "user", "content": row["prompt_text"]}] if row["endpoint"] == "chat" else row["prompt_text"]


def _usable(row: dict | None) -> bool:
    return bool(row and row["status"] < 400 and row["prompt_text"] and row["completion_text"])


def collect(log, experiment: str | None = None, since: float | None = None) -> FeedbackData:
    engine = connect(log)
    rows = {r["id"]: r for r in load_requests(engine, experiment, since)}
    votes = latest_votes(engine, set(rows))
    with engine.connect() as conn:
        battles = conn.execute(select(arena_table.c.left_id, arena_table.c.right_id, arena_table.c.winner)
                               .order_by(arena_table.c.id)).all()
    voted = [rows[i] for i in votes if i in rows]
    judged = [rows[i] for i in {*votes, *(b[0] for b in battles), *(b[1] for b in battles)} if i in rows]
    if judged and not any(r["prompt_text"] for r in judged):
        raise ConfigError("the request log has votes but no prompt or answer text: start the server with "
                          "`log_prompts: true` so that feedback can become training data")
    data = FeedbackData(counts={"requests": len(rows), "votes": len(votes), "arena_votes": len(battles),
                                "skipped_without_text": sum(1 for r in voted if not _usable(r))})
    seen_sft, seen_pairs = set(), set()
    winners = [rows.get(left if winner == "left" else right) for left, right, winner in battles
               if winner in ("left", "right")]
    liked = [rows.get(request_id) for request_id, rating in votes.items() if rating > 0]
    for row in liked + winners:
        if _usable(row):
            key = (row["endpoint"], row["prompt_text"], row["completion_text"])
            if key not in seen_sft:
                seen_sft.add(key)
                data.sft.append(_sft_record(row))

    def pair(chosen: dict, rejected: dict, source: str) -> None:
        if chosen["endpoint"] != rejected["endpoint"] or chosen["prompt_text"] != rejected["prompt_text"] \
                or chosen["completion_text"] == rejected["completion_text"]:
            return
        key = (chosen["endpoint"], chosen["prompt_text"], chosen["completion_text"], rejected["completion_text"])
        if key not in seen_pairs:
            seen_pairs.add(key)
            data.dpo.append({"prompt": _prompt(chosen), "chosen": chosen["completion_text"],
                             "rejected": rejected["completion_text"], "source": source})

    for left_id, right_id, winner in battles:
        left, right = rows.get(left_id), rows.get(right_id)
        if winner in ("left", "right") and _usable(left) and _usable(right):
            pair(left, right, "arena") if winner == "left" else pair(right, left, "arena")
    by_prompt: dict[tuple, dict[int, list[dict]]] = {}
    for request_id, rating in votes.items():
        row = rows.get(request_id)
        if _usable(row):
            by_prompt.setdefault((row["endpoint"], row["prompt_text"]), {}).setdefault(rating, []).append(row)
    for group in by_prompt.values():
        for up in group.get(1, []):
            for down in group.get(-1, []):
                pair(up, down, "thumbs")
    data.counts.update(sft=len(data.sft), dpo=len(data.dpo))
    return data


def _sft_record(row: dict) -> dict[str, Any]:
    if row["endpoint"] == "chat":
        return {"messages": [{"role": "user", "content": row["prompt_text"]},
                             {"role": "assistant", "content": row["completion_text"]}]}
    return {"prompt": row["prompt_text"], "completion": row["completion_text"]}


def export_feedback(log, out_dir: str | Path, experiment: str | None = None, since: float | None = None) -> FeedbackData:
    """Write OUT_DIR/sft.jsonl, OUT_DIR/dpo.jsonl and OUT_DIR/counts.json."""
    data = collect(log, experiment, since)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("sft.jsonl", data.sft), ("dpo.jsonl", data.dpo)):
        atomic_write_text(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_text(out / "counts.json", json.dumps(data.counts, indent=2) + "\n")
    return data
