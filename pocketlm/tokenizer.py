"""Tokenizers: a Hugging Face `tokenizers.Tokenizer` plus the few fields a chat model needs.

The files written here (tokenizer.json, tokenizer_config.json, special_tokens_map.json) are the ones
`transformers.AutoTokenizer` reads, so a pocketlm model directory loads unchanged there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as BackendTokenizer

from .errors import CheckpointError, ConfigError

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass
class Tokenizer:
    backend: BackendTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    model_max_length: int | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)

    # ---- ids -------------------------------------------------------------------------------
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render messages with the model's Jinja chat template, as transformers does (`tools`, OpenAI's
        function specs, go to templates that describe tools themselves: see `supports_tools`)."""
        if not self.chat_template:
            raise ConfigError(
                "this model has no chat template; use `generate` with a plain prompt instead of chat"
            )
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise ConfigError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **({"tools": tools} if tools else {}),
            )
        except jinja2.TemplateError as exc:
            raise ConfigError(f"chat template could not be rendered: {exc}") from None

    @property
    def supports_tools(self) -> bool:
        """The chat template renders a `tools` list itself (Qwen2.5, Hermes, SmolLM3 and others do)."""
        return bool(self.chat_template) and re.search(r"\btools\b", self.chat_template) is not None

    # ---- files -----------------------------------------------------------------------------
    def tokenizer_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update(self.extra_config)
        for key in SPECIAL_KEYS:
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        config["clean_up_tokenization_spaces"] = False
        return config

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.backend.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False))
        special = {key: getattr(self, key) for key in SPECIAL_KEYS if getattr(self, key) is not None}
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; a model directory needs its tokenizer.json")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({exc})") from None
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
        fields = {key: _token_text(config.pop(key, None)) for key in SPECIAL_KEYS}
        chat_template = config.pop("chat_template", None)
        if chat_template is None and (directory / "chat_template.jinja").is_file():
            chat_template = (directory / "chat_template.jinja").read_text()
        config.pop("tokenizer_class", None)
        config.pop("clean_up_tokenization_spaces", None)
        max_len = config.pop("model_max_length", None)
        return cls(backend=backend, chat_template=chat_template, model_max_length=max_len, extra_config=config, **fields)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json may store a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
EOS_TOKEN = "<|endoftext|>"


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (EOS_TOKEN,),
    chat_template: str | None = None,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on `texts`.

    No normalizer and no post-processor: `encode(text)` adds nothing and `decode(encode(t)) == t` for
    any text. The first special token is both bos and eos (as in GPT-2).
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    special_tokens = list(special_tokens)
    if not special_tokens:
        raise ConfigError("train_bpe: special_tokens is empty; give at least an end-of-text token")
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small for byte-level BPE: it needs 256 byte tokens plus "
            f"{len(special_tokens)} special token(s); use vocab_size >= {minimum}"
        )
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        # every byte is in the vocabulary, so no text is ever unknown
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    first = special_tokens[0]
    return Tokenizer(backend=backend, bos_token=first, eos_token=first, chat_template=chat_template)


def train_char(texts: Iterable[str], eos_token: str = EOS_TOKEN) -> Tokenizer:
    """A character-level tokenizer: one id per distinct character, sorted, then `eos_token`.

    The ids are nanoGPT's shakespeare_char ones (`sorted(set(text))` -> 0..n-1); the end-of-text
    token gets id n. A character not seen in training cannot be encoded (there is no unknown token).
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers

    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise ConfigError("train_char: no text to train on")
    vocab = {ch: i for i, ch in enumerate(sorted(chars))}
    backend = BackendTokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    # each character (newlines included) is its own pre-token, so WordLevel maps it to its id
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    backend.add_special_tokens([eos_token])
    return Tokenizer(backend=backend, bos_token=eos_token, eos_token=eos_token)
