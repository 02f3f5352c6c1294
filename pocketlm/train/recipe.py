"""Recipes: typed YAML configs for `pocketlm train`, validated before any work starts.

    pocketlm train recipes/shakespeare-char.yaml train.max_steps=500 optim.lr=3e-4

A wrong key, a value of the wrong type or a missing data path is one error line naming the key,
the value and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..datasets import is_dataset_ref, resolve_data_path
from ..errors import ConfigError
from ..hub import REGISTRY, resolve_model
from ..overrides import apply_override, parse_override, read_mapping
from ..validation import validation_message


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelShape(Section):
    """A new model's shape (Hugging Face LlamaConfig names); vocab_size defaults to the tokenizer's."""

    hidden_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = Field(default=None, gt=0)
    intermediate_size: int | None = Field(default=None, gt=0)
    max_position_embeddings: int | None = Field(default=None, gt=0)
    vocab_size: int | None = Field(default=None, gt=0)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    sliding_window: int | None = Field(default=None, gt=0)  # attend to this many latest positions (Mistral)
    num_local_experts: int | None = Field(default=None, gt=0)  # a mixture of experts in every layer (Mixtral)
    num_experts_per_tok: int | None = Field(default=None, gt=0)
    router_aux_loss_coef: float | None = Field(default=None, ge=0)  # the load-balancing loss's weight (0.001)
    init_std: float = 0.02


class DataSpec(Section):
    source: list[str] | str | None = None  # text/jsonl/parquet files, folders or globs, prepared on first use
    prepared: str | None = None  # a directory written by `pocketlm prepare`
    tokenizer: str = "bpe"  # bpe, char, or a model directory whose tokenizer is reused
    vocab_size: int = Field(default=8192, gt=0)
    field: str = "text"
    doc_separator: str | None = None
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    dedupe: bool = True
    scrub_pii: bool = True
    min_chars: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if self.source is not None and self.prepared is not None:
            raise ValueError("give only one of data.source (raw files) or data.prepared (a prepared directory)")
        return self

    def sources(self) -> list[str]:
        """The raw files, a `dataset:NAME/FILE` resolved to its local copy (fetched on first use)."""
        items = [self.source] if isinstance(self.source, str) else list(self.source or [])
        return [str(resolve_data_path(item)) if is_dataset_ref(item) else item for item in items]


class TrainSpec(Section):
    objective: Literal["pretrain", "sft", "distill", "dpo"] = "pretrain"
    max_steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)  # sequences per optimizer step, across all processes and accumulation steps
    block_size: int = Field(gt=1)
    grad_accum: int = Field(default=1, gt=0)
    grad_clip: float = Field(default=1.0, ge=0)  # 0 turns clipping off
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"  # bfloat16 = autocast
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, gt=0)
    # how a CPU process uses its threads: "batch" gives each thread a slice of the batch, every op on one
    # core (batch_threads.py); "ops" splits every op across them; "auto" is "batch" where it applies
    parallel: Literal["auto", "batch", "ops"] = "auto"


class OptimSpec(Section):
    # adamw; or sgd, plain gradient descent (no momentum): FedAvg's textbook client, whose averaged steps equal
    # one step on the union of the clients' batches
    algorithm: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    decay_steps: int | None = Field(default=None, gt=0)  # cosine decay length; defaults to train.max_steps
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    fused: bool = True


class EvalSpec(Section):
    interval: int = Field(default=250, gt=0)
    iters: int = Field(default=20, gt=0)
    sample_prompt: str | None = None  # a greedy sample written at each evaluation
    sample_tokens: int = Field(default=64, gt=0)


class CheckpointSpec(Section):
    interval: int = Field(default=250, gt=0)
    keep_last: int = Field(default=2, gt=0)
    keep_best: bool = True


class LogSpec(Section):
    interval: int = Field(default=10, gt=0)
    tensorboard: bool = True  # used when the tensorboard package is installed
    progress: bool = True


class AdapterSpec(Section):
    """Train an adapter (through peft) instead of every weight; saved in PEFT's format as OUT_DIR/adapter."""

    type: Literal["lora", "prefix"] = "lora"
    r: int = Field(default=8, gt=0)  # LoRA rank
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    num_virtual_tokens: int = Field(default=16, gt=0)  # prefix tuning
    prefix_projection: bool = False  # prefix tuning through a two-layer MLP (PEFT's option)
    merge: bool = True  # also write OUT_DIR/model: the base with the adapter merged in (LoRA)


