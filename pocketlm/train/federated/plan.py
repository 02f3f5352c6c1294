"""The run's plan: what `federate` decided before any process starts, written to WORK/plan.json and read by the
ServerApp and every ClientApp (each of them a fresh process, possibly in another working directory):
the recipe with absolute paths, each client's shard and size, and the layout of the packed weights.

WORK/
  plan.json              this
  result.json            the finished run: rounds, seconds, SuperLink restarts, Flower's runs and their traffic
  clients/data/          client-i.jsonl shards and partition.json (partition.py)
  clients/client-i/      each client's training directory, reused every round
  rounds/                the server's round checkpoints (checkpoints.py)
  flower/                the app's pyproject.toml, FLWR_HOME, the processes' logs (launcher.py), and
                         server-error.txt when the ServerApp stopped on an error
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..recipe import Recipe, validate_recipe
from .weights import Layout

PLAN = "plan.json"
RESULT = "result.json"  # written when a run finishes: rounds, seconds, SuperLink restarts, Flower's traffic
EXPECTED_CLIENTS = "expected-clients"  # in WORK/flower: the live SuperNodes when the run was submitted
SERVER_ERROR = "server-error.txt"  # in WORK/flower: why the ServerApp stopped, for the launcher's one line


@dataclass
class Plan:
    work: Path
    recipe: Recipe
    shards: list[str]
    examples: list[int]  # records per shard: FedAvg weighs each client's update by it
    layout: Layout

    @property
    def clients(self) -> int:
        return len(self.shards)

    def client_dir(self, client: int) -> Path:
        return self.work / "clients" / f"client-{client}"

    def save(self) -> None:
        record = {"recipe": self.recipe.model_dump(mode="json"), "shards": self.shards, "examples": self.examples,
                  "layout": [[name, list(shape)] for name, shape in self.layout]}
        (self.work / PLAN).write_text(json.dumps(record, indent=1) + "\n")

    @classmethod
    def load(cls, work: str | Path) -> "Plan":
        work = Path(work)
        record = json.loads((work / PLAN).read_text())
        return cls(work=work, recipe=validate_recipe(record["recipe"], source=str(work / PLAN)),
                   shards=record["shards"], examples=record["examples"],
                   layout=[(name, tuple(shape)) for name, shape in record["layout"]])
