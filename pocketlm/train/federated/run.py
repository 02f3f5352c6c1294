"""`federate(recipe)`: a federated run from start to finish.

    deal the records to the clients (partition.py) -> the starting weights as round 0 (checkpoints.py) ->
    SuperLink + SuperNodes + `flwr run` (launcher.py) -> the final global weights as a model directory

A run whose work directory holds round checkpoints continues from the last one with resume=true.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ...errors import ConfigError
from ...fsio import atomic_write_text
from ..recipe import Recipe, load_recipe
from .checkpoints import latest_round, read_log, rounds_dir, save_round
from .final_model import save_federated_model, starting_model
from .launcher import Federation, Watcher, clear_flower_state
from .partition import partition
from .plan import RESULT, Plan
from .weights import pack, trainable_layout


@dataclass
class FederatedResult:
    model_dir: Path
    work: Path
    rounds: list[dict]  # one record per round (checkpoints.py)
    seconds: float
    restarts: int = 0  # SuperLink restarts survived
    submissions: list[dict] = field(default_factory=list)  # Flower's runs, with their traffic


def federate(recipe: Recipe | str | Path, work: str | Path | None = None,
             on_round: Callable[[dict], None] | None = None,
             on_started: Callable[[Federation], None] | None = None) -> FederatedResult:
    """Run the recipe's federated training on Flower's deployment engine and save the final model to
    OUT_DIR/model (and OUT_DIR/adapter). WORK defaults to OUT_DIR/federated. `on_round` gets each round's record
    as it finishes; `on_started` the running Federation (its processes), once they are up."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if recipe.federated is None:
        raise ConfigError("this recipe has no `federated:` section (clients, rounds, local_steps, strategy, "
                          "partition); see recipes/federated-lora-arc-easy.yaml")
    work = Path(work) if work is not None else Path(recipe.out_dir) / "federated"
    started = time.perf_counter()
    plan = prepare(recipe, work)
    federation = Federation(plan.work, plan.clients)
    try:
        federation.start()
        if on_started is not None:
            on_started(federation)
        watcher = Watcher(federation, recipe.federated.rounds, on_round or (lambda record: None))
        submissions = watcher.run()
    finally:
        federation.stop()
    done, weights, _ = latest_round(plan.work)
    rounds = read_log(plan.work)
    provenance = {"federated": {**recipe.federated.model_dump(mode="json"), "rounds_done": done,
                                "client_examples": plan.examples, "superlink_restarts": watcher.restarts},
                  "metrics": {"rounds": done, "train_loss": rounds[-1]["train_loss"] if rounds else None,
                              "val_loss": rounds[-1]["val_loss"] if rounds else None}}
    model_dir = save_federated_model(recipe, weights, plan.layout, provenance)
    result = FederatedResult(model_dir, plan.work, rounds, time.perf_counter() - started, watcher.restarts,
                             submissions)
    summary = {"model_dir": str(model_dir), "rounds": done, "seconds": round(result.seconds, 1),
               "superlink_restarts": watcher.restarts, "submissions": submissions}
    atomic_write_text(plan.work / RESULT, json.dumps(summary, indent=1) + "\n")
    return result


def prepare(recipe: Recipe, work: Path) -> Plan:
    """The plan, the client shards and round 0, or the existing ones for resume=true."""
    work = work.resolve()
    if (rounds_dir(work) / "latest").is_file():
        if not recipe.resume:
            done = latest_round(work)[0]
            raise ConfigError(f"{work} holds an earlier federated run (round {done} of its checkpoints); pass "
                              "resume=true to continue it, or choose another --work")
        clear_flower_state(work)
        return Plan.load(work)
    work.mkdir(parents=True, exist_ok=True)
    fed = recipe.federated
    shards = partition(recipe.data.sources(), fed.clients, fed.partition, work / "clients" / "data")
    examples = [sum(1 for line in open(path, encoding="utf-8") if line.strip()) for path in shards]
    absolute = _with_absolute_paths(recipe)
    model, _ = starting_model(absolute)
    layout = trainable_layout(model)
    plan = Plan(work=work, recipe=absolute, shards=[str(p) for p in shards], examples=examples, layout=layout)
    plan.save()
    clear_flower_state(work)
    save_round(work, 0, pack(model, layout))
    return plan


def _with_absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe as the clients see it from their own working directories: relative paths made absolute."""
    spec = recipe.model_dump(mode="json")
    spec["out_dir"] = str(Path(recipe.out_dir).resolve())
    if recipe.init_from and Path(recipe.init_from).exists():
        spec["init_from"] = str(Path(recipe.init_from).resolve())
    tokenizer = recipe.data.tokenizer
    if tokenizer not in ("bpe", "char") and Path(tokenizer).exists():
        spec["data"]["tokenizer"] = str(Path(tokenizer).resolve())
    return Recipe.model_validate(spec)
