"""Federated training (train/federated/): FedAvg against central training, FedProx's term, FedAdam against the
update written out by hand, client partitions, the recipe's refusals, and whole runs on Flower's deployment
engine over loopback (a SuperLink and SuperNodes as processes), including a client killed mid-round and a
SuperLink killed and restarted."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pocketlm.checkpoint import load_model
from pocketlm.errors import ConfigError
from pocketlm.train import load_recipe, train
from pocketlm.train.federated.checkpoints import latest_round, read_log, save_round
from pocketlm.train.federated import local
from pocketlm.train.federated.local import train_round
from pocketlm.train.federated.partition import assign, partition
from pocketlm.train.federated.plan import Plan
from pocketlm.train.federated.run import prepare
from pocketlm.train.federated.strategies import load_strategy_state, make_strategy, strategy_state
from pocketlm.train.federated.weights import pack, unpack
from pocketlm.train.objectives import SFT, with_proximal_term
from pocketlm.train.recipe import FederatedSpec, PartitionSpec

from helpers import tiny_model_dir

LETTERS = "ABCD"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("base") / "base")


def write_records(path: Path, n: int, offset: int = 0) -> Path:
    """n prompt/completion records with an answer letter (as split-task writes them)."""
    words = ["apple", "river", "stone", "cloud", "ember", "frost", "maple", "quartz", "tiger", "violet"]
    with open(path, "w") as f:
        for i in range(offset, offset + n):
            w = words[i % len(words)]
            f.write(json.dumps({"prompt": f"Question: which word is number {i}?\nAnswer:", "completion": f" {w} {i}",
                                "answer": LETTERS[(i * 7) % 4]}) + "\n")
    return path


def write_recipe(tmp_path: Path, base: Path, data: Path, federated: dict | None = None, **sections) -> Path:
    recipe = {"name": "fed", "out_dir": str(tmp_path / "run"), "seed": 3, "init_from": str(base),
              "data": {"source": str(data), "val_fraction": 0.2},
              "train": {"objective": "sft", "max_steps": 1, "batch_size": 4, "block_size": 64, "dtype": "float32",
                        "threads": 1, "grad_clip": 0.0},
              "optim": {"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0, "fused": False},
              "sft": {"packing": False},
              "eval": {"iters": 1}, "log": {"progress": False, "tensorboard": False}}
    if federated is not None:  # each client's steps over the run
        recipe["federated"] = federated
        recipe["train"]["max_steps"] = max(1, federated.get("rounds", 1) * federated.get("local_steps", 1))
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# ---- the aggregation ----------------------------------------------------------------------------
class Nodes:
    """The one Grid method the strategies' configure_train calls, for aggregation outside a running server."""

    def __init__(self, n: int):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


@pytest.fixture(autouse=True)
def _flower_task_identity(monkeypatch):
    """Flower stamps each Message with the run, node and task of the process it runs in (set by its runtime):
    a made-up identity, for replies built outside a run."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)


def aggregate(strategy, round_: int, global_weights: np.ndarray, updates: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """One round of a Flower strategy on given client updates: configure (the strategy notes the global weights),
    then aggregate replies carrying (weights, num-examples)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    list(strategy.configure_train(round_, ArrayRecord({"weights": Array(global_weights)}), ConfigRecord(),
                                  Nodes(len(updates))))
    replies = [Message(RecordDict({"arrays": ArrayRecord({"weights": Array(w.astype(np.float32))}),
                                   "metrics": MetricRecord({"num-examples": n})}), dst_node_id=0, message_type="train")
               for w, n in updates]
    arrays, _ = strategy.aggregate_train(round_, replies)
    return arrays["weights"].numpy()


