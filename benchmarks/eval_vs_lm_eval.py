"""pocketlm eval against lm-evaluation-harness on the same data and prompt format.

Three runs per task on SmolLM2-135M-Instruct (fp32):
  * lm-eval's own `hf` model on the model directory (transformers), its task pointed at local files;
  * lm-eval with the `pocketlm` adapter (pocketlm.evaluate.harness) on the same tasks;
  * `pocketlm eval` with its built-in task.
Reported: acc and acc_norm of each, the largest per-choice log-likelihood difference against `hf`,
and the run times.

    .venv/bin/python benchmarks/eval_vs_lm_eval.py [--limit N] [--tasks arc_challenge piqa mmlu_anatomy] [--json out.json]

lm-eval's tasks are written as YAML files beside converted data in a temporary folder: ARC-Challenge
reads the raw jsonl as it is, MMLU one subject's CSVs, and PIQA a jsonl in its published form
(goal, sol1, sol2, label) that pocketlm's parser writes from the instruction-form copy; `pocketlm eval`
then reads that same jsonl through its published-form loader.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pocketlm.evaluate.loaders import instruction_piqa, shared_data_dir

ARC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

PIQA_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

MMLU_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
    dev: {dev}
output_type: multiple_choice
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
description: "The following are multiple choice questions (with answers) about {subject_words}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choice0}}}}\\nB. {{{{choice1}}}}\\nC. {{{{choice2}}}}\\nD. {{{{choice3}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def csv_to_jsonl(source: Path, target: Path) -> Path:
    """MMLU's CSV as jsonl of strings (a CSV loader would read choices such as '0.50' as numbers)."""
    with open(source, newline="", encoding="utf-8") as f, open(target, "w") as out:
        for row in csv.DictReader(f):
            out.write(json.dumps(dict(row, answer=int(row["answer"]))) + "\n")
    return target


def write_local_tasks(out_dir: Path, tasks: list[str], data: Path | None = None) -> dict[str, tuple[str, str]]:
    """lm-eval task files for local data; returns {task: (lm-eval task name, pocketlm task spec)}."""
    data = data or shared_data_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    mapping = {}
    for task in tasks:
        name = f"local_{task}"
        if task == "arc_challenge":
            path = data / "arc_raw" / "ARC-Challenge-Test.jsonl"
            text, spec = ARC_YAML.format(name=name, data=path), f"arc_challenge={path}"
        elif task == "piqa":
            path = out_dir / "piqa.jsonl"
            with open(path, "w") as f:
                for e in instruction_piqa(data / "commonsense_llm_adapters" / "piqa_test.json"):
                    goal = e.query[len("Question: "):-len("\nAnswer:")]
                    f.write(json.dumps({"goal": goal, "sol1": e.choices[0], "sol2": e.choices[1], "label": e.gold}) + "\n")
            text, spec = PIQA_YAML.format(name=name, data=path), f"piqa={path}"
        elif task.startswith("mmlu_"):
            subject = task[len("mmlu_"):]
            test = csv_to_jsonl(data / "mmlu" / "test" / f"{subject}_test.csv", out_dir / f"{subject}_test.jsonl")
            dev = csv_to_jsonl(data / "mmlu" / "dev" / f"{subject}_dev.csv", out_dir / f"{subject}_dev.jsonl")
            text = MMLU_YAML.format(name=name, data=test, dev=dev, subject_words=subject.replace("_", " "))
            spec = f"{task}={data / 'mmlu'}"
        else:
            raise SystemExit(f"no lm-eval counterpart written for {task}")
        (out_dir / f"{name}.yaml").write_text(text)
        mapping[task] = (name, spec)
    return mapping


def run_lm_eval(model: str, model_args: str, task_names: list[str], include_path: Path, limit: int | None) -> dict:
    """lm-eval's results and per-doc log-likelihoods: {task: {"acc", "acc_norm", "lls": {doc_id: [...]}}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if model == "pocketlm":
        import pocketlm.evaluate.harness  # noqa: F401  (registers the model)
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=task_names, limit=limit,
                                  task_manager=TaskManager(include_path=str(include_path)), log_samples=True,
                                  batch_size=8, num_fewshot=0, device="cpu")
    results = {}
    for name in task_names:
        metrics = out["results"][name]
        lls = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in out["samples"][name]}
        results[name] = {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"], "lls": lls}
    return results


def run_pocketlm(model_dir: Path, specs: list[str], limit: int | None) -> dict:
    from pocketlm.evaluate.runner import evaluate_dir

    document = evaluate_dir(model_dir, specs, limit=limit, num_fewshot=0, log_samples=True)
    return {name: {"acc": r["acc"], "acc_norm": r["acc_norm"],
                   "lls": {i: s["loglikelihoods"] for i, s in enumerate(document["samples"][name])}}
            for name, r in document["results"].items()}


def max_ll_difference(a: dict, b: dict) -> float:
    return max(abs(x - y) for doc in a for x, y in zip(a[doc], b[doc]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the cached SmolLM2-135M-Instruct)")
    parser.add_argument("--tasks", nargs="+", default=["arc_challenge", "piqa", "mmlu_anatomy"])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from pocketlm.hub import pull

    model_dir = Path(args.model) if args.model else pull("smollm2-135m-instruct")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        mapping = write_local_tasks(Path(tmp), args.tasks)
        names = [mapping[t][0] for t in args.tasks]
        timings = {}
        started = time.perf_counter()
        hf = run_lm_eval("hf", f"pretrained={model_dir},dtype=float32", names, Path(tmp), args.limit)
        timings["lm-eval hf"] = time.perf_counter() - started
        started = time.perf_counter()
        adapter = run_lm_eval("pocketlm", f"path={model_dir},dtype=float32", names, Path(tmp), args.limit)
        timings["lm-eval pocketlm"] = time.perf_counter() - started
        started = time.perf_counter()
        ours = run_pocketlm(model_dir, [mapping[t][1] for t in args.tasks], args.limit)
        timings["pocketlm eval"] = time.perf_counter() - started
    for task in args.tasks:
        name = mapping[task][0]
        ours_task = ours[task]
        rows[task] = {
            "n": len(hf[name]["lls"]),
            "lm-eval hf": {k: hf[name][k] for k in ("acc", "acc_norm")},
            "lm-eval pocketlm": {k: adapter[name][k] for k in ("acc", "acc_norm")},
            "pocketlm eval": {k: ours_task[k] for k in ("acc", "acc_norm")},
            "max |ll diff| vs hf": max_ll_difference(hf[name]["lls"], ours_task["lls"]),
            "max |ll diff| adapter vs eval": max_ll_difference(adapter[name]["lls"], ours_task["lls"]),
        }
    print(f"{'task':16} {'n':>5} {'hf acc':>8} {'hf norm':>8} {'pl acc':>8} {'pl norm':>8} {'adapter':>15} {'max|dll|':>9}")
    for task, r in rows.items():
        hfm, plm, adm = r["lm-eval hf"], r["pocketlm eval"], r["lm-eval pocketlm"]
        print(f"{task:16} {r['n']:>5} {100 * hfm['acc']:8.2f} {100 * hfm['acc_norm']:8.2f} {100 * plm['acc']:8.2f} "
              f"{100 * plm['acc_norm']:8.2f} {100 * adm['acc']:7.2f}/{100 * adm['acc_norm']:6.2f} {r['max |ll diff| vs hf']:9.2e}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    if args.json:
        args.json.write_text(json.dumps({"model": str(model_dir), "limit": args.limit, "tasks": rows, "seconds": timings}, indent=2))


if __name__ == "__main__":
    main()
