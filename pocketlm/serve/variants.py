"""The models a server holds, and which one answers a request.

A request names a model: a variant by its own name gets that variant; the experiment's name gets the
variant the user is assigned. Assignment is a hash of (experiment, user) onto the traffic weights, so
a user keeps their variant across requests and server restarts; a request with no user is assigned at
random.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

from ..loading import open_model
from ..tokenizer import Tokenizer
from .config import ServeConfig, VariantSpec
from .scheduler import Scheduler


@dataclass
class Variant:
    name: str
    spec: VariantSpec
    model: object
    tokenizer: Tokenizer
    scheduler: Scheduler
    experiment: str | None = None


def load_variant(spec: VariantSpec, config: ServeConfig, experiment: str | None = None) -> Variant:
    model, tokenizer = open_model(spec.model, dtype=getattr(torch, config.dtype), adapter=spec.adapter)
    model.eval()
    scheduler = Scheduler(model, max_batch=config.max_batch, max_context=config.max_context,
                          queue_size=config.queue_size, prefill_chunk=config.prefill_chunk, name=spec.name)
    return Variant(spec.name, spec, model, tokenizer, scheduler, experiment)


def bucket(experiment: str, user: str) -> float:
    """A stable number in [0, 1) for this user in this experiment."""
    digest = hashlib.sha256(f"{experiment}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(experiment: str, variants: list[Variant], user: str | None) -> Variant:
    """The variant for a user: sticky by hash when the user is known, by chance otherwise."""
    weights = [v.spec.weight for v in variants]
    point = (bucket(experiment, user) if user else random.random()) * sum(weights)
    for variant, weight in zip(variants, weights):
        if point < weight:
            return variant
        point -= weight
    return next(v for v in reversed(variants) if v.spec.weight > 0)
