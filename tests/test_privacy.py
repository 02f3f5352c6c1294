"""Private training (train/privacy.py): per-sample gradients against torch.func, epsilon against Opacus' and
dp-accounting's accountants run on their own, a private LoRA that leaves the base bit-identical, exact resume
with the accountant's state, and every option that would void the guarantee refused in one line."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call, grad, vmap

from pocketlm.adapt.adapters import attach, config_from_spec
from pocketlm.config import ModelConfig
from pocketlm.errors import ConfigError
from pocketlm.kernels import train_attention
from pocketlm.loading import open_model
from pocketlm.model import LlamaForCausalLM
from pocketlm.train import load_recipe, train
from pocketlm.train.instruct import IGNORE
from pocketlm.train.loop import make_optimizer
from pocketlm.train.objectives import lm_loss, per_example_lm_loss
from pocketlm.train.privacy import PrivateTraining, per_sample_module

from helpers import tiny_config, tiny_mixture_dir
from test_adapt import base, sft_file, write_recipe  # noqa: F401 (fixtures)
from test_train import prepared, tiny_recipe  # noqa: F401 (fixture)


def _batch(rows=4, seq=12, vocab=300, seed=0):
    """Rows with different numbers of labelled tokens (SFT's prompt positions are IGNORE)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    for r in range(rows):
        labels[r, : 2 * r] = IGNORE
    return {"input_ids": ids, "labels": labels}


def _lora(model):
    from pocketlm.train.recipe import AdapterSpec

    attach(model, config_from_spec(model, AdapterSpec(type="lora", r=4, alpha=8, dropout=0.0)))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give it values, so every LoRA gradient is non-trivial
            with torch.no_grad():
                p.normal_(std=0.05)
    return model


def _reference_per_sample(model, batch, loss_fn, monkeypatch):
    """torch.func: vmap over rows of the gradient of one row's loss (PyTorch's attention, since the training
    kernel is a C++ autograd function that functorch cannot transform)."""
    monkeypatch.setitem(train_attention._decided, "ok", False)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def row_loss(trainable, ids, labels):
        run = lambda x: functional_call(model, {**frozen, **trainable}, (x,))  # noqa: E731
        return loss_fn(run, {"input_ids": ids[None], "labels": labels[None]})[0]

    found = vmap(grad(row_loss), in_dims=(None, 0, 0))(params, batch["input_ids"], batch["labels"])
    monkeypatch.delitem(train_attention._decided, "ok")
    return found


@pytest.mark.parametrize("variant", ["untied", "tied", "lora"])
@pytest.mark.parametrize("loss_fn", [per_example_lm_loss, lm_loss], ids=["per-example-sft", "language-modelling"])
def test_per_sample_gradients_equal_torch_func(variant, loss_fn, monkeypatch):
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig.from_dict(tiny_config(tie_word_embeddings=variant == "tied")))
    model.init_weights(std=0.1, seed=0)
    if variant == "lora":
        _lora(model)
    batch = _batch()
    if loss_fn is lm_loss:  # language modelling labels every position (a mean over the batch is a mean of rows)
        batch["labels"] = torch.randint(0, 300, batch["labels"].shape)
    want = _reference_per_sample(copy.deepcopy(model), batch, loss_fn, monkeypatch)
    module = per_sample_module(model)
    loss, _ = loss_fn(module, batch)
    loss.backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trained) == set(want) and (variant != "lora" or all("lora_" in n for n in trained))
    for name, p in trained.items():
        assert p.grad_sample is not None, name
        torch.testing.assert_close(p.grad_sample, want[name], atol=2e-6, rtol=1e-4, msg=name)
    module._close()


