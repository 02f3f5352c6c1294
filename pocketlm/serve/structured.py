"""Structured output on OpenAI's wire: `response_format`, `tools` and `tool_choice` become a prompt and a
grammar the scheduler decodes under; the calls the model writes become `tool_calls`, whole or streamed as
deltas."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from ..constrain import Constraint, Grammar
from ..engine import eos_ids
from ..errors import ConfigError
from ..streaming import chat_prompt, compile_constraint
from ..tools import check_choice, compile_tools, read_calls, read_tools, tool_messages
from .protocol import APIError, ChatRequest, ResponseFormat
from .variants import Variant


@dataclass
class ChatInput:
    prompt: list[int]
    grammar: Grammar | None  # what the output must be, if anything
    calls: bool  # the output may hold tool calls, to be read back


def chat_input(body: ChatRequest, variant: Variant) -> ChatInput:
    """The prompt and grammar of a chat request; a format, tool or tool_choice that cannot be used is an
    APIError naming it."""
    messages = [m.for_template() for m in body.messages]
    tokenizer = variant.tokenizer
    tools = _guarded("tools", lambda: read_tools([t.model_dump(exclude_none=True) for t in body.tools or []]))
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if not isinstance(choice, str):
        choice = choice.function.name
    _guarded("tool_choice", lambda: check_choice(tools, choice))
    answer = _answer(body.response_format)
    extra: dict = {}
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        messages, extra = tool_messages(messages, tools, tokenizer.supports_tools)
    prompt = chat_prompt(tokenizer, messages, **extra)
    grammar = None
    if tools:
        grammar = _guarded("tools", lambda: compile_tools(
            tools, choice, body.parallel_tool_calls, answer, tokenizer, variant.model.config.vocab_size,
            eos_ids(variant.model, tokenizer)))
    elif answer is not None:
        grammar = _guarded("response_format", lambda: compile_constraint(variant.model, tokenizer, answer))
    return ChatInput(prompt, grammar, calls=bool(tools) and choice != "none")


def _answer(response_format: ResponseFormat | None) -> Constraint | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Constraint("json_object")
    if response_format.json_schema is None:
        raise APIError(400, "response_format of type json_schema needs `json_schema` with a `schema`",
                       param="response_format")
    return Constraint("json_schema", response_format.json_schema.schema_)


def _guarded(param: str, build):
    try:
        return build()
    except ConfigError as e:
        message = str(e) if str(e).startswith(param) else f"{param}: {e}"
        raise APIError(400, message, param=param) from None


@dataclass
class CallStream:
    """One choice's output read as an answer or tool calls while it streams: `feed` gives the deltas each
    new piece makes (content, a call's id and name, then its arguments' text), `message` the whole."""
    text: str = ""
    content_sent: int = 0
    ids: list[str] = field(default_factory=list)
    arguments_sent: list[int] = field(default_factory=list)

    def feed(self, piece: str, final: bool = False) -> list[dict]:
        self.text += piece
        answer, calls = read_calls(self.text, final)
        deltas: list[dict] = []
        if answer is not None:
            if len(answer) > self.content_sent:
                deltas.append({"content": answer[self.content_sent:]})
                self.content_sent = len(answer)
            return deltas
        for index, call in enumerate(calls):
            if index == len(self.ids):
                self.ids.append(_call_id())
                self.arguments_sent.append(0)
                deltas.append({"tool_calls": [{"index": index, "id": self.ids[index], "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
            if len(call.arguments) > self.arguments_sent[index]:
                deltas.append({"tool_calls": [{"index": index, "function": {
                    "arguments": call.arguments[self.arguments_sent[index]:]}}]})
                self.arguments_sent[index] = len(call.arguments)
        return deltas

    def message(self) -> dict:
        """The assistant message of the whole output (after the last `feed`)."""
        answer, calls = read_calls(self.text)
        while len(self.ids) < len(calls):
            self.ids.append(_call_id())
        if answer is not None:
            return {"role": "assistant", "content": answer}
        return {"role": "assistant", "content": None,
                "tool_calls": [{"id": i, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                               for i, c in zip(self.ids, calls)]}


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]
