"""CAGrad: conflict-averse gradient descent. Liu et al. (2021), "Conflict-averse gradient descent
for multi-task learning".

    w* = argmin_{w ∈ Δ} wᵀ b + r ‖Jᵀw‖,   b = G1/K,   r = c ‖g0‖,   g0 = Jᵀ1/K,
    d  = g0 + (r / ‖Jᵀw*‖) Jᵀw*,   then divided by 1 + c² (rescale=1) or 1 + c (rescale=2).

Solved exactly on the device (the reference code calls scipy on the CPU). For u = r w / ‖Jᵀw‖
the KKT conditions are those of the nonnegative QP  min_{u ≥ 0} ½ uᵀGu − (λ1 − b)ᵀu  together with
uᵀGu = r². Its solution u(λ) is piecewise linear, and ψ(λ) = u(λ)ᵀG u(λ) increases with λ, so λ
is found by a safeguarded search: on the free set of the current u(λ), ψ is an explicit quadratic
in λ whose root is taken when it lies inside the bracket of known values, bisection otherwise.
Once λ lands on the right piece the root is exact. Then d's weights are 1/K + r u / ‖Jᵀu‖.
The search runs on A + εI (ε = 1e-12, unit-diagonal scaling); on nearly singular Gramians that
perturbs the optimal value by a small fraction (below 1e-6 in the tests) of max‖g_i‖·‖g0‖; there
is no proximal refinement here yet.

When the minimum is attained at Jᵀw* = 0 (0 lies in the hull of the gradients and the ball
reaches the dual cone) the formula for d is undefined: every d of the ball with min_i g_i·d = 0 is
optimal, and gradagg returns the one nearest to g0, g0 projected onto the dual cone {x : J x ≥ 0}
(DualProj with uniform preference). It is chosen by comparing the primal objective min_i g_i·d of
both candidates, so no threshold on ‖Jᵀw*‖ is involved.
"""

from __future__ import annotations

import contextlib

import torch

from .._device import on_triton
from .._registry import Context, Method, Option, choice, real_at_least, register
from ..solvers import native, nnqp, scaled_gramian
from ..solvers._loop import all_done, can_stop_early, guard, opaque
from ..solvers.active_set import _masked_solve
from .dual_cone import project_dual_cone

EPS = 1e-12
MAX_OUTER = 60


def cagrad_direction_weights(g: torch.Tensor, c: float) -> torch.Tensor:
    """The weights of d = g0 + r Jᵀw*/‖Jᵀw*‖ before rescaling (float64)."""
    k = g.shape[-1]
    gn = g / torch.diagonal(g).amax().clamp_min(torch.finfo(g.dtype).tiny)
    b = gn.sum(1) / k
    r = c * b.sum().clamp_min(0).sqrt() / k**0.5  # c‖g0‖ with ‖g0‖² = 1ᵀG1/K²
    a, s, _ = scaled_gramian(gn, EPS)
    sb = s * b
    rr = r * r
    b_size = torch.diagonal(gn).clamp_min(0).sqrt() * torch.diagonal(gn).clamp_min(0).sqrt().mean()  # bounds |b|
    lo, hi = b.amin(), torch.full_like(r, float("inf"))
    lam = lo + 1.0
    y = torch.zeros(1, k, dtype=g.dtype, device=g.device)
    support = torch.zeros(1, k, dtype=torch.bool, device=g.device)
    done = rr <= 0
    early = can_stop_early(g)
    for _ in range(MAX_OUTER):
        if early and all_done(done):
            break
        q = (s * (lam - b)).unsqueeze(0)
        y_new, inner_ok = nnqp(a, q, y, None, s * (lam.abs() + b_size))
        y_new = guard(y_new, inner_ok, "CAGrad's inner QP solver", a)
        psi = (y_new @ a * y_new).sum()
        free = y_new > 0
        below = psi < rr
        lo = torch.where(done | ~below, lo, lam)
        hi = torch.where(done | below, hi, lam)
        # The root of ψ on the current free set: ψ(λ) = λ² αᵀs − 2λ αᵀ(sb) + βᵀ(sb).
        ab = _masked_solve(a, torch.stack([s, sb]), free.expand(2, k))
        qa, qb, qc = (ab[0] * s).sum(), (ab[0] * sb).sum(), (ab[1] * sb).sum()
        disc = qb * qb - qa * (qc - rr)
        root = (qb + disc.clamp_min(0).sqrt()) / qa
        inside = (disc >= 0) & (qa > 0) & (root > lo) & (root < hi)
        # Exact once ψ(λ) = r², or once λ is the root of the piece it lies on.
        settled = (free == support).all() & ((root - lam).abs() <= 1e-13 * (lam.abs() + lo.abs() + 1.0))
        finished = ~done & (((psi - rr).abs() <= 1e-12 * rr) | settled)
        y = torch.where(done, y, y_new)
        support = torch.where(done, support, free)
        done = done | finished
        fallback = torch.where(torch.isfinite(hi), 0.5 * (lo + hi), lo + 2.0 * (lam - lo).clamp_min(1.0))
        lam = torch.where(done, lam, torch.where(inside, root, fallback))
    u = guard(s * y[0], done, "CAGrad's search for the multiplier λ", a)
    norm_sq = (u @ gn @ u).clamp_min(0)
    scale = torch.where(norm_sq <= 0, 0.0, r / norm_sq.clamp_min(torch.finfo(g.dtype).tiny).sqrt())
    return 1.0 / k + scale * u


