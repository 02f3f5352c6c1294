"""`pocketlm run`: a pipeline's graph and its checks, caching by key (nothing changed runs nothing; an evaluation
setting re-runs only the evaluation; new data re-runs everything after it), outputs byte-identical to the same
stage run by its own command, and a run killed during training that resumes to the same model."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pocketlm.pipeline import PipelineError, load_pipeline, read_lock, run_pipeline
from pocketlm.pipeline.report import lineage, pareto
from pocketlm.serve.config import load_serve_config

REPO = Path(__file__).resolve().parent.parent
POCKETLM = [sys.executable, "-m", "pocketlm"]

TINY_RECIPE = {
    "name": "tiny", "out_dir": "unused", "seed": 0,
    "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "tie_word_embeddings": False},
    "data": {"source": "replaced-by-the-pipeline.txt", "tokenizer": "char"},
    "train": {"max_steps": 12, "batch_size": 4, "block_size": 32, "compile": False, "threads": 1},
    "optim": {"lr": 1.0e-3, "warmup_steps": 2},
    "eval": {"interval": 6, "iters": 2},
    "checkpoint": {"interval": 4, "keep_last": 2},
    "log": {"interval": 2, "progress": False},
}


def workspace(root: Path, text: str, steps: int = 12) -> Path:
    """Raw text, a tiny recipe, a held-out perplexity task and a pipeline over them: data -> model -> int8 ->
    evaluation, and the float and int8 models in one A/B experiment. Returns the pipeline file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "text.txt").write_text(text[:-2000])
    (root / "heldout.txt").write_text(text[-2000:])
    recipe = {**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "max_steps": steps}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    (root / "heldout.yaml").write_text(yaml.safe_dump({"task": "heldout", "type": "perplexity", "data": "heldout.txt"}))
    pipeline = {
        "name": "tiny",
        "stages": {
            "data": {"type": "prepare", "inputs": [str(root / "text.txt")], "tokenizer": "char", "dedupe": False,
                     "scrub_pii": False},
            "model": {"type": "pretrain", "recipe": str(root / "tiny.yaml"),
                      "set": {"data.source": None, "data.prepared": "${data}"}},
            "quant": {"type": "quantize", "model": "${model}", "to": "int8"},
            "eval": {"type": "eval", "model": "${quant}", "tasks": str(root / "heldout.yaml"), "max_tokens": 400},
            "serve": {"type": "serve", "experiment": "tiny", "variants": {"float": "${model}", "int8": "${quant}"},
                      "log_prompts": True},
        },
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def text(shared_data) -> str:
    return (shared_data / "tinyshakespeare" / "input.txt").read_text()[:30000]


def write_pipeline(tmp_path: Path, document: dict) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# the graph: fan-out and bad input, before any work
# ---------------------------------------------------------------------------------------------
def test_fan_out_names_variants_and_wires_them(tmp_path):
    path = write_pipeline(tmp_path, {"name": "p", "stages": {
        "base": {"type": "pull", "name": "smollm2-135m-instruct"},
        "quant": {"type": "quantize", "model": "${base}", "matrix": {"to": ["int8", "int4"]}},
        "eval": {"type": "eval", "tasks": "arc_easy", "matrix": {"model": ["${base}", "${quant}"]}},
        "gguf": {"type": "export", "model": "${quant}"},
        "last": {"type": "bench", "model": "${base}", "after": "gguf"},
    }})
    pipeline = load_pipeline(path)
    assert list(pipeline.stages) == ["base", "quant@int8", "quant@int4", "eval@base", "eval@quant-int8",
                                     "eval@quant-int4", "gguf@int8", "gguf@int4", "last"]
    assert pipeline.stages["eval@quant-int4"].settings["model"] == "${quant@int4}"
    assert pipeline.stages["gguf@int8"].deps == ("quant@int8",)
    assert pipeline.stages["last"].deps == ("base", "gguf@int8", "gguf@int4")
    assert pipeline.directory == Path("runs/p")


BAD = [
    ({"a": {"type": "quantize", "model": "${b}", "to": "int8"}, "b": {"type": "quantize", "model": "${a}", "to": "int8"}},
     "stages form a cycle: "),
    ({"a": {"type": "quantise", "model": "x"}}, "stage 'a': unknown type 'quantise' (did you mean 'quantize'?)"),
    ({"a": {"type": "pull", "name": "x"}, "b": {"type": "eval", "model": "${aa}", "tasks": "arc_easy"}},
     "stage 'b' names ${aa}, which no stage makes (did you mean 'a'?)"),
    ({"a": {"type": "pull", "name": "x"}, "b": {"type": "eval", "model": "${a@int8}", "tasks": "arc_easy"}},
     "stage 'b' names ${a@int8}, which no stage makes"),
    ({"a": {"type": "pull", "name": "x"}, "b": {"type": "bench", "model": "${a}", "after": "c"}},
     "stage 'b' names after: c, which no stage makes"),
    ({"a": {"type": "quantize", "model": "x", "matrix": {"to": "int8"}}}, "matrix: expected a mapping of settings"),
]


@pytest.mark.parametrize("stages, message", BAD)
def test_bad_pipelines_are_refused_in_one_line(tmp_path, stages, message):
    with pytest.raises(PipelineError) as info:
        load_pipeline(write_pipeline(tmp_path, {"name": "p", "stages": stages}))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_settings_are_refused_before_any_stage_runs(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "objective": "pretrain"}}))
    for stages, message in [
        ({"m": {"type": "dpo", "recipe": str(recipe)}}, "stage 'm' is a dpo stage but its recipe"),
        ({"m": {"type": "train", "recipe": str(tmp_path / "none.yaml")}}, "none.yaml: no such recipe file"),
        ({"m": {"type": "train", "recipe": str(recipe), "steps": 3}}, "steps: unknown setting"),
        ({"q": {"type": "quantize", "to": "int8"}}, "stage 'q' (quantize): set model"),
        ({"e": {"type": "eval", "model": "x", "output": "y.json"}}, "output: the pipeline places the output"),
        ({"d": {"type": "prepare", "inputs": ["dataset:tinystorys/a.txt"]}},
         "stage 'd': dataset:tinystorys/a.txt: unknown dataset 'tinystorys'; known: alpaca, arc, "),
        ({"m": {"type": "train", "recipe": str(recipe), "set": {"data.source": "dataset:arc/none.jsonl"}}},
         "stage 'm': dataset:arc/none.jsonl: arc has no file 'none.jsonl'"),
    ]:
        pipeline = load_pipeline(write_pipeline(tmp_path, {"name": "p", "stages": stages}), directory=tmp_path / "run")
        with pytest.raises(Exception) as info:
            run_pipeline(pipeline)
        assert message in str(info.value), str(info.value)
        assert not (tmp_path / "run").exists()  # no work: not even the pipeline's directory


