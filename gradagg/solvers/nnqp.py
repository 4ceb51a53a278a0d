"""Exact solver for batches of nonnegative convex quadratic programs (NNQPs).

    minimise  ½ yᵀ A y − qᵀ y   subject to   y ≥ 0,      for each row q of Q,

with A symmetric positive definite (K x K) and shared by the batch. This is the linear
complementarity problem  y ≥ 0,  μ = A y − q ≥ 0,  yᵀμ = 0,  which the block principal pivoting
method of Júdice & Pires (1994), as used for NNLS by Kim & Park (2011), solves exactly: each
iteration solves the KKT equations on a guessed free set F (y_F = A_FF⁻¹ q_F, y = 0 elsewhere) and
exchanges every variable that violates a sign condition. Should the number of violations stop
falling for three iterations, it falls back to Murty's single-exchange rule, which terminates for any
positive definite A. Every problem of the batch runs the same masked iterations, so there is no
data-dependent control flow; see ``_loop``.

The answer is exact up to rounding: the returned y solves the KKT system of its free set, whose
sign conditions hold to a relative tolerance of about 1e-13.
"""

from __future__ import annotations

import torch

from ._loop import all_done, can_stop_early

#: Relative tolerance of the sign tests, a few ulps of float64 over K terms.
SIGN_TOL = 1e-13


def default_budget(k: int) -> int:
    """The iteration budget: block pivoting needs a handful, Murty's rule at most a few per variable."""
    return 4 * k + 20


def _masked_solve(a: torch.Tensor, q: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """Solves A_FF y_F = q_F for each row's free set F, with y = 0 off F."""
    f = free.to(a.dtype)
    m = a * (f.unsqueeze(-1) * f.unsqueeze(-2)) + torch.diag_embed(1.0 - f)
    chol, _ = torch.linalg.cholesky_ex(m)
    return torch.cholesky_solve((q * f).unsqueeze(-1), chol).squeeze(-1)


def nnqp(
    a: torch.Tensor, q: torch.Tensor, free0: torch.Tensor | None = None, max_iter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solves the batch of NNQPs; returns (y [B, K], converged [B])."""
    b, k = q.shape
    budget = default_budget(k) if max_iter is None else max_iter
    free = (q > 0) if free0 is None else free0.clone()
    index = torch.arange(1, k + 1, device=q.device)
    best = torch.full((b,), k + 1, dtype=torch.int64, device=q.device)
    backups = torch.full((b,), 3, dtype=torch.int64, device=q.device)
    done = torch.zeros(b, dtype=torch.bool, device=q.device)
    tol_mu = SIGN_TOL * q.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
    early = can_stop_early(q)
    y = torch.zeros_like(q)
    for _ in range(budget):
        y = _masked_solve(a, q, free)
        mu = y @ a - q
        tol_y = SIGN_TOL * y.abs().amax(-1, keepdim=True)
        bad = (free & (y < -tol_y)) | (~free & (mu < -tol_mu))
        nbad = bad.sum(-1)
        done = nbad == 0
        if early and all_done(done):
            break
        improved = nbad < best
        block = improved | (backups > 0)
        backups = torch.where(improved, 3, torch.where(block, backups - 1, backups))
        best = torch.minimum(best, nbad)
        last = torch.nn.functional.one_hot((bad * index).argmax(-1), k).bool() & bad
        swap = torch.where(block.unsqueeze(-1), bad, last) & ~done.unsqueeze(-1)
        free = free ^ swap
    return y.clamp_min(0.0), done


@torch.library.custom_op("gradagg::nnqp", mutates_args=())
def nnqp_op(a: torch.Tensor, q: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``nnqp`` as one opaque operator, so that compiled graphs hold it as a single node."""
    return nnqp(a, q, None, max_iter)


@nnqp_op.register_fake
def _(a: torch.Tensor, q: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), q.new_empty(q.shape[:1], dtype=torch.bool)


def scaled_gramian(g: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (A, s) with A = S G S + eps I and S = diag(s), s_i = 1 / sqrt(G_ii) (1 for zero rows).

    A has unit diagonal (plus eps), so tasks whose gradients differ by many orders of magnitude are
    solved with the same relative accuracy, and the eps regularisation makes A positive definite.
    """
    diag = torch.diagonal(g)
    pos = diag > 0
    s = torch.where(pos, torch.rsqrt(torch.where(pos, diag, 1.0)), 1.0)
    a = g * s.unsqueeze(-1) * s.unsqueeze(-2)
    return a + eps * torch.eye(g.shape[-1], dtype=g.dtype, device=g.device), s
