"""The feedback loop as a pipeline: a server's thumbs (logged with their text) become DPO pairs in a feedback stage,
a DPO stage trains a LoRA adapter on them, and the serve stage's A/B experiment serves it beside the model the
votes were on. New votes in the log re-run the loop; nothing else does."""

from __future__ import annotations

import json

import httpx
import yaml
from helpers import tiny_model_dir
from serve_helpers import running_server

from pocketlm.pipeline import load_pipeline, read_lock, run_pipeline
from pocketlm.serve.app import create_app
from pocketlm.serve.config import load_serve_config
from pocketlm.serve.report import ab_report


def vote_on_answers(model, db, prompts: list[str]) -> None:
    """Two sampled answers to each prompt: the first gets a thumbs-up, the second a thumbs-down."""
    config = load_serve_config(None, [str(model)], database=str(db), log_prompts=True)
    with running_server(create_app(config)) as url, httpx.Client(base_url=url, timeout=60) as client:
        for prompt in prompts:
            for rating in ("up", "down"):
                reply = client.post("/v1/chat/completions", json={
                    "model": model.name, "max_tokens": 8, "temperature": 1.0,
                    "messages": [{"role": "user", "content": prompt}]})
                assert reply.status_code == 200, reply.text
                assert client.post("/v1/feedback", json={"id": reply.json()["id"], "rating": rating}).status_code == 200


def test_votes_become_a_tuned_variant_served_beside_the_current_one(tmp_path):
    current = tiny_model_dir(tmp_path / "current")
    votes, ab_log = tmp_path / "round0.db", tmp_path / "round1.db"
    vote_on_answers(current, votes, [f"tell me about thing {k}" for k in range(8)])
    recipe = {
        "name": "dpo", "out_dir": "unused", "seed": 0, "init_from": str(current),
        "data": {"source": "replaced-by-the-pipeline.jsonl", "val_fraction": 0.25},
        "train": {"objective": "dpo", "max_steps": 4, "batch_size": 2, "block_size": 64, "compile": False,
                  "threads": 1},
        "dpo": {"beta": 0.1}, "optim": {"lr": 1.0e-3, "warmup_steps": 1},
        "adapter": {"type": "lora", "r": 4, "alpha": 8},
        "eval": {"interval": 4, "iters": 1}, "checkpoint": {"interval": 4, "keep_last": 1},
        "log": {"interval": 2, "progress": False},
    }
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(recipe))
    stages = {
        "feedback": {"type": "feedback", "db": str(votes)},
        "tuned": {"type": "dpo", "recipe": str(tmp_path / "dpo.yaml"),
                  "set": {"data.source": "${feedback}/dpo.jsonl"}},
        "serve": {"type": "serve", "experiment": "assistant", "variants": {"current": str(current), "tuned": "${tuned}"},
                  "log_prompts": True, "database": str(ab_log)},
    }
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump({"name": "loop", "stages": stages}, sort_keys=False))
    out = tmp_path / "run"

    assert run_pipeline(load_pipeline(path, directory=out)).ran == ["feedback", "tuned", "serve"]
    lock = read_lock(out)["stages"]
    pairs = [json.loads(line) for line in (out / "feedback" / "data" / "dpo.jsonl").read_text().splitlines()]
    assert lock["feedback"]["metrics"]["votes"] == 16 and lock["feedback"]["metrics"]["dpo"] == len(pairs) >= 4
    assert all(p["source"] == "thumbs" for p in pairs)
    tuned = lock["tuned"]["output"]
    assert tuned == str(out / "tuned" / "run" / "model") and lock["tuned"]["metrics"]["steps"] == 4  # LoRA merged
    assert (out / "tuned" / "run" / "adapter" / "adapter_config.json").is_file()  # and the adapter on its own

    served = load_serve_config(out / "serve" / "serve.yaml")  # what `pocketlm serve --config` starts
    assert {v.name: v.model for v in served.experiment.variants} == {"current": str(current), "tuned": tuned}
    with running_server(create_app(served)) as url, httpx.Client(base_url=url, timeout=60) as client:
        seen = set()
        for user in range(16):  # each user is assigned a variant; both get traffic
            reply = client.post("/v1/chat/completions", json={
                "model": "assistant", "max_tokens": 4, "user": f"user-{user}",
                "messages": [{"role": "user", "content": "hello"}]})
            assert reply.status_code == 200, reply.text
            seen.add(reply.json()["variant"])
            client.post("/v1/feedback", json={"id": reply.json()["id"], "rating": "up"})
    assert seen == {"current", "tuned"}
    report = ab_report(ab_log, "assistant", baseline="current")
    assert [c["variant"] for c in report["comparisons"]] == ["tuned"]
    assert sum(v["thumbs_up"] for v in report["variants"].values()) == 16

    assert run_pipeline(load_pipeline(path, directory=out)).ran == []
    vote_on_answers(current, votes, ["one more question"])  # new votes: the loop runs again
    again = run_pipeline(load_pipeline(path, directory=out))
    assert again.ran == ["feedback", "tuned", "serve"] and read_lock(out)["stages"]["feedback"]["metrics"]["votes"] == 18
