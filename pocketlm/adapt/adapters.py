"""Adapters through peft: LoRA and prefix tuning on pocketlm's model, saved in PEFT's own format.

pocketlm's module names are Hugging Face's (model.layers.0.self_attn.q_proj ...), so peft's LoRA
layers go into the same places and an adapter directory written here loads unchanged with
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)`:

    adapter_config.json          peft's config, base_model_name_or_path = the base model directory
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight ... or prompt_embeddings

LoRA uses peft's layers as they are (`peft.functional`, peft's API for models that are not
transformers models). Prefix tuning uses peft's PrefixEncoder; its output is laid out as peft lays out
`past_key_values`, and the model prepends it to every layer's keys and values (PrefixKV below).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import load_model
from ..errors import CheckpointError, ConfigError
from ..fsio import replace_dir
from ..hub import resolve_model
from ..model import LlamaForCausalLM

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before module names in saved adapters
DEFAULT = "default"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


# ---------------------------------------------------------------------------------------------
# building peft configs
# ---------------------------------------------------------------------------------------------
def lora_config(r: int, alpha: float, dropout: float, target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      bias="none", task_type="CAUSAL_LM")


def prefix_config(model, num_virtual_tokens: int, projection: bool = False):
    """PEFT's PrefixTuningConfig for this model: with grouped-query attention peft sizes the prefix by
    the key/value heads (token_dim = kv_heads x head_dim)."""
    from peft import PrefixTuningConfig

    c = model.config
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                              num_layers=c.num_hidden_layers, token_dim=c.num_key_value_heads * c.head_dim,
                              num_attention_heads=c.num_key_value_heads, num_transformer_submodules=1,
                              prefix_projection=projection, encoder_hidden_size=c.hidden_size)


def config_from_spec(model, spec):
    """The peft config for a recipe's `adapter` section."""
    if spec.type == "lora":
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = [t for t in spec.target_modules if t not in names]
        if unknown:
            raise ConfigError(f"adapter.target_modules: {unknown} are not linear layers of this model; "
                              f"choose from {sorted(names)}")
        return lora_config(spec.r, spec.alpha, spec.dropout, spec.target_modules)
    return prefix_config(model, spec.num_virtual_tokens, spec.prefix_projection)


# ---------------------------------------------------------------------------------------------
# attaching, saving, loading
# ---------------------------------------------------------------------------------------------
def attach(model, config, name: str = DEFAULT) -> None:
    """Freeze the model and add a trainable adapter called `name`."""
    for p in model.parameters():
        p.requires_grad_(False)
    configs = _configs(model)
    if name in configs:
        raise ConfigError(f"an adapter called {name!r} is already attached")
    if config.peft_type == "LORA":
        from peft.functional import inject_adapter_in_model

        if any(c.peft_type != "LORA" for c in configs.values()):
            raise ConfigError("LoRA and prefix adapters cannot be combined on one model")
        inject_adapter_in_model(config, model, adapter_name=name)
    elif config.peft_type == "PREFIX_TUNING":
        if model.config.windowed:
            raise ConfigError("prefix tuning on a model with sliding-window attention is not supported; use LoRA")
        if configs:
            raise ConfigError("a prefix adapter cannot be combined with other adapters on one model")
        model.prefix = PrefixKV(config, model.config).to(model.device)
    else:
        raise ConfigError(f"{config.peft_type}: pocketlm supports LoRA and prefix-tuning adapters")
    configs[name] = config
    model.peft_configs = configs


def _configs(model) -> dict:
    return getattr(model, "peft_configs", None) or {}


