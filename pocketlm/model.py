"""A Llama-family decoder in one readable file.

Token embedding -> N x [RMSNorm -> grouped-query attention with RoPE -> residual,
                        RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> output head.

Module and parameter names follow Hugging Face's LlamaForCausalLM (model.layers.0.self_attn.q_proj ...)
so a state dict moves between the two without renaming, and RoPE uses the same rotate-half layout.
Generation keeps a static KV cache per layer (see `KVCache`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kernels import cpu_ops, decode_step, train_attention
from .kernels.dispatch import fused_projections
from .kernels.grouped_mlp import grouped_swiglu

FEW_ROWS = range(2, 7)  # rows where W @ x^T beats x @ W^T on a CPU (see Linear.forward)


class Linear(nn.Linear):
    """nn.Linear left uninitialised: weights come from a checkpoint or from `init_weights`."""

    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        few = FEW_ROWS.start <= rows < FEW_ROWS.stop  # comparisons, not `in`: torch.compile can trace a symbolic row count
        if few and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32:
            # 2-6 rows (batched decode, a speculative check, compiled or not): MKL's x @ W^T copies the whole
            # weight matrix on every call and takes twice one row's time; W @ x^T streams it once (1.4-2.4x
            # faster on SmolLM2's matrices, AMD EPYC; BENCHMARKS.md)
            y = (self.weight @ x.reshape(rows, self.in_features).t()).t().contiguous().view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return super().forward(x)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as transformers does) so bf16 activations don't lose the mean square.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of this config has, by its Hugging Face LlamaForCausalLM name, with its shape."""
    d, hd = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q_out, d),
            p + "self_attn.k_proj.weight": (kv_out, d),
            p + "self_attn.v_proj.weight": (kv_out, d),
            p + "self_attn.o_proj.weight": (d, q_out),
        })
        shapes.update(_feed_forward_shapes(config, i, p))
        if config.attention_bias or config.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                           p + "self_attn.v_proj.bias": (kv_out,)})
        if config.attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def _feed_forward_shapes(config: ModelConfig, i: int, p: str) -> dict[str, tuple[int, ...]]:
    """Layer i's feed-forward tensors under prefix p: a dense MLP, Mixtral's mixture (a router and the experts'
    w1 gate, w3 up, w2 down) or Qwen2-MoE's (MLP-named experts, a shared expert and its gate)."""
    d = config.hidden_size

    def mlp(prefix: str, width: int, bias: bool = False) -> dict[str, tuple[int, ...]]:
        names = {prefix + "gate_proj.weight": (width, d), prefix + "up_proj.weight": (width, d),
                 prefix + "down_proj.weight": (d, width)}
        if bias:
            names.update({prefix + "gate_proj.bias": (width,), prefix + "up_proj.bias": (width,),
                          prefix + "down_proj.bias": (d,)})
        return names

    if not config.sparse(i):
        return mlp(p + "mlp.", config.intermediate_size, config.mlp_bias)
    shapes: dict[str, tuple[int, ...]] = {}
    experts = range(config.num_local_experts)
    if config.family == "qwen2_moe":
        shapes[p + "mlp.gate.weight"] = (config.num_local_experts, d)
        for e in experts:
            shapes.update(mlp(f"{p}mlp.experts.{e}.", config.moe_intermediate_size))
        if config.shared_expert_intermediate_size:
            shapes.update(mlp(p + "mlp.shared_expert.", config.shared_expert_intermediate_size))
            shapes[p + "mlp.shared_expert_gate.weight"] = (1, d)
        return shapes
    h = config.intermediate_size
    shapes[p + "block_sparse_moe.gate.weight"] = (config.num_local_experts, d)
    for e in experts:
        x = f"{p}block_sparse_moe.experts.{e}."
        shapes.update({x + "w1.weight": (h, d), x + "w3.weight": (h, d), x + "w2.weight": (d, h)})
    return shapes


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, shape (max_positions, head_dim), rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos/sin: (batch, 1, seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def project(x: torch.Tensor, *layers: nn.Module) -> list[torch.Tensor]:
    """Several linear layers applied to one input; quantized layers may run them as one kernel call, and
    float ones that train on a CPU as one matmul."""
    fused = fused_projections(x, layers)
    if fused is None and _one_matmul_trains(x, layers):
        fused = _one_matmul(x, layers)
    return fused if fused is not None else [layer(x) for layer in layers]


def _one_matmul_trains(x: torch.Tensor, layers) -> bool:
    """Whether several projections of x train as one matmul: plain float layers on a CPU, with gradients."""
    return (len(layers) > 1 and x.device.type == "cpu" and torch.is_grad_enabled()
            and all(type(m) is Linear and m.weight.requires_grad and not hooked(m) for m in layers)
            and len({m.bias is None for m in layers}) == 1)


def hooked(module: nn.Module) -> bool:
    """Whether hooks watch the module's calls (Opacus' per-sample gradients do): such a layer must run as
    itself, never fused into a larger product that would pass its hooks by."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _one_matmul(x: torch.Tensor, layers) -> list[torch.Tensor]:
    """x through the layers' weights stacked, one matmul forward and two backward instead of as many per
    layer (the input's gradient is summed inside the matmul): for the small matrices of a shakespeare-char
    step one call beats three, forward and backward (measured in docs/benchmarks-history.md)."""
    weight = torch.cat([m.weight for m in layers])
    bias = None if layers[0].bias is None else torch.cat([m.bias for m in layers])
    return list(F.linear(x, weight, bias).split([m.out_features for m in layers], dim=-1))


class KVCache(nn.Module):
    """A preallocated key/value buffer for one layer: (batch, kv_heads, max_len, head_dim)."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor,
               row: int | slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write positions start.. of all rows (or of one `row`, or a slice of rows); return the
        keys/values up to there."""
        end = start + k.shape[2]
        rows = slice(None) if row is None else row if isinstance(row, slice) else slice(row, row + 1)
        self.k[rows, :, start:end] = k
        self.v[rows, :, start:end] = v
        return self.k[rows, :, :end], self.v[rows, :, :end]

    def write_at(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one new position per row, row b at pos[b] (decoding sequences of different lengths)."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[rows, :, pos] = k[:, :, 0]  # advanced indices around a slice: (batch, kv_heads, head_dim)
        self.v[rows, :, pos] = v[:, :, 0]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into row dst (a server compacting its busy rows)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


class RollingKVCache(KVCache):
    """A sliding-window layer's cache: only the `window` latest positions, position p in slot p % window, so its
    memory stays the same however long the sequence grows. Keys are stored rotated, and attention does not
    depend on the order of its keys, so the slots need no reordering."""

    def __init__(self, batch: int, kv_heads: int, window: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__(batch, kv_heads, window, head_dim, dtype, device)
        self.window = window

    def attend(self, start: int, k: torch.Tensor, v: torch.Tensor,
               row: int | slice | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For new keys/values at positions start..start+t-1: the keys and values their queries attend over (the
        cached window, then the new ones) with the bool mask (1, 1, t, window + t) of those each query sees; then
        the latest `window` new positions are written."""
        window, t, device = self.window, k.shape[2], k.device
        rows = slice(None) if row is None else row if isinstance(row, slice) else slice(row, row + 1)
        slots = torch.arange(window, device=device)
        held = start - 1 - (start - 1 - slots) % window  # each slot's position: the latest before start (< 0: none)
        key = torch.cat([held, torch.arange(start, start + t, device=device)])[None, :]
        query = torch.arange(start, start + t, device=device)[:, None]
        mask = (key >= 0) & (key <= query) & (key > query - window)
        keys, values = torch.cat([self.k[rows], k], dim=2), torch.cat([self.v[rows], v], dim=2)
        kept = min(t, window)
        at = torch.arange(start + t - kept, start + t, device=device) % window
        self.k[rows, :, at] = k[:, :, t - kept:]
        self.v[rows, :, at] = v[:, :, t - kept:]
        return keys, values, mask[None, None]

    def write_at(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        super().write_at(pos % self.window, k, v)

    def seen(self, pos: torch.Tensor) -> torch.Tensor:
        """(batch, 1, 1, window) bool after position pos[b] was written: the slots holding a position (all of
        them once the sequence is a window long; they hold the window's positions and no older one)."""
        return (torch.arange(self.window, device=pos.device)[None, :] <= pos[:, None])[:, None, None]

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.k[dst] = self.k[src]
        self.v[dst] = self.v[src]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, index: int = 0):
        super().__init__()
        self.window = config.window(index)  # None: every earlier position
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d, bias = config.hidden_size, config.attention_bias
        qkv_bias = bias or bool(config.qkv_bias)  # Qwen2's bias on q, k and v only
        self.q_proj = Linear(d, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, bias=bias)
        self.cache: KVCache | None = None

    def _heads(self, x):
        """q, k, v as (batch, seq, heads, head_dim) views of the projections."""
        b, t, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        return (q.reshape(b, t, self.n_heads, self.head_dim), k.reshape(b, t, self.n_kv_heads, self.head_dim),
                v.reshape(b, t, self.n_kv_heads, self.head_dim))

    def _qkv(self, x, cos, sin):
        """q, k, v as (batch, heads, seq, head_dim), RoPE applied to q and k."""
        q, k, v = (z.transpose(1, 2) for z in self._heads(x))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def decode(self, x, cos, sin, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One new token per row at positions `pos`, attending over the static cache under `mask`
        (batch, 1, 1, span): fixed shapes, so a compiled step is reused at every position. The batch
        is the cache's first rows and the span its first positions (a server decodes only its busy rows,
        over the positions they reach); the engine passes the whole cache."""
        b, span = x.shape[0], mask.shape[-1]
        q, k, v = self._qkv(x, cos, sin)
        self.cache.write_at(pos, k, v)
        if isinstance(self.cache, RollingKVCache):  # its slots: the window's positions, whatever the span
            mask, span = self.cache.seen(pos), self.cache.window
        elif self.window is not None:  # only the window's latest positions, the new one included
            mask = mask & (torch.arange(span, device=pos.device) > (pos[:, None] - self.window)).view(b, 1, 1, span)
        y = _single_query_attention(q, self.cache.k[:b, :, :span], self.cache.v[:b, :, :span], mask)
        return self.o_proj(y.reshape(b, 1, -1))

    def forward(self, x, cos, sin, start: int, mask: torch.Tensor | None, row: int | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        if self._kernel_trains(x, start, mask, prefix):
            q, k, v = self._heads(x)
            return self.o_proj(train_attention.causal_attention(q, k, v, cos, sin).reshape(b, t, -1))
        q, k, v = self._qkv(x, cos, sin)
        if isinstance(self.cache, RollingKVCache):
            k, v, mask = self.cache.attend(start, k, v, row)
        elif self.cache is not None:
            k, v = self.cache.update(start, k, v, row)
        if prefix is not None:  # prefix tuning: learned keys/values (not rotated) before the text's
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        gqa = self.n_kv_heads != self.n_heads
        if mask is not None and mask.dtype != torch.bool:  # an additive causal bias: CPU training
            y = _explicit_causal_attention(q, k, v, mask)
        elif mask is None:  # no cache, or a fresh prefill: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def _kernel_trains(self, x, start: int, mask: torch.Tensor | None, prefix) -> bool:
        """Training on a CPU from position 0 (an additive causal bias, no cache, no prefix adapter): RoPE and
        attention run as one kernel call (pocketlm.train_attention)."""
        return (mask is not None and mask.dtype != torch.bool and start == 0 and prefix is None
                and self.cache is None and self.window is None and train_attention.serves(x))


def windowed_mask(mask: torch.Tensor | None, window: int, start: int, end: int, device) -> torch.Tensor | None:
    """`mask` (as hidden_states builds it for queries start..end-1: None for plain causal attention, bool
    (queries, keys) after cached positions, or an additive causal bias for CPU training) narrowed so that each
    query sees only the `window` latest positions, itself included (transformers: key > query - window)."""
    if end <= window:
        return mask  # no query is that far from any key
    query = torch.arange(start, end, device=device)[:, None]
    key = torch.arange(end, device=device)[None, :]
    near = (key > query - window) & (key <= query)
    if mask is None:
        return near
    if mask.dtype == torch.bool:
        return mask & near
    return mask.masked_fill(~near, float("-inf"))


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row over the cache, as two batched matmuls: each key/value head
    serves its group of query heads without being repeated, and the softmax runs in fp32. On the CPU
    this beats scaled_dot_product_attention's flash kernel, which is slow for single queries (in bf16
    it took longer than all the matmuls of a 32-row decode step). In a compiled CPU step the two
    products are written as broadcast multiply-and-sum instead, which inductor fuses into its own
    loops: a batched-matmul call per layer costs more there than the arithmetic (docs/benchmarks-history.md).
    Returns (batch, 1, heads, head_dim)."""
    b, heads, _, d = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, kv_heads, heads // kv_heads, d)  # the query heads of each key/value head
    if cpu_ops.serves_attention(q, k):  # pocketlm's AVX2 kernel: it skips the masked positions
        return cpu_ops.decode_attention(q, k, v, mask).reshape(b, 1, heads, d)
    fused = torch.compiler.is_compiling() and q.device.type == "cpu"
    if fused:  # products and sums that inductor fuses into loops: a batched matmul call costs more here
        scores = (q[:, :, :, None, :] * k[:, :, None]).sum(-1).float() * (d ** -0.5)
    else:
        scores = (q @ k.transpose(-1, -2)).float() * (d ** -0.5)  # (batch, kv_heads, group, span)
    scores = scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf"))
    p = scores.softmax(-1).to(v.dtype)
    y = (p[..., None] * v[:, :, None]).sum(-2) if fused else p @ v  # (batch, kv_heads, group, head_dim)
    return y.reshape(b, 1, heads, d)


def _explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v, written out, with `bias` the additive causal mask. Used for CPU
    training only: there PyTorch's flash-attention backward is about 3x slower in bf16 than these plain
    matmuls at short block sizes."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5) + bias
    return scores.softmax(-1).to(v.dtype) @ v


class MLP(nn.Module):
    """Llama's SwiGLU MLP, `width` wide (the config's intermediate_size unless given: Qwen2-MoE's experts)."""

    projections = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, config: ModelConfig, width: int | None = None):
        super().__init__()
        d, h = config.hidden_size, width or config.intermediate_size
        bias = config.mlp_bias and width is None
        self.gate_proj = Linear(d, h, bias=bias)
        self.up_proj = Linear(d, h, bias=bias)
        self.down_proj = Linear(h, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


def swiglu(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)): Llama's MLP and each Mixtral expert."""
    g, u = project(x, gate, up)
    return down(F.silu(g) * u)


class Expert(nn.Module):
    """One expert of a mixture: a SwiGLU MLP under Mixtral's names (w1 gate, w3 up, w2 down)."""

    projections = ("w1", "w3", "w2")

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h = config.hidden_size, config.intermediate_size
        self.w1 = Linear(d, h, bias=False)
        self.w3 = Linear(d, h, bias=False)
        self.w2 = Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w1, self.w3, self.w2)