class SFTSpec(Section):
    """Instruction data: Alpaca-style json(l) (instruction, input, output) or chat messages jsonl."""

    prompt_format: Literal["auto", "chat", "alpaca"] = "auto"  # auto: the chat template when the model has one
    system: str | None = None  # a system message put before every conversation
    packing: bool = True  # several examples per block_size row


class DistillSpec(Section):
    teacher: str  # a model directory or a name `pocketlm pull` knows
    mode: Literal["logits", "sequence"] = "logits"
    alpha: float = Field(default=0.5, ge=0, le=1)  # weight of the teacher term; 1 - alpha on cross-entropy
    temperature: float = Field(default=2.0, gt=0)
    teacher_quantize: Literal["int8", "int4"] | None = None  # run the teacher quantized (logits mode)
    cache_top_k: int | None = Field(default=None, gt=0)  # cache the teacher's top-k logits on disk (logits mode)
    # a cache `pocketlm distill-cache` filled for this recipe's steps (a pipeline's teacher stage): read, never
    # written, so students share one teacher's work; default OUT_DIR/teacher-cache, filled by the run itself
    cache_dir: str | None = None
    # sequence mode: the teacher writes a corpus that the student then learns with its own tokenizer
    prompts: str | None = None  # a text file, one prompt per line
    seed_openings: list[str] = []  # or these openings, cycled
    num_sequences: int = Field(default=1000, gt=0)
    max_new_tokens: int = Field(default=200, gt=0)
    sample_temperature: float = Field(default=0.8, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    generate_batch: int = Field(default=16, gt=0)


    @model_validator(mode="after")
    def _shared_cache(self) -> "DistillSpec":
        if self.cache_dir is not None and (self.cache_top_k is None or self.mode != "logits"):
            raise ValueError("distill.cache_dir is a cache of the teacher's top-k logits: set distill.cache_top_k "
                             "(the k it was made with) in logits mode")
        return self


class DPOSpec(Section):
    beta: float = Field(default=0.1, gt=0)
    reference: str | None = None  # the frozen reference model; defaults to init_from


class PrivacySpec(Section):
    """Differentially private training (DP-SGD through Opacus; train/privacy.py). Give epsilon (the noise is
    chosen to spend it over train.max_steps) or noise_multiplier (epsilon is what it spends)."""

    epsilon: float | None = None  # the target: epsilon spent by the end of the run, at delta
    noise_multiplier: float | None = Field(default=None, gt=0)  # noise std over max_grad_norm
    delta: float | None = None  # defaults to 1 / (10 N), N the training rows; must be below 1 / N
    max_grad_norm: float = Field(default=1.0, gt=0)  # each row's gradient is clipped to this norm
    accountant: Literal["prv", "rdp"] = "prv"
    poisson_sampling: bool = True  # each row joins each step with probability batch_size / N
    # per_sample: every row's gradient held, then clipped (Opacus' hooks); ghost: only every row's gradient norm,
    # from the layers' inputs and output gradients, then a second backward with each row's loss scaled by its
    # clipping factor (Li et al. 2022): the same update, without batch x trainable weights of memory
    clipping: Literal["per_sample", "ghost"] = "per_sample"

    @model_validator(mode="after")
    def _budget(self) -> "PrivacySpec":
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("privacy: give exactly one of epsilon (a target) or noise_multiplier")
        if self.epsilon is not None and self.epsilon <= 0:
            raise ValueError(f"privacy.epsilon {self.epsilon} must be above 0 (smaller is more private; 1 to 8 is usual)")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta {self.delta} must be between 0 and 1, and below 1 / N for N training rows")
        if not self.poisson_sampling:
            raise ValueError("privacy.poisson_sampling false: the accountant's epsilon holds only for Poisson "
                             "sampling; fixed shuffled batches would be reported more private than they are")
        return self


class PartitionSpec(Section):
    """How the training examples are dealt to the clients (train/federated/partition.py): `even` shares, or
    per label (or per source file) Dirichlet(alpha) shares, so that clients' data differ as devices' data do."""

    method: Literal["even", "dirichlet"] = "even"
    alpha: float = Field(default=0.5, gt=0)  # Dirichlet concentration: smaller is more skewed
    by: Literal["labels", "sources"] = "labels"  # dirichlet: over each record's label, or over its source file
    label_field: str = "answer"  # by labels: the record field that holds the label (split-task's answer letter)
    seed: int = 0


class FederatedSpec(Section):
    """Federated training on Flower's deployment engine (`pocketlm federate`; train/federated/): each round every
    client trains `local_steps` steps of the one loop on its own shard from the global weights, and the server
    aggregates what they send back (the LoRA adapter when the recipe has one, else every weight)."""

    clients: int = Field(ge=1)
    rounds: int = Field(ge=1)
    local_steps: int = Field(default=1, ge=1)
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = Field(default=0.0, ge=0)  # FedProx: mu / 2 * ||w - w_global||^2 on each client's loss
    server_lr: float = Field(default=1e-3, gt=0)  # FedAdam: the server optimizer's step (Flower's eta)
    server_betas: tuple[float, float] = (0.9, 0.99)  # FedAdam: moment decays
    server_tau: float = Field(default=1e-3, gt=0)  # FedAdam: added to sqrt(v); smaller is more adaptive
    partition: PartitionSpec = PartitionSpec()
    round_timeout: float = Field(default=3600, gt=0)  # seconds the server waits for a round's replies

    @model_validator(mode="after")
    def _strategy_options(self) -> "FederatedSpec":
        if self.proximal_mu > 0 and self.strategy != "fedprox":
            raise ValueError(f"federated.proximal_mu {self.proximal_mu} is FedProx's term: set federated.strategy: "
                             f"fedprox, or leave proximal_mu out for {self.strategy}")
        if not all(0 <= b < 1 for b in self.server_betas):
            raise ValueError(f"federated.server_betas {list(self.server_betas)}: each must be in [0, 1)")
        return self


class Recipe(Section):
    name: str
    out_dir: str
    seed: int = 1337
    resume: bool = False
    init_from: str | None = None  # a model directory to start from instead of random weights
    model: ModelShape | None = None
    data: DataSpec
    train: TrainSpec
    optim: OptimSpec
    eval: EvalSpec = EvalSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    log: LogSpec = LogSpec()
    adapter: AdapterSpec | None = None
    sft: SFTSpec = SFTSpec()
    distill: DistillSpec | None = None
    dpo: DPOSpec = DPOSpec()
    privacy: PrivacySpec | None = None
    federated: FederatedSpec | None = None

    @model_validator(mode="after")
    def _model_source(self) -> "Recipe":
        if (self.model is None) == (self.init_from is None):
            raise ValueError("give exactly one of `model` (a new model's shape) or `init_from` (a model directory)")
        objective = self.train.objective
        if objective in ("sft", "dpo") and self.init_from is None:
            raise ValueError(f"train.objective {objective} fine-tunes an existing model: set init_from to a model directory")
        if (objective == "distill") != (self.distill is not None):
            raise ValueError("train.objective distill needs a `distill` section (teacher, ...), and a `distill` "
                             "section needs train.objective: distill")
        if self.adapter is not None and self.init_from is None:
            raise ValueError("an adapter trains on top of an existing model: set init_from")
        if self.distill_sequence and not (self.distill.prompts or self.distill.seed_openings):
            raise ValueError("distill.mode sequence needs distill.prompts (a file) or distill.seed_openings")
        if self.data.source is None and self.data.prepared is None and not self.distill_sequence:
            raise ValueError("give exactly one of data.source (raw files) or data.prepared (a prepared directory)")
        if self.privacy is not None:
            self._check_private()
        if self.federated is not None:
            self._check_federated()
        return self

    def _check_federated(self) -> None:
        """What federated training does not support, refused with why."""
        objective = self.train.objective
        if objective not in ("sft", "pretrain"):
            raise ValueError(f"federated: train.objective {objective} is not supported (DPO's reference and a "
                             "teacher would run on every client each round); use sft or pretrain")
        if self.init_from is None:
            raise ValueError("federated: set init_from; federated training fine-tunes an existing model (a new "
                             "model's tokenizer would be trained on the clients' pooled data)")
        if self.privacy is not None:
            raise ValueError("federated with privacy is not supported: each client's guarantee would need its own "
                             "accountant across rounds; drop one of the two sections")
        if self.data.prepared is not None:
            raise ValueError("federated: data.prepared is already tokenized and cannot be dealt to clients by "
                             "example; give data.source (JSON lines records)")
        steps = self.federated.rounds * self.federated.local_steps
        if self.train.max_steps != steps:
            raise ValueError(f"federated: train.max_steps {self.train.max_steps} must equal federated.rounds x "
                             f"local_steps = {steps}, the steps each client trains over the run; set it to {steps}")

    def _check_private(self) -> None:
        """Options that would void the guarantee, or that per-sample gradients cannot run, refused with why."""
        t = self.train
        if t.objective == "dpo":
            raise ValueError("privacy: DPO is not supported (a pair's loss runs the model twice and compares with a "
                             "reference); use sft, pretrain or distill")
        if t.objective == "sft" and self.sft.packing:
            raise ValueError("privacy with sft: set sft.packing: false, so that each row is one example and the "
                             "guarantee is per example")
        if t.compile:
            raise ValueError("privacy: set train.compile: false (per-sample gradients come from hooks on each layer, "
                             "which a compiled graph would pass by)")
        if t.dtype == "bfloat16":
            raise ValueError("privacy: train.dtype bfloat16 is not supported (per-sample norms and clipping in "
                             "bfloat16 lose the precision the bound rests on); use float32 or auto")
        if self.adapter is not None and self.adapter.type == "prefix":
            raise ValueError("privacy: prefix tuning is not supported (Opacus has no per-sample gradient for a "
                             "prefix shared across the batch); use adapter.type: lora")
        if self.distill_sequence:
            raise ValueError("privacy: distill.mode sequence trains on the teacher's text, not private data; "
                             "use logits mode")

    @property
    def distill_sequence(self) -> bool:
        return self.distill is not None and self.distill.mode == "sequence"


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def load_recipe(path: str | Path, overrides: list[str] = (), check_paths: bool = True) -> Recipe:
    path = Path(path)
    data = read_mapping(path, "recipe", "a YAML mapping of sections (name, out_dir, data, train, optim, ...)")
    for text in overrides:
        apply_override(data, *parse_override(text))
    recipe = validate_recipe(data, source=str(path))
    if check_paths:
        check_recipe_paths(recipe, source=str(path))
    return recipe


def validate_recipe(data: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc, Recipe)}") from None


