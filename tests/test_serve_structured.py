"""Structured output through the server, checked with the official `openai` client: response_format (a
Pydantic model through `chat.completions.parse`, json_object), tools with every tool_choice, a tools round
trip, streamed tool-call deltas, per-row grammars under continuous batching, and the 400s for what cannot
be enforced."""

from __future__ import annotations

import json
import threading
from typing import Literal

import jsonschema
import openai
import pytest
from helpers import byte_level_tokenizer, tiny_model_dir
from pydantic import BaseModel, Field
from serve_helpers import running_server
from test_constrain import SCHEMAS, check_tokens_with_llguidance

from pocketlm.checkpoint import load_model
from pocketlm.constrain import Constraint
from pocketlm.engine import SamplingParams
from pocketlm.serve.app import create_app
from pocketlm.serve.config import load_serve_config
from pocketlm.serve.scheduler import Finished, Job, Scheduler, TokenEvent
from pocketlm.serve.structured import CallStream
from pocketlm.streaming import chat_prompt, compile_constraint
from pocketlm.tools import OPEN, call_text, read_calls, read_tools, tool_constraint, tool_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    name: str = Field(max_length=10)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # a byte-level tokenizer spends a token per character: the tools' description needs a long context
    return tiny_model_dir(tmp_path_factory.mktemp("structured") / "tiny", seed=3, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def client(tiny_dir, tmp_path_factory):
    database = tmp_path_factory.mktemp("structured-db") / "log.db"
    app = create_app(load_serve_config(None, [str(tiny_dir)], database=str(database), max_context=2048, max_batch=8))
    with running_server(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def assert_valid_calls(message, finish: str) -> None:
    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        if finish == "tool_calls" or call is not message.tool_calls[-1]:  # the last may be cut by max_tokens
            jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


# ---------------------------------------------------------------------------------------------
# response_format
# ---------------------------------------------------------------------------------------------
def test_parse_with_a_pydantic_model_returns_the_parsed_object(client):
    for seed in range(4):
        completion = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "A pet?"}],
                                                   response_format=Pet, max_tokens=300, temperature=1.0, seed=seed)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Pet)
        assert Pet.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_and_json_schema_formats(client):
    answer = client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                            max_tokens=200, temperature=0.7, seed=2)
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    schema = SCHEMAS[17]
    stream = client.chat.completions.create(
        model="tiny", messages=ASK, stream=True, max_tokens=300, seed=3, temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    text, finish = "", None
    for chunk in stream:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), schema)


# ---------------------------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------------------------
def test_required_and_named_tool_choice_call_a_tool_with_valid_arguments(client):
    for seed in range(3):
        answer = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                                max_tokens=400, temperature=1.0, seed=seed)
        assert_valid_calls(answer.choices[0].message, answer.choices[0].finish_reason)
    named = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=400, seed=1,
                                           tool_choice={"type": "function", "function": {"name": "add"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] == ["add"]  # one call: a named choice is not parallel
    assert_valid_calls(choice.message, choice.finish_reason)


def test_a_tools_round_trip(client):
    """The model calls a function, the client runs it and sends the result back, the model answers."""
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=400, temperature=0)
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    result = {"temperature": 18} if call.function.name == "get_weather" else {"sum": 3}
    conversation = ASK + [message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    final = client.chat.completions.create(model="tiny", messages=conversation, tools=TOOLS, tool_choice="none",
                                           max_tokens=24, temperature=0)
    answer = final.choices[0].message
    assert answer.tool_calls is None and answer.content and not answer.content.startswith("<tool_call>")


def test_streamed_tool_call_deltas_reassemble_into_the_same_calls(client):
    args = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=400, temperature=0,
                parallel_tool_calls=False)
    whole = client.chat.completions.create(**args).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**args, stream=True):
        delta = chunk.choices[0].delta
        assert not delta.content  # an output that is calls streams no content
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            if part.id:
                assert call["id"] is None  # the id and name come once, in the call's first delta
                call["id"], call["name"] = part.id, part.function.name
            call["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_auto_answers_are_well_formed(client):
    """Whichever the model picks is well formed (that the grammar allows both: the grammar test; SmolLM2
    choosing a call: test_smollm2_calls_a_tool_on_its_own)."""
    for seed in range(4):
        choice = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=300,
                                                temperature=1.0, seed=seed).choices[0]
        if choice.message.tool_calls:
            assert_valid_calls(choice.message, choice.finish_reason)
        else:
            assert not choice.message.content.startswith("<tool_call>")


