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
"""

from __future__ import annotations

import torch

from .._registry import Context, Method, Option, choice, real_at_least, register
from ..solvers import nnqp, scaled_gramian
from ..solvers._loop import all_done, can_stop_early
from ..solvers.nnqp import _masked_solve

EPS = 1e-13
MAX_OUTER = 60


def cagrad_direction_weights(g: torch.Tensor, c: float) -> torch.Tensor:
    """The weights of d before rescaling (float64, K)."""
    k = g.shape[-1]
    gn = g / torch.diagonal(g).amax().clamp_min(torch.finfo(g.dtype).tiny)
    b = gn.sum(1) / k
    r = c * b.sum().clamp_min(0).sqrt() / k**0.5  # c‖g0‖ with ‖g0‖² = 1ᵀG1/K²
    a, s = scaled_gramian(gn, EPS)
    sb = s * b
    rr = r * r
    lo, hi = b.amin(), torch.full_like(r, float("inf"))
    lam = lo + 1.0
    free = torch.ones(1, k, dtype=torch.bool, device=g.device)
    y = torch.zeros(1, k, dtype=g.dtype, device=g.device)
    done = rr <= 0
    early = can_stop_early(g)
    for _ in range(MAX_OUTER):
        if early and all_done(done):
            break
        y_new, _ = nnqp(a, (s * (lam - b)).unsqueeze(0), free)
        psi = (y_new @ a * y_new).sum()
        y = torch.where(done, y, y_new)
        free = torch.where(done, free, y_new > 0)
        below = psi < rr
        lo = torch.where(done | ~below, lo, lam)
        hi = torch.where(done | below, hi, lam)
        done = done | ((psi - rr).abs() <= 1e-12 * rr)
        # The root of ψ on the current free set: ψ(λ) = λ² αᵀs − 2λ αᵀ(sb) + βᵀ(sb).
        ab = _masked_solve(a, torch.stack([s, sb]), free.expand(2, k))
        qa, qb, qc = (ab[0] * s).sum(), (ab[0] * sb).sum(), (ab[1] * sb).sum()
        disc = qb * qb - qa * (qc - rr)
        root = (qb + disc.clamp_min(0).sqrt()) / qa
        inside = (disc >= 0) & (qa > 0) & (root > lo) & (root < hi)
        fallback = torch.where(torch.isfinite(hi), 0.5 * (lo + hi), lo + 2.0 * (lam - lo).clamp_min(1.0))
        lam = torch.where(done, lam, torch.where(inside, root, fallback))
    u = s * y[0]
    norm = (u @ gn @ u).clamp_min(0).sqrt()
    scale = torch.where(norm > 0, r / torch.where(norm > 0, norm, 1.0), 0.0)
    return 1.0 / k + scale * u


@torch.library.custom_op("gradagg::cagrad", mutates_args=())
def cagrad_op(g: torch.Tensor, c: float) -> torch.Tensor:
    """``cagrad_direction_weights`` as one opaque operator for compiled graphs."""
    return cagrad_direction_weights(g, c)


@cagrad_op.register_fake
def _(g, c):
    return g.new_empty(g.shape[-1])


def _cagrad(g: torch.Tensor, ctx: Context, c: float, rescale: int) -> torch.Tensor:
    w = cagrad_op(g, c)
    return w / {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]


register(Method(
    "cagrad", "Maximise the worst task improvement within a ball of radius c‖g0‖ around the mean gradient.",
    "Liu et al. 2021, 'Conflict-averse gradient descent for multi-task learning'",
    options=(
        Option("c", 0.5, real_at_least(0.0), "ball radius relative to ‖g0‖, ≥ 0"),
        Option("rescale", 0, choice(0, 1, 2), "0: none; 1: divide by 1 + c²; 2: divide by 1 + c"),
    ),
    weighting=_cagrad,
))
