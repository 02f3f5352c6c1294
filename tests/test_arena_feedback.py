"""The arena's leaderboard and the feedback export: Bradley-Terry ratings equal a logistic regression fitted by
scikit-learn on the same votes (the LMSYS arena's own method), the bootstrap interval narrows with more votes, the
server stores an arena vote as a pair, and `pocketlm feedback export` turns votes into SFT and DPO records that
the training loop reads."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import tiny_model_dir
from serve_helpers import running_server

from pocketlm.serve.arena import Battle, fit, leaderboard
from pocketlm.serve.app import create_app
from pocketlm.serve.config import load_serve_config
from pocketlm.train.instruct import conversation, preference, read_records

TRUE = {"a": 1.0, "b": 0.3, "c": 0.0, "d": -0.8}


def simulated(n: int, seed: int, ties: float = 0.1) -> list[Battle]:
    rng = np.random.default_rng(seed)
    names = list(TRUE)
    battles = []
    for _ in range(n):
        i, j = rng.choice(len(names), 2, replace=False)
        left, right = names[i], names[j]
        if rng.random() < ties:
            battles.append(Battle(left, right, "tie" if rng.random() < 0.5 else "bad"))
        else:
            p = 1 / (1 + math.exp(TRUE[right] - TRUE[left]))
            battles.append(Battle(left, right, "left" if rng.random() < p else "right"))
    return battles


def sklearn_ratings(battles: list[Battle]) -> dict[str, float]:
    """The arena's reference fit: each battle twice, a tie once won by each side; a logistic regression without an
    intercept or penalty on +-log(10) indicators; rating = 400 * coefficient, centred on 1000."""
    from sklearn.linear_model import LogisticRegression

    names = sorted({b.left for b in battles} | {b.right for b in battles})
    index = {n: k for k, n in enumerate(names)}
    rows, outcomes = [], []
    for b in battles:
        row = np.zeros(len(names))
        row[index[b.left]], row[index[b.right]] = math.log(10), -math.log(10)
        won = {"left": (1, 1), "right": (0, 0)}.get(b.winner, (1, 0))
        rows += [row, row]
        outcomes += list(won)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-12, max_iter=100_000)
        model.fit(np.array(rows), np.array(outcomes))
    coef = 400 * model.coef_[0]
    return dict(zip(names, coef - coef.mean() + 1000))


@pytest.mark.parametrize("n, seed", [(400, 1), (150, 7)])
def test_bradley_terry_equals_a_logistic_regression(n, seed):
    battles = simulated(n, seed)
    ratings, smoothed = fit(battles)
    reference = sklearn_ratings(battles)
    assert not smoothed
    for name in TRUE:
        assert ratings[name] == pytest.approx(reference[name], abs=1e-3)
    assert sorted(ratings, key=ratings.get, reverse=True) == ["a", "b", "c", "d"] or n < 400


def test_a_variant_that_never_lost_gets_a_finite_rating_flagged():
    battles = [Battle("a", "b", "left")] * 3 + [Battle("b", "c", "left"), Battle("c", "b", "left")]
    ratings, smoothed = fit(battles)
    assert smoothed and all(math.isfinite(r) for r in ratings.values())
    assert ratings["a"] > ratings["b"] == pytest.approx(ratings["c"])


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_votes():
    few, many = leaderboard(simulated(100, 3), rounds=300), leaderboard(simulated(1600, 3), rounds=300)
    for board in (few, many):
        for row in board["variants"]:
            assert row["ci_low"] <= row["rating"] <= row["ci_high"]
            assert row["wins"] + row["ties"] + row["losses"] == row["battles"]
    width = {b: np.mean([r["ci_high"] - r["ci_low"] for r in board["variants"]]) for b, board in (("few", few), ("many", many))}
    assert width["many"] < 0.6 * width["few"]  # 16x the votes: about a quarter of the width
    assert [r["name"] for r in many["variants"]] == ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("arena")
    return (tiny_model_dir(root / "tiny", seed=3, max_position_embeddings=256),
            tiny_model_dir(root / "tiny-b", seed=4, max_position_embeddings=256))


def test_arena_votes_leaderboard_and_feedback_export(models, tmp_path):
    from pocketlm.serve.report import ab_report

    db = tmp_path / "log.db"
    config = load_serve_config(None, [str(m) for m in models], database=str(db), log_prompts=True)
    names = [m.name for m in models]
    pairs = []
    with running_server(create_app(config)) as url, httpx.Client(base_url=url, timeout=60) as client:
        def ask(model: str, prompt: str, temperature: float = 0.0) -> dict:
            reply = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 6, "temperature": temperature,
                                                              "messages": [{"role": "user", "content": prompt}]})
            assert reply.status_code == 200, reply.text
            return reply.json()

        for k in range(6):  # the arena: both models answer one prompt; the scripted user prefers tiny's answers
            left, right = ask(names[k % 2], f"question {k}"), ask(names[1 - k % 2], f"question {k}")
            winner = "left" if k % 2 == 0 else "right"
            vote = client.post("/v1/arena/votes", json={"left": left["id"], "right": right["id"], "winner": winner})
            assert vote.status_code == 200, vote.text
            assert vote.json()["left_variant"] == names[k % 2] and vote.json()["winner"] == winner
            pairs.append((left, right, winner))
        same = client.post("/v1/arena/votes", json={"left": left["id"], "right": left["id"], "winner": "tie"})
        missing = client.post("/v1/arena/votes", json={"left": left["id"], "right": "chatcmpl-nope", "winner": "tie"})
        wrong = client.post("/v1/arena/votes", json={"left": left["id"], "right": right["id"], "winner": "both"})
        assert (same.status_code, missing.status_code, wrong.status_code) == (400, 404, 400)
        assert "same response" in same.json()["error"]["message"]
        # thumbs on two sampled answers to one prompt: one up, one down
        up, down = ask(names[0], "tell me", 1.0), ask(names[0], "tell me", 1.0)
        for reply, rating in ((up, "up"), (down, "down")):
            assert client.post("/v1/feedback", json={"id": reply["id"], "rating": rating}).status_code == 200
        stats = client.get("/api/stats").json()

    board = stats["report"]["arena"]
    assert board["battles"] == 6 and [v["name"] for v in board["variants"]] == names  # tiny won every battle
    assert board["smoothed"] and board["variants"][0]["wins"] == 6
    assert ab_report(db)["arena"] == board

    out = tmp_path / "feedback"
    done = subprocess.run([sys.executable, "-m", "pocketlm", "feedback", "export", "--db", str(db), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    dpo = [json.loads(line) for line in (out / "dpo.jsonl").read_text().splitlines()]
    arena = [r for r in dpo if r["source"] == "arena"]
    expected = []
    for left, right, winner in pairs:  # a pair needs two different answers, neither empty
        chosen, rejected = (left, right) if winner == "left" else (right, left)
        texts = (chosen["choices"][0]["message"]["content"], rejected["choices"][0]["message"]["content"])
        if all(texts) and texts[0] != texts[1]:
            expected.append(texts)
    assert expected and [(r["chosen"], r["rejected"]) for r in arena] == expected
    thumbs = [r for r in dpo if r["source"] == "thumbs"]
    up_text, down_text = up["choices"][0]["message"]["content"], down["choices"][0]["message"]["content"]
    if up_text and down_text and up_text != down_text:
        assert thumbs == [{"prompt": [{"role": "user", "content": "tell me"}], "source": "thumbs",
                           "chosen": up["choices"][0]["message"]["content"],
                           "rejected": down["choices"][0]["message"]["content"]}]
    for where, record in read_records(out / "dpo.jsonl"):
        preference(record, where)  # the training loop's own reader takes every pair
    sft = read_records(out / "sft.jsonl")
    assert {conversation(r, w)[-1]["content"] for w, r in sft} >= ({up_text} - {""}) | {chosen for chosen, _ in expected}
    counts = json.loads((out / "counts.json").read_text())
    assert counts["arena_votes"] == 6 and counts["dpo"] == len(dpo) and counts["sft"] == len(sft)


def test_export_without_logged_text_says_what_to_do(models, tmp_path):
    db = tmp_path / "log.db"
    config = load_serve_config(None, [str(models[0])], database=str(db))  # log_prompts off
    with running_server(create_app(config)) as url, httpx.Client(base_url=url, timeout=60) as client:
        reply = client.post("/v1/completions", json={"model": models[0].name, "prompt": "hi", "max_tokens": 2}).json()
        client.post("/v1/feedback", json={"id": reply["id"], "rating": "up"})
    done = subprocess.run([sys.executable, "-m", "pocketlm", "feedback", "export", "--db", str(db), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: the request log has votes but no prompt or answer text: start the server "
                                   "with `log_prompts: true` so that feedback can become training data")
