"""The evaluator: scoring against transformers, task loaders on crafted fixtures and on the shared data,
metrics, task files, the CLI, and the lm-evaluation-harness adapter (tiny models; SmolLM2 is in
test_smollm2_eval.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.eval_vs_lm_eval import PIQA_YAML  # noqa: E402  (lm-eval's PIQA task, written for local files)

from pocketlm.checkpoint import load_model
from pocketlm.constrain import Constraint
from pocketlm.errors import ConfigError
from pocketlm.evaluate import loaders, records
from pocketlm.evaluate.runner import evaluate, evaluate_dir
from pocketlm.evaluate.scoring import encode_pair, loglikelihoods
from pocketlm.evaluate.tasks import (
    Example,
    Task,
    choose,
    extract_answer,
    normalize_number,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("eval") / "tiny", seed=3)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- scoring -------------------------------------------------------------------------------
def test_encode_pair_moves_trailing_space_to_the_continuation(tiny):
    _, tok = load_model(tiny)
    ctx, cont = encode_pair(tok, "Question: a\nAnswer: ", "yes")
    assert tok.decode(ctx) == "Question: a\nAnswer:"
    assert tok.decode(cont) == " yes"
    ctx, cont = encode_pair(tok, "", "hello")  # an empty context becomes the prefix token
    assert len(ctx) == 1 and tok.decode(cont) == "hello"
    with pytest.raises(ConfigError, match="empty continuation"):
        encode_pair(tok, "a", "")


def test_loglikelihoods_match_transformers_and_do_not_depend_on_batching(tiny, monkeypatch):
    from transformers import AutoModelForCausalLM

    from pocketlm.evaluate import scoring

    model, tok = load_model(tiny)
    packed = []  # the rows of each packed pass: a context and its choices share one
    original = model.packed_hidden_states
    monkeypatch.setattr(model, "packed_hidden_states", lambda ids, *a: (packed.append(ids.shape[0]), original(ids, *a))[1])
    pairs = [encode_pair(tok, c, x) for c, x in [("The cat sat on", " the mat"), ("The cat sat on", " a hat"),
                                                   ("One", " two three four"), ("x" * 150, " y"),  # longer than the context
                                                   ("Answer:", " A"), ("Answer:", " B"),
                                                   # a question and its choices: the context runs once for all
                                                   ("Why is the sky blue? Answer:", " because of light scattering"),
                                                   ("Why is the sky blue? Answer:", " it is"),
                                                   ("Why is the sky blue? Answer:", " no"),
                                                   ("Why is the sea salty? Answer:", " rivers carry salt"),
                                                   ("Why is the sea salty? Answer:", " fish")]]
    hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    expected = []
    for ctx, cont in pairs:
        whole = (ctx + cont)[-(model.config.max_position_embeddings + 1):]
        with torch.no_grad():
            logits = hf(torch.tensor([whole[:-1]])).logits[0].float()
        logprobs = torch.log_softmax(logits[-len(cont):], dim=-1)
        target = torch.tensor(cont)
        expected.append((logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())))
    for budget in (4096, 16):  # one batch; and rows so short that a question's choices take several
        packed.clear()
        got = loglikelihoods(model, pairs, max_batch_tokens=budget)
        for (score, greedy), (ref, ref_greedy) in zip(got, expected):
            assert score == pytest.approx(ref, abs=1e-4)
            assert greedy == ref_greedy
        if budget == 4096:  # one row per context that fits the window: all but the "x" * 150 one
            assert packed == [5]
        else:
            assert len(packed) > 1 and sum(packed) > 5


def test_packed_scoring_under_a_prefix_adapter_equals_one_request_at_a_time(tiny):
    """A prefix adapter's keys and values come first in a packed row too: every choice sees them, at the same
    positions as a lone forward pass gives them."""
    from pocketlm.adapt.adapters import attach, prefix_config

    model, tok = load_model(tiny)
    torch.manual_seed(0)
    attach(model, prefix_config(model, 4, False))
    pairs = [encode_pair(tok, "Why is the sky blue? Answer:", x) for x in (" light scattering", " no", " it is blue")]
    got = loglikelihoods(model, pairs)
    with torch.inference_mode():
        for (ctx, cont), (score, _) in zip(pairs, got):
            logits = model(torch.tensor([ctx + cont[:-1]]))[0, -len(cont):]
            ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(cont)[:, None]).sum().item()
            assert score == pytest.approx(ref, abs=1e-4)


def test_choose_picks_by_loglikelihood_and_by_length_normalised_loglikelihood():
    example = Example("q", ["a", "much longer answer"], gold=1)
    # -2 vs -9: raw picks the short one; per character -2/1 vs -9/18 picks the long one
    assert choose(example, [-2.0, -9.0]) == (0, 1)


# ---- loaders on crafted fixtures -------------------------------------------------------------
def test_hellaswag_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "hs.jsonl", [
        {"ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "ctx": "A man is sitting on a roof. he",
         "activity_label": "Roof shingle removal", "endings": ["is using wrap.", "starts pulling up [title] roofing."],
         "label": 1},
        {"ctx": "She opens the box", "endings": ["and smiles.", "and cries."], "label": "0"},
    ])
    first, second = loaders.hellaswag_jsonl(path)
    assert first.query == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.choices == ["is using wrap.", "starts pulling up. roofing."] and first.gold == 1
    assert second.query == "She opens the box" and second.gold == 0


def test_piqa_jsonl_with_labels_in_a_sibling_file(tmp_path):
    write_jsonl(tmp_path / "valid.jsonl", [{"goal": "open a jar", "sol1": "twist the lid", "sol2": "eat the lid"},
                                           {"goal": "dry hair", "sol1": "use water", "sol2": "use a towel"}])
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    examples = loaders.piqa_jsonl(tmp_path / "valid.jsonl")
    assert [e.gold for e in examples] == [0, 1]
    assert examples[0].query == "Question: open a jar\nAnswer:" and examples[1].choices == ["use water", "use a towel"]
    (tmp_path / "valid-labels.lst").write_text("0\n")
    with pytest.raises(ConfigError, match="1 labels for 2 records"):
        loaders.piqa_jsonl(tmp_path / "valid.jsonl")


def test_arc_jsonl_original_and_hugging_face_forms(tmp_path):
    original = {"question": {"stem": "Which is a gas?", "choices": [{"text": "ice", "label": "1"}, {"text": "steam", "label": "2"}]},
                "answerKey": "2"}
    hf = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]}, "answerKey": "B"}
    for record in (original, hf):
        (example,) = loaders.arc_jsonl(write_jsonl(tmp_path / "arc.jsonl", [record]))
        assert (example.query, example.choices, example.gold) == ("Question: Which is a gas?\nAnswer:", ["ice", "steam"], 1)
    with pytest.raises(ConfigError, match="answerKey 'C'"):
        loaders.arc_jsonl(write_jsonl(tmp_path / "bad.jsonl", [dict(hf, answerKey="C")]))


def test_mmlu_csv_with_and_without_header(tmp_path):
    (tmp_path / "a.csv").write_text('question,choice0,choice1,choice2,choice3,answer\n"What, is 2+2?",3,4,5,6,1\n')
    (tmp_path / "b.csv").write_text('"What, is 2+2?",3,4,5,6,B\n')
    for name in ("a.csv", "b.csv"):
        (example,) = loaders.mmlu_csv(tmp_path / name)
        assert example.query == "What, is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:" and example.gold == 1
    (tmp_path / "c.csv").write_text('"q",1,2,3,4,E\n')
    with pytest.raises(ConfigError, match="row 1's answer 'E'"):
        loaders.mmlu_csv(tmp_path / "c.csv")


def test_instruction_forms(tmp_path):
    def one(record_instruction: str, answer: str) -> Path:
        path = tmp_path / "data.json"
        path.write_text(json.dumps([{"instruction": record_instruction, "input": "", "output": "", "answer": answer}]))
        return path

    (e,) = loaders.instruction_winogrande(one("Please choose the correct answer to fill in the blank to complete the given "
                                              "sentence: Tom gave Bob a gift because _ was kind.\n\nOption1: Tom Option2: Bob "
                                              "Answer format: option1/option2", "option1"))
    assert e.partial and e.choices == ["Tom gave Bob a gift because Tom", "Tom gave Bob a gift because Bob"]
    assert e.query == "was kind." and e.gold == 0
    (e,) = loaders.instruction_boolq(one("Please answer the following question with true or false, question: is water wet?"
                                         "\n\nAnswer format: true/false", "true"))
    assert (e.query, e.choices, e.gold) == ("Question: is water wet?\nAnswer:", ["no", "yes"], 1)
    (e,) = loaders.instruction_multiple_choice(one("Please choose the correct answer to the question: Pick one\n\nAnswer1: "
                                                   "red Answer2: green Answer3: blue\n\nAnswer format: answer1/answer2/answer3",
                                                   "answer3"), "Q: {question}\nA:")
    assert (e.query, e.choices, e.gold) == ("Q: Pick one\nA:", ["red", "green", "blue"], 2)
    with pytest.raises(ConfigError, match="not in the expected form"):
        loaders.instruction_boolq(one("Tell me a joke", "true"))
    with pytest.raises(ConfigError, match="answer4"):
        loaders.instruction_multiple_choice(one("Please choose the correct answer to the question: Pick\n\nAnswer1: a "
                                                "Answer2: b\n\nAnswer format: answer1/answer2", "answer4"), "{question}")


def test_bad_data_files_are_one_clear_error(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"goal": "x"}\n{not json\n')
    with pytest.raises(ConfigError, match="broken.jsonl:2: not a JSON record"):
        records.read_records(tmp_path / "broken.jsonl")
    with pytest.raises(ConfigError, match="record 0 has no 'sol1' field"):
        loaders.piqa_jsonl(write_jsonl(tmp_path / "p.jsonl", [{"goal": "x", "label": 0}]))
    with pytest.raises(ConfigError, match="data not found"):
        loaders.resolve_tasks([f"hellaswag={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(ConfigError, match="did you mean 'piqa'"):
        loaders.resolve_tasks(["piqq"])


# ---- loaders on the shared data --------------------------------------------------------------
def test_instruction_form_arc_challenge_parses_to_the_raw_jsonl(shared_data):
    """The instruction-form copy of ARC-Challenge, parsed, equals the original jsonl question for question."""
    raw: dict[str, list] = {}
    for e in loaders.arc_jsonl(shared_data / "arc_raw" / "ARC-Challenge-Test.jsonl"):
        raw.setdefault(e.query, []).append((e.choices, e.gold))  # a few stems occur twice with other choices
    parsed = loaders.instruction_multiple_choice(shared_data / "commonsense_llm_adapters" / "ARC-Challenge_test.json",
                                                 loaders.ARC_Q)
    both = [e for e in parsed if e.query in raw]
    assert len(both) >= 1100
    mismatched = [e.query for e in both if (e.choices, e.gold) not in raw[e.query]]
    assert not mismatched, mismatched[:3]


def test_every_builtin_task_loads_from_the_shared_data(shared_data):
    counts = {"arc_challenge": 1150, "arc_easy": 2376, "piqa": 1838, "boolq": 3270, "winogrande": 1267,
              "openbookqa": 500, "social_iqa": 1954, "gsm8k": 1319}
    for name, n in counts.items():
        (task,) = loaders.resolve_tasks([name])
        examples = task.load()
        assert len(examples) == n, name
        assert all(0 <= e.gold < len(e.choices) for e in examples) or task.kind == "generate"
    mmlu = loaders.resolve_tasks(["mmlu"])
    assert len(mmlu) == 57 and sum(len(t.load()) for t in mmlu) == 14042
    assert all(len(t.load_fewshot()) == 5 for t in mmlu)
    (text,) = loaders.resolve_tasks(["wikitext2"])
    assert text.text_path.name == "test.txt"


# ---- generation metrics ------------------------------------------------------------------------
def test_gsm8k_answer_extraction_and_exact_match():
    assert extract_answer("She sells 9 eggs.\n#### 18") == ("18", "18")
    assert extract_answer("So the answer is $1,234.") == ("[invalid]", "$1,234.")
    assert normalize_number("$1,234.") == "1234"
    assert normalize_number("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18") == "18"


# ---- the runner --------------------------------------------------------------------------------
def test_runner_groups_mmlu_and_uses_fewshot_from_the_dev_split(tiny, tmp_path):
    root = tmp_path / "mmlu"
    (root / "test").mkdir(parents=True)
    (root / "dev").mkdir()
    for subject, rows in (("alpha", 3), ("beta", 1)):
        (root / "test" / f"{subject}_test.csv").write_text("".join(f'"q{i}",a,b,c,d,{i % 4}\n' for i in range(rows)))
        (root / "dev" / f"{subject}_dev.csv").write_text("".join(f'"dev{i}",a,b,c,d,A\n' for i in range(5)))
    model, tok = load_model(tiny)
    doc = evaluate(model, tok, [f"mmlu={root}"], num_fewshot=2, log_samples=True)
    alpha, beta = doc["results"]["mmlu_alpha"], doc["results"]["mmlu_beta"]
    group = doc["groups"]["mmlu"]
    assert group["n"] == 4 and group["tasks"] == 2
    assert group["acc"] == pytest.approx((alpha["acc"] * 3 + beta["acc"]) / 4)
    assert group["acc_subject_mean"] == pytest.approx((alpha["acc"] + beta["acc"]) / 2)
    (task,) = [t for t in loaders.resolve_tasks([f"mmlu={root}"]) if t.name == "mmlu_alpha"]
    context, continuation = task.requests(task.load()[0], task.load_fewshot()[:2])[1]
    assert context.startswith("The following are multiple choice questions (with answers) about alpha.\n\ndev0\n")
    assert "Answer: A\n\ndev1\n" in context and context.endswith("q0\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert continuation == " B"


def test_winogrande_style_partial_scoring(tiny):
    model, tok = load_model(tiny)
    task = Task(name="w", kind="multiple_choice", load=lambda: [Example("was kind.", ["Tom is", "Bob is"], 1, partial=True)])
    assert task.requests(task.load()[0], []) == [("Tom is", " was kind."), ("Bob is", " was kind.")]
    doc = evaluate(model, tok, [task], log_samples=True)
    lls = doc["samples"]["w"][0]["loglikelihoods"]
    expected = loglikelihoods(model, [encode_pair(tok, "Tom is", " was kind."), encode_pair(tok, "Bob is", " was kind.")])
    assert lls == [s for s, _ in expected]
    assert "acc" in doc["results"]["w"] and "acc_norm" not in doc["results"]["w"]  # lengths of contexts mean nothing


# ---- task files --------------------------------------------------------------------------------
TASK_YAML = """task: capitals
type: multiple_choice
data: capitals.jsonl
prompt: "Question: What is the capital of {{country}}?\\nAnswer:"
choices: "{{options}}"
target: "{{answer}}"
"""


def write_task(tmp_path: Path, text: str = TASK_YAML) -> Path:
    write_jsonl(tmp_path / "capitals.jsonl", [{"country": "France", "options": ["Paris", "Rome"], "answer": "Paris"},
                                               {"country": "Italy", "options": ["Paris", "Rome"], "answer": 1}])
    path = tmp_path / "capitals.yaml"
    path.write_text(text)
    return path


def test_task_file_runs(tiny, tmp_path):
    from pocketlm.evaluate.taskfile import load_task_file

    task = load_task_file(write_task(tmp_path))
    examples = task.load()
    assert [(e.query, e.choices, e.gold) for e in examples] == [
        ("Question: What is the capital of France?\nAnswer:", ["Paris", "Rome"], 0),
        ("Question: What is the capital of Italy?\nAnswer:", ["Paris", "Rome"], 1)]
    doc = evaluate_dir(tiny, [str(tmp_path / "capitals.yaml")])
    assert doc["results"]["capitals"]["n"] == 2


@pytest.mark.parametrize("change, message", [
    (("prompt:", "promt:"), "promt: unknown key; did you mean 'prompt'?"),
    (("data: capitals.jsonl\n", ""), "data: missing (required)"),
    (("data: capitals.jsonl", "data: nowhere.jsonl"), "data: nowhere.jsonl: no such file"),
    (("{{country}}", "{{contry}}"), "'prompt' template: 'contry' is undefined; the record's fields are: country, options, answer"),
    (("type: multiple_choice", "type: multiple-choice"), "type: Input should be 'multiple_choice', 'generate' or 'perplexity'"),
    (("target: \"{{answer}}\"\n", ""), "target: missing (required for type multiple_choice)"),
    (("target:", "constraint: {choice: [a, b]}\ntarget:"), "constraint: only generate tasks decode their answers"),
    (("target:", "constraint: {regex: a, choice: [a]}\ntarget:"), "constraint: Dictionary should have at most 1 item"),
    (("target:", "constraint: {xml: a}\ntarget:"), "constraint.xml.[key]: Input should be 'json_schema'"),
    (("type: multiple_choice", "type: generate\nconstraint: {json_schema: '{oops'}"), "constraint: the JSON Schema is not valid JSON"),
])
def test_task_file_errors_are_one_line(tmp_path, change, message):
    from pocketlm.evaluate.taskfile import load_task_file

    path = write_task(tmp_path, TASK_YAML.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_task_file(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_generation_task_decodes_under_its_constraint_or_the_one_given(tiny, tmp_path):
    """The constrained answers are the grammar's; the free ones are not; exact match and `strict_found` count
    them; a constraint given to evaluate overrides the task file's."""
    write_jsonl(tmp_path / "sums.jsonl", [{"q": f"{a}+{b}", "a": f"#### {a + b}"} for a, b in ((1, 1), (2, 3), (4, 4))])
    text = ('task: sums\ntype: generate\ndata: sums.jsonl\nprompt: "Q: {{q}}\\nA:"\ntarget: "{{a}}"\n'
            'until: ["\\n"]\nmax_new_tokens: 12\n')
    (tmp_path / "free.yaml").write_text(text)
    (tmp_path / "number.yaml").write_text(text + 'constraint: {regex: " #### [0-9]{1,2}"}\n')
    model, tok = load_model(tiny)
    free = evaluate(model, tok, [str(tmp_path / "free.yaml")], log_samples=True)
    number = evaluate(model, tok, [str(tmp_path / "number.yaml")], log_samples=True)
    assert all(re.fullmatch(r" #### [0-9]{1,2}", s["completion"]) for s in number["samples"]["sums"])
    assert not any(re.fullmatch(r" #### [0-9]{1,2}", s["completion"]) for s in free["samples"]["sums"])
    result = number["results"]["sums"]
    assert result["strict_found"] == 1.0 and free["results"]["sums"]["strict_found"] == 0.0
    assert result["constraint"] == {"kind": "regex", "value": " #### [0-9]{1,2}"}
    assert result["exact_match"] == result["exact_match_strict"] == \
        sum(s["strict"] == s["gold"] for s in number["samples"]["sums"]) / 3
    given = evaluate(model, tok, [str(tmp_path / "number.yaml")], log_samples=True,
                     constraint=Constraint("choice", [" 2", " 5", " 8"]))
    assert {s["completion"] for s in given["samples"]["sums"]} <= {" 2", " 5", " 8"}
    assert given["settings"]["constraint"] == {"kind": "choice", "value": [" 2", " 5", " 8"]}


