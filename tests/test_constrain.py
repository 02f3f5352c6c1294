"""Constrained decoding against references nobody here wrote: every output that ends by the grammar validates
with `jsonschema` (a random tiny model and SmolLM2, 30 schemas), regex outputs `re.fullmatch`, and every
token the engine let through is one a separate llguidance matcher accepts in sequence."""

import json
import re

import jsonschema
import llguidance
import pytest
import torch

from helpers import tiny_model_dir
from pocketlm.checkpoint import load_model
from pocketlm.constrain import Constraint, Grammar
from pocketlm.engine import SamplingParams, eos_ids, generate_batch, generate_tokens
from pocketlm.errors import ConfigError
from pocketlm.streaming import chat_prompt, compile_constraint, generate

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "integer", "minimum": 3, "maximum": 17},
    {"type": "number", "minimum": -2.5, "maximum": 2.5},
    {"type": "string", "maxLength": 12},
    {"type": "string", "minLength": 2, "maxLength": 5},
    {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
    {"enum": ["red", "green", "blue"]},
    {"const": "fixed"},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4},
    {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "maxItems": 2},
    {"anyOf": [{"type": "integer"}, {"type": "boolean"}]},
    {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                                                "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 8}},
     "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"enum": ["low", "mid", "high"]}, "score": {"type": "integer", "minimum": 0, "maximum": 100}},
     "required": ["level", "score"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}},
                                                                            "required": ["id"], "additionalProperties": False},
                                                "maxItems": 2}},
     "required": ["items"], "additionalProperties": False},
    {"type": "boolean"},
    {"type": "null"},
    {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number", "minimum": 0}},
     "required": ["kind", "r"], "additionalProperties": False},
    {"oneOf": [{"type": "object", "properties": {"cat": {"type": "string", "maxLength": 5}}, "required": ["cat"], "additionalProperties": False},
               {"type": "object", "properties": {"dog": {"type": "integer"}}, "required": ["dog"], "additionalProperties": False}]},
    {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
     "required": ["email"], "additionalProperties": False},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string", "maxLength": 4}], "minItems": 2, "maxItems": 2},
    {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}},
     "required": ["n"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "string", "enum": ["A", "B", "C", "D"]}, "why": {"type": "string", "maxLength": 20}},
     "required": ["answer"], "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string", "format": "date"}}, "required": ["date"], "additionalProperties": False},
    {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2}, "maxItems": 2},
    {"$defs": {"leaf": {"type": "integer"}}, "type": "object", "properties": {"v": {"$ref": "#/$defs/leaf"}}, "required": ["v"],
     "additionalProperties": False},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tokenizer = load_model(tiny_model_dir(tmp_path_factory.mktemp("constrain") / "tiny", seed=3))
    return model, tokenizer


def decode(tokenizer, ids, stops):
    return tokenizer.decode([t for t in ids if t not in stops])


def check_tokens_with_llguidance(grammar: Grammar, tokens: list[int]) -> None:
    """A separate matcher of llguidance's consumes the engine's tokens one by one, each accepted."""
    matcher = llguidance.LLMatcher(grammar.llg, grammar.text, log_level=0)
    for token in tokens:
        assert matcher.consume_token(token), (token, matcher.get_error())
    assert not matcher.is_error()


def test_thirty_schemas_with_a_random_model_give_valid_json_whenever_the_grammar_ends(tiny):
    assert len(SCHEMAS) >= 30
    model, tokenizer = tiny
    stops = eos_ids(model, tokenizer)
    prompt = tokenizer.encode("the answer:")
    ended = cut = 0
    for i, schema in enumerate(SCHEMAS):
        grammar = compile_constraint(model, tokenizer, Constraint("json_schema", schema))
        for seed in (0, 1):
            params = SamplingParams(max_new_tokens=160, temperature=1.0, seed=seed, grammar=grammar)
            tokens = list(generate_tokens(model, prompt, params, stops))
            check_tokens_with_llguidance(grammar, tokens)
            if tokens and tokens[-1] in stops:
                ended += 1
                jsonschema.validate(json.loads(decode(tokenizer, tokens, stops)), schema)
            else:
                cut += 1  # max_new_tokens ran out inside the value: reported as finish "length", never checked as done
    assert ended >= 0.8 * (ended + cut), (ended, cut)


def test_batched_rows_keep_their_own_grammar_state(tiny):
    model, tokenizer = tiny
    stops = eos_ids(model, tokenizer)
    schema = SCHEMAS[17]
    grammar = compile_constraint(model, tokenizer, Constraint("json_schema", schema))
    prompts = [tokenizer.encode(p) for p in ("a", "the cat sat", "x y z w v")]
    outputs = generate_batch(model, prompts, SamplingParams(max_new_tokens=120, temperature=0.9, seed=5, grammar=grammar), stops)
    for tokens in outputs:
        check_tokens_with_llguidance(grammar, tokens)
        assert tokens[-1] in stops
        jsonschema.validate(json.loads(decode(tokenizer, tokens, stops)), schema)
    assert len({tuple(t) for t in outputs}) > 1  # the rows sampled their own answers


