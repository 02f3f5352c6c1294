"""SwiGLU MLPs over groups of rows, one MLP per group, forward and backward as two ops (`grouped_swiglu`).

A mixture of experts sorts its tokens by expert, and each expert runs over its own contiguous rows. How many
rows each group has is data: in Python that is a `.tolist()` between the router and the experts, and
torch.compile breaks the graph there, in every layer, forward and backward. Wrapped as an op whose row counts
only its body reads, the compiled graph runs through a mixture in one piece (the router, the gathers and the
scatter fused around it); inside, each group is one matmul per projection, as the per-expert loop does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("pocketlm::grouped_swiglu", mutates_args=())
def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (rows, d) sorted by group, counts (groups,) rows of each, gate and up (groups, h, d), down (groups, d, h):
    (y, g, u) with y = down(silu(g) * u), g = gate(x), u = up(x) for each group's rows (g and u are kept for
    the backward). Only the products go group by group, into slices of whole-batch buffers: the elementwise
    work runs once over every row, and every tensor has the same shape at every step (a group's size changes
    from step to step; buffers of changing sizes are allocated and first touched anew)."""
    spans = list(_spans(counts))
    g = x.new_empty(x.shape[0], gate.shape[1])
    u = torch.empty_like(g)
    for e, (start, end) in spans:
        torch.mm(x[start:end], gate[e].t(), out=g[start:end])
        torch.mm(x[start:end], up[e].t(), out=u[start:end])
    act = F.silu(g).mul_(u)
    y = x.new_empty(x.shape[0], down.shape[1])
    for e, (start, end) in spans:
        torch.mm(act[start:end], down[e].t(), out=y[start:end])
    return y, g, u


@torch.library.custom_op("pocketlm::grouped_swiglu_backward", mutates_args=())
def grouped_swiglu_backward(dy: torch.Tensor, x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, counts: torch.Tensor,
                            gate: torch.Tensor, up: torch.Tensor,
                            down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, gate, up and down from dy, the gradient of y (groups with no rows get zeros)."""
    spans = list(_spans(counts))
    silu = F.silu(g)
    act = silu * u
    dgate, dup, ddown = torch.zeros_like(gate), torch.zeros_like(up), torch.zeros_like(down)
    dact = torch.empty_like(g)
    for e, (start, end) in spans:
        torch.mm(dy[start:end].t(), act[start:end], out=ddown[e])
        torch.mm(dy[start:end], down[e], out=dact[start:end])
    dg = torch.ops.aten.silu_backward(dact * u, g)  # dact * u * silu'(g)
    du = dact.mul_(silu)
    dx = torch.empty_like(x)
    for e, (start, end) in spans:
        torch.mm(dg[start:end].t(), x[start:end], out=dgate[e])
        torch.mm(du[start:end].t(), x[start:end], out=dup[e])
        torch.mm(dg[start:end], gate[e], out=dx[start:end])
        dx[start:end].addmm_(du[start:end], up[e])
    return dx, dgate, dup, ddown


def _spans(counts: torch.Tensor):
    """(group, (first row, end row)) of each group with rows."""
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            yield e, (start, start + n)
        start += n


@grouped_swiglu.register_fake
def _(x, counts, gate, up, down):
    return x.new_empty(x.shape[0], down.shape[1]), x.new_empty(x.shape[0], gate.shape[1]), x.new_empty(x.shape[0], gate.shape[1])


@grouped_swiglu_backward.register_fake
def _(dy, x, g, u, counts, gate, up, down):
    return torch.empty_like(x), torch.empty_like(gate), torch.empty_like(up), torch.empty_like(down)


def _setup(ctx, inputs, output):
    x, counts, gate, up, down = inputs
    _, g, u = output
    ctx.save_for_backward(x, g, u, counts, gate, up, down)


def _backward(ctx, dy, _dg, _du):
    x, g, u, counts, gate, up, down = ctx.saved_tensors
    dx, dgate, dup, ddown = grouped_swiglu_backward(dy.contiguous(), x, g, u, counts, gate, up, down)
    return dx, None, dgate, dup, ddown


grouped_swiglu.register_autograd(_backward, setup_context=_setup)