def test_fedavg_of_identical_clients_equals_the_central_step(tmp_path, base):
    """Two clients with the same data, one local step each from the same weights: their FedAvg is the step the
    one loop takes centrally on that data (1e-6)."""
    data = write_records(tmp_path / "data.jsonl", 20)
    central = load_recipe(write_recipe(tmp_path / "central", base, data))
    train(central, progress=False)
    want, _ = load_model(Path(central.out_dir) / "model")

    fed = load_recipe(write_recipe(tmp_path / "fed", base, data, {"clients": 2, "rounds": 1, "local_steps": 1}))
    plan = prepare(fed, tmp_path / "fed" / "work")
    plan.shards = [str(data), str(data)]  # identical clients
    plan.examples = [20, 20]
    _, start, _ = latest_round(plan.work)
    updates = [(train_round(plan, client, 1, start)[0], plan.examples[client]) for client in range(2)]
    np.testing.assert_array_equal(updates[0][0], updates[1][0])
    averaged = unpack(aggregate(make_strategy(fed.federated), 1, start, updates), plan.layout)
    assert np.abs(unpack(start, plan.layout)["model.layers.0.mlp.up_proj.weight"].numpy()
                  - averaged["model.layers.0.mlp.up_proj.weight"].numpy()).max() > 1e-4  # it did move
    for name, value in want.named_parameters():
        torch.testing.assert_close(averaged[name], value.detach(), atol=1e-6, rtol=0, msg=name)


def test_fedavg_of_sgd_steps_on_different_shards_equals_one_step_on_their_union(tmp_path, base):
    """Plain SGD, two clients with different shards of equal size and equal labelled tokens, one local step of
    their whole training rows each: FedAvg of the two steps is one SGD step on the union of their rows, the
    gradient written out here with autograd (1e-6)."""
    from pocketlm.train.data_source import load_data

    shards = [write_records(tmp_path / f"shard-{i}.jsonl", 5, offset=10 + 10 * i) for i in range(2)]
    recipe = load_recipe(write_recipe(tmp_path, base, shards[0], {"clients": 2, "rounds": 1, "local_steps": 1},
                                      optim={"algorithm": "sgd", "lr": 0.5}))
    plan = prepare(recipe, tmp_path / "work")
    plan.shards = [str(p) for p in shards]
    plan.examples = [5, 5]
    _, start, _ = latest_round(plan.work)
    updates, rows = [], []
    for client in range(2):
        client_recipe = local.client_recipe(plan, client, 1)
        data = load_data(client_recipe, True, lambda: None, True, per_step=4, model_tokenizer=load_model(base)[1])
        assert data.train.row_count == client_recipe.train.batch_size == 4  # the step takes every training row
        rows.append(data.train.batch(np.arange(4), torch.device("cpu")))
        updates.append((train_round(plan, client, 1, start)[0], plan.examples[client]))
    labelled = [int((r["labels"] != -100).sum()) for r in rows]
    assert labelled[0] == labelled[1]  # so the token-sum loss weighs the clients as FedAvg does (by examples)

    model, _ = load_model(base)
    model.float()
    union = {k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "labels")}
    loss, _ = SFT.loss(model, union)
    (loss / sum(labelled)).backward()
    averaged = unpack(aggregate(make_strategy(recipe.federated), 1, start, updates), plan.layout)
    for name, p in model.named_parameters():
        torch.testing.assert_close(averaged[name], (p - 0.5 * p.grad).detach(), atol=1e-6, rtol=0, msg=name)


def test_fedavg_weighs_clients_by_their_examples():
    strategy = make_strategy(FederatedSpec(clients=2, rounds=1))
    a, b = np.arange(6, dtype=np.float32), np.full(6, 10, dtype=np.float32)
    got = aggregate(strategy, 1, np.zeros(6, np.float32), [(a, 1), (b, 3)])
    np.testing.assert_allclose(got, (a + 3 * b) / 4, rtol=1e-6)


def test_fedprox_with_mu_zero_is_fedavg(tmp_path, base):
    data = write_records(tmp_path / "data.jsonl", 16)
    updates = [(np.random.default_rng(i).normal(size=50).astype(np.float32), 5 + i) for i in range(3)]
    start = np.zeros(50, np.float32)
    fedavg = aggregate(make_strategy(FederatedSpec(clients=3, rounds=1)), 1, start, updates)
    fedprox = aggregate(make_strategy(FederatedSpec(clients=3, rounds=1, strategy="fedprox")), 1, start, updates)
    np.testing.assert_array_equal(fedavg, fedprox)
    # and a client's round with mu = 0 trains exactly as FedAvg's client
    runs = {}
    for strategy in ("fedavg", "fedprox"):
        recipe = load_recipe(write_recipe(tmp_path / strategy, base, data, {"clients": 1, "rounds": 2, "local_steps": 2,
                                                                             "strategy": strategy}))
        plan = prepare(recipe, tmp_path / strategy / "work")
        runs[strategy] = train_round(plan, 0, 2, latest_round(plan.work)[1], proximal_mu=0.0)[0]
    np.testing.assert_array_equal(runs["fedavg"], runs["fedprox"])


