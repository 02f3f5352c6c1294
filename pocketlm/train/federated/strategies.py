"""The server's aggregation: Flower's own FedAvg, FedProx and FedAdam (flwr.serverapp.strategy), set up from the
recipe's `federated` section, and the state a resumed run needs (FedAdam's moments).

Every strategy samples all live clients each round and waits for none beyond them (min nodes 1): the server
waits for the whole federation itself before a round (server_app.py), so a client that dies leaves the later
rounds to the survivors instead of blocking them. Clients report their validation loss with their update, so
Flower's separate evaluation round is off.
"""

from __future__ import annotations

import numpy as np

from ..recipe import FederatedSpec

WEIGHTS = "weights"  # the one array of every ArrayRecord (weights.py packs them)


def make_strategy(spec: FederatedSpec):
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
                  min_available_nodes=1, weighted_by_key="num-examples")
    if spec.strategy == "fedprox":
        return FedProx(proximal_mu=spec.proximal_mu, **common)
    if spec.strategy == "fedadam":
        beta_1, beta_2 = spec.server_betas
        return FedAdam(eta=spec.server_lr, beta_1=beta_1, beta_2=beta_2, tau=spec.server_tau, **common)
    return FedAvg(**common)


def strategy_state(strategy) -> dict[str, np.ndarray]:
    """What the strategy carries from round to round: FedAdam's first and second moments (FedAvg and FedProx
    carry nothing)."""
    state = {}
    for key in ("m_t", "v_t"):
        moments = getattr(strategy, key, None)
        if moments:
            state[key] = np.asarray(moments[WEIGHTS], dtype=np.float32)
    return state


def load_strategy_state(strategy, state: dict[str, np.ndarray]) -> None:
    for key, value in state.items():
        setattr(strategy, key, {WEIGHTS: np.asarray(value, dtype=np.float32)})
