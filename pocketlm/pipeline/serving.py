"""The serve stage: the pipeline's models put into one A/B experiment, written as a serve.yaml that `pocketlm
serve --config` starts (the pipeline itself ends; a server runs until stopped).

    serve:
      type: serve
      experiment: arc-easy             # clients ask for model "arc-easy" and are assigned a variant
      variants: {base: "${base}", specialist: "${merge}"}   # or a list of {name, model, weight, ...}
      log_prompts: true                # any other key is the serve config's own (database, port, ...)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..fsio import atomic_write_text


def write_serve_config(settings: dict[str, Any], path: Path) -> Path:
    from ..serve.config import ServeConfig, load_serve_config

    options = {k: v for k, v in settings.items() if k not in ("experiment", "variants")}
    variants = settings.get("variants")
    if isinstance(variants, dict):
        variants = [{"name": name, "model": model, "weight": 1.0} for name, model in variants.items()]
    if not variants or not isinstance(variants, list):
        raise ConfigError("serve stage: variants: expected a mapping of variant names to models (or a list of "
                          "{name, model, weight})")
    document = {**options, "experiment": {"name": settings.get("experiment", "pipeline"), "variants": variants}}
    unknown = [k for k in options if k not in ServeConfig.model_fields]
    if unknown:
        raise ConfigError(f"serve stage: {unknown[0]}: not a serve config key (expected experiment, variants or one "
                          f"of {', '.join(ServeConfig.model_fields)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(document, sort_keys=False))
    load_serve_config(path)  # the server's own check: a bad value is refused now, not when it starts
    return path