def adapter_state(model, name: str = DEFAULT) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved names."""
    config = _configs(model)[name]
    if config.peft_type == "PREFIX_TUNING":
        return {"prompt_embeddings": model.prefix.embeddings().detach().cpu().contiguous()}
    from peft.functional import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    return {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_adapter(model, out: str | Path, base_model: str | Path, name: str = DEFAULT,
                 provenance: dict | None = None) -> Path:
    """Write one adapter as a PEFT adapter directory that points at `base_model`, atomically
    (`provenance`, if given, goes beside it as pocketlm.json)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = _configs(model)[name]
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=out.parent))
    config.base_model_name_or_path = str(Path(base_model).resolve()) if Path(base_model).exists() else str(base_model)
    inference = config.inference_mode
    config.inference_mode = True
    config.save_pretrained(str(tmp))
    config.inference_mode = inference
    save_file(adapter_state(model, name), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if provenance is not None:
        (tmp / "pocketlm.json").write_text(json.dumps(provenance, indent=2))
    replace_dir(tmp, out)
    return out


def read_adapter_config(adapter_dir: str | Path):
    from peft import PeftConfig

    adapter_dir = Path(adapter_dir)
    try:
        return PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:  # peft raises several kinds for a bad file
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: not a readable PEFT adapter config ({exc})") from None


def load_adapter(model, adapter_dir: str | Path, name: str = DEFAULT, trainable: bool = False) -> None:
    """Attach a saved PEFT adapter (LoRA or prefix tuning) to `model` under `name`."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    try:
        tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    except Exception as exc:
        raise CheckpointError(f"{adapter_dir / ADAPTER_WEIGHTS}: adapter weights cannot be read ({exc})") from None
    config.inference_mode = not trainable
    if config.peft_type == "PREFIX_TUNING":
        config.prefix_projection = False  # the saved embeddings are the projection's output
    attach(model, config, name)
    if config.peft_type == "PREFIX_TUNING":
        model.prefix.load_embeddings(tensors.get("prompt_embeddings"), adapter_dir)
    else:
        from peft.functional import set_peft_model_state_dict

        state = {k.removeprefix(PEFT_PREFIX): v.to(model.device) for k, v in tensors.items()}
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{adapter_dir}: the adapter does not fit this base model (missing "
                                  f"{missing[:2]}, unexpected {list(result.unexpected_keys)[:2]})")
    model.train(model.training)  # the new modules (LoRA dropout) follow the model's mode
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)


def use_adapter(model, name: str) -> None:
    """Switch which of several attached LoRA adapters is active."""
    if name not in _configs(model):
        raise ConfigError(f"no adapter called {name!r}; attached: {', '.join(_configs(model)) or 'none'}")
    from peft.functional import set_adapter

    set_adapter(model, name)


def merged_weights(model) -> dict[str, torch.Tensor]:
    """The base model's state dict with the active LoRA adapter folded into the weights (W + B A x scale)."""
    from peft.tuners.lora import LoraLayer

    configs = _configs(model)
    if any(c.peft_type != "LORA" for c in configs.values()):
        raise ConfigError("only LoRA adapters merge into the weights; a prefix adapter stays an adapter")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.merge(safe_merge=True)
    try:
        weights = {}
        for key, value in model.state_dict().items():
            if "lora_" in key:
                continue
            weights[key.replace(".base_layer.", ".")] = value.detach().cpu().float().clone()
    finally:
        for layer in layers:
            layer.unmerge()
    return weights


def load_adapted(adapter_dir: str | Path, dtype: torch.dtype | None = None, device="cpu", merge: bool = True,
                 base: str | None = None):
    """(model, tokenizer) for an adapter directory: its base model (or `base`, a model directory or name)
    with the adapter on it, merged into the weights for speed when it is LoRA (`merge=False` keeps
    peft's layers)."""
    config = read_adapter_config(adapter_dir)
    base = base or config.base_model_name_or_path
    if not base:
        raise CheckpointError(f"{adapter_dir}: adapter_config.json names no base_model_name_or_path")
    base_dir = resolve_model(base)
    model, tokenizer = load_model(base_dir, device=device)
    model = model.float()
    load_adapter(model, adapter_dir)
    if merge and config.peft_type == "LORA":
        model = _rebuilt(model, merged_weights(model))
    if dtype is not None:
        model = model.to(dtype)
    return model, tokenizer


def _rebuilt(model, weights: dict[str, torch.Tensor]):
    plain = LlamaForCausalLM(model.config)
    plain.load_state_dict(weights, strict=not model.config.tie_word_embeddings)
    if model.config.tie_word_embeddings:
        plain.tie_head()
    return plain.to(model.device).eval()


# ---------------------------------------------------------------------------------------------
# prefix tuning
# ---------------------------------------------------------------------------------------------
class PrefixKV(nn.Module):
    """Prefix tuning: `num_virtual_tokens` learned keys and values in front of every layer's own.

    peft's PrefixEncoder gives (batch, tokens, layers * 2 * kv_heads * head_dim); peft views that as
    (batch, tokens, layers * 2, kv_heads, head_dim) and hands layer i slots 2i (keys) and 2i + 1
    (values) as its cache. The prefix occupies positions 0..tokens-1, so the text starts at `tokens`."""

    def __init__(self, config, model_config):
        super().__init__()
        from peft.tuners.prefix_tuning import PrefixEncoder

        self.num_tokens = config.num_virtual_tokens
        self.layers = model_config.num_hidden_layers
        self.kv_heads = model_config.num_key_value_heads
        self.head_dim = model_config.head_dim
        self.encoder = PrefixEncoder(config)
        self.register_buffer("tokens", torch.arange(self.num_tokens), persistent=False)

    def embeddings(self) -> torch.Tensor:
        """(tokens, layers * 2 * kv_heads * head_dim): what PEFT saves as prompt_embeddings."""
        return self.encoder(self.tokens[None])[0]

    def load_embeddings(self, tensor: torch.Tensor | None, source) -> None:
        want = (self.num_tokens, self.layers * 2 * self.kv_heads * self.head_dim)
        if tensor is None or tuple(tensor.shape) != want:
            got = None if tensor is None else tuple(tensor.shape)
            raise CheckpointError(f"{source}: prompt_embeddings has shape {got}, this base model needs {want}")
        with torch.no_grad():
            self.encoder.embedding.weight.copy_(tensor)

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (batch, kv_heads, tokens, head_dim)."""
        kv = self.embeddings().to(dtype).view(self.num_tokens, self.layers * 2, self.kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3)  # (layers * 2, kv_heads, tokens, head_dim)
        return [(kv[2 * i].expand(batch, -1, -1, -1), kv[2 * i + 1].expand(batch, -1, -1, -1))
                for i in range(self.layers)]


def trainable_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable parameters of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
