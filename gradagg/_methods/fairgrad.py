"""FairGrad. Ban & Ji (2024), "Fair resource allocation in multi-task learning".

    w > 0 with  G w = w^(−1/α)  element-wise.

This is the stationarity condition of the strictly convex  ½ wᵀGw − Σ φ(w_i)  with
φ'(w) = w^(−1/α), solved by Newton's method (``solvers.barrier``) in the unit-diagonal scaling
w = S u, A = S G S + εI, where it reads A u = s^(1−1/α) ⊙ u^(−1/α). The εI (ε = 1e-15, at the
level of A's own rounding) keeps a solution in existence when a nonnegative combination of the
gradients vanishes; weights then grow like ε^(−1/2) along that combination while d stays finite.
A zero gradient, whose equation has no finite solution, gets weight 0.
"""

from __future__ import annotations

import contextlib

import torch

from .._device import on_triton
from .._registry import Context, Method, Option, real_at_least, register
from ..solvers import barrier_op, native, scaled_gramian
from ..solvers._loop import opaque
from ..solvers.barrier import MAX_ITER

EPS = 1e-15


def solve_power_equation(g: torch.Tensor, beta: float, u0: torch.Tensor | None = None) -> torch.Tensor:
    """w > 0 with (G + ε diag G) w = w^(−β); ``u0`` warm-starts in the scaled variable u = S⁻¹w."""
    # A zero gradient has no finite weight (its equation reads 0 = w^(−β)); it is decoupled as the
    # dummy equation u = u^(−β) (so u = 1) and gets weight 0, which changes nothing in d.
    a, s, _ = scaled_gramian(g, EPS, zero_eps=1.0)
    c = s ** (1.0 - beta)
    start = c ** (1.0 / (1.0 + beta)) if u0 is None else u0
    u, _ = barrier_op(a, c, start, beta, MAX_ITER)
    return torch.where(torch.diagonal(g) > 0, s * u, 0.0)


def _fairgrad_impl(g: torch.Tensor, beta: float) -> torch.Tensor:
    """``solve_power_equation`` from its default start, in C on the CPU."""
    if native.usable(g):
        with contextlib.suppress(native.Unconverged):  # else the torch reference decides
            return native.fairgrad(g, beta, MAX_ITER)
    return solve_power_equation(g, beta)


fairgrad_weights = opaque("fairgrad", lambda g, beta: g.new_empty(g.shape[-1]))(_fairgrad_impl)


def _fairgrad(g: torch.Tensor, ctx: Context, alpha: float) -> torch.Tensor:
    if on_triton(g):
        from ..solvers.gpu import newton

        return newton.fairgrad(g, 1.0 / alpha, MAX_ITER)
    return fairgrad_weights(g, 1.0 / alpha)


register(Method(
    "fairgrad", "w > 0 solving G w = w^(-1/α): α-fair allocation of the update across tasks.",
    "Ban & Ji 2024, 'Fair resource allocation in multi-task learning'",
    options=(Option("alpha", 1.0, real_at_least(0.0, strict=True), "fairness exponent α > 0"),),
    weighting=_fairgrad, project_null=True, unbounded_null=True,
))
