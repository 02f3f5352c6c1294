"""Typed model configuration. Field names follow Hugging Face's LlamaConfig so config.json round-trips."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import ConfigError


LAYER_TYPES = ("full_attention", "sliding_attention")
# model_type -> the architecture pocketlm computes exactly: Llama's layers, Mistral's with a sliding window on
# every layer, Ministral's on the layers its layer_types name, Mixtral's with mixtures of experts, Qwen2-MoE's
# with mixtures beside a gated shared expert and biases on q, k and v
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "ministral": "MinistralForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


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
    # sliding-window attention (Mistral: every layer; with layer_types, the layers named "sliding_attention"):
    # a token attends to the `sliding_window` latest positions, itself included
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    # mixture of experts (Mixtral): each token's feed-forward is the weighted sum of `num_experts_per_tok` of
    # `num_local_experts` expert MLPs, chosen and weighted by a router (softmax, top-k, renormalised)
    num_local_experts: int | None = None
    num_experts_per_tok: int | None = None
    router_aux_loss_coef: float | None = None
    # Qwen2-MoE's additions (read only where model_type is qwen2_moe, whose defaults they take there): experts
    # `moe_intermediate_size` wide, the top-k weights renormalised only with `norm_topk_prob`, a shared expert
    # beside them scaled by sigmoid(a gate), dense MLPs on `mlp_only_layers` and off every
    # `decoder_sparse_step`-th layer, and biases on q, k and v (not o)
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    norm_topk_prob: bool | None = None
    decoder_sparse_step: int | None = None
    mlp_only_layers: list[int] | None = None
    qkv_bias: bool | None = None

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if getattr(self, "use_sliding_window", True) is False:  # Qwen2's switch: the window is written but off
            self.sliding_window = None
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive number of tokens, got {self.sliding_window}")
        if getattr(self, "model_type", None) == "qwen2_moe":
            self._qwen2_moe_defaults()
        if self.decoder_sparse_step is not None and self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be at least 1, got {self.decoder_sparse_step}")
        if self.num_local_experts is not None:
            if self.num_local_experts < 1:
                raise ValueError(f"num_local_experts must be at least 1, got {self.num_local_experts}")
            if self.num_experts_per_tok is None or not 1 <= self.num_experts_per_tok <= self.num_local_experts:
                raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                                 f"num_local_experts ({self.num_local_experts})")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types names {len(self.layer_types)} layers; the model has {self.num_hidden_layers}")
            unknown = set(self.layer_types) - set(LAYER_TYPES)
            if unknown:
                raise ValueError(f"layer_types: {sorted(unknown)} unknown (pocketlm computes {', '.join(LAYER_TYPES)})")
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

    def _qwen2_moe_defaults(self) -> None:
        """Qwen2-MoE's names and defaults (transformers' Qwen2MoeConfig) on pocketlm's fields."""
        experts = getattr(self, "num_experts", None)
        if not experts:
            raise ValueError("a qwen2_moe config needs num_experts (a model without experts is a plain Qwen2)")
        self.num_local_experts = experts
        if self.moe_intermediate_size is None or self.shared_expert_intermediate_size is None:
            raise ValueError("a qwen2_moe config needs moe_intermediate_size and shared_expert_intermediate_size")
        self.norm_topk_prob = bool(self.norm_topk_prob)
        self.qkv_bias = True if self.qkv_bias is None else self.qkv_bias
        if self.sliding_window and self.layer_types is None:
            # transformers has computed Qwen2-MoE's windowed layers differently across releases
            raise ValueError("use_sliding_window is on but layer_types is missing; name each layer's attention "
                             "(full_attention or sliding_attention) in layer_types")

    def sparse(self, layer: int) -> bool:
        """Whether layer `layer`'s feed-forward is a mixture of experts (the others are dense MLPs)."""
        return (self.moe and layer not in (self.mlp_only_layers or [])
                and (layer + 1) % (self.decoder_sparse_step or 1) == 0)

    @property
    def renormalise_top_k(self) -> bool:
        """Whether a token's top-k router weights are rescaled to sum to 1 (Mixtral; Qwen2-MoE by norm_topk_prob)."""
        return self.norm_topk_prob is not False

    @property
    def family(self) -> str:
        """The Hugging Face model_type whose layers and names this config describes."""
        if getattr(self, "model_type", None) == "qwen2_moe":
            return "qwen2_moe"
        if self.moe:
            return "mixtral"
        return "ministral" if self.layer_types else "mistral" if self.sliding_window is not None else "llama"

    def window(self, layer: int) -> int | None:
        """The attention window of layer `layer` in tokens, or None where it attends to every earlier position
        (a window as long as the context restricts nothing)."""
        if self.sliding_window is None or self.sliding_window >= self.max_position_embeddings:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def moe(self) -> bool:
        """Whether the feed-forward layers are mixtures of experts."""
        return self.num_local_experts is not None

    @property
    def windowed(self) -> bool:
        """Whether any layer attends through a window shorter than the context."""
        return any(self.window(i) is not None for i in range(self.num_hidden_layers))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "(config)"
            raise ConfigError(f"{source}: {key}: {first['msg']}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents that transformers reads as the architecture pocketlm computes (Llama, Mistral,
        Ministral, Mixtral or Qwen2-MoE: `family`), unless the config names its own."""
        data = self.model_dump(exclude_none=True)
        if "sliding_window" in self.model_fields_set:  # a null window stays written: Mistral's default is 4096
            data["sliding_window"] = self.sliding_window
        if self.family == "qwen2_moe":
            del data["num_local_experts"]  # written as its num_experts
        data.setdefault("architectures", [ARCHITECTURES[self.family]])
        data.setdefault("model_type", self.family)
        data.setdefault("torch_dtype", "float32")
        return data
