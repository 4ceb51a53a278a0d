"""NSGD: normalised-gradient weighting with a reference point, from impartial-vaes (Javaloy &
Valera 2022, "Mitigating modality collapse in multimodal VAEs via impartial optimization").

    n_i = ‖g_i‖,  α = (n/r) / Σ(n/r),  m = Σ_i α_i n_i,  w_i = m / n_i,

so the direction is Σ_i u_i (the unit gradients) and the state sets its length. The reference
norms r are 1 until the call with index ``update_at`` (0 = the first call), where r ← n. A zero
gradient gets weight 0.
"""

from __future__ import annotations

import torch

from .._registry import Context, Method, Option, nonnegative_int, register
from ..state import NSGDState


def _nsgd(g: torch.Tensor, ctx: Context, update_at: int) -> torch.Tensor:
    state = ctx.state
    n = torch.diagonal(g).clamp_min(0).sqrt()
    ref = torch.where(state.step == update_at, n.to(state.dtype), state.ref)
    state.ref.copy_(ref)
    state.step.add_(1)
    r = ref.to(g.dtype)
    ratio = torch.where(r > 0, n / torch.where(r > 0, r, 1.0), 0.0)
    total = ratio.sum()
    alpha = torch.where(total > 0, ratio / torch.where(total > 0, total, 1.0), 0.0)
    m = (alpha * n).sum()
    return torch.where(n > 0, m / torch.where(n > 0, n, 1.0), 0.0)


register(Method(
    "nsgd", "w_i = m / ‖g_i‖: the sum of unit gradients, scaled by norms relative to a reference step.",
    "Javaloy & Valera 2022, impartial-vaes (NSGD)",
    options=(Option("update_at", 20, nonnegative_int, "the call index (0-based) at which r ← ‖g‖"),),
    weighting=_nsgd, state_class=NSGDState,
))