def test_cli_eval_takes_the_constraint_options(tiny, tmp_path):
    write_jsonl(tmp_path / "yn.jsonl", [{"q": "sky blue?", "a": "yes"}, {"q": "fire cold?", "a": "no"}])
    (tmp_path / "yn.yaml").write_text('task: yn\ntype: generate\ndata: yn.jsonl\nprompt: "{{q}}"\ntarget: "{{a}}"\n'
                                      'max_new_tokens: 4\n')
    out = tmp_path / "results.json"
    proc = run_cli("eval", str(tiny), "--tasks", str(tmp_path / "yn.yaml"), "--choice", "yes", "--choice", "no",
                   "--log-samples", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "| yn | exact_match |" in proc.stdout and "strict" not in proc.stdout  # no '#### N' answers to extract
    document = json.loads(out.read_text())
    assert {s["completion"] for s in document["samples"]["yn"]} <= {"yes", "no"}
    bad = run_cli("eval", str(tiny), "--tasks", str(tmp_path / "yn.yaml"), "--regex", "a(")
    assert bad.returncode != 0 and "unclosed group" in bad.stderr and "Traceback" not in bad.stderr


# ---- the command line --------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pocketlm", *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_cli_eval_writes_results_json_with_provenance(tiny, tmp_path):
    task = write_task(tmp_path)
    out = tmp_path / "results.json"
    proc = run_cli("eval", str(tiny), "--tasks", str(task), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "| capitals | acc |" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["model"]["path"] == str(tiny) and doc["model"]["parameters"] > 0 and "provenance" in doc["model"]
    assert doc["settings"]["dtype"] == "float32"


def test_cli_eval_bad_task_file_is_one_error_line(tiny, tmp_path):
    task = write_task(tmp_path, TASK_YAML.replace("choices:", "choises:"))
    proc = run_cli("eval", str(tiny), "--tasks", str(task))
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error:") and "choises: unknown key; did you mean 'choices'?" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- lm-evaluation-harness ---------------------------------------------------------------------


def test_lm_eval_adapter_and_hf_agree_with_pocketlm_eval(tiny, tmp_path, monkeypatch):
    """lm-eval's own `hf` model, lm-eval with the `pocketlm` adapter, and `pocketlm eval` give the
    same per-choice log-likelihoods and the same accuracy on the same file."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import pocketlm.evaluate.harness  # noqa: F401  (registers `pocketlm`)

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    records = [{"goal": f"goal number {i}", "sol1": "do it with a spoon" * (i % 3 + 1), "sol2": "a fork", "label": i % 2}
               for i in range(12)]
    data = write_jsonl(tmp_path / "piqa.jsonl", records)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_piqa.yaml").write_text(PIQA_YAML.format(name="tiny_piqa", data=data))
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    runs = {}
    for model, args in (("hf", f"pretrained={tiny},dtype=float32"), ("pocketlm", f"path={tiny}")):
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["tiny_piqa"], task_manager=manager,
                                      log_samples=True, device="cpu", batch_size=4)
        samples = sorted(out["samples"]["tiny_piqa"], key=lambda s: s["doc_id"])
        runs[model] = (out["results"]["tiny_piqa"], [[r[0] for r in s["filtered_resps"]] for s in samples])
    ours = evaluate_dir(tiny, [f"piqa={data}"], log_samples=True)
    our_lls = [s["loglikelihoods"] for s in ours["samples"]["piqa"]]
    for model, (metrics, lls) in runs.items():
        assert metrics["acc,none"] == pytest.approx(ours["results"]["piqa"]["acc"]), model
        assert metrics["acc_norm,none"] == pytest.approx(ours["results"]["piqa"]["acc_norm"]), model
        assert torch.allclose(torch.tensor(lls), torch.tensor(our_lls), atol=1e-4), model


# ---- compare -----------------------------------------------------------------------------------
def test_pareto_front():
    from pocketlm.evaluate.compare import pareto_front

    points = [(100.0, 30.0), (50.0, 29.0), (60.0, 25.0), (25.0, 20.0)]
    assert pareto_front(points, lower_x_better=True) == [0, 1, 3]  # (60, 25) is beaten by (50, 29)
    assert pareto_front(points, lower_x_better=False) == [0]


def test_cli_compare_writes_report_plots_and_an_accumulating_leaderboard(tiny, tmp_path):
    from pocketlm.quant import QuantScheme
    from pocketlm.quantize import quantize_dir

    int8 = quantize_dir(tiny, tmp_path / "tiny-int8", QuantScheme("int8"))
    task = write_task(tmp_path)
    out = tmp_path / "report"
    for _ in range(2):
        proc = run_cli("compare", str(tiny), str(int8), "--tasks", str(task), "--out", str(out), "--prompt", "hello",
                       "--new-tokens", "4")
        assert proc.returncode == 0, proc.stderr
    report = (out / "report.md").read_text()
    # the weights column may add how it decoded ("native step", see pocketlm.kernels.decode_step)
    assert "| model | capitals | mean |" in report and "| tiny-int8 | int8 per-channel" in report
    assert results_params(out) == 2 * [results_params(out)[0]]  # quantized: the same parameters
    assert "**hello**" in report
    for png in ("accuracy_vs_size.png", "accuracy_vs_speed.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    assert results[0]["file_mb"] > results[1]["file_mb"] > 0 and all(r["decode_tokens_per_s"] > 0 for r in results)
    board = json.loads((out / "leaderboard.json").read_text())
    assert len(board) == 4 and {b["path"] for b in board} == {str(tiny), str(int8)}


def results_params(out: Path) -> list[int]:
    return [r["parameters"] for r in json.loads((out / "results.json").read_text())]


def test_cli_compare_bad_task_fails_before_measuring(tiny):
    proc = run_cli("compare", str(tiny), str(tiny), "--tasks", "arc_chalenge")
    assert proc.returncode == 1 and "did you mean 'arc_challenge'" in proc.stderr and "Traceback" not in proc.stderr


def test_lm_eval_command_line_with_the_pocketlm_model(tiny, tmp_path):
    data = write_jsonl(tmp_path / "piqa.jsonl", [{"goal": "g", "sol1": "a spoon", "sol2": "a fork", "label": 1}] * 3)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_piqa.yaml").write_text(PIQA_YAML.format(name="tiny_piqa", data=data))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "pocketlm.evaluate.harness", "run", "--model", "pocketlm",
                           "--model_args", f"path={tiny}", "--tasks", "tiny_piqa", "--include_path", str(tmp_path / "tasks"),
                           "--device", "cpu"], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = evaluate_dir(tiny, [f"piqa={data}"])["results"]["piqa"]
    rows = {cells[5]: float(cells[7]) for line in proc.stdout.splitlines()
            if len(cells := [c.strip() for c in line.split("|")]) > 8 and cells[5] in ("acc", "acc_norm")}
    assert rows == {"acc": pytest.approx(ours["acc"]), "acc_norm": pytest.approx(ours["acc_norm"])}


def test_generation_task_decodes_greedily_until_a_stop_string_and_scores_exact_match(tiny, tmp_path):
    from pocketlm.engine import SamplingParams
    from pocketlm.streaming import generate

    write_jsonl(tmp_path / "sums.jsonl", [{"q": "1+1", "a": "#### 2"}, {"q": "2+2", "a": "#### 4"}])
    (tmp_path / "sums.yaml").write_text('task: sums\ntype: generate\ndata: sums.jsonl\nprompt: "Q: {{q}}\\nA:"\n'
                                        'target: "{{a}}"\nuntil: ["\\n"]\nmax_new_tokens: 12\n')
    model, tok = load_model(tiny)
    doc = evaluate(model, tok, [str(tmp_path / "sums.yaml")], log_samples=True)
    result, samples = doc["results"]["sums"], doc["samples"]["sums"]
    for sample, question in zip(samples, ("1+1", "2+2")):
        expected = generate(model, tok, tok.encode(f"Q: {question}\nA:"), SamplingParams(max_new_tokens=12, stop=["\n"])).text
        assert sample["completion"] == expected and "\n" not in sample["completion"]
        assert (sample["strict"], sample["flexible"]) == extract_answer(expected)
    assert result["exact_match_flexible"] == sum(normalize_number(s["flexible"]) == s["gold"] for s in samples) / 2
    assert {s["gold"] for s in samples} == {"2", "4"}
