"""Mixture-of-experts models against transformers' own MixtralForCausalLM: the router (softmax, top-k,
renormalised), experts run over the tokens routed to them, imported from a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pocketlm.checkpoint import load_model
from pocketlm.config import ModelConfig
from pocketlm.engine import SamplingParams, generate_tokens
from pocketlm.errors import ConfigError, UnsupportedModelError

import parity
from helpers import byte_level_tokenizer, tiny_config


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers' MixtralForCausalLM, pocketlm's import of its directory): 4 experts, top 2, a window."""
    import transformers

    root = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**tiny_config(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                                      sliding_window=16))
    return parity.imported(transformers.MixtralForCausalLM(config), root)


def test_logits_match_transformers(pair):
    parity.logits_match(*pair)


def test_greedy_generation_matches_transformers(pair):
    parity.greedy_matches(*pair)


def test_batched_decoding_equals_uncached_passes(pair):
    parity.batched_decoding_equals_uncached_passes(pair[1])


def test_training_gradients_match_transformers(pair):
    parity.gradients_match(*pair, lambda m: (m.model.layers[0].block_sparse_moe.gate.weight,),
                           lambda hf: (hf.model.layers[0].mlp.gate.weight,))


def test_top_k_larger_than_the_experts_is_one_line():
    with pytest.raises(ConfigError, match=r"num_experts_per_tok \(5\) must be between 1 and num_local_experts \(4\)"):
        ModelConfig.from_dict(tiny_config(num_local_experts=4, num_experts_per_tok=5))


def test_gguf_export_refuses_a_windowed_mixture(pair, tmp_path):
    from pocketlm.checkpoint import save_model_dir
    from pocketlm.convert.gguf_export import export_gguf

    _, model = pair
    out = save_model_dir(tmp_path / "m", model.config.to_hf_dict(), model.state_dict(), byte_level_tokenizer())
    with pytest.raises(UnsupportedModelError, match="sliding-window attention .* llama.cpp's llama architecture "
                       "ignores llama.attention.sliding_window"):
        export_gguf(out, tmp_path / "m.gguf")


def test_the_model_directory_loads_unchanged_in_transformers(pair, tmp_path):
    parity.directory_loads_in_transformers(pair[1], tmp_path / "m", "MixtralForCausalLM")


def test_load_balancing_loss_equals_transformers(pair):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    parity.router_matches(*pair, load_balancing_loss_func, 4, 2)


