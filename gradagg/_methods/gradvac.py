"""GradVac: gradient vaccine. Wang et al. (2021), "Gradient vaccine: investigating and improving
multi-task optimization in massively multilingual models".

As PCGrad, but towards a target cosine φ̂_ij (K x K, starting at 0) instead of 0: with
φ = cos(g_i', g_j), if φ < φ̂_ij then

    g_i' += ‖g_i'‖ (φ̂_ij √(1−φ²) − φ √(1−φ̂_ij²)) / (‖g_j‖ √(1−φ̂_ij²)) · g_j,

and every visited pair updates φ̂_ij ← (1−β) φ̂_ij + β φ (β = ``decay``). The targets persist in
the state across calls (the old module re-created them on every call, so it was PCGrad). On the
first call φ̂ = 0 and the update is PCGrad's. The partner orders are drawn as PCGrad draws them,
so with the same generator the first call equals PCGrad. Runs on K x K coefficients: g_i' = Σ_j C_ij g_j.
"""

from __future__ import annotations

import torch

from .._device import on_triton
from .._registry import Context, Method, Option, real_in, register
from ..state import GradVacState
from .pcgrad import _keys, random_orders


def gradvac_matrix(g: torch.Tensor, target: torch.Tensor, decay: float, generator: torch.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, updated targets)."""
    k = g.shape[-1]
    if on_triton(g):
        from ..solvers.gpu import surgery

        # The same draw as random_orders: with the same generator, the same orders.
        return surgery.gradvac(g, target, _keys(k, g, generator), decay)
    norms = torch.diagonal(g).clamp_min(0).sqrt()
    rows = torch.arange(k, device=g.device)
    order = random_orders(k, g, generator)
    c = torch.eye(k, dtype=g.dtype, device=g.device)
    target = target.clone()
    for t in range(k - 1):
        j = order[:, t]
        cg = c @ g
        dot = cg.gather(1, j.unsqueeze(1)).squeeze(1)
        ni_sq = (cg * c).sum(1).clamp_min(0)
        ni = ni_sq.sqrt()
        nj = norms[j]
        valid = (ni > 0) & (nj > 0)
        phi = torch.where(valid, dot / torch.where(valid, ni * nj, 1.0), 0.0).clamp(-1.0, 1.0)
        goal = target[rows, j]
        root = (1.0 - goal * goal).clamp_min(0).sqrt()
        # Not gated on ‖g_i'‖ > 0: a row that nearly cancelled has a norm known only to G's rounding,
        # and the correction below is continuous in it (PCGrad's where φ̂ = 0).
        adjust = (nj > 0) & (dot < goal * ni * nj) & (root > 0)
        # ‖g_i'‖(φ̂ √(1−φ²) − φ √(1−φ̂²)) / (‖g_j‖ √(1−φ̂²)), written so that ‖g_i'‖ cancels from the
        # PCGrad part −g_i'·g_j/‖g_j‖² (it is known only to G's rounding where g_i' nearly cancelled)
        # and enters only through ‖g_i'‖‖g_j‖ sin, times φ̂.
        nj_sq = torch.where(adjust, nj * nj, 1.0)
        sine = (ni_sq * nj * nj - dot * dot).clamp_min(0).sqrt()
        step = goal * sine / (nj_sq * torch.where(adjust, root, 1.0)) - dot / nj_sq
        coef = torch.where(adjust, step, 0.0)
        c = c + coef.unsqueeze(1) * torch.nn.functional.one_hot(j, k).to(g.dtype)
        target = target.index_put((rows, j), torch.where(valid, (1.0 - decay) * goal + decay * phi, goal))
    return c, target


def _transform(g: torch.Tensor, ctx: Context, decay: float) -> torch.Tensor:
    state = ctx.state
    c, target = gradvac_matrix(g, state.target.to(g.dtype), decay, ctx.generator)
    state.target.copy_(target.to(state.dtype))
    state.step.add_(1)
    return c


def _gradvac(g: torch.Tensor, ctx: Context, decay: float) -> torch.Tensor:
    return _transform(g, ctx, decay).sum(0)


register(Method(
    "gradvac", "PCGrad towards target cosines that track each pair's history (EMA with rate decay).",
    "Wang et al. 2021, 'Gradient vaccine: investigating and improving multi-task optimization in massively "
    "multilingual models'",
    options=(Option("decay", 0.01, real_in(0.0, 1.0), "EMA rate β of the target cosines, in [0, 1]"),),
    weighting=_gradvac, transform=_transform, random=True, state_class=GradVacState, project_null=True,
))
