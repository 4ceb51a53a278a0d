"""MGDA: the minimum-norm point of the convex hull of the task gradients.

    w = argmin_{w ∈ Δ} wᵀ G w,   d = Jᵀ w.

Désidéri (2012), "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization";
Sener & Koltun (2018), "Multi-task learning as multi-objective optimization" (MGDA-UB applies it to
the Jacobian with respect to shared features).

Solved exactly, not by Frank-Wolfe. With S = diag(1/‖g_i‖) and A = S G S + εI, the KKT conditions
of the simplex problem are, for v = S y / λ, those of the nonnegative QP
min_{y ≥ 0} ½ yᵀ A y − sᵀ y, which block principal pivoting solves exactly; then w = S y / Σ(S y).
The εI (ε = 1e-10) keeps the problem well posed when 0 lies in the hull (opposite or zero
gradients, where the answer is d = 0), and two proximal-point steps (``refined_nnqp``) remove the
bias it puts on the minimum.
"""

from __future__ import annotations

import contextlib

import torch

from .._device import on_triton
from .._registry import Context, Method, register
from ..solvers import native, nnqp_op, scaled_gramian
from ..solvers._loop import opaque
from ..solvers.active_set import default_budget

EPS = 1e-10
REFINE = 2


def _mgda_impl(g: torch.Tensor) -> torch.Tensor:
    """The min-norm simplex weights for the Gramian g (float64)."""
    if native.usable(g):
        with contextlib.suppress(native.Unconverged):  # else the torch reference decides
            return native.mgda(g)
    # A zero gradient puts 0 in the hull: a vanishing regulariser there makes w exactly that vertex.
    a, s, reg = scaled_gramian(g, EPS, zero_eps=1e-300)
    q = s.unsqueeze(0)
    y, _ = nnqp_op(a, q, reg, default_budget(g.shape[-1]), REFINE, q.abs())
    v = s * y[0]
    return v / v.sum()


mgda_weights = opaque("mgda", lambda g: g.new_empty(g.shape[-1]))(_mgda_impl)


def _mgda(g: torch.Tensor, ctx: Context) -> torch.Tensor:
    if on_triton(g):
        from ..solvers.gpu import nnqp

        return nnqp.mgda(g)
    return mgda_weights(g)


register(Method(
    "mgda", "w = argmin over the simplex of wᵀGw: the min-norm point of the hull of the gradients.",
    "Désidéri 2012; Sener & Koltun 2018, 'Multi-task learning as multi-objective optimization'",
    aliases=("mgda_ub",), weighting=_mgda, project_null=True,
))
