"""The ServerApp: rounds of "send the global weights to every live client, aggregate what comes back" through the
recipe's Flower strategy, with a checkpoint after every round (checkpoints.py).

It drives the strategy's own configure_train / aggregate_train round by round rather than `strategy.start`, which
always counts rounds from 1: a resumed run continues at its checkpoint's round, and FedAdam's bias correction
needs the true round number. The server never builds the model; it only sees packed float32 arrays.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from .checkpoints import append_log, latest_round, save_round
from .plan import EXPECTED_CLIENTS, SERVER_ERROR, Plan
from .strategies import WEIGHTS, load_strategy_state, make_strategy, strategy_state

app = ServerApp()

FIRST_WAIT_S = 600  # how long the first round waits for the SuperNodes the launcher started to connect
LATER_WAIT_S = 5  # later rounds: a client that died is not waited for


@app.main()
def main(grid: Grid, context: Context) -> None:
    plan = Plan.load(str(context.run_config["work-dir"]))
    try:
        run_rounds(grid, plan)
    except Exception as exc:
        (plan.work / "flower" / SERVER_ERROR).write_text(f"{type(exc).__name__}: {exc}")
        raise


def run_rounds(grid: Grid, plan: Plan) -> None:
    spec = plan.recipe.federated
    strategy = make_strategy(spec)
    done, weights, state = latest_round(plan.work)
    load_strategy_state(strategy, state)
    arrays = ArrayRecord({WEIGHTS: Array(weights)})
    expected = plan.work / "flower" / EXPECTED_CLIENTS
    wanted = int(expected.read_text()) if expected.is_file() else plan.clients
    for round_ in range(done + 1, spec.rounds + 1):
        wait_for_clients(grid, wanted, FIRST_WAIT_S if round_ == done + 1 else LATER_WAIT_S)
        started = time.perf_counter()
        messages = list(strategy.configure_train(round_, arrays, ConfigRecord(), grid))
        replies = list(grid.send_and_receive(messages, timeout=spec.round_timeout))
        answered = [r for r in replies if not r.has_error()]
        if not answered:
            reasons = "; ".join(r.error.reason for r in replies if r.has_error()) or "no reply before the timeout"
            raise RuntimeError(f"round {round_}: no client returned an update ({reasons})")
        aggregated, _ = strategy.aggregate_train(round_, replies)
        weights = aggregated[WEIGHTS].numpy().astype(np.float32)  # FedAdam's update comes back in float64
        arrays = ArrayRecord({WEIGHTS: Array(weights)})
        save_round(plan.work, round_, weights, strategy_state(strategy))
        append_log(plan.work, round_record(round_, messages, answered, len(replies) - len(answered), weights,
                                           time.perf_counter() - started))


def wait_for_clients(grid: Grid, wanted: int, patience_s: float) -> int:
    deadline = time.monotonic() + patience_s
    while (live := len(list(grid.get_node_ids()))) < wanted and time.monotonic() < deadline:
        time.sleep(0.5)
    while live == 0:  # nobody at all: wait for the first one (the run's own timeout ends a hopeless run)
        time.sleep(0.5)
        live = len(list(grid.get_node_ids()))
    return live


def round_record(round_: int, sent, answered, failed: int, weights: np.ndarray, seconds: float) -> dict:
    """What a round did: who trained, their losses, and the bytes of weights each way (the packed array only;
    Flower's framing adds a few hundred bytes per message)."""
    metrics = [reply.content["metrics"] for reply in answered]
    return {"round": round_, "clients": sorted(int(m["client"]) for m in metrics), "failed": failed,
            "train_loss": _weighted(metrics, "train-loss"), "val_loss": _weighted(metrics, "val-loss"),
            "bytes_down": len(sent) * weights.nbytes, "bytes_up": len(answered) * weights.nbytes,
            "seconds": round(seconds, 2)}


def _weighted(metrics, key: str) -> float | None:
    pairs = [(float(m[key]), float(m["num-examples"])) for m in metrics if key in m]
    if not pairs:
        return None
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