def test_the_proximal_term_adds_mu_times_the_distance_to_the_global_weights(base):
    """FedProx: the gradient of loss + mu/2 ||w - w_global||^2 is the loss's gradient + mu (w - w_global), whatever
    the loop's token-sum scaling (the term is weighted by the batch's labelled tokens, which the loop divides by)."""
    model, _ = load_model(base)
    model.float()
    proximal = with_proximal_term(SFT, 0.3, model)
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}  # the global weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ids = torch.randint(0, 300, (2, 16))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels}
    labelled = int((labels != -100).sum())

    def grads(objective):
        model.zero_grad()
        loss, _ = objective.loss(model, batch)
        (loss / labelled).backward()  # the loop's scale for a token-sum objective
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, with_term = grads(SFT), grads(proximal)
    for name, p in model.named_parameters():
        torch.testing.assert_close(with_term[name] - plain[name], 0.3 * (p.detach() - anchors[name]),
                                   atol=1e-6, rtol=1e-4, msg=name)


def test_fedadam_matches_the_update_written_out(tmp_path):
    """Two rounds of Flower's FedAdam on known client updates against Adam on the averaged delta, written out
    (Reddi et al. 2020, Algorithm 2, with Flower's bias correction), and the same after its moments went through
    a round checkpoint into a fresh strategy (a resumed run)."""
    spec = FederatedSpec(clients=2, rounds=2, strategy="fedadam", server_lr=0.05, server_betas=(0.8, 0.9),
                         server_tau=1e-2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=40).astype(np.float32)
    rounds = [[(x + rng.normal(scale=0.1, size=40).astype(np.float32), n) for n in (2, 6)] for _ in range(2)]

    m = v = np.zeros(40)
    want = x.astype(np.float64)
    for t, updates in enumerate(rounds, start=1):
        avg = sum(w.astype(np.float64) * n for w, n in updates) / sum(n for _, n in updates)
        delta = avg - want
        m = 0.8 * m + 0.2 * delta
        v = 0.9 * v + 0.1 * delta ** 2
        step = 0.05 * np.sqrt(1 - 0.9 ** (t + 1)) / (1 - 0.8 ** (t + 1))
        want = want + step * m / (np.sqrt(v) + 1e-2)
        rounds[t - 1] = (updates, want.copy())

    strategy = make_strategy(spec)
    got1 = aggregate(strategy, 1, x, rounds[0][0])
    np.testing.assert_allclose(got1, rounds[0][1], rtol=1e-5, atol=1e-6)
    save_round(tmp_path, 1, got1.astype(np.float32), strategy_state(strategy))
    got2 = aggregate(strategy, 2, got1.astype(np.float32), rounds[1][0])
    np.testing.assert_allclose(got2, rounds[1][1], rtol=1e-5, atol=1e-6)

    resumed = make_strategy(spec)
    done, weights, state = latest_round(tmp_path)
    assert done == 1 and set(state) == {"m_t", "v_t"}
    load_strategy_state(resumed, state)
    np.testing.assert_array_equal(aggregate(resumed, 2, weights, rounds[1][0]), got2)


# ---- partitions ------------------------------------------------------------------------------------
def test_even_partition_sizes_and_every_example_once(tmp_path):
    data = write_records(tmp_path / "d.jsonl", 10)
    paths = partition([str(data)], 3, PartitionSpec(), tmp_path / "shards")
    shards = [[json.loads(line) for line in p.read_text().splitlines()] for p in paths]
    assert [len(s) for s in shards] == [4, 3, 3]
    prompts = [r["prompt"] for s in shards for r in s]
    assert sorted(prompts) == sorted(json.loads(line)["prompt"] for line in data.read_text().splitlines())