def _moe_recipe(shared_data, tmp_path, name: str, model: dict | None = None, **train) -> Path:
    import yaml

    from pocketlm.data import prepare

    prepared = tmp_path / "data"
    if not prepared.exists():
        prepare([shared_data / "tinyshakespeare" / "input.txt"], prepared, tokenizer="char", dedupe=False,
                scrub_pii=False, progress=False)
    recipe = {
        "name": name, "out_dir": str(tmp_path / name), "seed": 7,
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "num_local_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.01,
                  **(model or {})},
        "data": {"prepared": str(prepared)},
        "train": {"max_steps": 20, "batch_size": 8, "block_size": 32, "dtype": "float32", "threads": 1, **train},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5, "decay_steps": 20},
        "eval": {"interval": 10, "iters": 2},
        "checkpoint": {"interval": 5, "keep_last": 1},
        "log": {"interval": 1, "progress": False, "tensorboard": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _log(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("threads", [1, 2])  # 2: slices of each batch on two threads, each with its own routers' logits
def test_a_mixture_trains_with_its_router_loss_logged(shared_data, tmp_path, threads):
    import json

    from pocketlm.train import load_recipe, train

    out = train(load_recipe(_moe_recipe(shared_data, tmp_path, "moe", threads=threads)))
    records = _log(tmp_path / "moe")
    routed = [r["router_loss"] for r in records if "router_loss" in r]
    assert len(routed) == 20 and all(1.9 < x < 4.0 for x in routed)  # top_k (2) when balanced, at most E (4)
    assert records[-1]["loss"] < records[0]["loss"]
    for r in records:  # per layer, each expert's share of the step's top-k choices
        shares = torch.tensor(r["expert_share"])
        assert shares.shape == (2, 4) and torch.allclose(shares.sum(-1), torch.ones(2), atol=1e-4)
        assert r["expert_imbalance"] == pytest.approx(shares.max().item() * 4, abs=1e-3)
        assert 1 <= r["expert_imbalance"] <= 2  # 1 when even, E / k when every token picks the same two
    assert (tmp_path / "moe" / "loss.png").stat().st_size > 5000
    assert (tmp_path / "moe" / "expert_usage.png").stat().st_size > 5000
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4


def test_a_resumed_mixture_continues_exactly(shared_data, tmp_path):
    """The router loss is part of the objective: stopped at step 10 and resumed, the run logs what the
    uninterrupted one does."""
    from pocketlm.train import load_recipe, train

    train(load_recipe(_moe_recipe(shared_data, tmp_path, "whole")))
    train(load_recipe(_moe_recipe(shared_data, tmp_path, "halves", max_steps=10)))
    train(load_recipe(_moe_recipe(shared_data, tmp_path, "halves")).model_copy(update={"resume": True}))
    whole, halves = _log(tmp_path / "whole"), _log(tmp_path / "halves")
    assert [r["step"] for r in halves] == list(range(1, 21))
    for a, b in zip(whole[10:], halves[10:]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["router_loss"] == pytest.approx(b["router_loss"], abs=1e-6)
        assert a["expert_share"] == b["expert_share"]


def test_logged_expert_shares_are_the_steps_routing(shared_data, tmp_path):
    """Step 1 with two micro-batches on two batch threads each (four forward passes): its logged shares are the
    top-k choices of one forward pass of the initial weights over the step's eight rows, counted here."""
    from pocketlm.train import load_recipe, train
    from pocketlm.train.data_source import load_data
    from pocketlm.train.loop import build_model

    recipe = load_recipe(_moe_recipe(shared_data, tmp_path, "usage", max_steps=1, threads=2, grad_accum=2))
    train(recipe)
    data = load_data(recipe, True, lambda: None, True, per_step=8)
    model = build_model(recipe, data.tokenizer, torch.device("cpu"))  # the weights step 1 ran with
    collected: list = []
    with torch.no_grad():
        model(data.train.batch(data.train.picks(recipe.seed, 0, 8), torch.device("cpu"))["input_ids"],
              router_logits=collected)
    counts = torch.stack([torch.bincount(torch.topk(logits.softmax(-1), 2).indices.flatten(), minlength=4)
                          for logits in collected])
    logged = torch.tensor(_log(tmp_path / "usage")[0]["expert_share"])
    assert torch.allclose(logged, counts / (8 * 32 * 2), atol=1e-5)  # 8 rows x 32 tokens x top 2 per layer


def test_ddp_two_processes_match_one_with_the_router_loss(shared_data, tmp_path):
    """Two gloo processes, each on half of every batch, log one process's losses, router losses and expert
    shares. Each process's own load-balancing term, averaged, would not do: it is off by 5e-4 from the batch's
    at step 1 here (the loss is not linear in tokens); with the top-k counts summed over the processes first, the
    two runs differ only in the order of fp32 sums (a few 1e-7), and 1e-5 leaves room for 8 steps of drift.
    8 experts, top 1, over 16 tokens a process: from step 5 some expert gets no token at all, whose weights then
    take no part in a backward (DDP has to be told to look for them)."""
    import os
    import subprocess
    import sys

    from pocketlm.train import load_recipe, train

    shape = {"model": {"num_local_experts": 8, "num_experts_per_tok": 1}, "max_steps": 8, "batch_size": 4,
             "block_size": 16}
    train(load_recipe(_moe_recipe(shared_data, tmp_path, "one", **shape)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pocketlm", "train", str(_moe_recipe(shared_data, tmp_path, "two", **shape))],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 9))
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["router_loss"] == pytest.approx(b["router_loss"], abs=1e-5)
        assert torch.allclose(torch.tensor(a["expert_share"]), torch.tensor(b["expert_share"]), atol=1e-5)
    assert any(0.0 in row for r in two for row in r["expert_share"])  # an expert no token went to


def test_ddp_sft_of_a_mixture_matches_one_process(tmp_path):
    """SFT sums the loss over labelled tokens, and the processes' rows hold different numbers of them: the router
    term is weighted by the micro-batch's labelled tokens over every process, as in one process (weighted by each
    process's own, the runs part by 2e-3 at step 2). An upcycled tiny model, replies of 1 to 7 words."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    from helpers import tiny_model_dir
    from pocketlm.train import load_recipe, train
    from pocketlm.upcycle import upcycle_dir

    moe = upcycle_dir(tiny_model_dir(tmp_path / "dense", seed=3), tmp_path / "moe", experts=4, top_k=2)
    words = ["the", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]
    (tmp_path / "sft.json").write_text(json.dumps([{"instruction": f"Repeat the word {w}", "input": "",
                                                    "output": " ".join([w] * (1 + i % 7))}
                                                   for i, w in enumerate(words * 6)]))
    for name in ("one", "two"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "name": name, "out_dir": str(tmp_path / name), "seed": 3, "init_from": str(moe),
            "data": {"source": str(tmp_path / "sft.json")},
            "train": {"objective": "sft", "max_steps": 6, "batch_size": 4, "block_size": 64, "dtype": "float32",
                      "threads": 1},
            "optim": {"lr": 3e-3, "warmup_steps": 0, "weight_decay": 0.0}, "eval": {"interval": 6, "iters": 1},
            "checkpoint": {"interval": 6, "keep_last": 1}, "log": {"interval": 1, "progress": False,
                                                                   "tensorboard": False}}))
    train(load_recipe(tmp_path / "one.yaml"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pocketlm", "train", str(tmp_path / "two.yaml")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["router_loss"] == pytest.approx(b["router_loss"], abs=1e-5)


def test_upcycling_keeps_the_dense_models_logits(tmp_path):
    """Every expert a copy of the MLP and weights summing to 1: the mixture computes the dense model, from the
    command line, and transformers loads it as a Mixtral."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from helpers import tiny_model_dir

    dense_dir = tiny_model_dir(tmp_path / "dense", seed=4)
    run = subprocess.run([sys.executable, "-m", "pocketlm", "upcycle", str(dense_dir), str(tmp_path / "moe"),
                          "--experts", "4", "--top-k", "2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    dense, _ = load_model(dense_dir)
    moe, _ = load_model(tmp_path / "moe")
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert (moe(ids) - dense(ids)).abs().max().item() <= 1e-5
        assert (AutoModelForCausalLM.from_pretrained(tmp_path / "moe")(ids).logits - dense(ids)).abs().max().item() <= 1e-4
    again = subprocess.run([sys.executable, "-m", "pocketlm", "upcycle", str(tmp_path / "moe"), str(tmp_path / "x"),
                            "--experts", "2"], capture_output=True, text=True)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'moe'} is already a mixture of 4 experts"]
    wide = subprocess.run([sys.executable, "-m", "pocketlm", "upcycle", str(dense_dir), str(tmp_path / "y"),
                           "--experts", "2", "--top-k", "3"], capture_output=True, text=True)
    assert wide.returncode == 1 and "num_experts_per_tok (3) must be between 1 and num_local_experts (2)" in wide.stderr
    assert len(wide.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_experts_compute_the_quantized_dense_model(tmp_path, method):
    """Every expert's projections quantized (the router stays in float). A dense model upcycled (its experts are
    copies of its MLP) and then quantized gives what the dense model quantized the same way gives, and it
    decodes as its own uncached passes do."""
    from helpers import tiny_model_dir
    from pocketlm.quant import Int4Linear, Int8Linear, QuantScheme
    from pocketlm.quantize import quantize_dir
    from pocketlm.upcycle import upcycle_dir

    dense_dir = tiny_model_dir(tmp_path / "dense", seed=5)
    moe_dir = upcycle_dir(dense_dir, tmp_path / "moe", experts=4, top_k=2)
    scheme = QuantScheme(method, 32 if method == "int4" else None)
    dense, _ = load_model(quantize_dir(dense_dir, tmp_path / f"dense-{method}", scheme))
    moe, _ = load_model(quantize_dir(moe_dir, tmp_path / f"moe-{method}", scheme))
    layer = moe.model.layers[0].block_sparse_moe
    kind = Int4Linear if method == "int4" else Int8Linear
    assert all(isinstance(getattr(e, n), kind) for e in layer.experts for n in ("w1", "w2", "w3"))
    assert not isinstance(layer.gate, (Int4Linear, Int8Linear))  # tokens go where the float router sends them
    ids = torch.randint(0, 300, (2, 30))
    with torch.no_grad():  # an expert sees a subset of the rows, and few rows may take the exact int4 kernels
        assert (moe(ids) - dense(ids)).abs().max().item() <= (1e-5 if method == "int8" else 1e-3)
    prompt = ids[0, :10].tolist()
    out = list(generate_tokens(moe, prompt, SamplingParams(max_new_tokens=16, ignore_eos=True)))
    with torch.no_grad():
        logits = moe(torch.tensor([prompt + out]))[0, len(prompt) - 1:-1]
    assert logits.argmax(-1).tolist() == out