@pytest.mark.parametrize("pattern", [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[a-z]+( [a-z]+){0,3}\.", r"#[0-9a-f]{6}"])
def test_regex_outputs_fullmatch(tiny, pattern):
    model, tokenizer = tiny
    stops = eos_ids(model, tokenizer)
    grammar = compile_constraint(model, tokenizer, Constraint("regex", pattern))
    for seed in range(3):
        tokens = list(generate_tokens(model, tokenizer.encode("hi"), SamplingParams(max_new_tokens=80, temperature=1.0, seed=seed,
                                                                                      grammar=grammar), stops))
        assert tokens[-1] in stops
        assert re.fullmatch(pattern, decode(tokenizer, tokens, stops))


def test_choices_and_a_lark_grammar(tiny):
    model, tokenizer = tiny
    stops = eos_ids(model, tokenizer)
    choices = ["north", "south", "east west", 'say "hi"']
    grammar = compile_constraint(model, tokenizer, Constraint("choice", choices))
    seen = set()
    for seed in range(12):
        tokens = list(generate_tokens(model, tokenizer.encode("go"), SamplingParams(max_new_tokens=20, temperature=1.5, seed=seed,
                                                                                      grammar=grammar), stops))
        seen.add(decode(tokenizer, tokens, stops))
    assert seen <= set(choices) and len(seen) > 1
    lark = 'start: sum\nsum: NUM ("+" NUM){0,3}\nNUM: /[1-9][0-9]?/\n'
    grammar = compile_constraint(model, tokenizer, Constraint("grammar", lark))
    text = generate(model, tokenizer, "x", SamplingParams(max_new_tokens=40, temperature=1.0, seed=2, grammar=grammar)).text
    assert re.fullmatch(r"[1-9][0-9]?(\+[1-9][0-9]?){0,3}", text)


def test_greedy_constrained_decoding_is_the_unconstrained_argmax_over_allowed_tokens(tiny):
    """Step by step: the engine's token is the largest logit among the tokens the grammar allows."""
    model, tokenizer = tiny
    stops = eos_ids(model, tokenizer)
    grammar = compile_constraint(model, tokenizer, Constraint("json_schema", SCHEMAS[0]))
    prompt = tokenizer.encode("person:")
    tokens = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=60, grammar=grammar), stops))
    guide = grammar.guide()
    with torch.no_grad():
        for i, token in enumerate(tokens):
            logits = model(torch.tensor([prompt + tokens[:i]]))[0, -1]
            allowed = guide.allowed(logits.shape[-1])
            assert allowed[token]
            assert logits[token] == logits.masked_fill(~allowed, float("-inf")).max()
            guide.advance(token)


@pytest.mark.parametrize("constraint, message", [
    (Constraint("json_schema", {"type": "object", "dependentSchemas": {"a": {}}}), "Unimplemented keys: \\[\"dependentSchemas\"\\]"),
    (Constraint("json_schema", {"type": "string", "format": "no-such-format"}), "Unknown format: no-such-format"),
    (Constraint("json_schema", "{not json"), "not valid JSON"),
    (Constraint("json_schema", [1, 2]), "must be a JSON object"),
    (Constraint("regex", "a(b"), "unclosed group"),
    (Constraint("grammar", "start: missing_rule"), "unknown name"),
    (Constraint("choice", []), "at least one non-empty string"),
    (Constraint("xml", "x"), "unknown constraint 'xml'"),
])
def test_what_cannot_be_enforced_is_refused_in_one_line(tiny, constraint, message):
    model, tokenizer = tiny
    with pytest.raises(ConfigError, match=message) as info:
        compile_constraint(model, tokenizer, constraint)
    assert "\n" not in str(info.value)


def test_a_constraint_with_ignore_eos_is_refused(tiny):
    model, tokenizer = tiny
    grammar = compile_constraint(model, tokenizer, Constraint("json_object"))
    with pytest.raises(ConfigError, match="ignore_eos cannot be combined with a constraint"):
        SamplingParams(grammar=grammar, ignore_eos=True)


@pytest.mark.slow
def test_smollm2_answers_thirty_schemas_with_valid_json(smollm2_dir):
    model, tokenizer = load_model(smollm2_dir)
    stops = eos_ids(model, tokenizer)
    ended = cut = 0
    for schema in SCHEMAS:
        grammar = compile_constraint(model, tokenizer, Constraint("json_schema", schema))
        ask = f"Reply with JSON that matches this JSON Schema: {json.dumps(schema)}"
        tokens = list(generate_tokens(model, chat_prompt(tokenizer, [{"role": "user", "content": ask}]),
                                      SamplingParams(max_new_tokens=96, grammar=grammar), stops))
        check_tokens_with_llguidance(grammar, tokens)
        if tokens and tokens[-1] in stops:
            ended += 1
            jsonschema.validate(json.loads(decode(tokenizer, tokens, stops)), schema)
        else:
            cut += 1
    # what SmolLM2 leaves unfinished in 96 tokens is numbers it never stops writing (an unbounded
    # number, an unbounded id): reported as finish "length", counted here, never passed off as done
    assert cut <= 3, (ended, cut)


