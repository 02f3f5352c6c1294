"""Tool calls (OpenAI's function calling) for a local model: tools described in the prompt, the model's
calls generated under a grammar built from the functions' parameter schemas, and the calls read back.

A call is written in the Hermes / Qwen convention, which chat templates with tool support render
(Qwen2.5, Hermes, SmolLM3 and others):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The grammar forces that frame and the function's arguments schema, so every call parses and names a
tool that exists. A model whose template knows no tools gets them described in its system message, its
earlier calls written in that frame and the tools' results as `<tool_response>` in a user turn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .constrain import JSON_OPTIONS, Constraint, Grammar
from .errors import ConfigError
from .tokenizer import Tokenizer

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
CHOICES = ("none", "auto", "required")
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
_HEAD = re.compile(r'<tool_call>\n\{"name": "(' + NAME.pattern + r')", "arguments": ')
_JSON_KINDS = ("json_schema", "json_object")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, and a JSON Schema of its arguments (an object)."""
    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def spec(self) -> dict:
        """OpenAI's shape, which chat templates take as `tools`."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


def read_tools(entries: list[dict]) -> list[Tool]:
    """Tools from OpenAI's `tools` entries ({"type": "function", "function": {...}}) or bare function specs;
    a malformed one is a ConfigError naming it."""
    tools: list[Tool] = []
    for i, entry in enumerate(entries):
        where = f"tools[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be an object with a function")
        if "function" in entry or "type" in entry:
            if entry.get("type", "function") != "function":
                raise ConfigError(f"{where}.type must be \"function\", got {entry.get('type')!r}")
            entry, where = entry.get("function"), where + ".function"
            if not isinstance(entry, dict):
                raise ConfigError(f"{where} must be an object with a name and parameters")
        name = entry.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(f"{where}.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if any(t.name == name for t in tools):
            raise ConfigError(f"{where}.name: two tools are named {name!r}")
        parameters = entry.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ConfigError(f"{where}.parameters must be a JSON Schema object")
        if parameters.get("type", "object") != "object":
            raise ConfigError(f"{where}.parameters must describe an object (\"type\": \"object\"), "
                              f"got type {parameters.get('type')!r}")
        description = entry.get("description") or ""
        if not isinstance(description, str):
            raise ConfigError(f"{where}.description must be a string")
        tools.append(Tool(name, description, {"type": "object", **parameters}))
    return tools


# ---------------------------------------------------------------------------------------------
# the grammar
# ---------------------------------------------------------------------------------------------
def check_choice(tools: list[Tool], choice: str) -> None:
    """A ConfigError unless `choice` (CHOICES, or a tool's name) can be met with these tools."""
    if choice in CHOICES:
        if choice != "none" and not tools:
            raise ConfigError(f"tool_choice {choice!r} needs tools; give `tools` or leave tool_choice out")
    elif not any(t.name == choice for t in tools):
        known = ", ".join(t.name for t in tools) or "none given"
        raise ConfigError(f"tool_choice names the function {choice!r}, which is not among the tools ({known})")


def tool_constraint(tools: list[Tool], choice: str = "auto", parallel: bool = True,
                    answer: Constraint | None = None) -> Constraint:
    """What the model may write: `choice` is "none" (an answer, never a call), "auto" (an answer or
    calls), "required" (calls) or one tool's name (a call of it). `answer` constrains an answer (a
    json_schema or json_object constraint); without it an answer is any text that does not open a call.
    `parallel`: one or more calls, else exactly one."""
    if answer is not None and answer.kind not in _JSON_KINDS:
        raise ConfigError(f"tool calls combine with a JSON answer format only, not {answer.describe()}")
    check_choice(tools, choice)
    if choice not in CHOICES:
        tools, choice, parallel = [t for t in tools if t.name == choice], "required", False
    rules = {"start": {"none": "answer", "auto": "answer | calls", "required": "calls"}[choice]}
    if choice != "none":
        rules["calls"] = 'call ("\\n" call)*' if parallel else "call"
        rules["call"] = " | ".join(f"call_{i}" for i in range(len(tools)))
        for i, tool in enumerate(tools):
            head = json.dumps(OPEN + '{"name": ' + json.dumps(tool.name) + ', "arguments": ')
            rules[f"call_{i}"] = f"{head} {_inline_json(tool.parameters)} {json.dumps('}' + CLOSE)}"
    if choice != "required" and answer is not None:
        rules["answer"] = _inline_json(answer.schema())
    elif choice != "required":
        rules["answer"] = "TEXT"
        # any text, except text that opens a call: that must be a call, under its schema
        rules["TEXT"] = r"/(.|\n)*/ & ~/<tool_call>(.|\n)*/"
    return Constraint("grammar", "\n".join(f"{name}: {body}" for name, body in rules.items()))


def compile_tools(tools: list[Tool], choice: str, parallel: bool, answer: Constraint | None, tokenizer: Tokenizer,
                  vocab_size: int, eos: set[int] | list[int]) -> Grammar:
    """`tool_constraint` checked against a tokenizer (as `Grammar.build`); a parameters schema the grammar
    engine cannot enforce is a ConfigError naming its tool."""
    try:
        return Grammar.build(tool_constraint(tools, choice, parallel, answer), tokenizer, vocab_size, eos)
    except ConfigError:
        for i, tool in enumerate(tools):  # say which schema it was
            try:
                Grammar.build(Constraint("json_schema", tool.parameters), tokenizer, vocab_size, eos)
            except ConfigError as e:
                raise ConfigError(f"tools[{i}] ({tool.name}) parameters: {e}") from None
        if answer is not None:
            Grammar.build(answer, tokenizer, vocab_size, eos)  # the answer's schema, then
        raise


def _inline_json(schema: Any) -> str:
    """A JSON Schema as a Lark rule body, with the same bounded whitespace as a json_schema constraint."""
    if isinstance(schema, dict):
        schema = {"x-guidance": JSON_OPTIONS, **schema}
    return "%json " + json.dumps(schema)


# ---------------------------------------------------------------------------------------------
# reading calls back
# ---------------------------------------------------------------------------------------------
@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it; cut short while the call is still being written
    complete: bool = False


def read_calls(text: str, final: bool = True) -> tuple[str | None, list[ToolCall]]:
    """(answer, calls) in an output written under `tool_constraint`: the answer's text, or None when the
    output is calls. Not `final` (the output is still streaming), an output that may yet open a call is
    neither, and the last call may be incomplete."""
    if len(text) < len(OPEN) and OPEN.startswith(text):  # it may still open a call
        return (text if final else None), []
    if not text.startswith(OPEN):
        return text, []
    calls: list[ToolCall] = []
    at = 0
    while (head := _HEAD.match(text, at)) is not None:
        end = _json_end(text, head.end())
        arguments = text[head.end():end].strip()
        calls.append(ToolCall(head.group(1), arguments, complete=end is not None))
        at = -1 if end is None else text.find(CLOSE, end)
        if at < 0:
            break
        at += len(CLOSE) + 1  # the "\n" between calls
    return None, calls


def _json_end(text: str, start: int) -> int | None:
    """The index just past the JSON value that starts at `start` (after any whitespace), or None while
    it is not complete."""
    at = len(text) - len(text[start:].lstrip())
    try:
        return _DECODER.raw_decode(text, at)[1]
    except json.JSONDecodeError:
        return None


# ---------------------------------------------------------------------------------------------
# the prompt
# ---------------------------------------------------------------------------------------------
def call_text(name: str, arguments: str | dict) -> str:
    """A call as the model writes it."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return OPEN + '{"name": ' + json.dumps(name) + ', "arguments": ' + (arguments or "{}") + "}" + CLOSE


def describe_tools(tools: list[Tool]) -> str:
    """The system message's account of the tools, for a template that does not render them."""
    listed = "\n".join(json.dumps(tool.spec(), ensure_ascii=False) for tool in tools)
    return ("# Tools\n\nYou may call one or more functions to help with the user's request. The functions, "
            f"described in JSON Schema:\n<tools>\n{listed}\n</tools>\n\nTo call a function, write a JSON object "
            "with its name and arguments between <tool_call></tool_call> tags:\n"
            + call_text("function_name", '{"argument": "value"}'))


def tool_messages(messages: list[dict], tools: list[Tool], template_has_tools: bool) -> tuple[list[dict], dict]:
    """(messages, chat template arguments) for a conversation with tools and earlier calls and results.
    Messages are OpenAI's: an assistant's `tool_calls` ({"id", "function": {"name", "arguments"}}), a
    tool's result as {"role": "tool", "tool_call_id", "content"}."""
    if template_has_tools:
        out = []
        for m in messages:
            if m.get("tool_calls"):
                calls = [{"id": c.get("id"), "type": "function",
                          "function": {"name": c["function"]["name"],
                                       "arguments": _arguments(c["function"].get("arguments"))}}
                         for c in m["tool_calls"]]
                m = {**m, "tool_calls": calls}
            out.append(m)
        return out, ({"tools": [t.spec() for t in tools]} if tools else {})
    out = []
    for m in messages:
        if m["role"] == "tool":
            result = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + result}
            else:
                out.append({"role": "user", "content": result, "_results": True})
        elif m.get("tool_calls"):
            calls = "\n".join(call_text(c["function"]["name"], c["function"].get("arguments") or "{}")
                              for c in m["tool_calls"])
            said = m.get("content") or ""
            out.append({"role": m["role"], "content": said + ("\n" if said else "") + calls})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    out = [{k: v for k, v in m.items() if k != "_results"} for m in out]
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + describe_tools(tools)}
        else:
            out.insert(0, {"role": "system", "content": describe_tools(tools)})
    return out, {}


def _arguments(arguments: Any) -> Any:
    """A call's arguments as chat templates expect them (an object; the JSON text when it is not one)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments or {}