def check_recipe_paths(recipe: Recipe, source: str = "recipe") -> None:
    """Fail before any work when a data path or model directory does not exist."""
    import glob

    for item in recipe.data.sources():
        if not (Path(item).exists() or glob.glob(item) or item.startswith("hf:")):
            raise ConfigError(f"{source}: data.source: {item}: no such file, folder or glob match (relative paths are "
                              f"taken from {Path.cwd()})")
    if recipe.data.prepared and not (Path(recipe.data.prepared) / "manifest.json").is_file():
        raise ConfigError(f"{source}: data.prepared: {recipe.data.prepared}: not a prepared data directory "
                          "(no manifest.json); run `pocketlm prepare` first or use data.source")
    tok = recipe.data.tokenizer
    if tok not in ("bpe", "char") and not (Path(tok) / "tokenizer.json").is_file() and not _is_model_name(tok):
        raise ConfigError(f"{source}: data.tokenizer: {tok!r}: expected 'bpe', 'char', a model directory with "
                          "tokenizer.json, or a known model name")
    if recipe.init_from:
        _check_model_ref(recipe.init_from, "init_from", source)
    if recipe.distill is not None:
        _check_model_ref(recipe.distill.teacher, "distill.teacher", source)
        if recipe.distill.prompts and not Path(recipe.distill.prompts).is_file():
            raise ConfigError(f"{source}: distill.prompts: {recipe.distill.prompts}: no such file")
    if recipe.train.objective == "dpo" and recipe.dpo.reference:
        _check_model_ref(recipe.dpo.reference, "dpo.reference", source)


def _is_model_name(ref: str) -> bool:
    return ref.lower() in REGISTRY or ref.startswith("hf:")


def tokenizer_source(ref: str) -> str:
    """data.tokenizer as `prepare` takes it: bpe, char or a directory (a model name becomes its directory)."""
    if ref in ("bpe", "char") or (Path(ref) / "tokenizer.json").is_file() or not _is_model_name(ref):
        return ref

    return str(resolve_model(ref))


def _check_model_ref(ref: str, key: str, source: str) -> None:
    if not ((Path(ref) / "config.json").is_file() or _is_model_name(ref)):
        raise ConfigError(f"{source}: {key}: {ref}: not a model directory (no config.json), nor a known model name "
                          f"({', '.join(sorted(REGISTRY))}, or hf:ORG/NAME)")
