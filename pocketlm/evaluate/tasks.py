"""What an evaluation task is: examples, how a prompt is built from them, and how answers are scored.

A task is data plus a few declarative fields, as in lm-evaluation-harness: each `Example` carries the
text before the answer (`query`), the answer choices and the gold index (multiple choice) or the gold
answer (generation). Few-shot prompts are the task's description, then solved examples separated by
`fewshot_delimiter`, then the example asked about; the answer follows `target_delimiter`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..constrain import Constraint

MULTIPLE_CHOICE = "multiple_choice"
GENERATE = "generate"
PERPLEXITY = "perplexity"


@dataclass
class Example:
    query: str
    choices: list[str] = field(default_factory=list)
    gold: int = 0  # index into choices
    answer: str = ""  # generation tasks: the gold answer, compared after extraction
    partial: bool = False  # WinoGrande style: each choice completes the context; `query` is the shared ending
    # generation
    prefix: str = ""  # a chat task: the start of the assistant's reply, written for the model
    until: list[str] | None = None  # this example's stop strings, instead of the task's
    search: str = ""  # what retrieval looks up (default: the query)

    def solved(self, delimiter: str) -> str:
        """The example with its answer, as a few-shot demonstration."""
        if self.partial:
            return self.choices[self.gold] + delimiter + self.query
        return self.query + delimiter + (self.choices[self.gold] if self.choices else self.answer)


@dataclass
class Retrieval:
    """A generation task answered from an index: the top k passages of `retriever` go into each prompt."""

    index: str | None = None  # an index folder (`pocketlm index build`); None: given by `pocketlm eval --index`
    k: int = 4
    retriever: str = "hybrid"


@dataclass
class Task:
    name: str
    kind: str
    load: Callable[[], list[Example]] | None = None  # the examples asked about
    load_fewshot: Callable[[], list[Example]] | None = None  # where demonstrations come from (first n)
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    group: str | None = None  # e.g. "mmlu": the group's average is reported too
    # generation
    until: list[str] = field(default_factory=list)
    max_new_tokens: int = 256
    constraint: Constraint | None = None  # the answer is decoded under it (pocketlm.constrain)
    chat: bool = False  # the prompt is the user's turn in the model's chat template
    retrieval: Retrieval | None = None
    default_fewshot: int = 0
    # perplexity
    text_path: Path | None = None
    source: str = ""  # where the data comes from, for the results' provenance

    def context(self, example: Example, fewshot: list[Example]) -> str:
        shots = "".join(e.solved(self.target_delimiter) + self.fewshot_delimiter for e in fewshot)
        return self.description + shots

    def requests(self, example: Example, fewshot: list[Example]) -> list[tuple[str, str]]:
        """(context, continuation) per choice, as lm-evaluation-harness builds them."""
        prefix = self.context(example, fewshot)
        if example.partial:
            return [(prefix + choice, self.target_delimiter + example.query) for choice in example.choices]
        return [(prefix + example.query, self.target_delimiter + choice) for choice in example.choices]


# ---- metrics --------------------------------------------------------------------------------
def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and the standard error of the mean (sample standard deviation / sqrt(n))."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def choose(example: Example, scores: list[float]) -> tuple[int, int]:
    """(prediction by log-likelihood, prediction by log-likelihood per character of the choice)."""
    by_ll = max(range(len(scores)), key=lambda i: scores[i])
    lengths = [float(len(c)) for c in example.choices]
    by_norm = max(range(len(scores)), key=lambda i: scores[i] / lengths[i] if lengths[i] else scores[i])
    return by_ll, by_norm


STRICT_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
ANY_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


INVALID = "[invalid]"  # no answer found (lm-evaluation-harness's marker)


def extract_answer(text: str) -> tuple[str, str]:
    """(strict, flexible) answers from a GSM8K-style completion: the number after '####', and the last
    number anywhere in the text (lm-evaluation-harness's two filters)."""
    strict = STRICT_ANSWER.search(text)
    numbers = [a or b for a, b in ANY_NUMBER.findall(text)]
    return (strict.group(1) if strict else INVALID), (numbers[-1] if numbers else INVALID)


def normalize_number(text: str) -> str:
    """What exact match compares: no thousands separators, dollar signs or trailing period; the part
    after '####' when the gold answer carries its worked solution; case-insensitive."""
    text = re.sub(r"(?s).*#### ", "", text)
    text = text.replace(",", "").replace("$", "")
    return re.sub(r"\.$", "", text.strip()).lower()
