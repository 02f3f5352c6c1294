"""Built-in tasks and their data loaders.

Defaults read the copies in ../shared/data (or $POCKETLM_SHARED_DATA); `NAME=PATH` points a task at
your own copy. Besides the shared files' own forms (MMLU's CSVs, ARC's raw jsonl, the instruction/answer
form of the commonsense sets), the standard published jsonl forms of HellaSwag, PIQA and ARC load too.
Prompt formats are lm-evaluation-harness's for the same tasks, so the figures compare with it.
"""

from __future__ import annotations

import csv
import difflib
import os
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from .records import read_records
from ..datasets import by_folder
from .taskfile import load_task_file
from .tasks import GENERATE, MULTIPLE_CHOICE, PERPLEXITY, Example, Task

ENV_DATA = "POCKETLM_SHARED_DATA"


def shared_data_dir() -> Path:
    """Where the shared data lives: $POCKETLM_SHARED_DATA, else ../shared/data beside the checkout or cwd."""
    if os.environ.get(ENV_DATA):
        return Path(os.environ[ENV_DATA])
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


def _default(relative: str) -> Path:
    """The shared copy where there is one, else the named dataset's published file (fetched once into the
    cache: pocketlm.datasets), so that built-in tasks run on a machine without ../shared."""
    local = shared_data_dir() / relative
    if local.exists():
        return local
    return by_folder(relative) or local


def _existing(path: Path, task: str) -> Path:
    if not path.exists():
        raise ConfigError(f"task {task}: data not found at {path}; pass {task}=PATH or set ${ENV_DATA}")
    return path


def _field(record: dict, key: str, path: Path, index: int):
    if key not in record:
        raise ConfigError(f"{path}: record {index} has no '{key}' field (fields: {', '.join(record)})")
    return record[key]


# ---- the instruction/answer form of ../shared/data/commonsense_llm_adapters -------------------
ANSWER_FORM = re.compile(r"^Please choose the correct answer to the question: (.*)\n\n(Answer1: .*)\n\nAnswer format: (\S+)$", re.DOTALL)
PIQA_FORM = re.compile(r"^Please choose the correct solution to the question: (.*?)\n\nSolution1: (.*)\n\nSolution2: (.*)\n\nAnswer format: solution1/solution2$", re.DOTALL)
BOOLQ_FORM = re.compile(r"^Please answer the following question with true or false, question: (.*)\n\nAnswer format: true/false$", re.DOTALL)
WINOGRANDE_FORM = re.compile(r"^Please choose the correct answer to fill in the blank to complete the given sentence: (.*)\n\nOption1: (.*) Option2: (.*) Answer format: option1/option2$", re.DOTALL)


def _instruction_records(path: Path, form: re.Pattern) -> list[tuple[re.Match, str]]:
    out = []
    for i, record in enumerate(read_records(path)):
        match = form.match(_field(record, "instruction", path, i))
        if not match:
            raise ConfigError(f"{path}: record {i}'s instruction is not in the expected form ({form.pattern[:60]}...)")
        out.append((match, str(_field(record, "answer", path, i)).strip().lower()))
    return out


def parse_numbered_choices(block: str, word: str = "Answer") -> list[str]:
    """'Answer1: x Answer2: y' -> ['x', 'y'], insisting on the numbers running 1, 2, ..."""
    parts = re.split(rf" ?{word}(\d+): ", block)
    numbers, texts = parts[1::2], parts[2::2]
    if parts[0] or numbers != [str(i) for i in range(1, len(numbers) + 1)]:
        raise ConfigError(f"cannot read the numbered choices in {block[:80]!r}")
    return texts


def _answer_index(answer: str, word: str, count: int, path: Path) -> int:
    if not answer.startswith(word) or not answer[len(word):].isdigit() or not 1 <= int(answer[len(word):]) <= count:
        raise ConfigError(f"{path}: answer {answer!r} is not one of {word}1..{word}{count}")
    return int(answer[len(word):]) - 1


