"""Exact solver for batches of nonnegative convex quadratic programs (NNQPs).

    minimise  ½ yᵀ A y − qᵀ y   subject to   y ≥ 0,      for each row q of Q,

with A symmetric positive definite (K x K) and shared by the batch: the linear complementarity
problem  y ≥ 0,  μ = A y − q ≥ 0,  yᵀμ = 0.

Two exact active-set methods share one masked iteration, each iteration solving the KKT equations
A_SS z_S = q_S (z = 0 off S) on a working set S:

1. Block principal pivoting (Júdice & Pires 1994; Kim & Park 2011 for NNLS) exchanges every
   variable that violates a sign condition at once. It usually ends in a handful of iterations.
   When the count of violations has not improved for three iterations it hands over to:
2. the Lawson–Hanson active-set method (1974), started from the clamped iterate. It keeps y
   feasible, adds the variable of steepest descent when the solve on S is positive, and otherwise
   steps back to the boundary and drops the variables that reached 0. Its objective falls strictly
   at every addition, so it terminates.

All problems of the batch run the same masked iterations: no data-dependent control flow (see
``_loop``). The answer is exact up to rounding: y solves the KKT system of its support, whose sign
conditions hold to a componentwise backward error of ``SIGN_TOL``.
"""

from __future__ import annotations

import torch

from ._loop import all_done, can_stop_early, guard, opaque

#: Relative tolerance of the tests on μ = A y − q, against the size of its terms (|A||y| + |q|):
#: rounding makes ~K ulps of it, and near-singular scaled Gramians a little more.
SIGN_TOL = 1e-11


def default_budget(k: int) -> int:
    """Iterations allowed: block pivoting needs a handful, Lawson–Hanson about one per variable it
    adds or drops."""
    return 3 * k + 30


