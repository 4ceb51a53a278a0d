"""UPGrad and DualProj: projections onto the dual cone {x : J x ≥ 0} of the task gradients.

Quinton & Rey (2024), "Jacobian descent for multi-objective optimization".

Projecting Jᵀu onto the dual cone has the dual form  v = argmin_{v ≥ u} vᵀ G v,  with the
projection Jᵀv. DualProj projects Jᵀp once; UPGrad projects every p_i g_i and sums:
w = Σ_i argmin_{v ≥ p_i e_i} vᵀ G v. The K problems of UPGrad are one batched solve. With the
diagonal scaling S = diag(1/‖g_i‖), A = S G S + εI and v = S(z + S⁻¹u), each is the
nonnegative QP min_{z ≥ 0} ½ zᵀ A z + (A S⁻¹u)ᵀ z, solved exactly by block principal pivoting.
The εI term (ε = 1e-10) makes the problem strictly convex, and two proximal-point steps
(``refined_nnqp``) remove the bias it puts on the projection.
"""

from __future__ import annotations

import contextlib

import torch

from .._device import on_triton
from .._registry import Context, Method, Option, as_vector, k_vector, register
from ..solvers import native, nnqp_op, scaled_gramian
from ..solvers._loop import opaque
from ..solvers.active_set import default_budget

EPS = 1e-10
REFINE = 2


def project_dual_cone(g: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """For each row u of ``lower`` [B, K], returns argmin_{v ≥ u} vᵀ G v (rows of [B, K])."""
    a, s, reg = scaled_gramian(g, EPS)
    bound = lower / s  # bounds on y = S⁻¹ v
    # The bias of reg is removed by the proximal steps, whose centre is y = z + bound, not z.
    q = -(bound @ a) + reg * bound
    unit = (torch.diagonal(g) > 0).to(g.dtype)
    qscale = unit * (bound.abs() * unit).sum(-1, keepdim=True) + q.abs()  # rounding of A's entries
    z, _ = nnqp_op(a, q, reg, default_budget(g.shape[-1]), REFINE, qscale)
    return (z + bound) * s


def _summed_impl(g: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Σ_rows project_dual_cone(g, lower), in C on the CPU."""
    if native.usable(g):
        with contextlib.suppress(native.Unconverged):  # else the torch reference decides
            return native.dual_cone(g, lower, sum_rows=True)
    return project_dual_cone(g, lower).sum(0)


summed_projections = opaque("dual_cone", lambda g, lower: g.new_empty(g.shape[-1]))(_summed_impl)


def _upgrad(g: torch.Tensor, ctx: Context, pref: torch.Tensor | None) -> torch.Tensor:
    if on_triton(g):
        from ..solvers.gpu import nnqp

        return nnqp.dual_cone(g, torch.diag(as_vector(pref, g)), True)
    return summed_projections(g, torch.diag(as_vector(pref, g)))


def _dualproj(g: torch.Tensor, ctx: Context, pref: torch.Tensor | None) -> torch.Tensor:
    if on_triton(g):
        from ..solvers.gpu import nnqp

        return nnqp.dual_cone(g, as_vector(pref, g).unsqueeze(0), True)
    return summed_projections(g, as_vector(pref, g).unsqueeze(0))


_PREF = Option("pref", None, k_vector(nonnegative=True, positive_sum=True),
               "nonnegative preference K-vector p (default: uniform 1/K)")
register(Method(
    "upgrad", "w = Σ_i argmin_{v ≥ p_i e_i} vᵀGv: each p_i g_i projected onto the dual cone, summed.",
    "Quinton & Rey 2024, 'Jacobian descent for multi-objective optimization'",
    options=(_PREF,), weighting=_upgrad, project_null=True,
))
register(Method(
    "dualproj", "w = argmin_{v ≥ p} vᵀGv: Jᵀp projected onto the dual cone.",
    "Quinton & Rey 2024, 'Jacobian descent for multi-objective optimization'",
    options=(_PREF,), weighting=_dualproj, project_null=True,
))
