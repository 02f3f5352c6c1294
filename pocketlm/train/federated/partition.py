"""Client data: the recipe's training records dealt to the clients, evenly or skewed, one shard file each.

    even        a seeded shuffle cut into `clients` nearly equal parts
    dirichlet   for each label (or each source file), shares drawn from Dirichlet(alpha) over the clients and
                that label's examples dealt by them: small alpha gives each client a few labels (Hsu et al. 2019)

Every example goes to exactly one client, and the same seed deals the same shards. A client left without
examples is refused in one line, before any process starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...data import resolve_inputs
from ...errors import ConfigError
from ..instruct import read_records
from ..recipe import PartitionSpec

RECORD_SUFFIXES = (".jsonl", ".json")


@dataclass
class Example:
    record: dict
    source: str  # the file it came from


def read_examples(sources: list[str]) -> list[Example]:
    """Every record of the recipe's data.source files, in file order."""
    examples: list[Example] = []
    for path in resolve_inputs(sources):
        if not str(path).endswith(RECORD_SUFFIXES):
            raise ConfigError(f"federated: data.source {path}: clients are dealt whole records, so the data must be "
                              "JSON lines or a JSON list (one example per record)")
        examples += [Example(record, str(path)) for _, record in read_records(path)]
    return examples


def example_labels(examples: list[Example], spec: PartitionSpec) -> list[str]:
    if spec.by == "sources":
        return [e.source for e in examples]
    missing = [i for i, e in enumerate(examples) if spec.label_field not in e.record]
    if missing:
        raise ConfigError(f"federated.partition.label_field {spec.label_field!r}: example {missing[0] + 1} of "
                          f"{len(examples)} has no such field (it has {', '.join(examples[missing[0]].record)}); "
                          "name the field that holds each example's label, or use partition.by: sources")
    return [str(e.record[spec.label_field]) for e in examples]


def assign(labels: list[str], clients: int, spec: PartitionSpec) -> list[np.ndarray]:
    """The example indices of each client (sorted), from the examples' labels."""
    rng = np.random.default_rng(spec.seed)
    n = len(labels)
    if spec.method == "even":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]
    parts: list[list[int]] = [[] for _ in range(clients)]
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for label in sorted(by_label):
        members = rng.permutation(by_label[label])
        shares = rng.dirichlet(np.full(clients, spec.alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client] += chunk.tolist()
    return [np.sort(np.array(part, dtype=np.int64)) for part in parts]


def check_every_client_has_data(parts: list[np.ndarray], spec: PartitionSpec, total: int) -> None:
    for client, part in enumerate(parts):
        if len(part) == 0:
            advice = ("raise partition.alpha (less skew), lower federated.clients or change partition.seed"
                      if spec.method == "dirichlet" else "lower federated.clients or add data")
            raise ConfigError(f"federated: client {client + 1} of {len(parts)} gets no examples ({total} examples, "
                              f"{spec.method} partition): {advice}")


def partition(sources: list[str], clients: int, spec: PartitionSpec, out_dir: str | Path) -> list[Path]:
    """Write client i's records to OUT_DIR/client-i.jsonl and return the paths (plus partition.json: sizes and
    each client's label histogram, for the record)."""
    examples = read_examples(sources)
    labels = example_labels(examples, spec)
    parts = assign(labels, clients, spec)
    check_every_client_has_data(parts, spec, len(examples))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for client, part in enumerate(parts):
        path = out_dir / f"client-{client}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i in part:
                f.write(json.dumps(examples[i].record) + "\n")
        paths.append(path)
    summary = {"method": spec.method, "by": spec.by, "alpha": spec.alpha, "seed": spec.seed,
               "examples": len(examples), "sizes": [len(p) for p in parts],
               "labels": [label_histogram(labels, p) for p in parts]}
    (out_dir / "partition.json").write_text(json.dumps(summary, indent=2) + "\n")
    return paths


def label_histogram(labels: list[str], part: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(np.array(labels, dtype=object)[part].astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}