@pytest.mark.parametrize("variant", ["untied", "lora"])
@pytest.mark.parametrize("loss_fn", [per_example_lm_loss, lm_loss], ids=["per-example-sft", "language-modelling"])
def test_ghost_clipping_sums_the_rows_clipped_gradients(variant, loss_fn, monkeypatch, tmp_path, prepared):  # noqa: F811
    """Ghost clipping never holds a row's gradient; what it leaves in .grad must still be the sum over rows of
    each row's gradient clipped to max_grad_norm, here from torch.func's per-row gradients, with the bound at
    the rows' median norm so that some rows are clipped and some are not."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig.from_dict(tiny_config()))
    model.init_weights(std=0.1, seed=0)
    if variant == "lora":
        _lora(model)
    batch = _batch(rows=6)
    if loss_fn is lm_loss:
        batch["labels"] = torch.randint(0, 300, batch["labels"].shape)
    rows = _reference_per_sample(copy.deepcopy(model), batch, loss_fn, monkeypatch)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in rows.values()]).norm(dim=0)
    bound = float(norms.median())
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    recipe = _private_recipe(tmp_path, prepared, **{"privacy.clipping": "ghost", "privacy.max_grad_norm": bound})
    private = PrivateTraining(recipe, model, make_optimizer(model, recipe), examples=1000)
    loss, _ = loss_fn(private.module, batch)
    private.backward(loss)
    for name, p in model.named_parameters():
        if p.requires_grad:
            want = (factors.view(-1, *[1] * (rows[name].dim() - 1)) * rows[name]).sum(0)
            torch.testing.assert_close(p.grad, want, atol=1e-5, rtol=1e-4, msg=name)
            assert getattr(p, "grad_sample", None) is None, f"{name} held every row's gradient"
    private.close()


def test_ghost_clipping_refuses_a_weight_two_layers_share(tmp_path, prepared):  # noqa: F811
    with pytest.raises(ConfigError, match=r"^privacy.clipping ghost: model.embed_tokens and lm_head share one "
                                          r"trainable weight[^\n]*clipping: per_sample"):
        _private(tmp_path, prepared, **{"privacy.clipping": "ghost"})


def _private(tmp_path, prepared, **changes):  # noqa: F811
    """A tiny private pretraining run in this process: (run dir, its log, its pocketlm.json)."""
    train(_private_recipe(tmp_path, prepared, **changes), progress=False)
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return run, log, json.loads((run / "model" / "pocketlm.json").read_text())


def _private_recipe(tmp_path, prepared, **changes):  # noqa: F811
    """The tiny recipe, 12 steps, with a privacy section (noise multiplier 1.1 unless `privacy.*` says)."""
    import yaml

    plain = {"train.max_steps": 12, "eval.interval": 6, "checkpoint.interval": 6,
             **{k: v for k, v in changes.items() if not k.startswith("privacy.")}}
    privacy = {k[len("privacy."):]: v for k, v in changes.items() if k.startswith("privacy.")}
    path = tiny_recipe(tmp_path, prepared, **plain)
    spec = yaml.safe_load(path.read_text())
    spec["privacy"] = {**({} if "epsilon" in privacy else {"noise_multiplier": 1.1}), **privacy}
    path.write_text(yaml.safe_dump(spec))
    return load_recipe(path)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_equals_the_accountants_run_on_their_own(accountant, tmp_path, prepared):  # noqa: F811
    from dp_accounting import dp_event, pld, rdp
    from opacus.accountants import create_accountant

    run, log, record = _private(tmp_path, prepared, **{"privacy.accountant": accountant})
    p = record["privacy"]
    rows = p["rows"]
    assert p["sample_rate"] == 8 / rows and p["delta"] == 1 / (10 * rows) and p["steps"] == 12
    logged = [r["epsilon"] for r in log if "epsilon" in r]
    assert len(logged) == 2 and 0 < logged[0] < logged[1] == p["epsilon"]
    opacus = create_accountant(accountant)
    for _ in range(12):
        opacus.step(noise_multiplier=1.1, sample_rate=8 / rows)
    assert logged[1] == pytest.approx(opacus.get_epsilon(delta=p["delta"]), abs=1e-4)
    # Google's dp-accounting, an implementation nobody here wrote: RDP for RDP, privacy loss distributions
    # (as tight as PRV) for PRV
    event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(8 / rows, dp_event.GaussianDpEvent(1.1)), 12)
    other = (rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant(value_discretization_interval=1e-4))
    theirs = other.compose(event).get_epsilon(p["delta"])
    if accountant == "rdp":
        assert logged[1] == pytest.approx(theirs, rel=0.03)
    else:  # Opacus' PRV reports an upper bound within its eps_error, 0.01
        assert theirs - 1e-3 <= logged[1] <= theirs + 0.011
    card = (run / "model" / "README.md").read_text()
    assert "## Differential privacy" in card and f"({p['epsilon']}, " in card


def test_a_target_epsilon_is_spent_and_not_exceeded(tmp_path, prepared):  # noqa: F811
    _, log, record = _private(tmp_path, prepared, **{"privacy.epsilon": 3.0})
    assert 3.0 * 0.97 <= record["privacy"]["epsilon"] <= 3.0
    assert record["privacy"]["target_epsilon"] == 3.0
    assert all(r["loss"] == r["loss"] for r in log)  # no NaN


@pytest.mark.parametrize("clipping", ["per_sample", "ghost"])
def test_a_private_run_resumes_exactly(tmp_path, prepared, clipping):  # noqa: F811
    changes = {"privacy.clipping": clipping, "model.tie_word_embeddings": False}
    whole, whole_log, whole_record = _private(tmp_path / "whole", prepared, **changes)

    class Stop(Exception):
        pass

    def stop_after_the_checkpoint(record):
        if record["step"] == 8:
            raise Stop

    recipe = _private_recipe(tmp_path / "cut", prepared, **changes)
    with pytest.raises(Stop):
        train(recipe, progress=False, on_step=stop_after_the_checkpoint)
    train(recipe.model_copy(update={"resume": True}), progress=False)
    cut = tmp_path / "cut" / "run"
    for name, tensor in load_file(str(whole / "model" / "model.safetensors")).items():
        assert torch.equal(tensor, load_file(str(cut / "model" / "model.safetensors"))[name]), name
    resumed = json.loads((cut / "model" / "pocketlm.json").read_text())["privacy"]
    assert resumed == whole_record["privacy"] and resumed["clipping"] == clipping


def test_private_lora_leaves_the_base_bit_identical(base, sft_file, tmp_path):  # noqa: F811
    path = write_recipe(tmp_path, init_from=str(base), data={"source": str(sft_file)},
                        train={"objective": "sft"}, sft={"packing": False},
                        adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                        privacy={"noise_multiplier": 1.0, "max_grad_norm": 0.5})
    recipe = load_recipe(path)
    model, _ = open_model(str(base))
    model = model.float()
    attach(model, config_from_spec(model, recipe.adapter))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    private = PrivateTraining(recipe, model, make_optimizer(model, recipe), examples=100)
    for step in range(3):
        loss, _ = per_example_lm_loss(private.module, _batch(seed=step, vocab=model.config.vocab_size, seq=16))
        loss.backward()
        private.micro_step(last=True, empty=False)
    private.close()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"{name} changed"
    # and the whole recipe trains from the command line, recording its guarantee
    done = subprocess.run([sys.executable, "-m", "pocketlm", "train", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epsilon" in json.loads((tmp_path / "run" / "adapter" / "pocketlm.json").read_text())["privacy"]


@pytest.mark.parametrize("clipping", ["per_sample", "ghost"])
def test_a_micro_batch_with_no_rows_still_adds_noise(base, sft_file, tmp_path, clipping):  # noqa: F811
    """Poisson sampling can draw no row: the step is still a noisy step (skipping it would leak that)."""
    recipe = load_recipe(write_recipe(tmp_path, init_from=str(base), data={"source": str(sft_file)},
                                      train={"objective": "sft"}, sft={"packing": False},
                                      privacy={"noise_multiplier": 1.0, "clipping": clipping}))
    model = open_model(str(base))[0].float()
    before = [p.detach().clone() for p in model.parameters()]
    private = PrivateTraining(recipe, model, make_optimizer(model, recipe), examples=100)
    private.micro_step(last=True, empty=True)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert private.accountant.history == [(1.0, recipe.train.batch_size / 100, 1)]


# ---- refused, in one line -----------------------------------------------------------------------
@pytest.mark.parametrize("privacy, extra, message", [
    ({"epsilon": 0}, {}, "privacy.epsilon 0.0 must be above 0"),
    ({"epsilon": -1}, {}, "privacy.epsilon -1.0 must be above 0"),
    ({}, {}, "give exactly one of epsilon (a target) or noise_multiplier"),
    ({"epsilon": 1, "noise_multiplier": 1}, {}, "give exactly one of epsilon"),
    ({"epsilon": 1, "poisson_sampling": False}, {}, "holds only for Poisson sampling"),
    ({"epsilon": 1}, {"train.compile": True}, "set train.compile: false"),
    ({"epsilon": 1}, {"train.dtype": "bfloat16"}, "train.dtype bfloat16 is not supported"),
])
def test_options_that_would_void_the_guarantee_are_refused(privacy, extra, message, tmp_path, prepared):  # noqa: F811
    path = tiny_recipe(tmp_path, prepared, **extra)
    import yaml

    spec = yaml.safe_load(path.read_text())
    spec["privacy"] = privacy
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="^[^\n]*" + re.escape(message)):
        load_recipe(path)


def test_sft_packing_dpo_and_prefix_are_refused(base, sft_file, tmp_path):  # noqa: F811
    cases = [({"train": {"objective": "sft"}}, "set sft.packing: false"),
             ({"train": {"objective": "dpo"}}, "DPO is not supported"),
             ({"train": {"objective": "sft"}, "sft": {"packing": False}, "adapter": {"type": "prefix"}},
              "prefix tuning is not supported")]
    for i, (sections, message) in enumerate(cases):
        path = write_recipe(tmp_path / str(i), init_from=str(base), data={"source": str(sft_file)},
                            privacy={"epsilon": 4}, **sections)
        with pytest.raises(ConfigError, match=message):
            load_recipe(path)


def test_a_delta_of_one_over_n_or_more_is_refused(tmp_path, prepared):  # noqa: F811
    with pytest.raises(ConfigError, match=r"privacy.delta 0.5 must be below 1 / N = .* training rows"):
        _private(tmp_path, prepared, **{"privacy.delta": 0.5})


def test_a_mixture_of_experts_is_refused_by_name(base, tmp_path):  # noqa: F811
    mixture = tiny_mixture_dir(tmp_path / "moe")
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 400)
    path = write_recipe(tmp_path, init_from=str(mixture), data={"source": str(text), "tokenizer": str(mixture)},
                        privacy={"noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="a mixture of experts mixes every row's tokens"):
        train(load_recipe(path), progress=False)


def test_layers_that_run_outside_opacus_hooks_are_named(tmp_path, prepared, monkeypatch):  # noqa: F811
    """Were the q, k, v (and gate, up) projections fused into one product, their hooks would never fire and
    their updates would go unclipped and unnoised: the first step refuses, naming them."""
    import pocketlm.model as model_module

    monkeypatch.setattr(model_module, "hooked", lambda module: False)
    with pytest.raises(ConfigError, match=r"no per-sample gradients for model\.layers\.0\.mlp\.gate_proj, "
                                          r"model\.layers\.0\.mlp\.up_proj, model\.layers\.0\.self_attn\.k_proj"):
        _private(tmp_path, prepared)


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path, prepared):  # noqa: F811
    path = tiny_recipe(tmp_path, prepared)
    path.write_text(path.read_text() + "privacy:\n  epsilon: -2\n")
    done = subprocess.run([sys.executable, "-m", "pocketlm", "train", str(path)], capture_output=True, text=True)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "privacy.epsilon -2.0 must be above 0" in lines[0], done.stderr
