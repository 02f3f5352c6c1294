"""One client's round: the one training loop (train/loop.py) on the client's own shard, `local_steps` steps from
the global weights, with the recipe's own schedule continued across rounds (round r runs steps
(r - 1) * local_steps ... r * local_steps of a schedule over rounds * local_steps steps, and draws those steps'
batches, so no round repeats the previous one's).
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from ..loop import WarmStart, train
from ..recipe import Recipe, validate_recipe
from .plan import Plan
from .weights import pack, unpack


def client_recipe(plan: Plan, client: int, round_: int) -> Recipe:
    """The recipe a client trains in round `round_` (1-based): its shard, its directory, the round's steps, no
    model directory written (the update goes back to the server instead), and its share of the CPU cores."""
    recipe = plan.recipe
    fed = recipe.federated
    spec = recipe.model_dump(mode="json")
    spec.update(out_dir=str(plan.client_dir(client)), resume=False, federated=None)
    spec["data"]["source"] = plan.shards[client]
    spec["train"]["max_steps"] = round_ * fed.local_steps
    spec["train"]["threads"] = recipe.train.threads or max(1, (os.cpu_count() or 1) // plan.clients)
    spec["optim"]["decay_steps"] = recipe.optim.decay_steps or fed.rounds * fed.local_steps
    spec["eval"].update(interval=fed.rounds * fed.local_steps + 1, sample_prompt=None)  # at the round's end only
    spec["checkpoint"].update(keep_last=1, keep_best=False)
    spec["log"].update(progress=False, tensorboard=False)
    return validate_recipe(spec, source=f"client {client + 1}'s recipe")


def train_round(plan: Plan, client: int, round_: int, global_weights: np.ndarray,
                proximal_mu: float = 0.0) -> tuple[np.ndarray, dict[str, float]]:
    """(the client's trained weights, packed; its metrics: num-examples, train-loss, val-loss)."""
    recipe = client_recipe(plan, client, round_)
    shutil.rmtree(plan.client_dir(client) / "checkpoints", ignore_errors=True)  # last round's: not a resume
    steps: list[dict] = []
    trained: dict[str, np.ndarray] = {}
    start = WarmStart(unpack(global_weights, plan.layout), first_step=(round_ - 1) * plan.recipe.federated.local_steps,
                      proximal_mu=proximal_mu, finished=lambda model: trained.update(weights=pack(model, plan.layout)))
    train(recipe, progress=False, on_step=steps.append, warm_start=start)
    metrics = {"num-examples": plan.examples[client], "train-loss": float(np.mean([s["loss"] for s in steps]))}
    val = [s["val_loss"] for s in steps if "val_loss" in s]
    if val:
        metrics["val-loss"] = float(val[-1])
    return trained["weights"], metrics
