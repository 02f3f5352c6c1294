"""pocketlm eval against lm-evaluation-harness on the same data and prompt format.

Three runs per task on SmolLM2-135M-Instruct (fp32):
  * lm-eval's own `hf` model on the model directory (transformers), its task pointed at local files;
  * lm-eval with the `pocketlm` adapter (pocketlm.evaluate.harness) on the same tasks;
  * `pocketlm eval` with its built-in task.
Reported: acc and acc_norm of each, the largest per-choice log-likelihood difference against `hf`,
and each side's run time per task. `--dtypes float32 bfloat16` runs both sides in each dtype (lm-eval's
`dtype=`, `pocketlm eval --dtype`), so a faster dtype is compared with the peer in that same dtype too.

    .venv/bin/python benchmarks/eval_vs_lm_eval.py [--limit N] [--tasks arc_challenge piqa mmlu_anatomy]
        [--dtypes float32 bfloat16] [--no-adapter] [--json out.json]

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

sys.path.insert(0, str(REPO / "benchmarks"))
from load_and_decode import machine  # noqa: E402

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


def run_pocketlm(model_dir: Path, specs: list[str], limit: int | None, dtype: str | None = None) -> dict:
    from pocketlm.evaluate.runner import evaluate_dir

    document = evaluate_dir(model_dir, specs, limit=limit, num_fewshot=0, log_samples=True, dtype=dtype)
    return {name: {"acc": r["acc"], "acc_norm": r["acc_norm"],
                   "lls": {i: s["loglikelihoods"] for i, s in enumerate(document["samples"][name])}}
            for name, r in document["results"].items()}


def max_ll_difference(a: dict, b: dict) -> float:
    return max(abs(x - y) for doc in a for x, y in zip(a[doc], b[doc]))


def timed(run, *args) -> tuple[dict, float]:
    started = time.perf_counter()
    out = run(*args)
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the cached SmolLM2-135M-Instruct)")
    parser.add_argument("--tasks", nargs="+", default=["arc_challenge", "piqa", "mmlu_anatomy"])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                        help="run both sides in each dtype (lm-eval's dtype=..., pocketlm eval's --dtype)")
    parser.add_argument("--no-adapter", action="store_true", help="skip lm-eval with pocketlm's adapter")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from pocketlm.hub import pull

    model_dir = Path(args.model) if args.model else pull("smollm2-135m-instruct")
    rows, adapter_lls = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        mapping = write_local_tasks(Path(tmp), args.tasks)
        if not args.no_adapter:  # fp32, all tasks at once: the adapter's log-likelihoods against `pocketlm eval`'s
            names = [mapping[t][0] for t in args.tasks]
            adapter = run_lm_eval("pocketlm", f"path={model_dir},dtype=float32", names, Path(tmp), args.limit)
            adapter_lls = {t: adapter[mapping[t][0]]["lls"] for t in args.tasks}
        for dtype in args.dtypes:
            for task in args.tasks:  # one task a run: each side's time per task
                name, spec = mapping[task]
                hf, hf_s = timed(run_lm_eval, "hf", f"pretrained={model_dir},dtype={dtype}", [name], Path(tmp),
                                 args.limit)
                ours, ours_s = timed(run_pocketlm, model_dir, [spec], args.limit, dtype)
                h, o = hf[name], ours[task]
                row = {"task": task, "dtype": dtype, "n": len(h["lls"]),
                       "lm-eval hf": {k: h[k] for k in ("acc", "acc_norm")},
                       "pocketlm eval": {k: o[k] for k in ("acc", "acc_norm")},
                       "max |ll diff| vs hf": max_ll_difference(h["lls"], o["lls"]),
                       "seconds": {"lm-eval hf": hf_s, "pocketlm eval": ours_s}}
                if task in adapter_lls and dtype == "float32":
                    row["max |ll diff| adapter vs eval"] = max_ll_difference(adapter_lls[task], o["lls"])
                rows.append(row)
    print(machine())
    print(f"{'task':16} {'dtype':9} {'n':>5} {'hf acc':>7} {'hf norm':>7} {'pl acc':>7} {'pl norm':>7} {'max|dll|':>9} "
          f"{'hf s':>7} {'pl s':>7} {'speed':>6}")
    for r in rows + [None]:
        if r is None:  # the totals per dtype
            for dtype in args.dtypes:
                mine = [x for x in rows if x["dtype"] == dtype]
                hf_s = sum(x["seconds"]["lm-eval hf"] for x in mine)
                ours_s = sum(x["seconds"]["pocketlm eval"] for x in mine)
                print(f"{'all':16} {dtype:9} {sum(x['n'] for x in mine):>5} {'':47} {hf_s:7.1f} {ours_s:7.1f} "
                      f"{hf_s / ours_s:5.2f}x")
            break
        hfm, plm, sec = r["lm-eval hf"], r["pocketlm eval"], r["seconds"]
        print(f"{r['task']:16} {r['dtype']:9} {r['n']:>5} {100 * hfm['acc']:7.2f} {100 * hfm['acc_norm']:7.2f} "
              f"{100 * plm['acc']:7.2f} {100 * plm['acc_norm']:7.2f} {r['max |ll diff| vs hf']:9.2e} "
              f"{sec['lm-eval hf']:7.1f} {sec['pocketlm eval']:7.1f} {sec['lm-eval hf'] / sec['pocketlm eval']:5.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "model": str(model_dir), "limit": args.limit,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
