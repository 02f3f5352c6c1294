"""Typed model configuration. Field names follow Hugging Face's LlamaConfig so config.json round-trips."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import ConfigError


class ModelConfig(BaseModel):
    """Shape of a Llama-family decoder. Unknown keys in config.json are kept in `extra` fields."""

    model_config = ConfigDict(extra="allow")

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads {self.num_key_value_heads} must divide num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu', as in Llama)")
        # transformers 5 writes RoPE settings as `rope_parameters`, older releases as rope_theta/rope_scaling.
        rope = getattr(self, "rope_parameters", None) or getattr(self, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"RoPE scaling {rope} is not supported yet (only default RoPE)")
        if "rope_theta" in rope:
            self.rope_theta = float(rope["rope_theta"])
        if getattr(self, "rope_parameters", None) is not None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "(config)"
            raise ConfigError(f"{source}: {key}: {first['msg']}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents that transformers reads as LlamaForCausalLM."""
        data = self.model_dump(exclude_none=True)
        data.setdefault("architectures", ["LlamaForCausalLM"])
        data.setdefault("model_type", "llama")
        data.setdefault("torch_dtype", "float32")
        return data
