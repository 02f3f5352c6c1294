"""Answering from an index: the top passages, numbered, in the model's chat template; an answer that cites
them as [1], [2]; and which passages it cited."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Iterator

from ..constrain import Constraint
from ..engine import SamplingParams
from ..errors import ContextLengthError, PocketLMError
from ..streaming import chat_prompt, compile_constraint, stream
from .search import Passage, Searcher

INSTRUCTIONS = ("Answer the question from the numbered passages. Cite each passage you use by its number in "
                "square brackets, like [1]. If the passages do not hold the answer, say that you do not know.")


def numbered_passages(passages: list[Passage]) -> str:
    """The passages as a model reads them: `[n] title`, then the text, a blank line between."""
    return "\n\n".join(f"[{p.number}] {p.title}\n{p.text.strip()}" if p.title else f"[{p.number}] {p.text.strip()}"
                       for p in passages)


def rag_messages(question: str, passages: list[Passage], history: list[dict] | None = None) -> list[dict]:
    """The conversation the model answers: instructions as the system message, earlier turns (`history`,
    without a system message), then the passages and the question as the last user turn."""
    return [{"role": "system", "content": INSTRUCTIONS}, *(history or []),
            {"role": "user", "content": f"Passages:\n\n{numbered_passages(passages)}\n\nQuestion: {question}"}]


def fit_passages(tokenizer, question: str, passages: list[Passage], context: int, reserve: int,
                 history: list[dict] | None = None) -> tuple[list[int], list[Passage]]:
    """Prompt ids with as many of the passages (best first) as fit beside `reserve` tokens of answer."""
    reserve = min(reserve, context // 2)
    kept = list(passages)
    while True:
        ids = chat_prompt(tokenizer, rag_messages(question, kept, history))
        if len(ids) + reserve <= context:
            return ids, kept
        if not kept:
            raise ContextLengthError(f"the question has {len(ids)} tokens; with room for {reserve} tokens of answer "
                                     f"it does not fit the model's context of {context}; shorten it")
        kept.pop()


def cited(text: str, passages: list[Passage]) -> list[int]:
    """The passage numbers an answer cites: [2], [1, 3] and [1][3] all count; numbers no passage has do not."""
    numbers = {int(n) for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", text) for n in re.split(r"\s*,\s*", group)}
    return sorted(numbers & {p.number for p in passages})


@dataclass
class Answer:
    question: str
    text: str = ""
    passages: list[Passage] = field(default_factory=list)
    cited: list[int] = field(default_factory=list)
    finish_reason: str = ""

    def as_dict(self) -> dict:
        return {"question": self.question, "answer": self.text, "cited": self.cited, "finish_reason": self.finish_reason,
                "sources": [p.as_dict() for p in self.passages]}


def citing(passages: int, sentences: int = 1) -> Constraint:
    """A reply of up to `sentences` sentences, each followed by the passages it comes from: `... . [2]`,
    `... . [1][3]` (small models seldom cite on their own; this makes them, through the grammar). The reply
    may end after any citation; it cannot end uncited. One sentence by default: SmolLM2-135M, given more,
    fills them all, citing passages in turn rather than by what they say."""
    number = "|".join(str(n) for n in range(passages, 0, -1))
    sentence = rf"[^\[\]\n.]{{1,300}}\. \[({number})\](\[({number})\]){{0,{max(passages - 1, 0)}}}"
    return Constraint("regex", rf"{sentence}( {sentence}){{0,{sentences - 1}}}")


def stream_answer(searcher: Searcher, model, tokenizer, question: str, k: int = 4,
                  params: SamplingParams | None = None, answer: Answer | None = None,
                  cite: bool = False) -> Iterator[str]:
    """Yield the answer's text as it is generated; `answer` (when given) is filled with the passages used,
    the whole text and the citations. `cite` holds the reply to text that ends in citations (`citing`)."""
    if not tokenizer.chat_template:
        raise PocketLMError("the model has no chat template; answering from passages needs an instruction-tuned model")
    params = params or SamplingParams(max_new_tokens=256)
    answer = answer if answer is not None else Answer(question)
    ids, answer.passages = fit_passages(tokenizer, question, searcher.search(question, k),
                                        model.config.max_position_embeddings, params.max_new_tokens)
    if cite:
        params = replace(params, grammar=compile_constraint(model, tokenizer, citing(len(answer.passages))))
    pieces, info = [], {}
    for piece in stream(model, tokenizer, ids, params, result=info):
        pieces.append(piece)
        yield piece
    answer.text, answer.finish_reason = "".join(pieces), info.get("finish_reason", "")
    answer.cited = cited(answer.text, answer.passages)


def ask(searcher: Searcher, model, tokenizer, question: str, k: int = 4, params: SamplingParams | None = None,
        cite: bool = False) -> Answer:
    """The whole answer at once: `pocketlm ask` from Python."""
    answer = Answer(question)
    for _ in stream_answer(searcher, model, tokenizer, question, k, params, answer, cite):
        pass
    return answer


def format_sources(answer: Answer) -> str:
    """One line per passage: its number, whether the answer cites it, its document and where in it."""
    return "\n".join(f"[{p.number}]{' cited' if p.number in answer.cited else ''} {p.doc_id}"
                     f"{f' ({p.title})' if p.title else ''}, characters {p.start}-{p.end}: {p.source}"
                     for p in answer.passages)
