"""The model directory: the one artifact every stage of pocketlm reads and writes.

    config.json              LlamaForCausalLM config (transformers loads it unchanged)
    model.safetensors        weights, Hugging Face tensor names
    generation_config.json
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
    pocketlm.json            provenance: source, parent, recipe, data hashes, quantization, metrics
    README.md                model card written from pocketlm.json

Writes are atomic (a temporary directory, fsync, rename) so a crash never leaves a half-written model
where a good one was. Loads memory-map the weights and validate every tensor against the config.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .config import ARCHITECTURES, ModelConfig
from .errors import CheckpointError, PocketLMError
from .fsio import atomic_write_text, fsync_file, replace_dir, timestamp
from .kernels.cpu_features import warn_if_bf16_is_slow
from .model import LlamaForCausalLM, expected_shapes
from .quant import (
    QuantScheme,
    build_quantized_skeleton,
    expected_quantized_shapes,
    prepare_kernels,
)
from .tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def save_model_dir(
    out: str | Path,
    config: ModelConfig | dict[str, Any],
    tensors: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    provenance: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write a complete model directory atomically and return its path.

    `tensors` use Hugging Face names; a tied `lm_head.weight` is dropped. `provenance` is merged into
    pocketlm.json (typical keys: source, parent, recipe, data_hashes, quantization, metrics).
    """
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config, source="config")
    out = Path(out)
    tensors = dict(tensors)
    if config.tie_word_embeddings:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("lm_head.")}
    _check_tensors(tensors, config, source="tensors to save", scheme=quant_scheme_from_record((provenance or {}).get("quantization")))
    if config.bos_token_id is None and tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    if config.eos_token_id is None and tokenizer.eos_token_id is not None:
        config.eos_token_id = tokenizer.eos_token_id
    hf_config = config.to_hf_dict()
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    hf_config["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config)
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        gen.update(generation_config or {})
        _write_json(tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
        tokenizer.save(tmp)
        record = {
            "pocketlm_version": __version__,
            "created": timestamp(),
            "parameters": sum(t.numel() for t in tensors.values()),
            "source": None, "parent": None, "recipe": None, "data_hashes": {}, "quantization": None, "metrics": {},
        }
        record.update(provenance or {})
        _write_json(tmp / "pocketlm.json", record)
        (tmp / "README.md").write_text(model_card(out.name, hf_config, record))
        for path in tmp.iterdir():
            path.chmod(0o644)  # mkdtemp and some writers create owner-only files; a model is meant to be shared
            fsync_file(path)
        tmp.chmod(0o755)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_card(name: str, config: dict[str, Any], record: dict[str, Any]) -> str:
    rows = [
        ("parameters", f"{record.get('parameters', 0):,}"),
        ("layers", config["num_hidden_layers"]),
        ("hidden size", config["hidden_size"]),
        ("attention heads / kv heads", f"{config['num_attention_heads']} / {config.get('num_key_value_heads')}"),
        ("vocabulary", config["vocab_size"]),
        ("context", config.get("max_position_embeddings")),
        ("weights dtype", config.get("torch_dtype")),
    ]
    lines = [f"# {name}", "", "A Llama-family model directory written by [pocketlm](https://pypi.org/project/pocketlm/).",
             "It loads unchanged with `transformers.AutoModelForCausalLM.from_pretrained`.", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Provenance", ""]
    for key in ("source", "parent", "recipe", "quantization"):
        if record.get(key):
            lines.append(f"- **{key}**: `{json.dumps(record[key], ensure_ascii=False)}`")
    if record.get("data_hashes"):
        lines.append(f"- **data**: {len(record['data_hashes'])} file(s), hashes in pocketlm.json")
    if record.get("privacy"):
        p = record["privacy"]
        lines += ["", "## Differential privacy", "",
                  f"Trained with DP-SGD: ({p['epsilon']}, {p['delta']:.3g})-differentially private for "
                  f"{p['unit']} ({p['accountant']} accountant; noise multiplier {p['noise_multiplier']:.4f}, "
                  f"per-row gradients clipped to {p['max_grad_norm']}, Poisson sample rate {p['sample_rate']:.5f} "
                  f"of {p['rows']} rows, {p['steps']} steps)."]
    if record.get("metrics"):
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in record["metrics"].items()]
    lines += ["", f"Created {record.get('created')} by pocketlm {record.get('pocketlm_version')}.", ""]
    return "\n".join(lines)


def update_provenance(model_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge fields into pocketlm.json (atomically) and rewrite the model card."""
    model_dir = Path(model_dir)
    record = read_provenance(model_dir)
    record.update(fields)
    atomic_write_text(model_dir / "pocketlm.json", json.dumps(record, indent=2, ensure_ascii=False))
    config = json.loads((model_dir / "config.json").read_text())
    atomic_write_text(model_dir / "README.md", model_card(model_dir.name, config, record))
    return record


def read_provenance(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "pocketlm.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def load_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a model directory (expected a folder with config.json and {WEIGHTS})")
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a model directory needs config.json "
                              "(an adapter directory opens with pocketlm.loading.open_model)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    architectures = data.get("architectures") or ["LlamaForCausalLM"]
    if ARCHITECTURES.get(data.get("model_type", "llama")) != architectures[0]:
        raise CheckpointError(f"{path}: architecture {architectures[0]} ({data.get('model_type')}) is not supported; "
                              f"pocketlm loads Llama-family models ({', '.join(ARCHITECTURES.values())})")
    return ModelConfig.from_dict(data, source=str(path))


def load_tensors(path: str | Path, config: ModelConfig | None = None, scheme=None) -> dict[str, torch.Tensor]:
    """Memory-map a safetensors file; validate names, shapes and dtypes against `config` if given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the model directory has no weights file")
    _check_safetensors_file(path)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({exc}); the file is corrupt, re-create it") from None
    if config is not None:
        _check_tensors(tensors, config, source=str(path), scheme=scheme)
    return tensors


def _check_safetensors_file(path: Path) -> None:
    """Catch truncation and non-safetensors files with a message that names the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes); it is truncated or not a weights file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len <= 0 or header_len > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path}: not a safetensors file (bad header length); is it a weights file?")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        missing = [k for k, v in header.items() if k != "__metadata__" and 8 + header_len + v["data_offsets"][1] > size]
        raise CheckpointError(
            f"{path}: truncated: {size:,} bytes but the header needs {8 + header_len + end:,}; "
            f"tensor {missing[0]} (and {len(missing) - 1} more) cut off. Re-create or re-download the file."
        )


def quant_scheme_from_record(record: dict[str, Any] | None):
    """The QuantScheme a pocketlm.json "quantization" record describes (None: float weights)."""
    if not record:
        return None
    try:
        return QuantScheme.from_dict(record)
    except (TypeError, PocketLMError) as exc:
        raise CheckpointError(f"pocketlm.json: bad quantization record {record}: {exc}") from None


def read_quant_scheme(model_dir: str | Path):
    """The quantization scheme of a model directory, or None for float weights."""
    return quant_scheme_from_record(read_provenance(model_dir).get("quantization"))


def _check_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, source: str, scheme=None) -> None:
    if scheme is None:
        expected = {k: (shape, None) for k, shape in expected_shapes(config).items()}
    else:
        expected = expected_quantized_shapes(config, scheme)
    if config.tie_word_embeddings:
        for k in [k for k in tensors if k.startswith("lm_head.")]:
            tensors.pop(k)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + "; the weights do not match config.json" + (f" and the {scheme.describe()} scheme" if scheme else ""))
    extra = [k for k in tensors if k not in expected and not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + "; the weights do not match config.json"
                              + ("" if scheme else " (a quantized model needs its \"quantization\" record in pocketlm.json)"))
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(t.shape)}, config.json expects {shape}")
        if dtype in (None, torch.float32):
            if t.dtype not in SAFETENSORS_DTYPES.values():
                raise CheckpointError(f"{source}: tensor {name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
        elif t.dtype != dtype:
            raise CheckpointError(f"{source}: tensor {name} has dtype {t.dtype}; the {scheme.describe()} scheme stores {dtype}")
    for name in [k for k in tensors if k.endswith("rotary_emb.inv_freq")]:
        tensors.pop(name)


def load_model(model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a model directory as (LlamaForCausalLM, Tokenizer) without an fp32 copy in between.
    (pocketlm.loading.open_model also opens names and adapter directories.)

    The module is built on the meta device and the memory-mapped tensors are assigned into it,
    so loading costs about one read of the file.
    """
    warn_if_bf16_is_slow(dtype, device)
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    scheme = read_quant_scheme(model_dir)
    tensors = load_tensors(model_dir / WEIGHTS, config, scheme)
    tokenizer = Tokenizer.load(model_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{model_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{config.vocab_size}; the tokenizer does not belong to these weights")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        if scheme is not None:
            build_quantized_skeleton(model, scheme)
    if dtype is not None or str(device) != "cpu":
        tensors = {k: v.to(device=device, dtype=(dtype or v.dtype) if v.is_floating_point() else v.dtype)
                   for k, v in tensors.items()}
    if scheme is not None:
        tensors = {k: v.float() if v.is_floating_point() and dtype is None else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings and not (scheme is not None and scheme.head):
        model.tie_head()
    if scheme is not None:
        prepare_kernels(model)  # also ties a quantized head to the embedding's int8 storage
    model.eval()
    return model, tokenizer
