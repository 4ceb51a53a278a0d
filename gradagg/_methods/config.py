"""ConFIG: conflict-free updates. Liu et al. (2024), "ConFIG: towards conflict-free training of
physics-informed neural networks".

    x = U⁺1  (the least-norm x with u_i·x = 1 for all i, u_i = g_i/‖g_i‖),
    d̂ = x/‖x‖,   d = (Σ_i g_i·d̂) d̂.

All from G: x = Uᵀa with a = A⁺1 and A = U Uᵀ = S G S, so x = Jᵀ S a and
w = (1ᵀ G S a / aᵀ A a) S a. Zero gradients have no direction and are left out. Where 1 is
orthogonal to the range of U Uᵀ (two opposite gradients, a zero Jacobian) no direction has a
positive cosine with every task
and w = 0.
"""

from __future__ import annotations

import torch

from .._registry import Context, Method, register
from ..solvers import native
from ..solvers._loop import opaque
from ..solvers.spectral import pinv_solve, unit_scaling

NOISE = 1e-8


def _config_impl(g: torch.Tensor) -> torch.Tensor:
    if native.usable(g):  # the common, provably invertible case in C; the rest via the eigendecomposition
        w = native.pinv_weighting("config", g)
        if w is not None:
            return w
    a, s = unit_scaling(g)
    coef = pinv_solve(a, (s > 0).to(g.dtype))
    v = s * coef
    norm_sq = v @ g @ v
    # A⁺1 has entries of order 1/K at least unless 1 ⊥ range(A): then no x has u_i·x = 1
    # (e.g. two opposite gradients), and only rounding noise is left.
    ok = (norm_sq > 0) & (coef.abs().amax() > NOISE)
    return torch.where(ok, (g.sum(0) @ v) / torch.where(ok, norm_sq, 1.0), 0.0) * v


_config_op = opaque("config", lambda g: g.new_empty(g.shape[-1]))(_config_impl)


def _config(g: torch.Tensor, ctx: Context) -> torch.Tensor:
    return _config_op(g)


register(Method(
    "config", "d = (Σ g_i·d̂) d̂ with d̂ ∝ U⁺1: equal cosine with every task gradient.",
    "Liu et al. 2024, 'ConFIG: towards conflict-free training of physics-informed neural networks'",
    weighting=_config,
))
