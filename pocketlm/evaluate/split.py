"""Split a multiple-choice task into training data and a held-out test task that is never trained on.

    pocketlm split-task arc_easy runs/arc_easy_split --test-fraction 0.2 --seed 0

writes
    train.jsonl   SFT records {"prompt": <the task's prompt>, "completion": " <the right answer>", "answer": "B"}
    preferences.jsonl  DPO pairs from the same examples {"prompt", "chosen": right answer, "rejected": a wrong one}
    test.jsonl    the held-out examples {"query", "choices", "gold"}
    test.yaml     a task file for them, scored exactly as the built-in task: pocketlm eval M --tasks DIR/test.yaml
    split.json    seed, fraction, counts and the source, for the record

The training prompts are the evaluation's prompts, so fine-tuning learns the format it is measured in;
the test questions appear in no training record (checked, by prompt text).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from ..errors import ConfigError
from .loaders import resolve_tasks
from .tasks import MULTIPLE_CHOICE

ANSWER_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def split_task(spec: str, out: str | Path, test_fraction: float = 0.2, seed: int = 0) -> dict:
    if not 0 < test_fraction < 1:
        raise ConfigError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    tasks = resolve_tasks([spec])
    if len(tasks) != 1 or tasks[0].kind != MULTIPLE_CHOICE:
        raise ConfigError(f"{spec}: split-task takes one multiple-choice task")
    task = tasks[0]
    examples = [e for e in task.load() if not e.partial]
    if len(examples) < 2:
        raise ConfigError(f"{spec}: {len(examples)} examples; a split needs at least 2")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(examples) * test_fraction))
    test = [examples[i] for i in sorted(order[:n_test])]
    test_queries = {e.query for e in test}
    train = [examples[i] for i in sorted(order[n_test:]) if examples[i].query not in test_queries]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    delimiter = task.target_delimiter
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for e in train:
            # "answer": the right choice's letter, a label to skew federated clients' data by (it is not trained on)
            f.write(json.dumps({"prompt": e.query, "completion": delimiter + e.choices[e.gold],
                                "answer": ANSWER_LETTERS[e.gold]}) + "\n")
    pick = random.Random(seed + 1)
    with open(out / "preferences.jsonl", "w", encoding="utf-8") as f:
        for e in train:
            wrong = pick.choice([c for i, c in enumerate(e.choices) if i != e.gold])
            f.write(json.dumps({"prompt": e.query, "chosen": delimiter + e.choices[e.gold],
                                "rejected": delimiter + wrong}) + "\n")
    with open(out / "test.jsonl", "w", encoding="utf-8") as f:
        for e in test:
            f.write(json.dumps({"query": e.query, "choices": e.choices, "gold": e.gold}) + "\n")
    task_file = {"task": f"{task.name}_heldout", "type": "multiple_choice", "data": "test.jsonl",
                 "prompt": "{{query}}", "choices": "choices", "target": "{{gold}}", "target_delimiter": delimiter}
    (out / "test.yaml").write_text(yaml.safe_dump(task_file, sort_keys=False))
    record = {"task": task.name, "source": task.source, "seed": seed, "test_fraction": test_fraction,
              "train": len(train), "test": len(test), "dropped_duplicates": len(examples) - n_test - len(train)}
    (out / "split.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
