"""A quantized model's decode step as one call of pocketlm's kernels (csrc/decode_step.cpp).

`LlamaForCausalLM.decode_step` runs through it on CPUs where pocketlm's kernels are used (see
`cpu_ops.wanted`: every x86 CPU with AVX2) when every projection is an int8 or int4 layer those kernels
serve, activations are fp32 and the head is quantized. Its products are the qdot kernels' (int8
activations) or, with POCKETLM_CPU_KERNELS=exact, the fp32-activation ones; either way it computes what
the Python step computes with the same kernels (the tests hold the two together). It is faster than the
compiled Python step and needs no `torch.compile`: decoding is fast from the first token, for any batch,
and the rows of one call may be a prompt's positions in one cache row (the engine and the server prefill
through it; docs/quantize.md, docs/serve.md).

Mixtures of experts run through it too (a mixture in every layer, without a shared expert: Mixtral's, and
Qwen2-MoE's without one), and windowed layers, with rolling caches or whole ones. Anything it does not serve
(fp32 or bf16 weights, LoRA-wrapped layers, CUDA) keeps the Python step, compiled or not.
"""

from __future__ import annotations

import torch

from . import cpu_ops
from .dispatch import kernel_weights

_NONE = torch.empty(0)  # an absent bias


def _linear(module) -> list[torch.Tensor] | None:
    """(weights, scales or tables, bias) as the op reads them; None for a layer it cannot run."""
    packed = kernel_weights(module)
    if packed is None:
        return None
    bias = _NONE if packed.bias is None else packed.bias.float().contiguous()
    return [packed.codes, packed.scales.contiguous(), bias]


def step_weights(model) -> list[torch.Tensor] | None:
    """Every tensor the op reads, in its order: per layer the input norm, q, k, v, o, the
    post-attention norm, gate, up, down (each projection as three tensors; in a mixture of experts the router,
    then each expert's gate, up, down), then the final norm and the head. None where the model has something
    the op does not run."""
    config = model.config
    if model.device.type != "cpu" or model.compute_dtype != torch.float32 or config.head_dim % 8 or not cpu_ops.available():
        return None
    sparse = [layer.moe for layer in model.model.layers]
    if config.moe and (not all(sparse) or any(layer.ffn.shared_expert is not None for layer in model.model.layers)):
        return None  # the op runs a mixture in every layer, or none, and no shared expert
    weights: list[torch.Tensor] = []
    for layer in model.model.layers:
        attn = layer.self_attn
        mlps = layer.ffn.mlps() if layer.moe else [layer.ffn]
        router = [[layer.ffn.gate.weight.detach().float().contiguous()]] if layer.moe else []
        parts = [[layer.input_layernorm.weight.detach()],
                 *(_linear(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)),
                 [layer.post_attention_layernorm.weight.detach()], *router,
                 *(_linear(getattr(mlp, name)) for mlp in mlps for name in mlp.projections)]
        if any(p is None for p in parts):
            return None
        # each gate and up of one kind: the op reads them as a pair (int8 codes, or int4 words as int32)
        if any(parts[i][0].dtype != parts[i + 1][0].dtype for i in range(6 + len(router), len(parts), 3)):
            return None
        weights += [t for p in parts for t in p]
    head = _linear(model.lm_head)
    if head is None:
        return None
    return weights + [model.model.norm.weight.detach(), *head]


class NativeStep:
    """`decode_step(input_ids, pos, mask, rows, logit_rows)` for a model `step_weights` accepted: rows (B,)
    names the cache row of each input row (default: row b for input b), so one call can also feed a
    prompt's tokens into its row at their positions; logits come for the first `logit_rows` rows."""

    def __init__(self, model, weights: list[torch.Tensor]):
        self.model, self.weights = model, weights
        c = model.config
        self.heads, self.kv_heads, self.eps = c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps
        self.experts = (c.num_local_experts or 0, c.num_experts_per_tok or 0, c.renormalise_top_k,
                        [layer.self_attn.window or 0 for layer in model.model.layers])

    def __call__(self, input_ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None = None,
                 logit_rows: int = -1) -> torch.Tensor:
        model = self.model
        x = model.model.embed_tokens(input_ids[:, -1]).float()
        caches = [t for layer in model.model.layers for t in (layer.self_attn.cache.k, layer.self_attn.cache.v)]
        cos, sin = model.rope(x.device)
        return torch.ops.pocketlm.decode_step(x, pos + model.prefix_tokens, mask.reshape(x.shape[0], -1).contiguous(),
                                              cos, sin, self.weights, caches, self.heads, self.kv_heads, self.eps,
                                              rows, logit_rows, *self.experts)


def serves(model) -> bool:
    """Whether `decode_step` runs through the kernel for this model (as it stands now)."""
    return model.native_decoding and step_weights(model) is not None


def native_step(model) -> NativeStep | None:
    weights = step_weights(model)
    return None if weights is None else NativeStep(model, weights)