def test_dirichlet_partition_is_skewed_complete_and_seeded():
    labels = [LETTERS[i % 4] for i in range(400)]
    spec = PartitionSpec(method="dirichlet", alpha=0.3, seed=1)
    parts = assign(labels, 4, spec)
    everything = np.concatenate(parts)
    assert sorted(everything.tolist()) == list(range(400))  # each example exactly once
    histograms = np.array([[sum(labels[i] == letter for i in part) for letter in LETTERS] for part in parts])
    shares = histograms / histograms.sum(1, keepdims=True)
    assert (shares.max(1) > 0.5).sum() >= 2  # most clients dominated by a label (an even split gives 0.25 each)
    assert len({tuple(h) for h in histograms.tolist()}) == 4
    again = assign(labels, 4, spec)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = assign(labels, 4, PartitionSpec(method="dirichlet", alpha=0.3, seed=2))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    even = assign(labels, 4, PartitionSpec())
    even_hist = np.array([[sum(labels[i] == letter for i in part) for letter in LETTERS] for part in even])
    assert (even_hist / even_hist.sum(1, keepdims=True)).max() < 0.5


def test_partition_by_sources(tmp_path):
    files = [write_records(tmp_path / f"s{i}.jsonl", 30, offset=30 * i) for i in range(3)]
    paths = partition([str(f) for f in files], 3, PartitionSpec(method="dirichlet", by="sources", alpha=0.1, seed=0),
                      tmp_path / "shards")
    summary = json.loads((tmp_path / "shards" / "partition.json").read_text())
    assert sum(summary["sizes"]) == 90 and all(summary["sizes"])
    assert sum(len(p.read_text().splitlines()) for p in paths) == 90


def test_a_client_without_examples_is_refused(tmp_path):
    data = write_records(tmp_path / "d.jsonl", 3)
    with pytest.raises(ConfigError, match=r"client 4 of 4 gets no examples \(3 examples, even partition\): lower"):
        partition([str(data)], 4, PartitionSpec(), tmp_path / "shards")
    labels = ["A"] * 5  # one label: a skewed Dirichlet draw leaves some clients nothing
    with pytest.raises(ConfigError, match=r"client \d of 4 gets no examples .*raise partition.alpha"):
        parts = assign(labels, 4, PartitionSpec(method="dirichlet", alpha=0.05, seed=0))
        from pocketlm.train.federated.partition import check_every_client_has_data

        check_every_client_has_data(parts, PartitionSpec(method="dirichlet"), 5)


def test_missing_label_field_is_one_line(tmp_path):
    data = write_records(tmp_path / "d.jsonl", 6)
    with pytest.raises(ConfigError, match="label_field 'topic': example 1 of 6 has no such field"):
        partition([str(data)], 2, PartitionSpec(method="dirichlet", label_field="topic"), tmp_path / "shards")


@pytest.mark.parametrize("federated, sections, message", [
    ({"clients": 0, "rounds": 1}, {}, "federated.clients"),
    ({"clients": 2, "rounds": 0}, {}, "federated.rounds"),
    ({"clients": 2, "rounds": 1, "strategy": "fedsgd"}, {}, "federated.strategy"),
    ({"clients": 2, "rounds": 1, "proximal_mu": 0.1}, {}, "proximal_mu 0.1 is FedProx's term"),
    ({"clients": 2, "rounds": 1}, {"privacy": {"noise_multiplier": 1.0}}, "federated with privacy is not supported"),
    ({"clients": 2, "rounds": 1}, {"train": {"objective": "dpo"}}, "train.objective dpo is not supported"),
    ({"clients": 2, "rounds": 3, "local_steps": 2}, {"train": {"max_steps": 5}}, "train.max_steps 5 must equal"),
])
def test_unsupported_federated_recipes_are_refused(tmp_path, base, federated, sections, message):
    data = write_records(tmp_path / "d.jsonl", 8)
    path = write_recipe(tmp_path, base, data, federated, **sections)
    with pytest.raises(ConfigError, match=message) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)


def test_the_cli_refuses_in_one_line(tmp_path, base):
    import subprocess
    import sys

    data = write_records(tmp_path / "d.jsonl", 3)
    path = write_recipe(tmp_path, base, data, {"clients": 4, "rounds": 1})
    done = subprocess.run([sys.executable, "-m", "pocketlm", "federate", str(path)], capture_output=True, text=True)
    assert done.returncode == 1
    assert "client 4 of 4 gets no examples" in done.stderr and "Traceback" not in done.stderr


