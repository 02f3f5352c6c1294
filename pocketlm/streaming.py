"""From tokens to text: pieces that never split a UTF-8 character, stop strings, chat prompts.

`stream` turns a decode loop's token ids (pocketlm.engine, or pocketlm.speculative with a draft model)
into text pieces that stop cleanly at stop strings; `generate` collects a whole answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .constrain import Constraint, Grammar
from .engine import SamplingParams, eos_ids, generate_tokens
from .errors import ContextLengthError
from .speculative import SpeculativeStats, speculative_tokens
from .tokenizer import Tokenizer


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"



class TextAssembler:
    """Turns a stream of token ids into text pieces.

    Decodes a short window of recent tokens (so SentencePiece's leading spaces come out right) and
    holds back a piece while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context_ids[-4:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        new_text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""


class StopStringFilter:
    """Passes text through, holding back any tail that could start a stop string; reports a hit."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.buffer = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        self.buffer += piece
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out
        cuts = [self.buffer.find(s) for s in self.stops if s in self.buffer]
        if cuts:
            self.hit = True
            out, self.buffer = self.buffer[: min(cuts)], ""
            return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(out):]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def stream(model, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams | None = None,
           result: dict | None = None, draft=None, draft_tokens: int = 4) -> Iterator[str]:
    """Yield text pieces of the continuation of `prompt` (text or token ids).

    If `result` is given it is filled with token_ids, prompt_tokens and finish_reason when the stream
    ends (and `speculative`, the draft's statistics, when a `draft` model proposes tokens).
    """
    params = params or SamplingParams()
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    stop_ids = eos_ids(model, tokenizer)
    assembler = TextAssembler(tokenizer, prompt_ids)
    stops = StopStringFilter(params.stop)
    generated: list[int] = []
    finish = "length"
    if draft is not None:
        stats = SpeculativeStats()
        if result is not None:
            result["speculative"] = stats
        tokens = speculative_tokens(model, draft, prompt_ids, params.max_new_tokens, draft_tokens,
                                    set() if params.ignore_eos else stop_ids, stats, params)
    else:
        tokens = generate_tokens(model, prompt_ids, params, stop_ids)
    for token in tokens:
        if token in stop_ids and not params.ignore_eos:
            finish = "stop"
            break
        generated.append(token)
        piece = stops.feed(assembler.add(token))
        if piece:
            yield piece
        if stops.hit:
            finish = "stop"
            break
    if not stops.hit:
        tail = stops.flush()
        if tail:
            yield tail
    if result is not None:
        result.update(token_ids=generated, prompt_tokens=len(prompt_ids), finish_reason=finish)


def generate(model, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams | None = None) -> Generation:
    info: dict = {}
    text = "".join(stream(model, tokenizer, prompt, params, result=info))
    return Generation(text=text, token_ids=info["token_ids"], prompt_tokens=info["prompt_tokens"],
                      finish_reason=info["finish_reason"])


def chat_prompt(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation rendered with the chat template, ready for the assistant's turn
    (`tools` for a template that renders them: pocketlm.tools)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    # The template writes BOS itself where the model wants one; don't add a second.
    return tokenizer.encode(text, add_special_tokens=False)


def fit_conversation(tokenizer: Tokenizer, messages: list[dict[str, str]], context: int,
                     reserve: int) -> tuple[list[int], list[dict[str, str]]]:
    """Prompt ids for a conversation, dropping its oldest turns until `reserve` tokens of answer fit.

    A system message is always kept. Returns the ids and the messages they were rendered from.
    """
    reserve = min(reserve, context // 2)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        ids = chat_prompt(tokenizer, system + turns)
        if len(ids) + reserve <= context:
            return ids, system + turns
        if len(turns) <= 1:
            raise ContextLengthError(f"the message has {len(ids)} tokens; with room for {reserve} tokens of answer "
                                     f"it does not fit the model's context of {context}; shorten it")
        turns = turns[2:] if len(turns) > 2 else turns[1:]  # drop the oldest user/assistant exchange


def compile_constraint(model, tokenizer: Tokenizer, constraint: Constraint) -> Grammar:
    """The constraint checked for this model and tokenizer, for `SamplingParams(grammar=...)`; a schema
    keyword, regex or grammar the engine cannot enforce is a ConfigError naming it."""
    return Grammar.build(constraint, tokenizer, model.config.vocab_size, eos_ids(model, tokenizer))

