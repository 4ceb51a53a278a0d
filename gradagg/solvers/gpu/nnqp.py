"""The nonnegative QP and the weightings built on it, as Triton kernels: MGDA, UPGrad/DualProj, CAGrad.

One device function, ``nnqp``, solves  min ½ yᵀAy − qᵀy  subject to  y ≥ 0  (A symmetric positive
definite, in unit-diagonal scaling) exactly, following ``nnqp_one`` of ``gradagg/_kkt.c`` step for
step: block principal pivoting exchanges every variable that violates a sign condition, and after
three iterations without fewer violations hands over to Lawson–Hanson, which keeps y feasible and
blocks a variable that comes straight back at ≤ 0 after being added (anti-cycling). The sign tests
on μ = Ay − q use the componentwise backward-error tolerance SIGN_TOL · (|A||z| + qscale + the
rounding of the unit rows), as in ``solvers.active_set.nnqp``. ``refined`` adds the proximal steps
of ``refined_nnqp``. The kernels port ``mgda_solve``, ``dual_cone_solve`` and ``w_cagrad``
(``cagrad_solve``, then ``cagrad_fallback``) with the same eps, refinement and budgets.

Each problem is one program holding the padded KP x KP tile of A in registers; nothing is read back
to the host. Non-finite input, a working set whose A_FF is not positive definite (where C's
Cholesky factorisation fails) and a problem that runs out of its budget all give NaN.

Vectors are laid out along the tile's columns (``vecmat``, ``diag``, ``row``: reductions over
axis 0), which holds a KP-vector in the fewest registers per thread; there is no float64 division
or square root (see ``_float``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._methods import cagrad as _cagrad
from ..._methods import dual_cone as _dual_cone
from ..._methods import mgda as _mgda
from ..active_set import SIGN_TOL, default_budget
from . import aot, padded, triton_op, warps
from ._float import div, f64, finite, inf, nan, recip, rsqrt, sqrt
from ._tile import entry, load_square, load_vector, row, store_vector, vecmat

_SIGN_TOL = tl.constexpr(SIGN_TOL)
_TINY = tl.constexpr(torch.finfo(torch.float64).tiny)  # DBL_MIN
_REFINE = tl.constexpr(_mgda.REFINE)
_MGDA_EPS = tl.constexpr(_mgda.EPS)
_MGDA_ZERO_EPS = tl.constexpr(1e-300)  # _mgda_impl's zero_eps: a zero gradient makes w exactly that vertex
_CONE_EPS = tl.constexpr(_dual_cone.EPS)
_CAGRAD_EPS = tl.constexpr(_cagrad.EPS)

assert _mgda.REFINE == _dual_cone.REFINE


def _warps(kp: int) -> int:
    """Warps per program: one or two up to 16 x 16 tiles, whose reductions then stay inside warps;
    ``gpu.warps`` above."""
    return 1 if kp <= 8 else 2 if kp <= 16 else warps(kp)


# ------------------------------------------------------------------------------------------------
# Generic device functions (any kernel may use them)

@triton.jit
def full(value: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """A float64 KP-vector of ``value``, exact (tl.where rounds a Python float to float32)."""
    return tl.full([KP], value, tl.float64)


@triton.jit
def diag(a: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """The diagonal of the tile, laid out along its columns (like ``vecmat``'s results)."""
    r = tl.arange(0, KP)
    return tl.sum(tl.where(r[:, None] == r[None, :], a, 0.0), 0)


@triton.jit
def all_finite(a: tl.tensor) -> tl.tensor:
    """Whether every entry of the tile is finite."""
    return tl.sum(tl.sum(tl.where(finite(a), 0, 1), 1), 0) == 0


@triton.jit
def solve_on(a: tl.tensor, u: tl.tensor, v: tl.tensor, free: tl.tensor,
             KP: tl.constexpr) -> tuple[tl.tensor, tl.tensor, tl.tensor]:
    """(x, y, ok): A_FF x_F = u_F and A_FF y_F = v_F on the free set F (an int1 KP-vector), 0 off F.

    Symmetric Gaussian elimination without pivoting (LDLᵀ, reading only the upper triangle as a
    Cholesky factorisation reads one), then back substitution: backward stable for A_FF positive
    definite, unlike Gauss–Jordan. ``ok`` says every pivot was positive, i.e. A_FF is numerically
    positive definite (where C's ``masked_factor`` fails, ok is false). The two right-hand sides
    share the elimination."""
    r = tl.arange(0, KP)
    eye = r[:, None] == r[None, :]
    m = tl.where(free[:, None] & free[None, :], a, tl.where(eye, 1.0, 0.0))
    x = tl.where(free, u, 0.0)
    y = tl.where(free, v, 0.0)
    fails = 0
    inverse = full(0.0, KP)  # 1 / the pivots, for the back substitution
    for p in range(KP):
        prow = row(m, p, KP)
        pivot = entry(prow, p, KP)
        fails += tl.where(pivot > 0.0, 0, 1)
        inv = recip(pivot)
        inverse = tl.where(r == p, inv, inverse)
        # L_ip = U_pi / U_pp below the pivot; the lower triangle of m is never read again.
        low = tl.where(r > p, prow * inv, 0.0)
        m = m - low[:, None] * prow[None, :]
        x = x - low * entry(x, p, KP)
        y = y - low * entry(y, p, KP)
    # Back substitution with U (row p of m from the diagonal on); entries not yet solved are 0.
    for i in range(KP):
        p = KP - 1 - i
        urow = tl.where(r > p, row(m, p, KP), 0.0)
        inv = entry(inverse, p, KP)
        x = tl.where(r == p, (entry(x, p, KP) - tl.sum(urow * x, 0)) * inv, x)
        y = tl.where(r == p, (entry(y, p, KP) - tl.sum(urow * y, 0)) * inv, y)
    return x, y, fails == 0


# ------------------------------------------------------------------------------------------------
# The NNQP

@triton.jit
def nnqp(a: tl.tensor, q: tl.tensor, qscale: tl.tensor, y0: tl.tensor, work: tl.tensor, k: tl.tensor, budget: tl.tensor,
         KP: tl.constexpr) -> tuple[tl.tensor, tl.tensor]:
    """(y, converged) for min ½ yᵀAy − qᵀy, y ≥ 0 (``nnqp_one`` of _kkt.c, ``active_set.nnqp``).

    A is the padded tile in unit-diagonal scaling (identity padding, and q = qscale = 0 there);
    ``qscale`` bounds the size of the terms q was computed from. The search starts from y0 ≥ 0 on
    the working set ``work`` (C: y0 > 0 when warm-started, q > 0 from cold). Block principal
    pivoting, handing over to Lawson–Hanson after three iterations without fewer violations; at
    most ``budget`` iterations. Returns the clamped KKT solution, or 0 and False."""
    r = tl.arange(0, KP)
    real = r < k
    unit = tl.where(diag(a, KP) > 0.5, 1.0, 0.0)  # rows of nonzero gradients: their entries carry eps
    y = tl.where(y0 > 0.0, y0, 0.0)
    # Anti-cycling: a variable added on a descent at the rounding floor can come out of the next
    # solve at ≤ 0; it is blocked until Lawson–Hanson makes progress, and meets a 1000x looser test.
    blocked = r < 0
    added = r < 0
    out = full(0.0, KP)
    lawson = 0
    best = k + 1
    backups = 3
    state = 0  # 0 running, 1 converged, 2 A_FF not positive definite
    it = 0
    while (it < budget) & (state == 0):
        z, _, solved = solve_on(a, q, q, work, KP)
        descent = q - vecmat(z, a)  # −μ: positive where raising y_j from 0 lowers the objective
        noise = tl.sum(tl.abs(z) * unit, 0)
        tol = _SIGN_TOL * (unit * noise + vecmat(tl.abs(z), tl.abs(a)) + qscale) + _TINY
        bar = tl.where(blocked, 1e3 * tol, tol)
        bad = real & ((work & (z < 0.0)) | (~work & (descent > bar)))
        nbad = tl.sum(bad.to(tl.int32), 0)
        out = tl.where(solved & (nbad == 0), tl.where(z > 0.0, z, 0.0), out)
        state = tl.where(solved, tl.where(nbad == 0, 1, 0), 2)
        # Block principal pivoting: exchange every violator while the count keeps improving.
        backups = tl.where(nbad < best, 3, backups - 1)
        best = tl.minimum(best, nbad)
        switch = (lawson == 0) & (backups < 0)
        pivot_work = work ^ bad
        # Lawson–Hanson, from feasible y: take z (positive on S) and add the steepest variable,
        # or step towards z up to the boundary and drop what reached 0.
        y = tl.where(switch, tl.where(work & (z > 0.0), z, 0.0), y)
        start_work = y > 0.0
        feasible = tl.sum((work & (z <= 0.0)).to(tl.int32), 0) == 0
        bounced = tl.sum((added & (z <= 0.0)).to(tl.int32), 0) > 0
        kept = tl.sum((added & (z > 0.0)).to(tl.int32), 0) > 0
        blocked = tl.where(lawson != 0, tl.where(kept, r < 0, blocked | tl.where(bounced, added, r < 0)), blocked)
        # The steepest descent beyond its own tolerance (the first index on ties).
        gain = tl.where(work | blocked | ~real, -inf(), descent - tol)
        top = tl.max(gain, 0)
        add = (r == tl.min(tl.where(gain == top, r, KP), 0)) & (gain > 0.0)
        drop = work & (z <= 0.0)
        ratio = tl.where(drop, div(tl.where(drop, y, 0.0), tl.maximum(y - z, _TINY)), inf())
        alpha = tl.minimum(tl.maximum(tl.min(ratio, 0), 0.0), 1.0)
        stepped = y + alpha * (z - y)
        lh_work = tl.where(feasible, work | add, work & (stepped > 0.0) & (ratio != alpha))
        lh_y = tl.where(lh_work, tl.where(feasible, z, stepped), 0.0)
        # A problem that just switched restarts Lawson–Hanson from its clamped iterate.
        lh_y = tl.where(switch, y, lh_y)
        lh_work = tl.where(switch, start_work, lh_work)
        lawson = tl.where(switch, 1, lawson)
        added = tl.where(feasible & (lawson != 0) & ~switch, add, r < 0)
        y = tl.where(lawson != 0, lh_y, y)
        work = tl.where(lawson != 0, lh_work, pivot_work)
        it += 1
    return out, state == 1


@triton.jit
def refined(a: tl.tensor, q: tl.tensor, eps: tl.tensor, zero_eps: tl.tensor, qscale: tl.tensor, k: tl.tensor,
            budget: tl.tensor, KP: tl.constexpr) -> tuple[tl.tensor, tl.tensor]:
    """(y, converged): ``nnqp`` for A = Â + diag(reg), then up to REFINE proximal-point steps
    (``nnqp_refined`` of _kkt.c, ``active_set.refined_nnqp``), each the same NNQP for q + reg ⊙ y_k
    warm-started at y_k, which removes the regularisation's bias; they stop once a step moves y by
    ≤ 1e-9 of its largest entry. reg is eps on the rows of nonzero gradients (A_ii ≈ 1), zero_eps
    on the others."""
    y = full(0.0, KP)
    centre = q
    start = q > 0.0
    # Flags as int32 (i1 values live across the loops end up spilled from predicate registers).
    ok = tl.where(budget > 0, 1, 0)
    moving = 1
    for step in range(_REFINE + 1):
        # Once a step barely moved y, or one failed, the later steps run no iteration.
        new, converged = nnqp(a, centre, qscale, y, start, k, tl.where((moving != 0) & (ok != 0), budget, 0), KP)
        ok = tl.where(converged | (moving == 0), ok, 0)
        big = tl.max(tl.abs(new), 0)
        moved = tl.sum(tl.where(tl.abs(new - y) <= 1e-9 * big, 0, 1), 0) > 0
        y = tl.where(moving != 0, new, y)
        moving = tl.where((step == 0) | moved, moving, 0)
        centre = q + tl.where(diag(a, KP) > 0.5, full(eps, KP), full(zero_eps, KP)) * y
        start = y > 0.0
    return y, ok != 0


@triton.jit
def scales(d: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """s_i = 1/√d_i for the diagonal d of G (1 for zero rows and the padding)."""
    r = tl.arange(0, KP)
    return tl.where((r < k) & (d > 0.0), rsqrt(tl.where(d > 0.0, d, 1.0)), 1.0)


@triton.jit
def scaled(g: tl.tensor, eps: tl.tensor, zero_eps: tl.tensor, k: tl.tensor,
           KP: tl.constexpr) -> tuple[tl.tensor, tl.tensor]:
    """(A, s) of ``scale_gramian`` (``active_set.scaled_gramian``): A = S G S + diag(reg),
    s_i = 1/√G_ii (1 for zero rows), reg_i = eps (zero_eps for zero rows); identity padding.
    S G S is formed as G_ij (s_i s_j), exactly symmetric for a symmetric G."""
    r = tl.arange(0, KP)
    real = r < k
    d = diag(g, KP)
    s = scales(d, k, KP)
    reg = tl.where(d > 0.0, full(eps, KP), full(zero_eps, KP))
    eye = r[:, None] == r[None, :]
    inside = real[:, None] & real[None, :]
    a = tl.where(inside, g * (s[:, None] * s[None, :]) + tl.where(eye, reg[None, :], 0.0), tl.where(eye, 1.0, 0.0))
    return a, s


@triton.jit
def cone_row(g_ptr: tl.tensor, u: tl.tensor, k: tl.tensor, budget: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """v = argmin_{v ≥ u} vᵀGv for the k x k G at g_ptr, one row of ``dual_cone_solve``: with (A, s)
    the scaling of G (eps = 1e-10 on every row) and b = S⁻¹u, v = S(z + b) for z the refined NNQP
    of A and q = −Aᵀb + eps b (the proximal steps centre on y = z + b). NaN where unsolved, or for
    non-finite G or u."""
    r = tl.arange(0, KP)
    g = load_square(g_ptr, k, KP)
    usable = all_finite(g) & (tl.sum(tl.where(finite(u), 0, 1), 0) == 0)
    a, s = scaled(g, _CONE_EPS, _CONE_EPS, k, KP)
    unit = tl.where((r < k) & (diag(a, KP) > 0.5), 1.0, 0.0)
    bound = div(u, s)
    spread = tl.sum(tl.abs(bound) * unit, 0)
    q = _CONE_EPS * bound - vecmat(bound, a)
    qscale = unit * spread + tl.abs(q)  # the rounding of A's entries in Aᵀb
    z, ok = refined(a, q, _CONE_EPS, _CONE_EPS, qscale, k, tl.where(usable, budget, 0), KP)
    # s and b again from G's diagonal, the same numbers, rather than kept live through the loops.
    s = scales(tl.load(g_ptr + r * (k + 1), mask=r < k, other=0.0), k, KP)
    return tl.where(ok, (z + div(u, s)) * s, nan())


@triton.jit
def quad(g: tl.tensor, x: tl.tensor) -> tl.tensor:
    """xᵀGx."""
    return tl.sum(vecmat(x, g) * x, 0)


# ------------------------------------------------------------------------------------------------
# Kernels

@triton.jit
def mgda_kernel(g_ptr: tl.tensor, w_ptr: tl.tensor, k: tl.tensor, budget: tl.tensor, KP: tl.constexpr) -> None:
    """w = argmin_{w ∈ Δ} wᵀGw (``mgda_solve``): w = Sy / Σ Sy for the refined NNQP of A = SGS + εI
    and q = s (ε = 1e-10, 1e-300 on zero rows), each NNQP within ``budget`` iterations."""
    r = tl.arange(0, KP)
    g = load_square(g_ptr, k, KP)
    a, s = scaled(g, _MGDA_EPS, _MGDA_ZERO_EPS, k, KP)
    q = tl.where(r < k, s, 0.0)
    y, ok = refined(a, q, _MGDA_EPS, _MGDA_ZERO_EPS, q, k, tl.where(all_finite(g), budget, 0), KP)
    v = q * y
    store_vector(w_ptr, tl.where(ok, div(v, tl.sum(v, 0)), nan()), k, KP)


@triton.jit
def dual_cone_kernel(g_ptr: tl.tensor, lower_ptr: tl.tensor, out_ptr: tl.tensor, k: tl.tensor, budget: tl.tensor,
                     KP: tl.constexpr) -> None:
    """Row ``program_id(0)`` of ``dual_cone_solve``: argmin_{v ≥ u} vᵀGv for the row u of lower."""
    p = tl.program_id(0)
    u = load_vector(lower_ptr + p * k, k, KP, 0.0)
    store_vector(out_ptr + p * k, cone_row(g_ptr, u, k, budget, KP), k, KP)


@triton.jit
def cagrad_kernel(g_ptr: tl.tensor, w_ptr: tl.tensor, k: tl.tensor, c: tl.float64, max_outer: tl.tensor,
                  budget: tl.tensor, KP: tl.constexpr) -> None:
    """CAGrad's weights w = 1/K + r Su / ‖Jᵀ Su‖ before the degenerate case (``cagrad_solve``).

    For u(λ) the NNQP of A = S Gn S + εI (Gn = G / max G_ii, ε = 1e-12) and q = S(λ1 − b),
    b = Gn1/K, ψ(λ) = uᵀAu increases to r² = c²‖g0‖²; on the free set of u(λ), ψ is a quadratic in
    λ whose root is taken inside the bracket of known values, bisection otherwise: at most
    ``max_outer`` steps, each NNQP within ``budget`` iterations."""
    r = tl.arange(0, KP)
    real = r < k
    eye = r[:, None] == r[None, :]
    inside = real[:, None] & real[None, :]
    kf = f64(k)
    c = f64(c)  # already float64 when compiled; a Python float in the interpreter
    g = load_square(g_ptr, k, KP)
    ok = all_finite(g)
    peak = tl.maximum(tl.max(tl.where(real, diag(g, KP), 0.0), 0), _TINY)
    gn = tl.where(inside, div(g, peak), tl.where(eye, 1.0, 0.0))
    dn = diag(gn, KP)
    b = tl.where(real, div(tl.sum(gn, 0), kf), 0.0)
    root_dn = tl.where(real, sqrt(tl.maximum(dn, 0.0)), 0.0)
    radius = div(c * sqrt(tl.maximum(tl.sum(b, 0), 0.0)), sqrt(kf))
    rr = radius * radius
    sc = tl.where(dn > 0.0, rsqrt(tl.where(dn > 0.0, dn, 1.0)), 1.0)
    a = gn * (sc[:, None] * sc[None, :]) + tl.where(eye, _CAGRAD_EPS, 0.0)
    sb = sc * b
    bsize = root_dn * div(tl.sum(root_dn, 0), kf)  # bounds |b_i|
    lo = tl.min(tl.where(real, b, inf()), 0)
    hi = inf()
    lam = lo + 1.0
    y = full(0.0, KP)
    support = r < 0
    done = tl.where(rr <= 0.0, 1, 0)
    it = 0
    while (it < max_outer) & (done == 0) & ok:
        q = tl.where(real, sc * (lam - b), 0.0)
        qscale = tl.where(real, sc * (tl.abs(lam) + bsize), 0.0)
        new, converged = nnqp(a, q, qscale, y, y > 0.0, k, budget, KP)
        psi = quad(a, new)
        free = new > 0.0
        below = psi < rr
        lo = tl.where(below, lam, lo)
        hi = tl.where(below, hi, lam)
        # The root of ψ on the current free set: ψ(λ) = λ² αᵀs − 2λ αᵀ(sb) + βᵀ(sb).
        ab0, ab1, solved = solve_on(a, sc, sb, free, KP)
        ok = converged & solved
        qa = tl.sum(ab0 * sc, 0)
        qb = tl.sum(ab0 * sb, 0)
        qc = tl.sum(ab1 * sb, 0)
        disc = qb * qb - qa * (qc - rr)
        root = div(qb + sqrt(tl.maximum(disc, 0.0)), qa)
        within = (disc >= 0.0) & (qa > 0.0) & (root > lo) & (root < hi)
        # Exact once ψ(λ) = r², or once λ is the root of the piece it lies on.
        same = tl.sum((free != support).to(tl.int32), 0) == 0
        settled = same & (tl.abs(root - lam) <= 1e-13 * (tl.abs(lam) + tl.abs(lo) + 1.0))
        done = tl.where((tl.abs(psi - rr) <= 1e-12 * rr) | settled, 1, 0)
        y = new
        support = free
        bisect = tl.where(finite(hi), 0.5 * (lo + hi), lo + 2.0 * tl.maximum(lam - lo, 1.0))
        lam = tl.where(done != 0, lam, tl.where(within, root, bisect))
        it += 1
    u = sc * y
    norm_sq = tl.maximum(quad(gn, u), 0.0)
    scale = tl.where(norm_sq <= 0.0, 0.0, radius * rsqrt(tl.maximum(norm_sq, _TINY)))
    w = div(1.0, kf) + scale * u
    store_vector(w_ptr, tl.where(ok & (done != 0), w, nan()), k, KP)


@triton.jit
def cagrad_fallback_kernel(g_ptr: tl.tensor, w_ptr: tl.tensor, out_ptr: tl.tensor, k: tl.tensor, c: tl.float64,
                           divisor: tl.float64, budget: tl.tensor, KP: tl.constexpr) -> None:
    """CAGrad's degenerate case, then the division (``cagrad_fallback``, end of ``w_cagrad``).

    Where Jᵀw* = 0 every d of the ball with min_i g_i·d = 0 is optimal; the nearest to g0 is g0
    projected onto the dual cone (``cone_row`` of the mean), which replaces w where it lies in the
    ball and beats w on min_i (Gw)_i by more than the rounding of the largest terms."""
    r = tl.arange(0, KP)
    real = r < k
    kf = f64(k)
    c = f64(c)
    w = load_vector(w_ptr, k, KP, 0.0)
    mean = tl.where(real, div(1.0, kf), 0.0)
    usable = tl.sum(tl.where(finite(w), 0, 1), 0) == 0  # w is NaN where the search failed
    cone = cone_row(g_ptr, mean, k, tl.where(usable, budget, 0), KP)
    g = load_square(g_ptr, k, KP)
    g0 = quad(g, mean)
    in_ball = quad(g, cone - mean) <= c * c * g0 * (1.0 + 1e-9)
    unit = tl.max(tl.where(real, diag(g, KP), -inf()), 0) * tl.maximum(g0, 0.0)
    low_cone = tl.min(tl.where(real, vecmat(cone, g), inf()), 0)
    low_w = tl.min(tl.where(real, vecmat(w, g), inf()), 0)
    better = low_cone > low_w + 1e-9 * (1.0 + c) * sqrt(unit)
    w = div(tl.where(in_ball & better & (c > 0.0), cone, w), f64(divisor))
    store_vector(out_ptr, w + (cone - cone), k, KP)  # NaN where the projection failed


# ------------------------------------------------------------------------------------------------
# Launchers

def launch_mgda(g: torch.Tensor, budget: int) -> torch.Tensor:
    """``mgda_kernel`` on the contiguous float64 g, each NNQP within ``budget`` iterations."""
    k = g.shape[-1]
    w = torch.empty(k, dtype=torch.float64, device=g.device)
    kp = padded(k)
    torch.library.wrap_triton(mgda_kernel)[(1,)](g, w, k, budget, KP=kp, num_warps=_warps(kp))
    return w


def launch_dual_cone(g: torch.Tensor, lower: torch.Tensor, budget: int) -> torch.Tensor:
    """``dual_cone_kernel``, one program per row of lower [B, K]; returns [B, K]."""
    b, k = lower.shape
    out = torch.empty((b, k), dtype=torch.float64, device=g.device)
    kp = padded(k)
    torch.library.wrap_triton(dual_cone_kernel)[(b,)](g, lower, out, k, budget, KP=kp, num_warps=_warps(kp))
    return out


def launch_cagrad(g: torch.Tensor, c: float, max_outer: int, divisor: float, budget: int) -> torch.Tensor:
    """The search, then the degenerate case and the division: two launches."""
    k = g.shape[-1]
    w = torch.empty(k, dtype=torch.float64, device=g.device)
    out = torch.empty_like(w)
    kp = padded(k)
    torch.library.wrap_triton(cagrad_kernel)[(1,)](g, w, k, c, max_outer, budget, KP=kp, num_warps=_warps(kp))
    torch.library.wrap_triton(cagrad_fallback_kernel)[(1,)](g, w, out, k, c, divisor, budget, KP=kp,
                                                            num_warps=_warps(kp))
    return out


@triton_op("gradagg::tr_mgda", mutates_args=())
def mgda(g: torch.Tensor) -> torch.Tensor:
    """MGDA's weights for the float64 Gramian g [K, K] (``native.mgda``); NaN where unsolved."""
    return launch_mgda(g.contiguous(), default_budget(g.shape[-1]))


@triton_op("gradagg::tr_dual_cone", mutates_args=())
def dual_cone(g: torch.Tensor, lower: torch.Tensor, sum_rows: bool) -> torch.Tensor:
    """argmin_{v ≥ u} vᵀGv for each row u of lower [B, K] (``native.dual_cone``): [B, K], or their
    sum [K] with ``sum_rows``. One program per row: an unsolved row is NaN (and so is the sum)."""
    out = launch_dual_cone(g.contiguous(), lower.contiguous(), default_budget(g.shape[-1]))
    return out.sum(0) if sum_rows else out


@triton_op("gradagg::tr_cagrad", mutates_args=())
def cagrad(g: torch.Tensor, c: float, max_outer: int, divisor: float) -> torch.Tensor:
    """CAGrad's weights divided by ``divisor`` (``native.cagrad``), degenerate case included; NaN
    where unsolved."""
    return launch_cagrad(g.contiguous(), c, max_outer, divisor, default_budget(g.shape[-1]))


_P, _I, _F = "*fp64", "i32", "fp64"
AOT = [
    aot.Kernel(mgda_kernel, {"g_ptr": _P, "w_ptr": _P, "k": _I, "budget": _I, "KP": ""}, warps=_warps),
    aot.Kernel(dual_cone_kernel, {"g_ptr": _P, "lower_ptr": _P, "out_ptr": _P, "k": _I, "budget": _I, "KP": ""},
               warps=_warps),
    aot.Kernel(cagrad_kernel, {"g_ptr": _P, "w_ptr": _P, "k": _I, "c": _F, "max_outer": _I, "budget": _I, "KP": ""},
               warps=_warps),
    aot.Kernel(cagrad_fallback_kernel, {"g_ptr": _P, "w_ptr": _P, "out_ptr": _P, "k": _I, "c": _F, "divisor": _F,
                                        "budget": _I, "KP": ""}, warps=_warps),
]