class SparseMoE(nn.Module):
    """A mixture-of-experts feed-forward: a router picks each token's top-k experts (softmax over all; Mixtral
    renormalises the k weights to sum to 1, Qwen2-MoE only with norm_topk_prob) and the output is their weighted
    sum, plus, in Qwen2-MoE, a shared expert every token goes through, scaled by sigmoid(its gate). Experts run
    over the tokens routed to them, one call per expert in use, so one token reads only its chosen experts'
    weights. Given a list, the router's logits are appended to it (the load-balancing loss is computed from them)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.renormalise = config.num_experts_per_tok, config.renormalise_top_k
        self.gate = Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.shared_expert: MLP | None = None
        if config.family == "qwen2_moe":
            self.experts = nn.ModuleList(MLP(config, config.moe_intermediate_size)
                                         for _ in range(config.num_local_experts))
            if config.shared_expert_intermediate_size:
                self.shared_expert = MLP(config, config.shared_expert_intermediate_size)
                self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)
        else:
            self.experts = nn.ModuleList(Expert(config) for _ in range(config.num_local_experts))

    def forward(self, x: torch.Tensor, router_logits: list | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.gate(flat)
        if router_logits is not None:
            router_logits.append(logits)
        weights, chosen = torch.topk(F.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        if self._trains_grouped():
            out = self._grouped(flat, weights, chosen)
        else:
            out = torch.zeros_like(flat)
            used = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
            for e, expert in enumerate(self.experts):
                if used[e]:
                    token, slot = torch.where(chosen == e)
                    out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(x.shape)

    def _trains_grouped(self) -> bool:
        """Whether the experts train as one grouped op: plain float layers whose weights learn (a LoRA-wrapped
        or frozen expert, and inference, which reads only the chosen experts, keep the loop)."""
        return torch.is_grad_enabled() and all(
            type(layer) is Linear and layer.weight.requires_grad and not hooked(layer)
            for expert in self.experts for layer in (getattr(expert, name) for name in expert.projections))

    def _grouped(self, flat: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The experts' weighted sum with tokens sorted by expert and the experts run as one op
        (kernels/grouped_mlp.py): no row count reaches Python, so a compiled step does not break here."""
        choice = chosen.flatten()
        order = choice.argsort(stable=True)  # within an expert, tokens in order: the loop's sums, in its order
        token = order // self.top_k
        counts = torch.zeros(len(self.experts), dtype=torch.long, device=flat.device).index_add_(
            0, choice, torch.ones_like(choice))
        device = flat.device.type  # the products in autocast's dtype, as the loop's Linear layers would run them
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else flat.dtype
        stacked = [torch.stack([getattr(e, name).weight for e in self.experts]).to(dtype)
                   for name in self.experts[0].projections]
        # index_select, not indexing: its gradient is an index_add, where indexing's is a serial index_put
        y, _, _ = grouped_swiglu(flat.index_select(0, token).to(dtype), counts, *stacked)
        return torch.zeros_like(flat).index_add_(0, token, y * weights.flatten().index_select(0, order)[:, None])

    def mlps(self) -> list[nn.Module]:
        """Every SwiGLU block inside: the experts, then the shared expert."""
        return [*self.experts, *([self.shared_expert] if self.shared_expert is not None else [])]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = config.sparse(index)
        if self.moe and config.family == "mixtral":  # Mixtral names its mixture block_sparse_moe, Qwen2-MoE mlp
            self.block_sparse_moe = SparseMoE(config)
        else:
            self.mlp = SparseMoE(config) if self.moe else MLP(config)

    @property
    def ffn(self) -> nn.Module:
        """The feed-forward block: an MLP or a SparseMoE."""
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def feed_forward(self, x: torch.Tensor, router_logits: list | None = None) -> torch.Tensor:
        return self.ffn(x, router_logits) if self.moe else self.ffn(x)

    def forward(self, x, cos, sin, start, mask, row=None, prefix=None, router_logits=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, mask, row, prefix)
        return x + self.feed_forward(self.post_attention_layernorm(x), router_logits)

    def decode(self, x, cos, sin, pos, mask):
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, pos, mask)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """The part Hugging Face calls `model`: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_head()
        self.quant_scheme = None  # set by pocketlm.quant when the linear layers are quantized
        self.prefix: nn.Module | None = None  # prefix tuning (pocketlm.adapt.adapters.PrefixKV)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._bias_cache: torch.Tensor | None = None
        # decode through pocketlm's whole-step kernel where it serves the model (see kernels/decode_step.py); off,
        # the step runs layer by layer in Python (what the kernel is tested against)
        self.native_decoding = True
        self._native_step: decode_step.NativeStep | None = None

    # ---- setup ------------------------------------------------------------------------------
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "LlamaForCausalLM":
        """Random initialisation for training from scratch (normal(0, std), norms at 1)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def tie_head(self) -> None:
        """The output head shares the embedding's weight (tie_word_embeddings)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations flow in: the float weights' dtype (int8 storage computes in fp32)."""
        return self.model.norm.weight.dtype

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope_cache is None or self._rope_cache[0].device != device:
            c = self.config
            cos, sin = rope_tables(c.head_dim, c.max_position_embeddings, c.rope_theta)
            self._rope_cache = (cos.to(device), sin.to(device))
        return self._rope_cache

    def causal_bias(self, t: int, device: torch.device) -> torch.Tensor:
        """Additive causal mask (0 on and below the diagonal, -inf above), cached per length."""
        cached = self._bias_cache
        if cached is None or cached.shape[0] != t or cached.device != device:
            cached = torch.full((t, t), float("-inf"), device=device).triu(1)
            self._bias_cache = cached
        return cached

    @property
    def prefix_tokens(self) -> int:
        """Positions a prefix-tuning adapter holds in front of the text (0 without one)."""
        return self.prefix.num_tokens if self.prefix is not None else 0

    @property
    def context_length(self) -> int:
        """Tokens of text the model can see: its context less a prefix adapter's positions."""
        return self.config.max_position_embeddings - self.prefix_tokens

    def setup_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                    rolling: bool = True) -> None:
        """Allocate a static KV cache for `batch` sequences of up to `max_len` tokens. A prefix adapter's
        keys and values fill the first positions, and the text follows them. Sliding-window layers keep only
        their window (RollingKVCache) unless `rolling` is off: a caller that rewinds positions (speculative
        decoding's rejected drafts) needs the older ones kept."""
        c = self.config
        p = self.prefix_tokens
        max_len = min((max_len or c.max_position_embeddings) + p, c.max_position_embeddings)
        weight = self.model.embed_tokens.weight
        dtype = dtype or self.compute_dtype
        # the weights the whole-step kernel reads are gathered again: the model may have changed since
        native = self.native_decoding and dtype == torch.float32
        self._native_step = decode_step.native_step(self) if native else None
        for layer in self.model.layers:
            window = layer.self_attn.window
            if rolling and window is not None and window < max_len:
                cache = RollingKVCache(batch, c.num_key_value_heads, window, c.head_dim, dtype, weight.device)
            else:
                cache = KVCache(batch, c.num_key_value_heads, max_len, c.head_dim, dtype, weight.device)
            layer.self_attn.cache = cache
        if p:
            for layer, (k, v) in zip(self.model.layers, self.prefix.key_values(batch, dtype)):
                layer.self_attn.cache.k[:, :, :p] = k
                layer.self_attn.cache.v[:, :, :p] = v

    @property
    def cache_positions(self) -> int:
        """Positions the longest layer cache holds: what a decode step's mask spans (a rolling cache masks its
        own slots)."""
        return max(layer.self_attn.cache.k.shape[2] for layer in self.model.layers)

    def move_cache_row(self, src: int, dst: int, length: int) -> None:
        """Move a sequence of `length` text tokens from cache row src to row dst."""
        for layer in self.model.layers:
            layer.self_attn.cache.move_row(src, dst, length + self.prefix_tokens)

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.cache = None

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, start: int = 0, last_only: bool = False,
                cache_row: int | slice | None = None, select: torch.Tensor | None = None,
                router_logits: list | None = None) -> torch.Tensor:
        """Logits for `input_ids` (batch, seq) placed at positions start..start+seq-1.

        With a KV cache set up, earlier positions come from the cache; `last_only` skips the output
        head for all but the final position (what decoding needs); `cache_row` prefills one row of a
        batched cache with a single sequence (or a slice of rows with as many sequences). `select`, a (batch, seq) bool mask, runs the head only
        at those positions and returns (selected, vocab): fine-tuning scores only the reply tokens,
        and the head over a 49k vocabulary is a large share of a small model's work. `router_logits`, a list,
        collects a mixture of experts' router logits layer by layer (for the load-balancing loss:
        train/objectives.py).
        """
        x = self.hidden_states(input_ids, start, cache_row, router_logits)
        if last_only:
            x = x[:, -1:]
        elif select is not None:
            x = x[select]
        return self.lm_head(x)

    def hidden_states(self, input_ids: torch.Tensor, start: int = 0, cache_row: int | slice | None = None,
                      router_logits: list | None = None) -> torch.Tensor:
        """The final normed hidden states (batch, seq, hidden): scoring applies the output head only
        at the positions it needs, instead of materialising logits for every position."""
        b, t = input_ids.shape
        prefix = None
        if self.prefix is not None:
            start += self.prefix.num_tokens  # the prefix holds positions 0..tokens-1; with a cache, it is there
            if self.model.layers[0].self_attn.cache is None:
                prefix = self.prefix.key_values(b, self.compute_dtype)
        end = start + t
        if end > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {end} tokens exceeds the context of {self.config.max_position_embeddings}")
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(x.device)
        cos = cos[start:end].to(x.dtype)[None, None]
        sin = sin[start:end].to(x.dtype)[None, None]
        mask = None
        if start > 0 and (t > 1 or prefix is not None):  # after cached or prefix tokens: query i sees keys 0..start+i
            q_pos = torch.arange(start, end, device=x.device)[:, None]
            mask = torch.arange(end, device=x.device)[None, :] <= q_pos
            if x.device.type == "cpu" and torch.is_grad_enabled():
                mask = torch.zeros(mask.shape, device=x.device).masked_fill(~mask, float("-inf"))
        elif x.device.type == "cpu" and torch.is_grad_enabled() and t > 1:
            mask = self.causal_bias(t, x.device)
        masks = {None: mask}  # by window: the mask of the layers attending through it
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            if isinstance(attn.cache, RollingKVCache):
                layer_mask = None  # it masks its own slots
            else:
                if attn.window not in masks:
                    masks[attn.window] = windowed_mask(mask, attn.window, start, end, x.device)
                layer_mask = masks[attn.window]
            x = layer(x, cos, sin, start, layer_mask, cache_row, None if prefix is None else prefix[i], router_logits)
        return self.model.norm(x)

    def packed_hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states (batch, seq, hidden) of rows that pack several sequences sharing a
        beginning (one context, then each of its continuations): token i of a row sits at positions[b, i] and
        attends to the tokens j where sees[b, i, j]. Without a cache; a prefix adapter's positions come first
        and every token sees them. Scoring a context's choices this way runs the context once, in one pass."""
        b, t = input_ids.shape
        if positions.shape != (b, t) or sees.shape != (b, t, t) or sees.dtype != torch.bool:
            raise ValueError(f"positions must be {(b, t)} and sees {(b, t, t)} bool for input of shape {(b, t)}")
        p = self.prefix_tokens
        positions = positions + p
        if int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"position {int(positions.max())} exceeds the context of {self.config.max_position_embeddings}")
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(x.device)
        cos, sin = cos[positions].to(x.dtype)[:, None], sin[positions].to(x.dtype)[:, None]
        prefix = self.prefix.key_values(b, self.compute_dtype) if p else None
        if p:
            sees = torch.cat([sees.new_ones(b, t, p), sees], dim=-1)
        masks = {None: sees[:, None]}  # by window, (batch, 1, seq, prefix + seq): every head alike
        for i, layer in enumerate(self.model.layers):
            window = layer.self_attn.window
            if window not in masks:  # the window counts positions (prefix adapters are refused on windowed models)
                masks[window] = (sees & (positions[:, :, None] - positions[:, None, :] < window))[:, None]
            x = layer(x, cos, sin, 0, masks[window], None, None if prefix is None else prefix[i])
        return self.model.norm(x)

    def decode_mask(self, pos: torch.Tensor, span: int | None = None) -> torch.Tensor:
        """(batch, 1, 1, span) bool: row b sees cache positions 0..pos[b] (after any prefix). The span,
        the cache positions a step attends over, is the whole cache unless given."""
        span = span or self.cache_positions
        pos = pos + self.prefix_tokens
        return (torch.arange(span, device=pos.device)[None, :] <= pos[:, None])[:, None, None]

    @property
    def steps_any_rows(self) -> bool:
        """Whether `decode_step` takes `rows`: the whole-step kernel serves this model (kernels/decode_step.py)
        and no layer keeps a rolling cache (a prompt's later positions would overwrite slots its earlier ones
        attend to)."""
        return self._native_step is not None and not self.rolling_cache

    @property
    def rolling_cache(self) -> bool:
        """Whether a layer keeps a rolling cache (a window of slots): writing past a row's end overwrites slots
        that row still attends to, so its prompts cannot be padded on the right."""
        return any(isinstance(layer.self_attn.cache, RollingKVCache) for layer in self.model.layers)

    def decode_step(self, input_ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None,
                    rows: torch.Tensor | None = None, logit_rows: int = -1) -> torch.Tensor:
        """Logits (batch, vocab) for one new token per row, row b at position pos[b], using and
        extending the static KV cache; `mask` is `decode_mask(pos)`. Shapes depend only on the batch
        and the cache length, so a compiled step is built once per shape and serves every position.
        Where `steps_any_rows`: `rows` gives each input row's cache row (several may be one prompt's
        positions), and only the first `logit_rows` rows get logits."""
        if mask is None:
            mask = self.decode_mask(pos)
        if not torch.compiler.is_compiling() and self._native_step is not None:
            return self._native_step(input_ids, pos, mask, rows, logit_rows)
        if rows is not None or logit_rows != -1:
            raise NotImplementedError("rows and logit_rows need the whole-step kernel (model.steps_any_rows)")
        if self.prefix is not None:
            pos = pos + self.prefix.num_tokens
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(x.device)
        cos = cos[pos].to(x.dtype)[:, None, None]
        sin = sin[pos].to(x.dtype)[:, None, None]
        for layer in self.model.layers:
            x = layer.decode(x, cos, sin, pos, mask)
        return self.lm_head(self.model.norm(x))[:, -1].float()
