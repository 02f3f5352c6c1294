"""Sampling is safe for every value the API and the CLI accept: property tests (hypothesis) over the whole
accepted ranges, and the defects the fuzzer found as regression tests."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketlm.checkpoint import load_model
from pocketlm.engine import (GREEDY_BELOW, NonFiniteLogitsError, SamplingParams, apply_repetition_penalty,
                             generate_tokens, sample_next, seeded_generator, token_probs)
from pocketlm.errors import ConfigError

VOCAB = 64

# what the API accepts (serve/protocol.py) and the CLI passes on: any float in range, subnormals included
temperatures = st.one_of(st.just(0.0), st.floats(0, 2, allow_subnormal=True),
                         st.sampled_from([1e-300, 5e-324, 1e-60, GREEDY_BELOW / 2, GREEDY_BELOW, 2.0]))
top_ps = st.one_of(st.floats(0, 1, exclude_min=True, allow_subnormal=True), st.sampled_from([1e-300, 5e-324, 1.0]))
seeds = st.one_of(st.none(), st.integers(), st.integers(min_value=2**63, max_value=2**200),
                  st.integers(max_value=-(2**63)))
logit_values = st.one_of(st.floats(-1e4, 1e4), st.sampled_from([-3e38, 3e38, -1e30, 1e30, 0.0]))


@st.composite
def logits(draw, batch: int = 1) -> torch.Tensor:
    """Logits as a model, a penalty or a bias might leave them: extreme values, ties, -inf for masked tokens,
    and at least one finite value per row."""
    rows = []
    for _ in range(batch):
        row = draw(st.lists(logit_values, min_size=VOCAB, max_size=VOCAB))
        masked = draw(st.sets(st.integers(0, VOCAB - 1), max_size=VOCAB - 1))
        rows.append([-math.inf if i in masked else v for i, v in enumerate(row)])
    return torch.tensor(rows, dtype=torch.float32)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logits=logits(batch=2), temperature=temperatures, top_p=top_ps, top_k=st.integers(0, 2 * VOCAB),
       seed=seeds)
def test_any_accepted_parameters_give_a_valid_token(logits, temperature, top_p, top_k, seed):
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    tokens = sample_next(logits, params, seeded_generator(seed))
    assert tokens.shape == (2,)
    for row, token in zip(logits, tokens.tolist()):
        assert 0 <= token < VOCAB
        assert row[token] > -math.inf  # never a masked token
        if params.greedy:
            assert row[token] == row.max()
    if not params.greedy:
        probs = token_probs(logits, params)
        assert torch.isfinite(probs).all() and (probs >= 0).all()
        assert torch.allclose(probs.sum(-1), torch.ones(2))
        leaders = logits == logits.amax(-1, keepdim=True)
        assert ((probs * leaders).sum(-1) > 0).all()  # the most likely token (one of them, if tied) always stays


@settings(max_examples=200, deadline=None)
@given(logits=logits(), penalty=st.one_of(st.floats(0, 1e6, exclude_min=True, allow_subnormal=True),
                                          st.sampled_from([1e-300, 5e-324, 1e300])),
       temperature=temperatures, seen=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8))
def test_repetition_penalty_at_any_accepted_value_leaves_a_distribution(logits, penalty, temperature, seen):
    params = SamplingParams(temperature=temperature, repetition_penalty=penalty)
    penalised = apply_repetition_penalty(logits, torch.tensor([seen]), penalty)
    token = int(sample_next(penalised, params, seeded_generator(0))[0])
    assert 0 <= token < VOCAB and logits[0, token] > -math.inf


# ---- the defects found on main, as regressions ---------------------------------------------------
def test_tiny_temperature_is_greedy_and_tiny_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.999]])
    for params in (SamplingParams(temperature=1e-60), SamplingParams(temperature=GREEDY_BELOW / 2),
                   SamplingParams(temperature=1.0, top_p=1e-300), SamplingParams(temperature=2.0, top_p=5e-324)):
        for seed in range(20):
            assert int(sample_next(logits, params, seeded_generator(seed))[0]) == 1, params
    # at the threshold it samples: both near-equal leaders come up
    drawn = {int(sample_next(logits, SamplingParams(temperature=1.0), seeded_generator(s))[0]) for s in range(200)}
    assert {1, 3} <= drawn


def test_any_integer_seed_is_folded_into_the_generators_range():
    for seed in (2**70, -1, -(2**63) - 1, 10**40):
        a = torch.rand(4, generator=seeded_generator(seed))
        b = torch.rand(4, generator=seeded_generator(seed % 2**64))
        assert torch.equal(a, b)
    assert not torch.equal(torch.rand(4, generator=seeded_generator(2**70)),
                           torch.rand(4, generator=seeded_generator(2**70 + 1)))


def test_a_row_with_nothing_finite_is_refused_not_sampled():
    bad = torch.tensor([[float("nan")] * 4])
    with pytest.raises(NonFiniteLogitsError):
        sample_next(bad, SamplingParams(temperature=0.7), None)
    with pytest.raises(NonFiniteLogitsError):
        sample_next(bad, SamplingParams(), None)
    # NaN beside finite values is never chosen
    assert int(sample_next(torch.tensor([[float("nan"), 1.0, 0.0]]), SamplingParams(), None)[0]) == 1


@pytest.mark.parametrize("field, value", [("temperature", math.nan), ("temperature", math.inf), ("top_p", math.nan),
                                          ("repetition_penalty", math.inf), ("repetition_penalty", 0.0)])
def test_values_no_sampler_can_use_are_refused_with_the_field_named(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**{field: value})


def test_generate_and_chat_decode_with_the_extreme_values(tmp_path):
    """The engine `pocketlm generate` and `chat` run: extreme values decode, greedy where they mean greedy."""
    model, _ = load_model(tiny_model_dir(tmp_path / "tiny", seed=5))
    prompt = [3, 9, 4, 7]
    greedy = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=12, ignore_eos=True)))
    for extreme in (dict(temperature=1e-60), dict(temperature=1.0, top_p=1e-300), dict(temperature=0.9, top_p=5e-324)):
        out = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=12, ignore_eos=True, seed=2**70,
                                                                  **extreme)))
        assert out == greedy, extreme
    sampled = [list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1.3,
                                                                    seed=seed, repetition_penalty=1e-300)))
               for seed in (2**70, 2**70 % 2**64)]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 12