def instruction_multiple_choice(path: Path, template: str) -> list[Example]:
    """ARC, OpenBookQA and SocialIQA in instruction form; `template` formats the question."""
    examples = []
    for match, answer in _instruction_records(path, ANSWER_FORM):
        choices = parse_numbered_choices(match.group(2))
        examples.append(Example(template.format(question=match.group(1)), choices,
                                _answer_index(answer, "answer", len(choices), path)))
    return examples


def instruction_piqa(path: Path) -> list[Example]:
    return [Example(f"Question: {m.group(1)}\nAnswer:", [m.group(2), m.group(3)], _answer_index(a, "solution", 2, path))
            for m, a in _instruction_records(path, PIQA_FORM)]


def instruction_boolq(path: Path) -> list[Example]:
    examples = []
    for match, answer in _instruction_records(path, BOOLQ_FORM):
        if answer not in ("true", "false"):
            raise ConfigError(f"{path}: answer {answer!r} is neither true nor false")
        examples.append(Example(f"Question: {match.group(1)}\nAnswer:", ["no", "yes"], int(answer == "true")))
    return examples


def winogrande_example(sentence: str, option1: str, option2: str, gold: int) -> Example:
    """The blank is filled by each option; the rest of the sentence is what gets scored."""
    if "_" not in sentence:
        raise ConfigError(f"WinoGrande sentence without a blank '_': {sentence[:80]!r}")
    blank = sentence.index("_")
    return Example(sentence[blank + 1:].strip(), [sentence[:blank] + option1, sentence[:blank] + option2], gold, partial=True)


def instruction_winogrande(path: Path) -> list[Example]:
    return [winogrande_example(m.group(1), m.group(2), m.group(3), _answer_index(a, "option", 2, path))
            for m, a in _instruction_records(path, WINOGRANDE_FORM)]


# ---- published jsonl forms ---------------------------------------------------------------------
def arc_jsonl(path: Path) -> list[Example]:
    """ARC: the original form (question.stem, question.choices[].text/label) or Hugging Face's
    (question, choices.text, choices.label); answerKey names the gold label."""
    examples = []
    for i, record in enumerate(read_records(path)):
        question = _field(record, "question", path, i)
        if isinstance(question, dict):
            stem = question["stem"]
            texts = [c["text"] for c in question["choices"]]
            labels = [c["label"] for c in question["choices"]]
        else:
            choices = _field(record, "choices", path, i)
            stem, texts, labels = question, list(choices["text"]), list(choices["label"])
        key = str(_field(record, "answerKey", path, i)).strip()
        if key not in labels:
            raise ConfigError(f"{path}: record {i}'s answerKey {key!r} is not among its labels {labels}")
        examples.append(Example(f"Question: {stem}\nAnswer:", texts, labels.index(key)))
    return examples


def _hellaswag_clean(text: str) -> str:
    # the brackets are artifacts of the WikiHow part of HellaSwag (lm-evaluation-harness strips them too)
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_jsonl(path: Path) -> list[Example]:
    """HellaSwag's published form: ctx (or ctx_a + ctx_b), activity_label, endings, label."""
    examples = []
    for i, r in enumerate(read_records(path)):
        endings = _field(r, "endings", path, i)
        label = _field(r, "label", path, i)
        if "ctx_a" in r and "ctx_b" in r:
            ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        else:
            ctx = _field(r, "ctx", path, i)
        query = f"{r['activity_label']}: {ctx}" if r.get("activity_label") else ctx
        examples.append(Example(_hellaswag_clean(query), [_hellaswag_clean(e) for e in endings], int(label)))
    return examples


