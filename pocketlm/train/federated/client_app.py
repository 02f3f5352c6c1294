"""The ClientApp: each training message runs one round of the client's local training (local.py) and replies with
the trained weights and the metrics FedAvg weighs them by.

Its SuperNode was started with `--node-config "partition-id=I"` (launcher.py): I is the shard it trains on. The
run config names the work directory, where the plan is. Flower starts a fresh process for every message, so this
module imports only what a round needs, when it needs it.
"""

from __future__ import annotations

import os

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .strategies import WEIGHTS

app = ClientApp()


CLIENT_NICENESS = 10  # training yields the CPU to the SuperLink, the ServerApp and the SuperNodes


@app.train()
def train(message: Message, context: Context) -> Message:
    from .local import train_round
    from .plan import Plan

    # on one machine the clients' training can starve the processes that talk HTTP: Flower then misses the
    # ServerApp's heartbeats and fails the run (4 SmolLM2 clients on 2 cores did)
    os.nice(CLIENT_NICENESS)

    plan = Plan.load(str(context.run_config["work-dir"]))
    client = int(context.node_config["partition-id"])
    config = message.content["config"]
    weights = message.content["arrays"][WEIGHTS].numpy()
    trained, metrics = train_round(plan, client, int(config["server-round"]), weights,
                                   float(config.get("proximal-mu", 0.0)))
    reply = RecordDict({"arrays": ArrayRecord({WEIGHTS: Array(trained)}),
                        "metrics": MetricRecord({**metrics, "client": client})})
    return Message(reply, reply_to=message)
