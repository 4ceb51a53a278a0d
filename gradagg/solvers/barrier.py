"""Newton solver for the positive root of  A u = c ⊙ u^(−β)  (u > 0).

This equation is the stationarity condition of the strictly convex problem

    minimise  h(u) = ½ uᵀ A u − Σ_i c_i φ(u_i),   φ'(u) = u^(−β)   (φ = log for β = 1),

for A positive definite, c > 0 and β > 0. With β = 1 and c = 1 it is Nash-MTL's bargaining
equation α ⊙ (Gα) = 1 (Navon et al. 2022); with β = 1/α it is FairGrad's G w = w^(−1/α) (Ban & Ji
2024). Each iteration takes a Newton step with a backtracking line search whose trial steps 1, ½,
¼, … are evaluated together, so there is no data-dependent control flow. Newton's method on a
self-concordant-like barrier converges quadratically once near the root; from afar each step at
least doubles or halves a coordinate towards it, hence the budget of ``MAX_ITER`` iterations.
"""

from __future__ import annotations

import torch

from ._loop import all_done, can_stop_early, guard, opaque

MAX_ITER = 80
#: Trial step lengths of the line search.
_STEPS = 2.0 ** -torch.arange(0, 31, dtype=torch.float64)
#: The backward error (see ``residual``) at which a problem has converged.
RESIDUAL_TOL = 1e-14
#: The backward error below which the answer counts as converged: well-conditioned problems reach
#: ~1e-15; nearly singular ones (a vanishing combination of gradients, float32 Gramians) stop at
#: about their condition number times eps, which this bar (Nash-MTL's 1e-6) still accepts.
CONVERGED_TOL = 1e-6


def _phi(u: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 1.0:
        return torch.log(u)
    return u ** (1.0 - beta) / (1.0 - beta)


def _objective(a: torch.Tensor, c: torch.Tensor, u: torch.Tensor, beta: float) -> torch.Tensor:
    quad = 0.5 * ((u @ a) * u).sum(-1)
    return quad - (c * _phi(u, beta)).sum(-1)


def residual(a: torch.Tensor, c: torch.Tensor, u: torch.Tensor, beta: float) -> torch.Tensor:
    """The componentwise backward error max_i |(Au)_i − c_i u_i^(−β)| / ((|A| u)_i + c_i u_i^(−β)).

    It is zero exactly at the root and, unlike the plain relative residual, it stays meaningful
    where (Au)_i is a cancellation of much larger terms (gradients of very different norms).
    """
    rhs = c * u ** (-beta)
    return ((u @ a - rhs).abs() / (u @ a.abs() + rhs)).amax(-1)


def solve_barrier(
    a: torch.Tensor, c: torch.Tensor, u0: torch.Tensor, beta: float, max_iter: int = MAX_ITER
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (u, converged) for A u = c ⊙ u^(−β), starting from u0 > 0."""
    steps = _STEPS.to(device=u0.device, dtype=u0.dtype)
    u = u0
    early = can_stop_early(u0)
    best, best_res = u0, residual(a, c, u0, beta)
    done = best_res <= RESIDUAL_TOL
    for _ in range(max_iter):
        if early and all_done(done):
            break
        grad = u @ a - c * u ** (-beta)
        hess = a + torch.diag_embed(beta * c * u ** (-beta - 1.0))
        step = -torch.linalg.solve_ex(hess, grad.unsqueeze(-1))[0].squeeze(-1)
        slope = (grad * step).sum(-1)
        trial = u.unsqueeze(-2) + steps.unsqueeze(-1) * step.unsqueeze(-2)  # [..., T, K]
        positive = (trial > 0).all(-1)
        h_trial = _objective(a, c, trial.clamp_min(torch.finfo(u.dtype).tiny), beta)
        h_now = _objective(a, c, u, beta)
        accept = positive & (h_trial <= h_now.unsqueeze(-1) + 1e-4 * steps * slope.unsqueeze(-1))
        first = accept.to(torch.int64).argmax(-1)
        chosen = trial.gather(-2, first.view(*first.shape, 1, 1).expand(*first.shape, 1, u.shape[-1]))
        # Near the root, h changes by less than its rounding and Armijo's test can no longer tell:
        # the full Newton step is taken whenever it halves the residual (the quadratic phase), or
        # when no step passes Armijo's test but it still reduces the residual.
        full = trial[..., 0, :]
        res_now = residual(a, c, u, beta)
        res_full = residual(a, c, full.clamp_min(torch.finfo(u.dtype).tiny), beta)
        polish = positive[..., 0] & ((res_full <= 0.5 * res_now) | (~accept.any(-1) & (res_full < res_now)))
        chosen = torch.where(polish.unsqueeze(-1), full, chosen.squeeze(-2))
        # Neither means rounding noise: u is as good as it gets.
        stalled = ~accept.any(-1) & ~polish
        u = torch.where((~done & ~stalled).unsqueeze(-1), chosen, u)
        res = residual(a, c, u, beta)
        # At the rounding floor Armijo's test is noise and may wander: keep the best iterate.
        improved = res < best_res
        best = torch.where(improved.unsqueeze(-1), u, best)
        best_res = torch.where(improved, res, best_res)
        done = done | stalled | (res <= RESIDUAL_TOL)
    return best, best_res <= CONVERGED_TOL


def _barrier_impl(
    a: torch.Tensor, c: torch.Tensor, u0: torch.Tensor, beta: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``solve_barrier`` as one opaque operator for compiled graphs."""
    u, converged = solve_barrier(a, c, u0, beta, max_iter)
    return guard(u, converged, "the Newton solver of A u = c u^(-beta)", a), converged


def _barrier_fake(a: torch.Tensor, c: torch.Tensor, u0: torch.Tensor, beta: float,
                  max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(u0), u0.new_empty(u0.shape[:-1], dtype=torch.bool)


barrier_op = opaque("barrier", _barrier_fake)(_barrier_impl)
