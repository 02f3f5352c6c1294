"""The training loop: recipes validated up front, exact resume after SIGKILL, atomic checkpoints, DDP."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from pocketlm.errors import ConfigError
from pocketlm.train import load_recipe, train
from pocketlm.train.loop import lr_at
from pocketlm.train.state import latest_checkpoint

STEPS = 30


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory):
    from pocketlm.data import prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare([shared_data / "tinyshakespeare" / "input.txt"], out, tokenizer="char", dedupe=False, scrub_pii=False,
            progress=False)
    return out


def tiny_recipe(tmp_path: Path, prepared: Path, **changes) -> Path:
    recipe = {
        "name": "tiny", "out_dir": str(tmp_path / "run"), "seed": 7,
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
        "data": {"prepared": str(prepared)},
        "train": {"max_steps": STEPS, "batch_size": 8, "block_size": 32, "dtype": "float32", "threads": 1},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5},
        "eval": {"interval": 10, "iters": 2},
        "checkpoint": {"interval": 5, "keep_last": 2},
        "log": {"interval": 1, "progress": False, "tensorboard": False},
    }
    for key, value in changes.items():
        node = recipe
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r["loss"] for r in records}


def run_cli(*args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "pocketlm", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kwargs)


# ---- recipes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"optim.lr_rate": 1e-3}, "optim.lr_rate: unknown key; did you mean 'lr'?"),
    ({"train.max_steps": "many"}, "train.max_steps: Input should be a valid integer"),
    ({"train.dtype": "fp8"}, "train.dtype: Input should be 'auto', 'float32' or 'bfloat16'"),
    ({"data.prepared": "/nonexistent/data"}, "data.prepared: /nonexistent/data: not a prepared data directory"),
])
def test_bad_recipe_is_one_line_before_any_work(tmp_path, prepared, change, message):
    path = tiny_recipe(tmp_path, prepared, **change)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)
    proc = run_cli("train", path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "run").exists()


def test_missing_data_source_and_bad_override(tmp_path, prepared):
    path = tiny_recipe(tmp_path, prepared)
    with pytest.raises(ConfigError, match="data.source: no/such/file.txt: no such file"):
        load_recipe(path, overrides=["data.prepared=null", "data.source=no/such/file.txt"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_recipe(path, overrides=["train.max_steps"])


def test_learning_rate_schedule(tmp_path, prepared):
    recipe = load_recipe(tiny_recipe(tmp_path, prepared, **{"train.max_steps": 100, "optim.warmup_steps": 10}))
    assert lr_at(0, recipe) == pytest.approx(3e-3 / 11)
    assert lr_at(9, recipe) == pytest.approx(3e-3 * 10 / 11)
    assert lr_at(10, recipe) == pytest.approx(3e-3)
    assert lr_at(55, recipe) == pytest.approx(3e-4 + 0.5 * (3e-3 - 3e-4))
    assert lr_at(100, recipe) == pytest.approx(3e-4)


# ---- a whole run -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(prepared, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    final = train(load_recipe(tiny_recipe(tmp, prepared)))
    return tmp / "run", final


def test_run_writes_model_logs_and_plot(reference_run):
    from pocketlm.checkpoint import load_model, read_provenance
    from pocketlm.engine import SamplingParams
    from pocketlm.streaming import generate

    run_dir, final = reference_run
    steps = losses(run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert steps[STEPS] < steps[1] - 0.5  # it learns
    assert (run_dir / "loss.png").stat().st_size > 5000
    record = read_provenance(final)
    assert record["recipe"]["name"] == "tiny" and record["metrics"]["steps"] == STEPS
    logged = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
    assert record["metrics"]["val_loss"] == [r["val_loss"] for r in logged if "val_loss" in r][-1]
    assert record["metrics"]["best_val_loss"] == min(r["val_loss"] for r in logged if "val_loss" in r)
    model, tokenizer = load_model(final)
    assert len(generate(model, tokenizer, "ROMEO:", SamplingParams(max_new_tokens=10)).token_ids) == 10
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert ckpts[-2:] == ["step-0000025", "step-0000030"] and len(ckpts) <= 3  # last 2, plus the best


def test_a_run_gives_the_caller_its_thread_count_back(prepared, tmp_path):
    """train.threads is the run's own: Python code after train() (an evaluation, the next test) keeps its threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        train(load_recipe(tiny_recipe(tmp_path, prepared, **{"train.max_steps": 2, "train.threads": 1})))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_existing_run_needs_resume(reference_run):
    run_dir, _ = reference_run
    with pytest.raises(ConfigError, match="resume=true"):
        train(load_recipe(run_dir.parent / "recipe.yaml"))


