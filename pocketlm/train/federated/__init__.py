"""Federated training on Flower's deployment engine: `federate(recipe)` (run.py), with the ServerApp
(server_app.py), the ClientApp (client_app.py) that runs the one training loop on a client's own shard
(local.py), Flower's strategies (strategies.py), client data partitions (partition.py), the packed weights that
travel (weights.py), round checkpoints (checkpoints.py) and the processes (launcher.py)."""

from .run import FederatedResult, federate

__all__ = ["FederatedResult", "federate"]