def test_cli_prints_one_line_for_a_bad_pipeline(tmp_path):
    path = write_pipeline(tmp_path, {"name": "p", "stages": {"a": {"type": "pull", "name": "x"},
                                                              "b": {"type": "bench", "model": "${c}"}}})
    done = subprocess.run([*POCKETLM, "run", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"error: {path}: stage 'b' names ${{c}}, which no stage makes "
                                                "(stages: a, b)"]


def test_pareto_front():
    points = [(1.0, 0.5, "small"), (4.0, 0.7, "big"), (2.0, 0.4, "worse"), (2.0, 0.6, "mid")]
    assert pareto(points, cost_lower=True, quality_lower=False) == ["small", "big", "mid"]
    assert pareto(points, cost_lower=True, quality_lower=True) == ["small", "worse"]  # perplexity: lower wins


# ---------------------------------------------------------------------------------------------
# running: caching, byte-identical outputs, resuming
# ---------------------------------------------------------------------------------------------
def test_caching_runs_only_what_changed(tmp_path, text):
    path = workspace(tmp_path / "ws", text)
    out = tmp_path / "run"
    first = run_pipeline(load_pipeline(path, directory=out))
    assert first.ran == ["data", "model", "quant", "eval", "serve"]
    lock = read_lock(out)
    assert lock["stages"]["eval"]["metrics"]["heldout.token_perplexity"] > 1
    assert lock["stages"]["model"]["metrics"]["steps"] == 12 and lock["stages"]["model"]["peak_rss_mb"] > 50
    report = (out / "report.md").read_text()
    assert "| quant | quantize |" in report and "data → model → quant" in report
    assert "data:image/png;base64," in (out / "report.html").read_text()
    written = (out / "report.md").stat().st_mtime_ns

    started = time.perf_counter()
    second = run_pipeline(load_pipeline(path, directory=out))
    assert time.perf_counter() - started < 2.0
    assert second.ran == [] and [s.status for s in second.stages] == ["cached"] * 5
    assert (out / "report.md").stat().st_mtime_ns == written  # nothing changed: the report is not rewritten

    third = run_pipeline(load_pipeline(path, ["stages.eval.max_tokens=300"], directory=out))
    assert third.ran == ["eval"] and [s.reason for s in third.stages if s.name == "eval"] == ["settings changed: max_tokens"]
    assert (out / "report.md").stat().st_mtime_ns != written

    with open(tmp_path / "ws" / "text.txt", "a") as f:
        f.write("\nKING: a line the first run never saw.\n")
    dry = run_pipeline(load_pipeline(path, ["stages.eval.max_tokens=300"], directory=out), dry_run=True)
    assert [(s.name, s.status) for s in dry.stages] == [(n, "would run") for n in ("data", "model", "quant", "eval",
                                                                                      "serve")]
    assert dry.stages[0].reason == f"input changed: {tmp_path / 'ws' / 'text.txt'}"
    assert dry.stages[1].reason == "data runs before it"
    assert read_lock(out)["stages"]["eval"]["parts"]["settings"]["max_tokens"] == 300  # the dry run changed nothing
    fourth = run_pipeline(load_pipeline(path, ["stages.eval.max_tokens=300"], directory=out))
    assert fourth.ran == ["data", "model", "quant", "eval", "serve"]
    assert fourth.stages[1].reason == "data changed"
    served = load_serve_config(out / "serve" / "serve.yaml")  # the server's own reader
    assert served.log_prompts and served.experiment.name == "tiny"
    assert {v.name: v.model for v in served.experiment.variants} == {
        "float": read_lock(out)["stages"]["model"]["output"], "int8": read_lock(out)["stages"]["quant"]["output"]}


def test_only_runs_the_stages_named_and_what_they_read(tmp_path, text):
    path = workspace(tmp_path / "ws", text)
    out = tmp_path / "run"
    with pytest.raises(PipelineError, match="--only nope: no such stage"):
        run_pipeline(load_pipeline(path, directory=out), only=["nope"])
    part = run_pipeline(load_pipeline(path, directory=out), only=["quant"])
    assert part.ran == ["data", "model", "quant"] and part.report is None
    assert not (out / "report.md").exists() and sorted(read_lock(out)["stages"]) == ["data", "model", "quant"]
    rest = run_pipeline(load_pipeline(path, directory=out))  # what --only ran is not run again
    assert rest.ran == ["eval", "serve"] and (out / "report.md").exists()


def test_stage_output_is_byte_identical_to_its_own_command(tmp_path, text, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1800000000")  # the records' creation time, the same in both
    path = workspace(tmp_path / "ws", text)
    out = tmp_path / "run"
    pipeline = load_pipeline(path, directory=out)
    pipeline.stages.pop("eval"), pipeline.stages.pop("serve")
    run_pipeline(pipeline)
    lock = read_lock(out)
    made = {name: Path(lock["stages"][name]["output"]) for name in ("data", "model", "quant")}
    for name in made:  # the pipeline's outputs aside; the same commands by hand write to the same paths
        os.rename(out / name, tmp_path / f"pipeline-{name}")
    by_hand = [
        ["prepare", str(tmp_path / "ws" / "text.txt"), "--out", str(made["data"]), "--tokenizer", "char",
         "--no-dedupe", "--no-scrub-pii"],
        ["train", str(tmp_path / "ws" / "tiny.yaml"), "data.source=null", f"data.prepared={made['data']}",
         f"out_dir={out / 'model' / 'run'}"],
        ["quantize", str(made["model"]), str(made["quant"]), "--to", "int8"],
    ]
    for args in by_hand:
        subprocess.run([*POCKETLM, *args], check=True, capture_output=True, cwd=tmp_path)
    for name, output in made.items():
        theirs = tmp_path / f"pipeline-{name}" / output.relative_to(out / name)
        files = sorted(p.relative_to(output) for p in output.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file())
        match, mismatch, errors = filecmp.cmpfiles(output, theirs, [str(f) for f in files], shallow=False)
        assert (mismatch, errors) == ([], []), f"{name}: {mismatch or errors} differ"
        assert len(match) >= 3


def test_a_run_killed_in_training_resumes_to_the_same_model(tmp_path, text):
    path = workspace(tmp_path / "ws", text, steps=300)  # long enough that it cannot end before it is stopped
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    document = yaml.safe_load(path.read_text())
    document["stages"] = {k: document["stages"][k] for k in ("data", "model")}
    path.write_text(yaml.safe_dump(document, sort_keys=False))

    run = subprocess.Popen([*POCKETLM, "run", str(path), "--dir", str(killed)], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = killed / "model" / "run" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("step-*")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # stopped at its first checkpoint (step 4 of 300)
    assert run.poll() is None, run.communicate()
    run.send_signal(signal.SIGTERM)
    run.wait(timeout=60)
    assert "model" not in read_lock(killed)["stages"] and "data" in read_lock(killed)["stages"]
    assert not (killed / "model" / "run" / "model").exists()

    events = []
    resumed = run_pipeline(load_pipeline(path, directory=killed), progress=lambda *e: events.append(e))
    assert resumed.ran == ["model"]
    assert any(name == "model" and "resuming from its last checkpoint" in info.get("reason", "")
               for name, event, info in events)
    assert "resumed from" in (killed / "model" / "stage.log").read_text()

    run_pipeline(load_pipeline(path, directory=whole))
    weights = "model/run/model/model.safetensors"
    assert (killed / weights).read_bytes() == (whole / weights).read_bytes()


def test_shipped_pipelines_pass_their_checks(monkeypatch):
    from pocketlm.pipeline import check_pipeline

    monkeypatch.chdir(REPO)  # their paths (recipes/...) are the repository's
    shipped = sorted((REPO / "recipes" / "pipelines").glob("*.yaml"))
    assert {p.name for p in shipped} >= {"quickstart.yaml", "arc-easy-specialist.yaml"}
    for path in shipped:
        pipeline = load_pipeline(path)
        check_pipeline(pipeline)
        assert pipeline.stages and pipeline.directory == Path("runs") / pipeline.name


def test_lineage_names_every_stage_a_model_comes_from(monkeypatch):
    """A model made from two stages names both (the data as well as the base), a level at a time."""
    monkeypatch.chdir(REPO)
    arc = load_pipeline(REPO / "recipes" / "pipelines" / "arc-easy-specialist.yaml")
    assert lineage(arc, "quant@int8") == ["split, base", "sft", "quant@int8"]
    assert lineage(arc, "base") == ["base"]
    stories = load_pipeline(REPO / "recipes" / "pipelines" / "tinystories-from-scratch.yaml")
    assert lineage(stories, "student") == ["base", "data", "teacher", "student"]
    assert lineage(stories, "scratch") == ["base", "data", "scratch"]


def test_a_teacher_stage_feeds_its_students(tmp_path):
    """The teacher's top-k logits as a stage of their own (`pocketlm distill-cache`): the distilled student reads
    them (distill.cache_dir) instead of running the teacher, and a second student changes nothing upstream."""
    from helpers import tiny_model_dir

    teacher = tiny_model_dir(tmp_path / "teacher-model")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"the cat {i % 7} sat on the mat number {i}." for i in range(400)))
    recipe = {**TINY_RECIPE, "data": {"source": str(text), "tokenizer": str(teacher), "dedupe": False},
              "train": {**TINY_RECIPE["train"], "objective": "distill", "max_steps": 6},
              "distill": {"teacher": str(teacher), "cache_top_k": 8}}
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(recipe))
    stages = {"teacher": {"type": "teacher", "recipe": str(tmp_path / "distill.yaml")},
              "student": {"type": "distill", "recipe": str(tmp_path / "distill.yaml"),
                          "set": {"distill.cache_dir": "${teacher}"}}}
    path = write_pipeline(tmp_path, {"name": "kd", "stages": stages})
    out = tmp_path / "run"
    assert run_pipeline(load_pipeline(path, directory=out)).ran == ["teacher", "student"]
    lock = read_lock(out)
    assert lock["stages"]["teacher"]["output"] == str(out / "teacher" / "run" / "teacher-cache")
    assert not (out / "student" / "run" / "teacher-cache").exists()
    assert lock["stages"]["student"]["metrics"]["steps"] == 6
    stages["student2"] = {**stages["student"], "set": {**stages["student"]["set"], "optim.lr": 2.0e-3}}
    path = write_pipeline(tmp_path, {"name": "kd", "stages": stages})
    assert run_pipeline(load_pipeline(path, directory=out)).ran == ["student2"]  # the teacher's work is reused


