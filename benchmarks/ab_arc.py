"""An A/B test run end to end on real questions: base SmolLM2 against its LoRA-tuned ARC-Easy variant.

Each held-out ARC-Easy question (from `pocketlm split-task arc_easy runs/arc_easy_split`) is asked by
its own user of a running server whose experiment splits traffic between the two variants; the script
votes thumbs up when the first line of the reply starts with the right answer and thumbs down otherwise (the scripted
user), then prints `pocketlm ab report` for the log. Start the server first:

    pocketlm serve --config docs/serve/arc-ab.yaml &
    python benchmarks/ab_arc.py --url http://127.0.0.1:8000 --questions 200
    pocketlm ab report --db runs/serve-ab/log.db --experiment arc-helper --plot runs/serve-ab/ab.png
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def ask(client: httpx.Client, experiment: str, index: int, record: dict, max_tokens: int) -> dict:
    reply = client.post("/v1/completions", json={"model": experiment, "prompt": record["query"], "max_tokens": max_tokens,
                                                 "temperature": 0, "user": f"student-{index}"})
    reply.raise_for_status()
    body = reply.json()
    answer = normalise(record["choices"][record["gold"]])
    lines = [line for line in body["choices"][0]["text"].splitlines() if line.strip()]
    correct = bool(lines) and normalise(lines[0]).startswith(answer)  # the first line the reply writes
    vote = client.post("/v1/feedback", json={"id": body["id"], "rating": "up" if correct else "down"})
    vote.raise_for_status()
    return {"variant": body["variant"], "correct": correct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--experiment", default="arc-helper")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--test-file", type=Path, default=Path("runs/arc_easy_split/test.jsonl"))
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    records = [json.loads(line) for line in args.test_file.read_text().splitlines()[: args.questions]]
    started = time.perf_counter()
    with httpx.Client(base_url=args.url, timeout=300) as client, ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda item: ask(client, args.experiment, *item, args.max_tokens), enumerate(records)))
    for variant in sorted({r["variant"] for r in results}):
        mine = [r for r in results if r["variant"] == variant]
        print(f"{variant}: {len(mine)} questions, {sum(r['correct'] for r in mine)} answered right "
              f"({100 * sum(r['correct'] for r in mine) / len(mine):.1f}%)")
    print(f"{len(results)} questions in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