def test_sigkill_and_resume_reproduce_losses_exactly(reference_run, prepared, tmp_path):
    expected = losses(reference_run[0])
    path = tiny_recipe(tmp_path, prepared)
    kill_at = random.Random().randint(6, STEPS - 3)
    # the same run, slowed to ~50 ms a step so that the kill lands mid-run, at a random step
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import time
        import pocketlm.train.batches as batches
        real = batches.batch_starts
        batches.batch_starts = lambda *a: (time.sleep(0.05), real(*a))[1]
        from pocketlm.train import load_recipe, train
        train(load_recipe({str(path)!r}))
    """))
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= kill_at:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint is not None and checkpoint.name < f"step-{STEPS:07d}", f"killed at step {kill_at}"
    train(load_recipe(path, overrides=["resume=true"]))
    assert losses(tmp_path / "run") == expected, f"killed at step {kill_at}"


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(reference_run, prepared, tmp_path):
    """The process dies half-way through writing its second checkpoint (step 10)."""
    path = tiny_recipe(tmp_path, prepared)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import os, signal
        import pocketlm.train.state as state
        real = state.save_file
        def dying_save(tensors, filename, *a, **k):
            real(tensors, filename, *a, **k)
            if state.save_file.calls == 3:  # model + optimizer of step 5, then model of step 10
                with open(filename, "r+b") as f:
                    f.truncate(100)
                os.kill(os.getpid(), signal.SIGKILL)
            state.save_file.calls += 1
        dying_save.calls = 1
        state.save_file = dying_save
        from pocketlm.train import load_recipe, train
        train(load_recipe({str(path)!r}))
    """))
    proc = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]  # the half-written one
    assert latest_checkpoint(root).name == "step-0000005"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]  # cleaned up on resume
    train(load_recipe(path, overrides=["resume=true"]))
    assert losses(tmp_path / "run") == losses(reference_run[0])


# ---- distributed -------------------------------------------------------------------------------
def test_ddp_two_processes_match_one(prepared, tmp_path):
    single = tiny_recipe(tmp_path / "one", prepared, **{"train.max_steps": 20, "checkpoint.interval": 20})
    double = tiny_recipe(tmp_path / "two", prepared, **{"train.max_steps": 20, "checkpoint.interval": 20})
    train(load_recipe(single))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pocketlm", "train", str(double)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert sorted(one) == sorted(two) == list(range(1, 21))
    assert max(abs(one[s] - two[s]) for s in one) <= 1e-5


@pytest.mark.parametrize("name", ["shakespeare-char", "tinystories", "tinystories-moe"])
def test_shipped_recipes_are_valid(shared_data, name):
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml", check_paths=False)
    for source in recipe.data.sources():
        assert (shared_data / Path(source).relative_to("../shared/data")).is_file()