@pytest.mark.parametrize("request_args, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "dependentSchemas": {}}}}}, "response_format", 'Unimplemented keys: ["dependentSchemas"]'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(("}}}}, "response_format", "unclosed group"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "strng"}}}}, "response_format", "Invalid type: strng"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}}]}, "tools", "tools[0] (f) parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools", "must describe an object"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "two tools are named 'get_weather'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope', which is not among the tools (get_weather, add)"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs `json_schema`"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, None, "ignore_eos cannot be combined"),
])
def test_what_cannot_be_enforced_is_a_400_that_names_it(client, request_args, param, message):
    extra = {k: v for k, v in request_args.items() if k == "ignore_eos"}
    args = {k: v for k, v in request_args.items() if k != "ignore_eos"}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, extra_body=extra or None, **args)
    assert message in error.value.body["message"]
    assert error.value.body["param"] == param
    assert "\n" not in error.value.body["message"]
    assert client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2).choices  # still serving


# ---------------------------------------------------------------------------------------------
# continuous batching
# ---------------------------------------------------------------------------------------------
def test_rows_decoded_together_keep_their_own_grammar(tiny_dir):
    model, tokenizer = load_model(tiny_dir)
    scheduler = Scheduler(model, max_batch=6, max_context=256, queue_size=8, prefill_chunk=64, name="tiny")
    stops = {tokenizer.eos_token_id}
    schemas = [SCHEMAS[i] for i in (0, 5, 9, 17, 22)]
    grammars = [compile_constraint(model, tokenizer, Constraint("json_schema", s)) for s in schemas]
    results: dict[int, list] = {i: [] for i in range(len(schemas) + 1)}
    done = threading.Semaphore(0)
    try:
        for i, grammar in enumerate(grammars + [None]):  # and one row with no grammar between them
            def emit(event, i=i):
                results[i].append(event)
                if isinstance(event, Finished):
                    done.release()
            job = Job(tokenizer.encode(f"row {i}:"), max_new_tokens=180, stop_ids=frozenset(stops),
                      sampling=SamplingParams(temperature=1.0, seed=i, grammar=grammar))
            scheduler.submit(job, emit)
        for _ in results:
            assert done.acquire(timeout=120)
        assert scheduler.steps < sum(len(r) for r in results.values())  # the rows shared decode steps
    finally:
        scheduler.close()
    for i, (schema, grammar) in enumerate(zip(schemas, grammars)):
        tokens = [e.token for e in results[i] if isinstance(e, TokenEvent)]
        check_tokens_with_llguidance(grammar, tokens)
        if results[i][-1].reason == "stop":
            jsonschema.validate(json.loads(tokenizer.decode(tokens[:-1])), schema)
    assert sum(results[i][-1].reason == "stop" for i in range(len(schemas))) >= 4


