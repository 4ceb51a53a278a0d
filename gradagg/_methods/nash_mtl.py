"""Nash-MTL. Navon et al. (2022), "Multi-task learning as a bargaining game".

    α > 0  with  α ⊙ (G α) = 1,   d = Jᵀα,   so ‖d‖² = αᵀGα = K.

Solved by Newton's method on the convex potential ½ αᵀGα − Σ log α_i (``solvers.barrier``, the
same solver as FairGrad with α = 1) in the unit-diagonal scaling, warm-started from the previous
α kept in the state, on the device; the paper's reference code uses cvxpy on the CPU. The answer
is recomputed every ``update_every`` calls and reused in between. ``max_norm`` clips ‖d‖.

Singular Gramians: when a nonnegative combination of the gradients vanishes (e.g. two opposite
gradients) the equation has no solution. gradagg then solves it for G + ε diag(G) (ε = 1e-15):
α grows like ε^(−1/2) along that combination, d stays finite, and ‖d‖² < K. A zero gradient,
whose equation α_i (Gα)_i = 1 has no solution, gets α_i = 0.
"""

from __future__ import annotations

import contextlib

import torch

from .._device import on_triton
from .._registry import Context, Method, Option, optional_positive_real, positive_int, register
from ..solvers import native, scaled_gramian, solve_barrier
from ..solvers._loop import can_stop_early, guard, opaque
from ..solvers.barrier import MAX_ITER
from ..state import NashMTLState

EPS = 1e-15


def _nash_impl(g: torch.Tensor, previous: torch.Tensor, recompute: torch.Tensor) -> torch.Tensor:
    """α for the Gramian g, or ``previous`` where ``recompute`` is false (no solve where that is
    free to read, on the CPU)."""
    if can_stop_early(recompute) and not bool(recompute):
        return previous.clone()
    if native.usable(g):
        with contextlib.suppress(native.Unconverged):  # else the torch reference decides
            return native.nash(g, previous, MAX_ITER)
    a, s, _ = scaled_gramian(g, EPS, zero_eps=1.0)  # zero gradients: the dummy equation u = 1/u
    nonzero = torch.diagonal(g) > 0
    have = (previous > 0).all()
    start = torch.where(have & nonzero, previous / s, 1.0)
    u, converged = solve_barrier(a, torch.ones_like(s), start, 1.0, MAX_ITER)
    alpha = torch.where(nonzero, s * u, 0.0)
    return torch.where(recompute, guard(alpha, converged, "Nash-MTL's Newton solver", a), previous)


def _nash_fake(g: torch.Tensor, previous: torch.Tensor, recompute: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(previous)


nash_op = opaque("nash", _nash_fake)(_nash_impl)


def _nash_mtl(g: torch.Tensor, ctx: Context, update_every: int, max_norm: float | None) -> torch.Tensor:
    state = ctx.state
    previous = state.alpha.to(g.dtype)
    recompute = ((state.step % update_every) == 0) | ~(previous > 0).any()
    if on_triton(g):
        from ..solvers.gpu import newton

        alpha = newton.nash(g, previous, recompute, MAX_ITER)  # reads recompute in the kernel
    else:
        alpha = nash_op(g, previous, recompute)
    state.alpha.copy_(alpha.to(state.dtype))
    state.step.add_(1)
    if max_norm is None:
        return alpha
    norm = (alpha @ g @ alpha).clamp_min(0).sqrt()
    return alpha * torch.where(norm > max_norm, max_norm / torch.where(norm > 0, norm, 1.0), 1.0)


register(Method(
    "nash_mtl", "α > 0 with α ⊙ (Gα) = 1: the Nash bargaining solution, warm-started from the last step.",
    "Navon et al. 2022, 'Multi-task learning as a bargaining game'",
    options=(
        Option("update_every", 1, positive_int, "recompute α every this many calls (≥ 1)"),
        Option("max_norm", None, optional_positive_real, "clip ‖d‖ to this (> 0), or None"),
    ),
    weighting=_nash_mtl, state_class=NashMTLState, project_null=True, unbounded_null=True,
))