# ---- on Flower's deployment engine -----------------------------------------------------------------
def deployed_recipe(tmp_path: Path, base: Path, clients: int = 2, rounds: int = 2, **federated):
    data = write_records(tmp_path / "data.jsonl", 24)
    return load_recipe(write_recipe(
        tmp_path, base, data, {"clients": clients, "rounds": rounds, "local_steps": 1, **federated},
        adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}))


def check_finished(result, recipe, rounds: int) -> np.ndarray:
    """The run's rounds, its model directories, and an adapter that holds the last round's global weights."""
    from pocketlm.adapt.adapters import load_adapter

    assert [r["round"] for r in result.rounds] == list(range(1, rounds + 1))
    out = Path(recipe.out_dir)
    assert (out / "model" / "config.json").is_file()
    record = json.loads((out / "model" / "pocketlm.json").read_text())
    assert record["federated"]["rounds_done"] == rounds
    done, weights, _ = latest_round(result.work)
    assert done == rounds
    model, _ = load_model(recipe.init_from)
    load_adapter(model.float(), out / "adapter", trainable=True)
    np.testing.assert_array_equal(pack(model, Plan.load(result.work).layout), weights)
    return weights


@pytest.mark.slow
def test_a_two_client_run_finishes_and_writes_a_model(tmp_path, base):
    from pocketlm.train.federated import federate

    recipe = deployed_recipe(tmp_path, base, strategy="fedprox", proximal_mu=0.01)
    seen = []
    result = federate(recipe, on_round=seen.append)
    check_finished(result, recipe, 2)
    assert seen == result.rounds and all(r["clients"] == [0, 1] and r["failed"] == 0 for r in seen)
    assert seen[0]["bytes_up"] == 2 * 4 * len(latest_round(result.work)[1])  # two float32 updates
    assert result.submissions[-1]["status"] == "finished:completed"


@pytest.mark.slow
def test_a_client_killed_mid_round_leaves_the_round_to_the_others(tmp_path, base):
    from pocketlm.train.federated import federate

    recipe = deployed_recipe(tmp_path, base, clients=2, rounds=2)

    def kill_client_1_once_it_trains(federation):
        def watch():
            log = federation.work / "clients" / "client-1" / "log.jsonl"  # the loop opens it before its first step
            while not log.exists() and federation.alive("supernode-1"):
                time.sleep(0.05)
            federation.kill("supernode-1")
        threading.Thread(target=watch, daemon=True).start()

    result = federate(recipe, on_started=kill_client_1_once_it_trains)
    check_finished(result, recipe, 2)
    assert [(r["clients"], r["failed"]) for r in result.rounds] == [([0], 1), ([0], 0)]


@pytest.mark.slow
def test_a_restarted_superlink_resumes_from_the_round_checkpoint(tmp_path, base):
    from pocketlm.train.federated import federate

    recipe = deployed_recipe(tmp_path, base, rounds=2, strategy="fedadam", server_lr=0.01)

    def kill_superlink_after_round_1(federation):
        def watch():
            while not read_log(federation.work):
                time.sleep(0.05)
            federation.kill("superlink")
        threading.Thread(target=watch, daemon=True).start()

    result = federate(recipe, on_started=kill_superlink_after_round_1)
    weights = check_finished(result, recipe, 2)
    assert result.restarts == 1 and result.submissions[0]["status"] == "superlink died"
    assert result.submissions[-1]["status"] == "finished:completed"
    # the resumed submission started at round 2: round 1 ran once
    assert [r["round"] for r in read_log(result.work)] == [1, 2]
    assert not np.array_equal(weights, latest_round_zero(result.work))  # FedAdam moved the adapter


def latest_round_zero(work: Path) -> np.ndarray:
    """The starting adapter, as `federate` built it (round 0 is pruned from the checkpoints by then)."""
    plan = Plan.load(work)
    from pocketlm.train.federated.final_model import starting_model

    return pack(starting_model(plan.recipe)[0], plan.layout)