def test_the_server_lists_pipeline_runs_and_serves_their_reports(tmp_path, text):
    """The serve config's `pipelines:` folder: /api/pipelines lists each run from its lock file, and
    /pipelines/RUN/report serves its report.html; a name that is not a listed run is a 404, never a path."""
    import httpx
    from helpers import tiny_model_dir
    from serve_helpers import running_server

    from pocketlm.serve.app import create_app

    runs = tmp_path / "runs"
    path = workspace(tmp_path / "ws", text)
    pipeline = load_pipeline(path, directory=runs / "tiny")
    pipeline.stages.pop("eval"), pipeline.stages.pop("serve"), pipeline.stages.pop("quant")
    run_pipeline(pipeline)
    (runs / "not-a-run").mkdir()
    model = tiny_model_dir(tmp_path / "m", max_position_embeddings=64)
    app = create_app(load_serve_config(None, [str(model)], database=str(tmp_path / "log.db"), pipelines=str(runs)))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        listing = client.get("/api/pipelines").json()["runs"]
        report = client.get("/pipelines/tiny/report")
        missing = [client.get(f"/pipelines/{name}/report").status_code for name in ("not-a-run", "..", "%2e%2e")]
    lock = read_lock(runs / "tiny")
    assert listing == [{"run": "tiny", "pipeline": "tiny", "stages": 2, "report": True,
                        "finished": max(s["finished"] for s in lock["stages"].values()),
                        "wall_s": round(sum(s["wall_s"] for s in lock["stages"].values()), 1)}]
    assert report.status_code == 200 and report.text == (runs / "tiny" / "report.html").read_text()
    assert report.headers["content-type"].startswith("text/html")
    assert missing == [404, 404, 404]


def test_a_command_line_override_reaches_a_training_stages_recipe(tmp_path):
    """`stages.model.set.train.max_steps=600` on the command line nests under `set`; it overrides that one recipe
    key (the later value wins), and leaves the rest of the recipe's train section as it was."""
    from pocketlm.pipeline.stages import command_line, recipe_document

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "objective": "pretrain"}}))
    path = write_pipeline(tmp_path, {"name": "p", "stages": {
        "model": {"type": "pretrain", "recipe": str(recipe), "set": {"train.max_steps": 200, "optim.lr": 0.01}}}})
    stage = load_pipeline(path, ["stages.model.set.train.max_steps=600"]).stages["model"]
    document = recipe_document("model", "pretrain", stage.settings)
    assert document["train"] == {**TINY_RECIPE["train"], "objective": "pretrain", "max_steps": 600}
    assert document["optim"]["lr"] == 0.01
    args = command_line("pretrain", stage.settings, tmp_path / "out")
    assert args[2:5] == ["optim.lr=0.01", "train.max_steps=600", f'out_dir="{tmp_path / "out" / "run"}"']
