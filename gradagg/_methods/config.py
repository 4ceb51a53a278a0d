"""ConFIG: conflict-free updates. Liu et al. (2024), "ConFIG: towards conflict-free training of
physics-informed neural networks".

    x = U⁺1  (the least-norm x with u_i·x = 1 for all i, u_i = g_i/‖g_i‖),
    d̂ = x/‖x‖,   d = (Σ_i g_i·d̂) d̂.

All from G: x = Uᵀa with a = A⁺1 and A = U Uᵀ = S G S, so x = Jᵀ S a and
w = (1ᵀ G S a / aᵀ A a) S a. Zero gradients have no direction and are left out; a zero Jacobian
gives w = 0.
"""

from __future__ import annotations

import torch

from .._registry import Context, Method, register
from ..solvers.spectral import pinv_solve, unit_scaling


def _config(g: torch.Tensor, ctx: Context) -> torch.Tensor:
    a, s = unit_scaling(g)
    v = s * pinv_solve(a, (s > 0).to(g.dtype))
    norm_sq = v @ g @ v
    ok = norm_sq > 0
    return torch.where(ok, (g.sum(0) @ v) / torch.where(ok, norm_sq, 1.0), 0.0) * v


register(Method(
    "config", "d = (Σ g_i·d̂) d̂ with d̂ ∝ U⁺1: equal cosine with every task gradient.",
    "Liu et al. 2024, 'ConFIG: towards conflict-free training of physics-informed neural networks'",
    weighting=_config,
))