def test_init_from_a_model_directory_continues_training(reference_run, shared_data, tmp_path):
    """Fine-tuning path: start from a model directory, data tokenized with that model's tokenizer."""
    from safetensors.torch import load_file

    _, base = reference_run
    path = tiny_recipe(tmp_path, base, **{"train.max_steps": 5, "checkpoint.interval": 5})
    recipe = yaml.safe_load(path.read_text())
    del recipe["model"]
    recipe["init_from"] = str(base)
    recipe["data"] = {"source": str(shared_data / "tinyshakespeare" / "input.txt"), "tokenizer": str(base),
                      "dedupe": False, "scrub_pii": False}
    path.write_text(yaml.safe_dump(recipe))
    final = train(load_recipe(path))
    before, after = load_file(base / "model.safetensors"), load_file(final / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    first_loss = losses(tmp_path / "run")[1]
    assert first_loss < losses(reference_run[0])[1] - 0.5  # starts from the trained weights, not from scratch


def test_two_machines_without_a_shared_file_system(shared_data, prepared, tmp_path):
    """Two torchrun launchers with --nnodes 2, as on two machines: each has its own out_dir, so the second
    prepares its own copy of the data; the losses equal one process with the same global batch."""
    source = {"source": str(shared_data / "tinyshakespeare" / "input.txt"), "tokenizer": "char",
              "dedupe": False, "scrub_pii": False}
    single = tiny_recipe(tmp_path / "one", prepared, **{"train.max_steps": 10, "checkpoint.interval": 10})
    train(load_recipe(single))
    double = tiny_recipe(tmp_path / "two", prepared, **{"train.max_steps": 10, "checkpoint.interval": 10, "data": source})
    port = str(29600 + random.Random().randint(0, 300))
    launch = lambda rank, *extra: subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
         "--master_addr", "127.0.0.1", "--master_port", port, "-m", "pocketlm", "train", str(double), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    nodes = [launch(0), launch(1, f"out_dir={tmp_path / 'machine-b'}")]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert (tmp_path / "machine-b" / "data" / "manifest.json").is_file()
    one, two = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert sorted(one) == sorted(two) == list(range(1, 11))
    assert max(abs(one[s] - two[s]) for s in one) <= 1e-5


def test_clipping_through_fused_adamw_equals_clip_grad_norm():
    """The fused AdamW's gradient divisor gives the update that clip_grad_norm_ and AdamW give, in both
    regimes: a norm over the limit (clipped) and under it (left alone)."""
    from pocketlm.train.loop import clip_gradients

    for max_norm in (0.05, 1e6):
        models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)) for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in models]
        x = torch.randn(32, 8)
        for step in range(3):
            for m in models:
                m(x * (step + 1)).pow(2).mean().backward()
            norm = clip_gradients(models[0], optimizers[0], max_norm)
            expected = torch.nn.utils.clip_grad_norm_(models[1].parameters(), max_norm)
            assert torch.allclose(norm, expected)
            for o in optimizers:
                o.step()
                o.zero_grad()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


# ---- batch threads -------------------------------------------------------------------------------
def test_batch_threads_match_one_thread_and_repeat_exactly(prepared, tmp_path):
    """Two threads with half the batch each (train.parallel=batch) train as one thread with the whole batch
    does, to rounding, and two such runs give the same losses to the last bit, also across a resume."""
    decay = {"train.max_steps": 20, "optim.decay_steps": 20, "checkpoint.interval": 5}
    one = tiny_recipe(tmp_path / "one", prepared, **decay)
    two = tiny_recipe(tmp_path / "two", prepared, **decay, **{"train.threads": 2, "train.parallel": "batch"})
    again = tiny_recipe(tmp_path / "again", prepared, **decay, **{"train.threads": 2, "train.parallel": "batch"})
    train(load_recipe(one))
    train(load_recipe(two))
    train(load_recipe(again, overrides=["train.max_steps=12"]))
    train(load_recipe(again, overrides=["resume=true"]))  # from the step-10 checkpoint, steps 11-12 redone
    single, threaded, resumed = (losses(tmp_path / d / "run") for d in ("one", "two", "again"))
    assert sorted(single) == sorted(threaded) == sorted(resumed) == list(range(1, 21))
    assert max(abs(single[s] - threaded[s]) for s in single) <= 1e-5
    assert threaded != single  # the halves were really summed apart (rounding differs), not one batch
    assert resumed == threaded


def test_batch_threads_accumulate_micro_batches_as_one_thread_does(prepared, tmp_path):
    """With gradient accumulation the threads sum each micro-batch into the flat gradient and step AdamW
    only after the last one (flat_adamw.py): the same training as one thread, to rounding."""
    decay = {"train.max_steps": 12, "optim.decay_steps": 12, "train.grad_accum": 2}
    one = tiny_recipe(tmp_path / "one", prepared, **decay)
    two = tiny_recipe(tmp_path / "two", prepared, **decay, **{"train.threads": 2, "train.parallel": "batch"})
    train(load_recipe(one))
    train(load_recipe(two))
    single, threaded = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert sorted(single) == sorted(threaded) == list(range(1, 13))
    assert max(abs(single[s] - threaded[s]) for s in single) <= 1e-5