def piqa_jsonl(path: Path) -> list[Example]:
    """PIQA's published form: goal, sol1, sol2 and label (in the record, or in the release's
    sibling NAME-labels.lst file, one label per line)."""
    records = read_records(path)
    labels_file = path.with_name(path.stem + "-labels.lst")
    if "label" not in records[0] and labels_file.exists():
        labels = labels_file.read_text().split()
        if len(labels) != len(records):
            raise ConfigError(f"{labels_file} has {len(labels)} labels for {len(records)} records in {path}")
        for record, label in zip(records, labels):
            record["label"] = label
    return [Example(f"Question: {_field(r, 'goal', path, i)}\nAnswer:",
                    [_field(r, "sol1", path, i), _field(r, "sol2", path, i)], int(_field(r, "label", path, i)))
            for i, r in enumerate(records)]


# ---- MMLU ------------------------------------------------------------------------------------
MMLU_TEMPLATE = "{question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def mmlu_csv(path: Path) -> list[Example]:
    """One MMLU subject: a header question,choice0..choice3,answer (answer 0-3), or the original
    header-less rows with a letter answer."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if rows and rows[0][:1] == ["question"]:
        rows = rows[1:]
    examples = []
    for number, row in enumerate(rows, 1):
        if len(row) != 6:
            raise ConfigError(f"{path}: row {number} has {len(row)} columns; MMLU rows are question, 4 choices, answer")
        answer = row[5].strip()
        gold = "ABCD".index(answer) if answer in ("A", "B", "C", "D") else int(answer) if answer in ("0", "1", "2", "3") else None
        if gold is None:
            raise ConfigError(f"{path}: row {number}'s answer {answer!r} is neither 0-3 nor A-D")
        q, a, b, c, d = row[:5]
        examples.append(Example(MMLU_TEMPLATE.format(question=q.strip(), a=a, b=b, c=c, d=d), ["A", "B", "C", "D"], gold))
    return examples


def mmlu_subjects(root: Path) -> list[str]:
    subjects = sorted(p.name[: -len("_test.csv")] for p in (root / "test").glob("*_test.csv"))
    if not subjects:
        raise ConfigError(f"no MMLU subjects (test/*_test.csv) under {root}")
    return subjects


def mmlu_task(root: Path, subject: str) -> Task:
    test, dev = root / "test" / f"{subject}_test.csv", root / "dev" / f"{subject}_dev.csv"
    _existing(test, f"mmlu_{subject}")
    return Task(
        name=f"mmlu_{subject}", kind=MULTIPLE_CHOICE, group="mmlu", source=str(test),
        load=lambda: mmlu_csv(test), load_fewshot=(lambda: mmlu_csv(dev)) if dev.exists() else None,
        description=f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n",
    )


# ---- GSM8K -----------------------------------------------------------------------------------
def gsm8k_jsonl(path: Path) -> list[Example]:
    return [Example(f"Question: {_field(r, 'question', path, i)}\nAnswer:", answer=_field(r, "answer", path, i))
            for i, r in enumerate(read_records(path))]


# ---- the registry ----------------------------------------------------------------------------
def _mc(name: str, default: str, loader: Callable[[Path], list[Example]], fewshot: str | None = None):
    def make(path: Path | None) -> list[Task]:
        data = _existing(path or _default(default), name)
        shots = _default(fewshot) if fewshot and path is None and _default(fewshot).exists() else None
        return [Task(name=name, kind=MULTIPLE_CHOICE, source=str(data), load=lambda: loader(data),
                     load_fewshot=(lambda: loader(shots)) if shots else None)]
    return make


def _instruction(template: str):
    return lambda path: instruction_multiple_choice(path, template)


def _either(instruction: Callable[[Path], list[Example]], published: Callable[[Path], list[Example]]):
    """A loader for a task whose data comes in instruction form or in its published form."""
    return lambda path: (instruction if "instruction" in read_records(path)[0] else published)(path)


def _mmlu(path: Path | None) -> list[Task]:
    root = _existing(path or _default("mmlu"), "mmlu")
    return [mmlu_task(root, subject) for subject in mmlu_subjects(root)]


def _gsm8k(path: Path | None) -> list[Task]:
    data = _existing(path or _default("gsm8k/test.jsonl"), "gsm8k")
    train = data.with_name("train.jsonl")
    return [Task(name="gsm8k", kind=GENERATE, source=str(data), load=lambda: gsm8k_jsonl(data),
                 load_fewshot=(lambda: gsm8k_jsonl(train)) if train.exists() else None,
                 until=["Question:", "</s>", "<|im_end|>"], max_new_tokens=256, default_fewshot=5)]


def _text(name: str, default: str):
    def make(path: Path | None) -> list[Task]:
        return [Task(name=name, kind=PERPLEXITY, text_path=_existing(path or _default(default), name),
                     source=str(path or _default(default)))]
    return make


ARC_Q = "Question: {question}\nAnswer:"
BUILTIN: dict[str, tuple[Callable[[Path | None], list[Task]], str]] = {
    "mmlu": (_mmlu, "MMLU, 57 subjects (each also as mmlu_SUBJECT) and their average; DIR with test/ and dev/ CSVs"),
    "arc_challenge": (_mc("arc_challenge", "arc_raw/ARC-Challenge-Test.jsonl", _either(_instruction(ARC_Q), arc_jsonl),
                          "arc_raw/ARC-Challenge-Dev.jsonl"),
                      "ARC-Challenge, ARC's jsonl (original or Hugging Face form) or instruction form"),
    "arc_easy": (_mc("arc_easy", "commonsense_llm_adapters/ARC-Easy_test.json", _either(_instruction(ARC_Q), arc_jsonl)),
                 "ARC-Easy, instruction form or ARC's jsonl"),
    "piqa": (_mc("piqa", "commonsense_llm_adapters/piqa_test.json", _either(instruction_piqa, piqa_jsonl)),
             "PIQA, instruction form or the published jsonl (goal, sol1, sol2, label)"),
    "boolq": (_mc("boolq", "commonsense_llm_adapters/boolq_test.json", instruction_boolq), "BoolQ questions (no passages), instruction form"),
    "winogrande": (_mc("winogrande", "commonsense_llm_adapters/winogrande_test.json", instruction_winogrande), "WinoGrande, instruction form"),
    "openbookqa": (_mc("openbookqa", "commonsense_llm_adapters/openbookqa_test.json", _instruction("{question}")), "OpenBookQA, instruction form"),
    "social_iqa": (_mc("social_iqa", "commonsense_llm_adapters/social_i_qa_test.json", _instruction("Q: {question}\nA:")), "SocialIQA, instruction form"),
    "hellaswag": (_mc("hellaswag", "hellaswag/hellaswag_val.jsonl", hellaswag_jsonl), "HellaSwag's published jsonl (ctx, endings, label)"),
    "gsm8k": (_gsm8k, "GSM8K, generation with answer extraction and exact match (5-shot by default)"),
    "wikitext2": (_text("wikitext2", "wikitext2/test.txt"), "perplexity over WikiText-2 test"),
    "tinystories": (_text("tinystories", "tinystories/tinystories_val_head.txt"), "perplexity over the TinyStories validation slice"),
}


def resolve_tasks(specs: list[str]) -> list[Task]:
    """Task objects for names (`piqa`), names with data (`hellaswag=FILE`), MMLU subjects
    (`mmlu_anatomy`) and task files (`my_task.yaml`)."""
    tasks: list[Task] = []
    for spec in specs:
        name, _, path = spec.partition("=")
        name = name.strip()
        if name.endswith((".yaml", ".yml")) and not path:
            tasks.append(load_task_file(Path(name)))
        elif name in BUILTIN:
            tasks.extend(BUILTIN[name][0](Path(path) if path else None))
        elif name.startswith("mmlu_"):
            root = Path(path) if path else _default("mmlu")
            tasks.append(mmlu_task(_existing(root, "mmlu"), name[len("mmlu_"):]))
        else:
            close = difflib.get_close_matches(name, list(BUILTIN), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown task {name!r}; {hint}known: {', '.join(BUILTIN)}, mmlu_SUBJECT, or a task file (.yaml)")
    return tasks
