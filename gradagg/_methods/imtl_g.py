"""IMTL-G: impartial multi-task learning, gradient part. Liu et al. (2021), "Towards impartial
multi-task learning".

    w ∝ G⁺ √diag(G),  normalised so that Σ w = 1,

so that d = Jᵀw has equal projections d·u_i on every unit task gradient u_i = g_i/‖g_i‖.
The pseudo-inverse is taken in the unit-diagonal scaling (w = S A⁺ S √diag G with A = SGS), which
equals G⁺√diag G whenever G is invertible and keeps tasks of very different scales accurate; zero
gradients get weight 0. Where Σ(G⁺√diag G) vanishes, or √diag G is orthogonal to the range of G (two opposite
gradients), there is no normalised solution and w = 0.
"""

from __future__ import annotations

import torch

from .._registry import Context, Method, register
from ..solvers import native
from ..solvers._loop import opaque
from ..solvers.spectral import pinv_solve, unit_scaling


def _imtl_g_impl(g: torch.Tensor) -> torch.Tensor:
    if native.usable(g):  # the common, safely invertible case in C; the rest via the eigendecomposition
        w = native.pinv_weighting("imtl_g", g)
        if w is not None:
            return w
    a, s = unit_scaling(g)
    coef = pinv_solve(a, (s > 0).to(g.dtype))
    v = s * coef
    total = v.sum()
    # As for ConFIG: A⁺1 below 1e-8 is rounding noise (1 ⊥ range(A)), not a direction.
    ok = (total.abs() > 1e-12 * v.abs().sum()) & (coef.abs().amax() > 1e-8)
    return torch.where(ok, v / torch.where(ok, total, 1.0), 0.0)


_imtl_g_op = opaque("imtl_g", lambda g: g.new_empty(g.shape[-1]))(_imtl_g_impl)


def _imtl_g(g: torch.Tensor, ctx: Context) -> torch.Tensor:
    return _imtl_g_op(g)


register(Method(
    "imtl_g", "w ∝ G⁺ √diag G with Σw = 1: equal projection of d on every unit task gradient.",
    "Liu et al. 2021, 'Towards impartial multi-task learning'",
    aliases=("imtlg",), weighting=_imtl_g,
))