def test_the_command_line_constrains_and_refuses_in_one_line(tmp_path):
    from test_cli import pocketlm

    model = tiny_model_dir(tmp_path / "tiny", seed=3)
    done = pocketlm("generate", model, "go", "--regex", "[a-z]{2,5}", "-t", "1", "--seed", "4")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch("go[a-z]{2,5}", done.stdout.strip())
    assert "finish: stop" in done.stderr
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS[1]))
    done = pocketlm("generate", model, "go", "--regex", "", "-n", "5")  # an empty pattern is a constraint too
    assert done.returncode == 0 and done.stdout.strip() == "go" and "finish: stop" in done.stderr
    done = pocketlm("generate", model, "x=", "--json-schema", schema, "-t", "1", "--seed", "1", "-n", "40")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().removeprefix("x="))["ok"] in (True, False)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "object", "dependentSchemas": {}}))
    for args, message in (((("--json-schema", bad)), 'Unimplemented keys: ["dependentSchemas"]'),
                          (("--regex", "a(b"), "unclosed group"),
                          (("--json-schema", tmp_path / "missing.json"), "cannot read the JSON Schema file"),
                          (("--regex", "a", "--choice", "b"), "give one of --json-schema, --regex, --grammar or --choice")):
        done = pocketlm("generate", model, "go", *args)
        assert done.returncode != 0
        assert message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# ---------------------------------------------------------------------------------------------
# speculative decoding under a grammar
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    """The tiny target's int4 copy (most proposals accepted) and another random model (most rejected)."""
    from pocketlm.quant import QuantScheme
    from pocketlm.quantize import quantize_dir

    root = tmp_path_factory.mktemp("drafts")
    target = tiny_model_dir(root / "tiny", seed=3)
    return [load_model(quantize_dir(target, root / "int4", QuantScheme("int4", 32)))[0],
            load_model(tiny_model_dir(root / "other", seed=1, hidden_size=64, intermediate_size=128))[0]]


def test_greedy_speculative_decoding_under_a_grammar_is_the_targets_constrained_output(tiny, drafts):
    from pocketlm.speculative import speculative_generate

    model, tokenizer = tiny
    stops = eos_ids(model, tokenizer)
    prompt = tokenizer.encode("the answer:")
    for schema in (SCHEMAS[0], SCHEMAS[9], SCHEMAS[17]):
        grammar = compile_constraint(model, tokenizer, Constraint("json_schema", schema))
        alone = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=100, grammar=grammar), stops))
        for draft in drafts:
            for k in (1, 4):
                tokens, stats = speculative_generate(model, draft, prompt, 100, k=k, stop_ids=stops,
                                                     sampling=SamplingParams(grammar=grammar))
                assert tokens == alone
                check_tokens_with_llguidance(grammar, tokens)
                assert stats.drafted > 0


def test_sampled_speculative_decoding_under_a_grammar_draws_the_targets_constrained_distribution(tiny, drafts):
    """Over a choice grammar, the outputs of 600 seeded runs with each draft are distributed as 600 runs of
    constrained sampling with the target alone (total variation against the scale two such samples have)."""
    from pocketlm.speculative import speculative_generate

    model, tokenizer = tiny
    stops = eos_ids(model, tokenizer)
    grammar = compile_constraint(model, tokenizer, Constraint("choice", ["ab", "ba", "abc", "cab", "b"]))
    prompt = tokenizer.encode("go")
    runs = 600

    def counts(run) -> dict[str, int]:
        seen: dict[str, int] = {}
        for seed in range(runs):
            text = decode(tokenizer, run(seed), stops)
            seen[text] = seen.get(text, 0) + 1
        return seen

    def tv(a, b):
        return 0.5 * sum(abs(a.get(key, 0) - b.get(key, 0)) / runs for key in set(a) | set(b))

    def alone(seed, offset=0):
        return list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed + offset,
                                                                  grammar=grammar), stops))

    reference, again = counts(alone), counts(lambda seed: alone(seed, runs))
    assert set(reference) <= {"ab", "ba", "abc", "cab", "b"} and len(reference) >= 3
    for draft in drafts:
        speculative = counts(lambda seed: speculative_generate(
            model, draft, prompt, 8, k=3, stop_ids=stops,
            sampling=SamplingParams(temperature=1.0, seed=seed, grammar=grammar))[0])
        assert set(speculative) <= set(["ab", "ba", "abc", "cab", "b"])
        assert tv(speculative, reference) < 2 * tv(again, reference) + 0.03, (speculative, reference)