def _cagrad_impl(g: torch.Tensor, c: float, divisor: float) -> torch.Tensor:
    """CAGrad's weights for the Gramian g, divided by ``divisor`` (in C on the CPU)."""
    if native.usable(g):
        with contextlib.suppress(native.Unconverged):  # else the torch reference decides
            return native.cagrad(g, c, MAX_OUTER, divisor)
    k = g.shape[-1]
    w = cagrad_direction_weights(g, c)
    # Degenerate case (Jᵀw* = 0): every d of the ball with min_i g_i·d = 0 is optimal. The nearest
    # to g0 is g0 projected onto the dual cone; it is taken when it lies in the ball and beats the
    # formula's d on the CAGrad objective min_i g_i·d.
    mean = torch.full((k,), 1.0 / k, dtype=g.dtype, device=g.device)
    w_cone = project_dual_cone(g, mean.unsqueeze(0))[0]
    offset = w_cone - mean
    radius_sq = c * c * (mean @ g @ mean)
    in_ball = offset @ g @ offset <= radius_sq * (1.0 + 1e-9)
    # The primal values are known to the rounding of their largest terms, ‖g_i‖‖d‖ ≤ max‖g‖ (1+c)‖g0‖.
    unit = torch.diagonal(g).amax() * (mean @ g @ mean).clamp_min(0)
    better = (g @ w_cone).amin() > (g @ w).amin() + 1e-9 * (1.0 + c) * unit.sqrt()
    w = torch.where(in_ball & better & (c > 0), w_cone, w)
    return w / divisor


cagrad_weights = opaque("cagrad", lambda g, c, divisor: g.new_empty(g.shape[-1]))(_cagrad_impl)


def _cagrad(g: torch.Tensor, ctx: Context, c: float, rescale: int) -> torch.Tensor:
    divisor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
    if on_triton(g):
        from ..solvers.gpu import nnqp

        return nnqp.cagrad(g, c, MAX_OUTER, divisor)
    return cagrad_weights(g, c, divisor)


register(Method(
    "cagrad", "Maximise the worst task improvement within a ball of radius c‖g0‖ around the mean gradient.",
    "Liu et al. 2021, 'Conflict-averse gradient descent for multi-task learning'",
    options=(
        Option("c", 0.5, real_at_least(0.0), "ball radius relative to ‖g0‖, ≥ 0"),
        Option("rescale", 0, choice(0, 1, 2), "0: none; 1: divide by 1 + c²; 2: divide by 1 + c"),
    ),
    weighting=_cagrad, project_null=True,
))