# ---------------------------------------------------------------------------------------------
# pocketlm.tools: the grammar, the prompt, reading calls back
# ---------------------------------------------------------------------------------------------
def test_reading_calls_while_they_stream_gives_the_whole_calls_at_the_end():
    text = call_text("add", {"a": 1, "b": 2}) + "\n" + call_text("get_weather", '{"city": "P}{\\"x", "unit": "C"}')
    stream = CallStream()
    deltas = [d for i in range(0, len(text), 3) for d in stream.feed(text[i:i + 3])] + stream.feed("", final=True)
    calls: dict[int, dict] = {}
    for delta in deltas:
        assert "content" not in delta
        for part in delta["tool_calls"]:
            calls.setdefault(part["index"], {"name": part["function"].get("name"), "arguments": ""})
            calls[part["index"]]["arguments"] += part["function"]["arguments"]
    message = stream.message()
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == \
        [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"city": "P}{\\"x", "unit": "C"}')]
    # an answer waits only while it could still open a call
    assert read_calls("<tool", final=False) == (None, []) and read_calls("<tool") == ("<tool", [])
    answer = CallStream()
    assert answer.feed("<to") == [] and answer.feed("o hot") == [{"content": "<too hot"}]


def test_the_grammar_accepts_calls_and_answers_as_the_choice_says(tiny_dir):
    import llguidance

    from pocketlm.constrain import Grammar

    model, tokenizer = load_model(tiny_dir)
    tools = read_tools(TOOLS)
    call = call_text("add", '{"a": 1, "b": 2}')

    def accepts(choice, text, answer=None, parallel=True):
        grammar = Grammar.build(tool_constraint(tools, choice, parallel, answer), tokenizer, 300, [tokenizer.eos_token_id])
        matcher = llguidance.LLMatcher(grammar.llg, grammar.text, log_level=0)
        return all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False)) \
            and matcher.is_accepting()

    assert accepts("auto", call) and accepts("auto", "It is sunny.") and accepts("required", call + "\n" + call)
    assert not accepts("required", "It is sunny.") and not accepts("none", call) and accepts("none", "It is sunny.")
    assert not accepts("required", call + "\n" + call, parallel=False)
    assert accepts("add", call) and not accepts("add", call_text("get_weather", '{"city": "P", "unit": "C"}'))
    assert not accepts("auto", call_text("add", '{"a": 1}'))  # b is required
    assert not accepts("auto", OPEN + "free text")  # text that opens a call must be a call
    json_answer = Constraint("json_schema", {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})
    assert accepts("auto", '{"x": 5}', json_answer) and not accepts("auto", "sunny", json_answer)


def test_a_template_that_renders_tools_gets_them_and_the_calls_as_data(tiny_dir):
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = (
        "{% if tools %}<s>system\n{% for t in tools %}{{ t.function.name }}:{{ t.function.parameters | tojson }}\n"
        "{% endfor %}</s>\n{% endif %}{% for m in messages %}<s>{{ m['role'] }}\n{% if m.tool_calls %}"
        "{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
        "{% else %}{{ m['content'] }}{% endif %}</s>\n{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    assert tokenizer.supports_tools and not byte_level_tokenizer().supports_tools
    tools = read_tools(TOOLS)
    conversation = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18"}]
    messages, extra = tool_messages(conversation, tools, tokenizer.supports_tools)
    text = tokenizer.decode(chat_prompt(tokenizer, messages, **extra))
    assert 'get_weather:{"type": "object"' in text and "CALL get_weather Paris" in text and "<s>tool\n18</s>" in text
    # a template without tools: described in the system message, calls in their frame, results as a user turn
    messages, extra = tool_messages(conversation, tools, False)
    assert extra == {} and messages[0]["role"] == "system" and '"name": "get_weather"' in messages[0]["content"]
    assert messages[2]["content"] == call_text("get_weather", '{"city": "Paris", "unit": "C"}')
    assert messages[3] == {"role": "user", "content": "<tool_response>\n18\n</tool_response>"}


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_client(smollm2_dir, tmp_path_factory):
    database = tmp_path_factory.mktemp("structured-smollm2") / "log.db"
    app = create_app(load_serve_config(None, [str(smollm2_dir)], database=str(database), max_context=2048))
    with running_server(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0), smollm2_dir.name


@pytest.mark.slow
def test_smollm2_fills_a_pydantic_model_and_calls_the_right_tool(smollm2_client):
    client, model = smollm2_client
    pet = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "Describe a pet as JSON."}],
                                        response_format=Pet, max_tokens=100, temperature=0).choices[0]
    assert pet.finish_reason == "stop" and isinstance(pet.message.parsed, Pet)
    expected = {"What is the weather in Paris?": ("get_weather", {"city": "Paris", "unit": "C"}),
                "What is 2 plus 3?": ("add", {"a": 2, "b": 3})}
    for question, (name, arguments) in expected.items():
        ask = [{"role": "user", "content": question}]
        first = client.chat.completions.create(model=model, messages=ask, tools=TOOLS, tool_choice="required",
                                               parallel_tool_calls=False, max_tokens=80, temperature=0).choices[0]
        call = first.message.tool_calls[0]
        assert first.finish_reason == "tool_calls"
        assert (call.function.name, json.loads(call.function.arguments)) == (name, arguments)
        back = ask + [first.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"result": 5}'}]
        final = client.chat.completions.create(model=model, messages=back, tools=TOOLS, max_tokens=40,
                                               temperature=0).choices[0]
        assert final.message.tool_calls is None and final.message.content  # auto: it answers in text
