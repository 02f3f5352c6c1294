"""`serve.yaml`: what a server serves (variants under one experiment) and its limits.

    host: 127.0.0.1
    port: 8000
    database: serve.db            # the request log (a path for SQLite, or a SQLAlchemy URL)
    log_prompts: false            # store prompt and completion text (needed by `pocketlm drift`)
    api_keys: [secret-1]          # or api_keys_env: NAME of an environment variable, comma-separated
    experiment:
      name: assistant             # clients ask for model "assistant" and are assigned a variant
      variants:
        - {name: base, model: smollm2-135m-instruct, weight: 0.5}
        - {name: tuned, model: smollm2-135m-instruct, adapter: runs/lora/adapter, weight: 0.5}
    models:
      - {name: docs, model: smollm2-135m-instruct, index: runs/index, retriever: hybrid, k: 4}
    embedder: all-minilm-l6-v2    # served at /v1/embeddings (default: the embedders of the indexes named)
    pipelines: runs               # `pocketlm run` outputs the dashboard lists, with their reports
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError
from ..validation import validation_message


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VariantSpec(Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")
    model: str  # a model directory, a quantized one, a PEFT adapter directory, or a known model name
    adapter: str | None = None  # a LoRA adapter directory applied to `model` (merged at load)
    weight: float = Field(default=1.0, ge=0)
    # an index folder (`pocketlm index build`): chat requests to this variant are answered from its passages
    index: str | None = None
    retriever: Literal["hybrid", "bm25", "dense"] = "hybrid"
    k: int = Field(default=4, ge=1, le=64)  # passages retrieved per question (those that fit the context are used)

    @model_validator(mode="after")
    def _check(self) -> "VariantSpec":
        if self.index is None and {"retriever", "k"} & self.model_fields_set:
            raise ValueError(f"variant {self.name}: `retriever` and `k` need an `index` to search")
        return self


class ExperimentSpec(Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")
    variants: list[VariantSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "ExperimentSpec":
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must differ, got {names}")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("at least one variant needs a traffic weight above 0")
        return self


class ServeConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    models: list[VariantSpec] = Field(default_factory=list)  # served by name, outside any experiment
    experiment: ExperimentSpec | None = None
    database: str = "pocketlm-serve.db"
    log_prompts: bool = False
    # the embedding model /v1/embeddings serves (a registry name or a sentence-transformers folder); the
    # embedders of the variants' indexes are served as well
    embedder: str | None = None
    api_keys: list[str] = Field(default_factory=list)
    api_keys_env: str | None = None
    max_body_bytes: int = Field(default=1 << 20, gt=0)
    max_tokens_cap: int = Field(default=2048, gt=0)  # a request asking for more gets a 400
    default_max_tokens: int = Field(default=256, gt=0)
    max_batch: int = Field(default=32, gt=0)  # sequences decoded together per model
    max_context: int = Field(default=2048, gt=1)  # cache length per sequence (capped by the model's)
    queue_size: int = Field(default=64, ge=0)  # requests waiting for a free sequence before 429s
    request_timeout: float = Field(default=300.0, gt=0)
    prefill_chunk: int = Field(default=256, gt=0)
    threads: int | None = Field(default=None, gt=0)  # torch threads; default: torch's own choice
    # bfloat16 halves the weights read per token and doubles the batched matmul rate on CPUs with
    # bf16 instructions (AVX512-BF16, AMX); float32 gives the same numbers as `pocketlm eval`
    dtype: Literal["float32", "bfloat16"] = "float32"
    pipelines: str | None = None  # a folder of `pocketlm run` outputs (runs/): the dashboard lists them

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        names = [v.name for v in self.variants()] + ([self.experiment.name] if self.experiment else [])
        duplicate = sorted({n for n in names if names.count(n) > 1})
        if duplicate:
            raise ValueError(f"model, variant and experiment names must differ; repeated: {', '.join(duplicate)}")
        if not self.variants():
            raise ValueError("nothing to serve: give a model on the command line, `models:` or an `experiment:`")
        return self

    def variants(self) -> list[VariantSpec]:
        """Every model the server loads: the plain ones, then the experiment's."""
        return list(self.models) + (list(self.experiment.variants) if self.experiment else [])

    def keys(self) -> set[str]:
        keys = set(self.api_keys)
        if self.api_keys_env:
            keys.update(k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip())
        return keys


def model_name(ref: str) -> str:
    """The name a model argument is served under: a directory's name, or the known name itself."""
    path = Path(ref)
    return path.name if path.name else ref


def load_serve_config(path: str | Path | None = None, models: list[str] = (), **overrides) -> ServeConfig:
    """The config file (if any), plus models from the command line, plus options set on the command line."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such serve config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a serve config is a YAML mapping (host, port, models, experiment, ...)")
    data = dict(data)
    if models:
        data["models"] = list(data.get("models") or []) + [{"name": model_name(m), "model": m} for m in models]
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path or 'serve config'}: {validation_message(exc, ServeConfig)}") from None
