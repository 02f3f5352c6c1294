"""The quantize stage: a model directory in, a quantized model directory out (`pocketlm quantize`)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import load_config, load_model, read_provenance, save_model_dir
from .errors import ConfigError
from .quant import GROUP_SIZES, QuantScheme, quantize_model, stored_state_dict


def quantize_dir(model_dir, out, scheme: QuantScheme):
    """Quantize a model directory into a new one; pocketlm.json records the scheme and the parent."""
    config = load_config(model_dir)
    if scheme.method == "int4":
        widths = {config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size}
        bad = sorted(w for w in widths if w % scheme.group_size)
        if bad:
            fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
            raise ConfigError(f"{model_dir}: layers with {bad[0]} input columns cannot be split into int4 groups of "
                              f"{scheme.group_size}; use --group-size {' or '.join(map(str, fits)) or '(none fits)'}")
    model, tokenizer = load_model(model_dir)
    if model.quant_scheme is not None:
        raise ConfigError(f"{model_dir} is already quantized ({model.quant_scheme.describe()}); quantize its float parent")
    quantize_model(model, scheme)
    parent = read_provenance(model_dir)
    provenance = {
        "source": parent.get("source"), "parent": str(Path(model_dir).resolve()),
        "recipe": parent.get("recipe"), "data_hashes": parent.get("data_hashes", {}),
        "quantization": scheme.to_dict(), "metrics": {},
    }
    # save_model_dir leaves a tied head out, as for float models
    return save_model_dir(out, model.config, stored_state_dict(model), tokenizer, provenance=provenance)