def _masked_solve(a: torch.Tensor, q: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """Solves A_FF y_F = q_F for each row's free set F, with y = 0 off F."""
    f = free.to(a.dtype)
    m = a * (f.unsqueeze(-1) * f.unsqueeze(-2)) + torch.diag_embed(1.0 - f)
    chol, _ = torch.linalg.cholesky_ex(m)
    return torch.cholesky_solve((q * f).unsqueeze(-1), chol).squeeze(-1)


def nnqp(
    a: torch.Tensor, q: torch.Tensor, y0: torch.Tensor | None = None, max_iter: int | None = None,
    qscale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solves the batch of NNQPs; returns (y [B, K], converged [B]).

    ``y0`` ≥ 0 warm-starts the search (its support is the first working set). ``qscale`` is the
    size of the terms q was computed from (default |q|), which bounds its rounding.

    A is expected in unit-diagonal scaling (``scaled_gramian``): an entry A_ji then carries a
    rounding error of order eps, whatever its own size, except in the rows of zero gradients,
    which are exact. The tests on μ = A y − q use that backward-error bound.
    """
    b, k = q.shape
    budget = default_budget(k) if max_iter is None else max_iter
    work = (q > 0) if y0 is None else (y0 > 0)
    y = torch.zeros_like(q) if y0 is None else y0.clamp_min(0.0)
    lawson = torch.zeros(b, dtype=torch.bool, device=q.device)  # which method each problem runs
    best = torch.full((b,), k + 1, dtype=torch.int64, device=q.device)
    backups = torch.full((b,), 3, dtype=torch.int64, device=q.device)
    done = torch.zeros(b, dtype=torch.bool, device=q.device)
    solution = torch.zeros_like(q)
    # Lawson–Hanson anti-cycling: a variable added on a descent at the rounding floor can come out
    # of the next solve at ≤ 0 and be dropped at once; it is then blocked (not offered again) until
    # the method makes progress, and at the end it only has to meet a 1000x looser tolerance.
    blocked = torch.zeros_like(work)
    added = torch.zeros_like(work)
    abs_a = a.abs()
    unit = (torch.diagonal(a) > 0.5).to(a.dtype)  # rows of nonzero gradients (unit diagonal)
    qscale = q.abs() if qscale is None else qscale
    early = can_stop_early(q)
    for _ in range(budget):
        z = _masked_solve(a, q, work)
        descent = q - z @ a  # −μ: positive where raising a variable from 0 lowers the objective
        # μ_j is known to the rounding of its terms: a backward-error tolerance, per component.
        noise = unit * (z.abs() * unit).sum(-1, keepdim=True)
        tol_q = SIGN_TOL * (noise + z.abs() @ abs_a + qscale) + torch.finfo(q.dtype).tiny
        # Signs of z are tested exactly: a relative tolerance would be polluted by decoupled
        # variables (zero gradients) whose values dwarf the others. μ is tested relative to q.
        negative = work & (z < 0)
        bad = negative | (~work & ~blocked & (descent > tol_q)) | (~work & blocked & (descent > 1e3 * tol_q))
        solved = ~bad.any(-1) & ~done
        solution = torch.where(solved.unsqueeze(-1), z.clamp_min(0.0), solution)
        done = done | solved
        if early and all_done(done):
            break
        # Block principal pivoting: exchange every violator while the count keeps improving.
        nbad = bad.sum(-1)
        improved = nbad < best
        backups = torch.where(improved, 3, backups - 1)
        best = torch.minimum(best, nbad)
        switch = ~lawson & (backups < 0)
        pivot_work = work ^ bad
        # Lawson–Hanson: from feasible y, either take z (all positive on S) and add the steepest
        # variable, or step towards z up to the boundary and drop what reached 0.
        y = torch.where(switch.unsqueeze(-1), (z * work).clamp_min(0.0), y)
        start_work = y > 0
        feasible = ~(work & (z <= 0)).any(-1)
        # The variable added last came straight back at ≤ 0: block it; real progress unblocks all.
        bounced = (added & (z <= 0)).any(-1, keepdim=True)
        kept = (added & (z > 0)).any(-1, keepdim=True)
        blocked = torch.where(lawson.unsqueeze(-1) & kept, False, blocked | (lawson.unsqueeze(-1) & bounced & added))
        # The steepest descent beyond its own tolerance (tolerances differ per variable).
        gain = torch.where(work | blocked, -float("inf"), descent - tol_q)
        add = torch.nn.functional.one_hot(gain.argmax(-1), k).bool() & (gain > 0)
        ratio = torch.where(work & (z <= 0), y / (y - z).clamp_min(torch.finfo(q.dtype).tiny), float("inf"))
        alpha = ratio.amin(-1, keepdim=True).clamp(0.0, 1.0)
        stepped = y + alpha * (z - y)
        lh_y = torch.where(feasible.unsqueeze(-1), z, stepped)
        lh_work = torch.where(feasible.unsqueeze(-1), work | add, work & (stepped > 0) & ~(alpha == ratio))
        lh_y = lh_y * lh_work
        # Problems that just switched restart Lawson–Hanson from their clamped iterate.
        lh_y = torch.where(switch.unsqueeze(-1), y, lh_y)
        lh_work = torch.where(switch.unsqueeze(-1), start_work, lh_work)
        lawson = lawson | switch
        added = torch.where(feasible.unsqueeze(-1) & lawson.unsqueeze(-1) & ~switch.unsqueeze(-1), add, False)
        keep = done.unsqueeze(-1)
        y = torch.where(keep, y, torch.where(lawson.unsqueeze(-1), lh_y, y))
        work = torch.where(keep, work, torch.where(lawson.unsqueeze(-1), lh_work, pivot_work))
    return solution, done


def refined_nnqp(a: torch.Tensor, q: torch.Tensor, reg: torch.Tensor, max_iter: int, refine: int,
                 qscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``nnqp`` for A = Â + diag(reg), followed by ``refine`` proximal-point steps.

    Each step solves min ½yᵀÂy − qᵀy + ½‖y − y_k‖²_reg, which is the same NNQP with q + reg ⊙ y_k,
    warm-started at y_k: the bias of the regularisation shrinks by a factor reg/(λ + reg) along
    every eigendirection λ of Â per step, so the answer is that of the unregularised problem up
    to rounding wherever that one is well defined.
    """
    y, converged = nnqp(a, q, None, max_iter, qscale)
    early = can_stop_early(q)
    for _ in range(refine):
        previous = y
        y, again = nnqp(a, q + reg * y, y, max_iter, qscale)
        converged = converged & again
        # A step that barely moved y leaves a bias smaller still along well-conditioned directions
        # (each step shrinks it by ε/(λ+ε)); along near-null ones it does not matter, since they
        # hardly change Jᵀy. Where reading that is free, stop there.
        if early and all_done((y - previous).abs() <= 1e-9 * y.abs().amax(-1, keepdim=True)):
            break
    return y, converged


def _nnqp_impl(a: torch.Tensor, q: torch.Tensor, reg: torch.Tensor, max_iter: int, refine: int,
            qscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``refined_nnqp`` as one opaque operator, so that compiled graphs hold it as a single node."""
    y, converged = refined_nnqp(a, q, reg, max_iter, refine, qscale)
    return guard(y, converged, "the nonnegative QP solver", a), converged


def _nnqp_fake(a: torch.Tensor, q: torch.Tensor, reg: torch.Tensor, max_iter: int, refine: int,
               qscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), q.new_empty(q.shape[:1], dtype=torch.bool)


nnqp_op = opaque("nnqp", _nnqp_fake)(_nnqp_impl)


def scaled_gramian(g: torch.Tensor, eps: float, zero_eps: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (A, s, reg) with A = S G S + diag(reg), S = diag(s), s_i = 1/sqrt(G_ii) (1 for zero rows).

    A has unit diagonal (plus eps), so tasks whose gradients differ by many orders of magnitude are
    solved with the same relative accuracy, and the eps regularisation makes A positive definite.
    Zero rows are decoupled from the rest, and get ``zero_eps`` (default ``eps``) on the diagonal.
    """
    diag = torch.diagonal(g)
    pos = diag > 0
    s = torch.where(pos, torch.rsqrt(torch.where(pos, diag, 1.0)), 1.0)
    a = g * s.unsqueeze(-1) * s.unsqueeze(-2)
    reg = torch.full_like(diag, eps).masked_fill(~pos, eps if zero_eps is None else zero_eps)
    return a + torch.diag(reg), s, reg
