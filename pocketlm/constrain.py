"""Constrained decoding: the model can only produce text a JSON Schema, a regular expression, a Lark grammar
or a list of choices accepts.

A `Constraint` says what the output must be; `Grammar.build` checks it once against a tokenizer with
llguidance (the grammar engine llama.cpp, vLLM and SGLang use), and every sequence decoded under it gets
its own `Guide`. At each step the guide masks the logits to the tokens the grammar allows next, before
sampling, and then advances by the token chosen. Once the grammar is complete only end-of-sequence is
allowed, so a constrained answer ends as an unconstrained one does, with EOS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance
import torch

from .errors import ConfigError, PocketLMError
from .tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
# JSON's whitespace between tokens, bounded: a small model left free to indent can indent forever
JSON_OPTIONS = {"whitespace_pattern": r"[\n\t ]{0,20}"}
_SHIFTS = torch.arange(32, dtype=torch.int32)


@dataclass(frozen=True)
class Constraint:
    """What the output must be: `kind` is one of KINDS; `value` a JSON Schema (a dict or its JSON text),
    a regular expression, a Lark grammar, or a list of strings (None for json_object)."""
    kind: str
    value: Any = None

    def schema(self) -> dict | bool:
        """A json_schema or json_object constraint's JSON Schema, parsed."""
        if self.kind == "json_object":
            return {"type": "object"}
        schema = self.value
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConfigError(f"the JSON Schema is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(schema, (dict, bool)):
            raise ConfigError("a JSON Schema must be a JSON object (or true/false)")
        return schema

    def grammar_text(self) -> str:
        """The constraint as an llguidance grammar (not yet checked)."""
        if self.kind == "json_schema":
            schema = self.schema()
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            except (ValueError, TypeError, RuntimeError) as e:
                raise ConfigError(f"the JSON Schema cannot be enforced: {_one_line(e)}") from None
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            if not isinstance(self.value, str):
                raise ConfigError("a regex constraint needs the pattern as a string")
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        if self.kind == "grammar":
            if not isinstance(self.value, str) or not self.value.strip():
                raise ConfigError("a grammar constraint needs the Lark grammar's text")
            return llguidance.LLMatcher.grammar_from_lark(self.value)
        if self.kind == "choice":
            choices = self.value
            if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) and c for c in choices):
                raise ConfigError("a choice constraint needs at least one non-empty string to choose from")
            # Lark string literals take JSON's escapes, so each choice is matched exactly as written
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        raise ConfigError(f"unknown constraint {self.kind!r}; choose one of {', '.join(KINDS)}")

    def describe(self) -> str:
        return {"json_schema": "JSON Schema", "json_object": "JSON object"}.get(self.kind, self.kind)


def _one_line(error: object) -> str:
    return " ".join(str(error).split())


def llg_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the tokenizer, with the model's vocabulary size (the logits' width); built once
    per tokenizer and kept on it, since it reads the whole vocabulary."""
    key = (vocab_size, tuple(eos))
    cached = tokenizer.__dict__.setdefault("_llguidance", {})
    if key not in cached:
        cached[key] = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=list(eos))
    return cached[key]


class Grammar:
    """A constraint checked against one tokenizer, ready to guide any number of sequences."""

    def __init__(self, constraint: Constraint, llg: llguidance.LLTokenizer, text: str):
        self.constraint, self.llg, self.text = constraint, llg, text
        self.vocab_size = llg.vocab_size

    @classmethod
    def build(cls, constraint: Constraint, tokenizer: Tokenizer, vocab_size: int, eos: set[int] | list[int]) -> "Grammar":
        """Check the constraint once; a schema keyword, regex or grammar llguidance cannot enforce is a
        ConfigError naming it."""
        if not eos:
            raise ConfigError("constrained decoding needs an end-of-sequence token to end the output; this model has none")
        llg = llg_tokenizer(tokenizer, vocab_size, sorted(eos))
        text = constraint.grammar_text()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, llg)
        if is_error:
            raise ConfigError(f"the {constraint.describe()} cannot be enforced: {_one_line(messages[0])}")
        return cls(constraint, llg, text)

    def guide(self) -> "Guide":
        return Guide(llguidance.LLMatcher(self.llg, self.text, log_level=0), self.vocab_size)


class Guide:
    """One sequence's place in the grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        import llguidance.torch  # seconds to import: only decoding under a grammar pays for it

        self.matcher = matcher
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def allowed(self, vocab: int) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar allows next."""
        llguidance.torch.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        self._check()
        bits = (self._bitmask[0].unsqueeze(-1) >> _SHIFTS) & 1
        return bits.bool().reshape(-1)[:vocab]  # the bitmask covers the model's vocabulary (Grammar.build)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            self._check()
            raise PocketLMError(f"token {token} is not allowed by the grammar here")

    def rollback(self, tokens: int) -> None:
        """Undo the last `tokens` advances (draft tokens the target rejected)."""
        if tokens and not self.matcher.rollback(tokens):
            self._check()
            raise PocketLMError(f"the grammar engine cannot roll back {tokens} tokens")

    def _check(self) -> None:
        if self.matcher.is_error():
            raise PocketLMError(f"the grammar engine stopped: {_one_line(self.matcher.get_error())}")

