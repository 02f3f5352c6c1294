"""SwiGLU MLPs over groups of rows, one MLP per group, forward and backward as two ops (`grouped_swiglu`).

A mixture of experts sorts its tokens by expert, and each expert runs over its own contiguous rows. How many
rows each group has is data: in Python that is a `.tolist()` between the router and the experts, and
torch.compile breaks the graph there, in every layer, forward and backward. Wrapped as an op whose row counts
only its body reads, the compiled graph runs through a mixture in one piece (the router, the gathers and the
scatter fused around it); inside, each group is one matmul per projection, as the per-expert loop does.

Inside, each group's rows sit in a slot of a padded buffer rounded up to ALIGN rows, with zeros after them.
oneDNN builds (JIT-compiles) a matmul for every new shape it meets: with exact row counts, which change at
every step, nearly every product of a training step paid that build, and a mixture's step grew slower as
routing spread out (measured: a 1024-row product 210 us, the same at an unseen row count 560 us). Rounded,
the shapes repeat; the zero rows add nothing to any weight's gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ALIGN = 32  # rows; a group pads by less than this
# Inductor's cache of compiled graphs keys on an op's name, not on its fake function: an op whose outputs
# change shape needs a new name, or graphs compiled before the change are reused and fail on the new shapes.


@torch.library.custom_op("pocketlm::grouped_swiglu_padded", mutates_args=())
def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (rows, d) sorted by group, counts (groups,) rows of each, gate and up (groups, h, d), down (groups, d, h):
    (y, g, u) with y = down(silu(g) * u), g = gate(x), u = up(x) for each group's rows. g and u are kept for
    the backward in the padded layout (`padded_rows` rows). Only the products go group by group, into slices of
    whole-batch buffers: the elementwise work runs once over every row, and every tensor has the same shape
    at every step."""
    slots, dest = _layout(counts, x.shape[0])
    xp = _scatter(x, dest, padded_rows(x.shape[0], counts))
    g = xp.new_zeros(xp.shape[0], gate.shape[1])
    u = torch.zeros_like(g)
    for e, rows in slots:
        torch.mm(xp[rows], gate[e].t(), out=g[rows])
        torch.mm(xp[rows], up[e].t(), out=u[rows])
    act = F.silu(g).mul_(u)
    y = xp.new_empty(xp.shape[0], down.shape[1])
    for e, rows in slots:
        torch.mm(act[rows], down[e].t(), out=y[rows])
    return y.index_select(0, dest), g, u


@torch.library.custom_op("pocketlm::grouped_swiglu_padded_backward", mutates_args=())
def grouped_swiglu_backward(dy: torch.Tensor, x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, counts: torch.Tensor,
                            gate: torch.Tensor, up: torch.Tensor,
                            down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, gate, up and down from dy, the gradient of y (groups with no rows get zeros)."""
    slots, dest = _layout(counts, x.shape[0])
    xp, dyp = _scatter(x, dest, g.shape[0]), _scatter(dy, dest, g.shape[0])
    silu = F.silu(g)
    act = silu * u
    dgate, dup, ddown = torch.zeros_like(gate), torch.zeros_like(up), torch.zeros_like(down)
    dact = torch.zeros_like(g)
    for e, rows in slots:
        torch.mm(dyp[rows].t(), act[rows], out=ddown[e])
        torch.mm(dyp[rows], down[e], out=dact[rows])
    dg = torch.ops.aten.silu_backward(dact * u, g)  # dact * u * silu'(g)
    du = dact.mul_(silu)
    dxp = torch.empty_like(xp)
    for e, rows in slots:
        torch.mm(dg[rows].t(), xp[rows], out=dgate[e])
        torch.mm(du[rows].t(), xp[rows], out=dup[e])
        torch.mm(dg[rows], gate[e], out=dxp[rows])
        dxp[rows].addmm_(du[rows], up[e])
    return dxp.index_select(0, dest), dgate, dup, ddown


def padded_rows(rows: int, counts: torch.Tensor) -> int:
    """Rows of the padded layout: enough for every group rounded up to ALIGN, whatever the counts."""
    return rows + counts.shape[0] * ALIGN


def _layout(counts: torch.Tensor, rows: int) -> tuple[list[tuple[int, slice]], torch.Tensor]:
    """The slot (group, padded rows) of each group with rows, and each row's place in the padded layout."""
    slots, starts, start = [], [], 0
    for e, n in enumerate(counts.tolist()):
        size = -(-n // ALIGN) * ALIGN
        if n:
            slots.append((e, slice(start, start + size)))
        starts.append(start)
        start += size
    first = torch.cumsum(counts, 0) - counts  # each group's first row in x
    offset = torch.tensor(starts, device=counts.device) - first
    dest = torch.arange(rows, device=counts.device) + torch.repeat_interleave(offset, counts, output_size=rows)
    return slots, dest


def _scatter(rows: torch.Tensor, dest: torch.Tensor, size: int) -> torch.Tensor:
    """rows placed at dest in a zero buffer of `size` rows."""
    return rows.new_zeros(size, rows.shape[1]).index_copy_(0, dest, rows)  # index_put is serial, and 10x slower


@grouped_swiglu.register_fake
def _(x, counts, gate, up, down):
    padded = padded_rows(x.shape[0], counts)
    return x.new_empty(x.shape[0], down.shape[1]), x.new_empty(padded, gate.shape[1]), x.new_empty(padded, gate.shape[1])


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
