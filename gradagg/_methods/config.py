"""ConFIG: conflict-free updates. Liu et al. (2024), "ConFIG: towards conflict-free training of
physics-informed neural networks".

    x = U⁺1  (the least-norm x with u_i·x = 1 for all i, u_i = g_i/‖g_i‖),
    d̂ = x/‖x‖,   d = (Σ_i g_i·d̂) d̂.

All from G: x = Uᵀa with a = A⁺1 and A = U Uᵀ = S G S, so x = Jᵀ S a and
w = (1ᵀ G S a / aᵀ A a) S a. Where no x has u_i·x = 1 for every i (more tasks than independent
gradients, in general), x = U⁺1 is the least-squares answer, the one every implementation's
pseudo-inverse gives. A⁺ is taken at the Gramian's noise floor (eigenvalues of A at or below the
cut are zero). Zero gradients have no direction and are left out. Where 1 is orthogonal to the
range of A within the floor (two opposite gradients, a zero Jacobian) no direction has a positive
cosine with every task and w = 0.
"""

from __future__ import annotations

import torch

from .._device import on_triton
from .._numerics import eigen_cut
from .._registry import Context, Method, register
from ..solvers import native
from ..solvers._loop import opaque
from ..solvers.spectral import perpendicular_tol, scaled_spectrum


def _config_impl(g: torch.Tensor, cut: float) -> torch.Tensor:
    if native.usable(g) and not on_triton(g):  # the common, provably invertible case in C; the rest via the spectrum
        w = native.pinv_weighting("config", g, cut)
        if w is not None:
            return w
    sp = scaled_spectrum(g, cut)
    ones = (sp.s > 0).to(g.dtype)
    along = torch.where(sp.keep, sp.vec.mT @ ones, 0.0)  # 1's coordinates in the kept range of A
    v = sp.s * (sp.vec @ (along / torch.where(sp.keep, sp.lam, 1.0)))
    norm_sq = v @ g @ v
    ok = (norm_sq > 0) & (along.norm() > perpendicular_tol(sp, cut) * ones.norm())
    return torch.where(ok, (g.sum(0) @ v) / torch.where(ok, norm_sq, 1.0), 0.0) * v


_config_op = opaque("config", lambda g, cut: g.new_empty(g.shape[-1]))(_config_impl)


def _config(g: torch.Tensor, ctx: Context) -> torch.Tensor:
    if on_triton(g):  # the whole K x K stage in one kernel launch
        from ..solvers.gpu import closed

        return closed.config(g, eigen_cut(ctx.noise, g.shape[-1]))
    return _config_op(g, eigen_cut(ctx.noise, g.shape[-1]))


register(Method(
    "config", "d = (Σ g_i·d̂) d̂ with d̂ ∝ U⁺1: equal cosine with every task gradient.",
    "Liu et al. 2024, 'ConFIG: towards conflict-free training of physics-informed neural networks'",
    weighting=_config, project_null=True,
))
