"""IMTL-G: impartial multi-task learning, gradient part. Liu et al. (2021), "Towards impartial
multi-task learning".

    w ∝ G⁺ √diag(G),  normalised so that Σ w = 1,

so that d = Jᵀw has equal projections d·u_i on every unit task gradient u_i = g_i/‖g_i‖ wherever
such a d exists. With n = √diag(G), G⁺n = (J⁺)ᵀ J⁺ n and d ∝ J⁺n, the least-norm x minimising
Σ_i (g_i·x − ‖g_i‖)². Where no direction has equal projections (more tasks than independent
gradients, in general) this is the contract's least-squares answer, as every implementation's
pseudo-inverse gives it; it weighs task i by ‖g_i‖², as the contract's G⁺ does.

G⁺ is the pseudo-inverse of G itself, not that of the unit-diagonal scaling (S A⁺ S with A = SGS
equals G⁺ only for invertible G). It is computed at the Gramian's noise floor: the rank is decided
on A, and G⁺n from the graded factor of G's range (``solvers.spectral.graded_range``), which stays
accurate when the norms are spread. Where A is safely invertible (its smallest eigenvalue provably
above the cut), G⁺n = S A⁻¹ 1 by one Cholesky solve (in C on the CPU).

Where Σ(G⁺n) vanishes within the floor (e.g. two opposite gradients of equal norm), or n is
orthogonal to the range of G, there is no normalised solution and w = 0.
"""

from __future__ import annotations

import torch

from .._device import on_triton
from .._numerics import eigen_cut
from .._registry import Context, Method, register
from ..solvers import native
from ..solvers._loop import opaque
from ..solvers.spectral import graded_range, perpendicular_tol, scaled_spectrum


def _imtl_g_impl(g: torch.Tensor, cut: float) -> torch.Tensor:
    if native.usable(g) and not on_triton(g):  # the common, safely invertible case in C; the rest via the spectrum
        w = native.pinv_weighting("imtl_g", g, cut)
        if w is not None:
            return w
    sp = scaled_spectrum(g, cut)
    u, sigma2, valid = graded_range(sp)
    along = u.mT @ sp.n  # n's coordinates in the range of G
    v = u @ torch.where(valid, along / torch.where(valid, sigma2, 1.0), 0.0)
    total = v.sum()
    tol = perpendicular_tol(sp, cut)
    ok = (total.abs() > tol * v.abs().sum()) & ((along * valid).norm() > tol * sp.n.norm())
    return torch.where(ok, v / torch.where(ok, total, 1.0), 0.0)


_imtl_g_op = opaque("imtl_g", lambda g, cut: g.new_empty(g.shape[-1]))(_imtl_g_impl)


def _imtl_g(g: torch.Tensor, ctx: Context) -> torch.Tensor:
    if on_triton(g):  # the whole K x K stage in one kernel launch
        from ..solvers.gpu import closed

        return closed.imtl_g(g, eigen_cut(ctx.noise, g.shape[-1]))
    return _imtl_g_op(g, eigen_cut(ctx.noise, g.shape[-1]))


register(Method(
    "imtl_g", "w ∝ G⁺ √diag G with Σw = 1: equal projection of d on every unit task gradient.",
    "Liu et al. 2021, 'Towards impartial multi-task learning'",
    aliases=("imtlg",), weighting=_imtl_g, project_null=True,
))