def test_compiled_batch_threads_run_each_slice_as_one_graph(prepared, tmp_path, monkeypatch):
    """With train.compile each batch thread runs its slice's forward and backward as one compiled graph
    (joint_graph.py), its gradients laid out flat for the threads' shared AdamW: the same training as one
    uncompiled thread, to rounding."""
    from pocketlm.train.joint_graph import JointGradients

    used = []
    original = JointGradients.__call__

    def spy(self, batch, scale):
        found = original(self, batch, scale)
        used.append(found is not None and self.flat_order is not None)
        return found

    monkeypatch.setattr(JointGradients, "__call__", spy)
    decay = {"train.max_steps": 8, "optim.decay_steps": 8}
    one = tiny_recipe(tmp_path / "one", prepared, **decay)
    compiled = tiny_recipe(tmp_path / "compiled", prepared, **decay,
                           **{"train.threads": 2, "train.parallel": "batch", "train.compile": True})
    train(load_recipe(one))
    train(load_recipe(compiled))
    single, joint = losses(tmp_path / "one" / "run"), losses(tmp_path / "compiled" / "run")
    assert sorted(single) == sorted(joint) == list(range(1, 9))
    assert max(abs(single[s] - joint[s]) for s in single) <= 1e-4
    assert len(used) == 2 * 8 and all(used)


def test_lookahead_makes_each_step_once_a_run_at_a_time():
    from pocketlm.train.loop import Lookahead

    made = []
    ahead = Lookahead(lambda step: made.append(step) or step * 10, end=20, ahead=8)
    assert [ahead(s) for s in range(5, 20)] == [s * 10 for s in range(5, 20)]
    assert made == list(range(5, 20))  # from the first step asked for (a resumed run), never past the end
    assert ahead(3) == 30  # a step out of sequence is made on demand


def test_batch_thread_count_and_pool():
    import threading

    from pocketlm.train.batch_threads import BatchThreads, batch_thread_count

    cpu = torch.device("cpu")
    assert batch_thread_count("auto", 2, 12, cpu, 1, False) == 2
    assert batch_thread_count("auto", 4, 6, cpu, 1, False) == 3  # as many as split the rows evenly
    assert batch_thread_count("auto", 2, 7, cpu, 1, False) == 1
    assert batch_thread_count("ops", 2, 12, cpu, 1, False) == 1
    assert batch_thread_count("auto", 2, 12, cpu, 2, False) == 1  # DDP
    assert batch_thread_count("auto", 2, 12, cpu, 1, True) == 1  # dropout: random numbers in varying order
    assert batch_thread_count("batch", 2, 12, cpu, 1, True) == 2
    assert batch_thread_count("auto", 2, 12, torch.device("meta"), 1, False) == 1

    before = torch.get_num_threads()
    pool = BatchThreads(2)
    try:
        seen = pool.map(lambda x: (x * x, threading.get_ident(), torch.get_num_threads()), [3, 4])
        assert [s[0] for s in seen] == [9, 16]
        assert seen[0][1] == threading.get_ident() != seen[1][1]  # the caller runs the first item
        assert [s[2] for s in seen] == [1, 1]
        assert pool.map_chunks(lambda x: x + 1, list(range(7))) == list(range(1, 8))

        def fails(x):
            if x == 2:
                raise ValueError("slice 2")
            return x
        with pytest.raises(ValueError, match="slice 2"):
            pool.map(fails, [1, 2])

        def released(x):  # the caller's item is released from a barrier because the other one failed
            if x == 1:
                raise threading.BrokenBarrierError
            raise ValueError("the real failure")
        with pytest.raises(ValueError, match="the real failure"):
            pool.map(released, [1, 2])
    finally:
        pool.close()
    assert torch.get_num_threads() == before
