"""Newton's method for the positive root of  A u = c ⊙ u^(−β)  as one Triton program: FairGrad and Nash-MTL.

The algorithm of ``gradagg.solvers.barrier`` (C: ``barrier_solve`` in ``gradagg/_kkt.c``), step for
step: from u0 > 0, a Newton step on the strictly convex h(u) = ½ uᵀAu − Σ c_i φ(u_i), φ' = u^(−β),
then a backtracking line search over the lengths 1, ½, …, 2^(−30) (Armijo's test, trials that
leave u > 0 only); near the root, where Armijo's test is rounding noise, the full step is taken
whenever it halves the componentwise backward error

    res(u) = max_i |(Au)_i − c_i u_i^(−β)| / ((|A| u)_i + c_i u_i^(−β)),

or when nothing passed Armijo's test but it still lowers res. The iteration stops at res ≤ 1e-14, when
neither step helps (stalled), or after ``max_iter`` steps, and returns the best iterate seen;
a best backward error above 1e-6 (unconverged), or non-finite input, gives NaN.

The two problems, like C's ``fairgrad_solve`` and ``nash_solve`` (``scale_gramian``): A = S G S +
diag(reg) with s_i = 1/√G_ii and reg_i = 1e-15, while a zero row (G_ii = 0) gets s_i = 1 and reg_i = 1,
so that its equation reads u_i = c_i u_i^(−β) (u_i = 1) and its weight is 0.

- FairGrad: c = s^(1−β), u0 = c^(1/(1+β)), w = S u.
- Nash-MTL: β = 1, c = 1, u0 = previous / s where every previous α_i > 0 (else 1), α = S u.

There is no float64 division or square root (``_float``: ptxas spills around their slow-path
calls), and powers are exp(p log u) (Triton's interpreter has no libdevice ``pow``) except for the
exponents 0, −1 and −2 that Nash-MTL and FairGrad's default α = 1 use, which take ``recip``; the
general ones carry a relative error of about |p log u| ulp, well below the residual tolerance.
Vectors are reductions over the tile's axis 0 (``vecmat``), which hold a KP-vector in the fewest
registers per thread.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import barrier
from . import padded, triton_op, warps
from ._float import finite, nan, recip, rsqrt
from ._tile import col, entry, load_square, load_vector, row, vecmat
from .aot import Kernel

#: FairGrad's and Nash-MTL's regularisation of the scaled Gramian (``BARRIER_EPS`` in C).
EPS = tl.constexpr(1e-15)
RESIDUAL_TOL = tl.constexpr(barrier.RESIDUAL_TOL)
CONVERGED_TOL = tl.constexpr(barrier.CONVERGED_TOL)
#: Line-search trials: lengths 2^0 … 2^(−30), as ``_STEPS`` in barrier.py and TRIALS in C.
TRIALS = tl.constexpr(31)
#: The smallest normal float64 (C's DBL_MIN): the full step's coordinates are clamped to it for res.
DBL_MIN = tl.constexpr(2.2250738585072014e-308)


@triton.jit
def power(u: tl.tensor, p: tl.tensor) -> tl.tensor:
    """u^p for u > 0 and a scalar p: 1 for p = 0, ``recip(u)`` (within an ulp) for p = −1 and its
    square for p = −2, exp(p log u) otherwise."""
    inv = recip(u)
    return tl.where(p == 0.0, 1.0, tl.where(p == -1.0, inv, tl.where(p == -2.0, inv * inv, tl.exp(p * tl.log(u)))))


@triton.jit
def spd_solve(m: tl.tensor, diag: tl.tensor, z: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """x with M x = z, for M symmetric positive definite with the diagonal ``diag`` and the
    off-diagonal entries of the tile m (whose own diagonal is not read), padded beyond k with a
    decoupled diagonal (where z is 0).

    Gauss–Jordan elimination without pivoting, stable on such M (its pivots are those of LDLᵀ).
    The diagonal is carried as a vector, so no loop-invariant diagonal mask of the tile is live
    across the iterations; the loop runs to k, not KP, as the padding needs no pivots."""
    r = tl.arange(0, KP)
    for p in range(0, k):
        pivot = entry(diag, p, KP)
        inv = recip(pivot)
        prow = tl.where(r == p, pivot, row(m, p, KP)) * inv
        pcol = tl.where(r == p, 0.0, col(m, p, KP))
        zp = entry(z, p, KP) * inv
        m = tl.where(r[:, None] == p, prow[None, :], m - pcol[:, None] * prow[None, :])
        diag = tl.where(r == p, 1.0, diag - pcol * prow)
        z = tl.where(r == p, zp, z - pcol * zp)
    return z


@triton.jit
def residual(a: tl.tensor, c: tl.tensor, u: tl.tensor, beta: tl.tensor) -> tl.tensor:
    """The componentwise backward error (C ``residual``); NaN when any row gives NaN. (The padding
    rows are exact roots, A_pp = c_p = u_p = 1: their error is 0.)"""
    rhs = c * power(u, -beta)
    err = tl.abs(vecmat(u, a) - rhs) * recip(vecmat(u, tl.abs(a)) + rhs)
    # Reduce explicitly: max() treats NaN differently on the device and in the interpreter.
    return tl.where(tl.sum((err != err).to(tl.int32), 0) > 0, nan(), tl.max(err, 0))


@triton.jit
def objective(a: tl.tensor, c: tl.tensor, u: tl.tensor, beta: tl.tensor, inside: tl.tensor) -> tl.tensor:
    """h(u) = ½ uᵀAu − Σ c_i φ(u_i), φ = log for β = 1, else u^(1−β)/(1−β) (C ``objective``), over
    the rows where the float mask ``inside`` is 1."""
    quad = tl.sum(vecmat(u, a) * u * inside, 0)
    phi = tl.where(beta == 1.0, tl.log(u), power(u, 1.0 - beta) * recip(tl.where(beta == 1.0, 1.0, 1.0 - beta)))
    return 0.5 * quad - tl.sum(c * phi * inside, 0)


@triton.jit
def positive(x: tl.tensor) -> tl.tensor:
    """1 if every entry of x is > 0, else 0 (an int32: flags kept as i1 across loops get spilled)."""
    return (tl.sum(tl.where(x > 0, 0, 1), 0) == 0).to(tl.int32)


@triton.jit
def armijo(a: tl.tensor, c: tl.tensor, trial: tl.tensor, beta: tl.tensor, inside: tl.tensor, h_now: tl.tensor,
           bound: tl.tensor) -> tl.tensor:
    """1 if the trial point is positive and h(trial) ≤ h_now + bound (bound = 1e-4 · length · slope)."""
    return positive(trial) & (objective(a, c, trial, beta, inside) <= h_now + bound).to(tl.int32)


@triton.jit
def solve(a: tl.tensor, c: tl.tensor, u0: tl.tensor, scale: tl.tensor, fallback: tl.tensor, beta: tl.tensor,
          max_iter: tl.tensor, k: tl.tensor, inside: tl.tensor, skip: tl.tensor,
          KP: tl.constexpr) -> tuple[tl.tensor, tl.tensor]:
    """(scale ⊙ u for the best iterate u of Newton's method from u0, its backward error)
    (C ``barrier_solve``). ``skip`` (an int32 flag: a problem known to be non-finite, or not to be
    solved) returns (``fallback``, −1) without iterating. ``inside`` is 1.0 on the k rows, 0.0 on
    the padding.

    The scaled iterate is carried, not u, so that nothing from before the loop is needed after it:
    ptxas spills registers live across the loops (around the slow-path calls of their warp shuffles)."""
    r = tl.arange(0, KP)
    diag_a = tl.sum(tl.where(r[:, None] == r[None, :], a, 0.0), 0)
    u = u0
    best = tl.where(skip != 0, fallback, scale * u0)
    res = tl.where(skip != 0, -1.0, residual(a, c, u0, beta))
    best_res = res
    done = skip | (res <= RESIDUAL_TOL).to(tl.int32)
    it = 0
    while (it < max_iter) & (done == 0):
        grad = vecmat(u, a) - c * power(u, -beta)
        # The Hessian A + diag(β c u^(−β−1)) is symmetric positive definite: Gauss–Jordan without
        # pivoting is stable on it. A zero pivot (C's lu_solve reports a singular matrix) gives an
        # all-NaN step, as in C.
        step = spd_solve(a, diag_a + beta * c * power(u, -beta - 1.0), grad, k, KP)
        singular = tl.sum((~finite(step)).to(tl.int32), 0) > 0
        step = -tl.where(singular, nan(), step)
        slope = tl.sum(grad * step, 0)
        h_now = objective(a, c, u, beta, inside)
        full = u + step
        accepted = armijo(a, c, full, beta, inside, h_now, 1e-4 * slope)
        chosen = full
        length = tl.full([], 1.0, tl.float64)
        t = 1
        while (t < TRIALS) & (accepted == 0):
            length = length * 0.5
            trial = u + length * step
            accepted = armijo(a, c, trial, beta, inside, h_now, 1e-4 * length * slope)
            chosen = tl.where(accepted != 0, trial, chosen)
            t += 1
        # Near the root Armijo's test is rounding noise: take the full step when it halves the
        # residual, or when nothing passed the test but it still lowers the residual.
        res_full = residual(a, c, tl.where(full > DBL_MIN, full, DBL_MIN), beta)
        polish = (positive(full) != 0) & ((res_full <= 0.5 * res) | ((accepted == 0) & (res_full < res)))
        chosen = tl.where(polish, full, chosen)
        # Neither: rounding noise, u is as good as it gets.
        stalled = (accepted == 0) & ~polish
        u = tl.where(stalled, u, chosen)
        res = residual(a, c, u, beta)
        # At the rounding floor Armijo's test may wander: keep the best iterate.
        improved = res < best_res
        best = tl.where(improved, scale * u, best)
        best_res = tl.where(improved, res, best_res)
        done = (stalled | (res <= RESIDUAL_TOL)).to(tl.int32)
        it += 1
    return best, best_res


@triton.jit
def _barrier_kernel(g_ptr: tl.tensor, prev_ptr: tl.tensor, flag_ptr: tl.tensor, out_ptr: tl.tensor, k: tl.tensor,
                    beta: tl.float64, max_iter: tl.tensor, KP: tl.constexpr, NASH: tl.constexpr) -> None:
    """FairGrad's w (C ``fairgrad_solve``), or with NASH Nash-MTL's α (C ``nash_solve``, β = 1),
    warm-started from prev and returned as prev where the flag (a bool) is false."""
    # A float64 scalar also in the interpreter, which would make a bare Python float a float32.
    beta = tl.zeros([], tl.float64) + beta
    r = tl.arange(0, KP)
    inside = r < k
    g = load_square(g_ptr, k, KP)
    ok = (tl.sum((~finite(g)).to(tl.int32)) == 0).to(tl.int32)
    # s_i = 1/√G_ii, or 1 for a zero row (C ``scale_gramian``); padding: A_pp = 1, c_p = 1, u_p = 1,
    # an exact root that stays one (its gradient and step are exactly 0).
    d = tl.sum(tl.where(r[:, None] == r[None, :], g, 0.0), 0)
    nonzero = (d > 0) & inside
    s = tl.where(nonzero, rsqrt(d), 1.0)
    reg = tl.where(inside, tl.where(nonzero, EPS, 1.0), 0.0)
    a = g * s[:, None] * s[None, :] + tl.where(r[:, None] == r[None, :], reg[None, :], 0.0)
    c = power(s, 1.0 - beta)
    if NASH:
        prev = load_vector(prev_ptr, k, KP, 1.0)
        have = tl.sum((inside & ~(prev > 0)).to(tl.int32), 0) == 0
        u0 = tl.where(have & nonzero, prev * recip(s), 1.0)
        go = tl.load(flag_ptr) != 0
        skip = (ok == 0) | ~go
        fallback = tl.where(go, nan(), prev)
    else:
        u0 = power(c, recip(1.0 + beta))
        skip = ok == 0
        fallback = tl.full([KP], 0.0, tl.float64) + nan()
    # w = S u (0 on zero rows); a skipped problem gives NaN, or prev where Nash-MTL keeps it.
    w, res = solve(a, c, u0, tl.where(nonzero, s, 0.0), fallback, beta, max_iter, k, inside.to(tl.float64),
                   skip.to(tl.int32), KP)
    w = tl.where(res <= CONVERGED_TOL, w, nan())  # a skipped problem's res, −1, keeps its fallback
    tl.store(out_ptr + r, w, mask=inside)


def _warps(kp: int) -> int:
    """Warps per program: one up to 16 x 16 tiles, whose reductions then stay inside a warp, except
    4 at K = 8, where ptxas spills for sm_90 with one or two (found with ``aot``); ``gpu.warps`` from
    K = 32 on."""
    return 4 if kp == 8 else 1 if kp <= 16 else warps(kp)


@triton_op("gradagg::tr_fairgrad", mutates_args=())
def fairgrad(g: torch.Tensor, beta: float, max_iter: int) -> torch.Tensor:
    """FairGrad's w > 0 with (G + ε diag G) w = w^(−β) for the K x K float64 Gramian g (zero rows get 0),
    as C ``fairgrad_solve``; NaN where Newton's method does not converge within max_iter steps or g is
    not finite."""
    k = g.shape[-1]
    g = g.contiguous()
    out = torch.empty(k, dtype=torch.float64, device=g.device)
    wrap_triton(_barrier_kernel)[(1,)](g, g, g, out, k, float(beta), max_iter, KP=padded(k), NASH=False,
                                       num_warps=_warps(padded(k)))
    return out


@triton_op("gradagg::tr_nash", mutates_args=())
def nash(g: torch.Tensor, previous: torch.Tensor, recompute: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Nash-MTL's α > 0 with α ⊙ ((G + ε diag G) α) = 1 (zero rows get 0), warm-started from ``previous``
    (as C ``nash_solve``), or ``previous`` itself where the 0-dim bool ``recompute`` is false (read in
    the kernel: no host sync). NaN where the solve does not converge or g is not finite."""
    k = g.shape[-1]
    g, previous = g.contiguous(), previous.contiguous()
    out = torch.empty(k, dtype=torch.float64, device=g.device)
    wrap_triton(_barrier_kernel)[(1,)](g, previous, recompute, out, k, 1.0, max_iter, KP=padded(k), NASH=True,
                                       num_warps=_warps(padded(k)))
    return out


_SIGNATURE = {"g_ptr": "*fp64", "prev_ptr": "*fp64", "flag_ptr": "*u1", "out_ptr": "*fp64", "k": "i32",
              "beta": "fp64", "max_iter": "i32", "KP": "constexpr", "NASH": "constexpr"}
AOT = [
    Kernel(_barrier_kernel, {**_SIGNATURE, "prev_ptr": "*fp64", "flag_ptr": "*fp64"}, {"NASH": False}, _warps),
    Kernel(_barrier_kernel, _SIGNATURE, {"NASH": True}, _warps),
]
