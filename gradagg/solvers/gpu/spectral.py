"""Spectral tools for the Triton route, without host synchronisation: ``eigh``, ``clean`` and
``graded_range``.

On CUDA ``torch.linalg.eigh``, ``svd``, ``cholesky`` and ``inv`` check their results on the host; these
kernels replace them on the accelerator path (``gradagg/solvers/spectral.py`` picks them where
``_device.on_triton``). Each runs as one program holding the padded K x K problem in float64.

Jacobi's methods, in the parallel (round-robin) ordering
---------------------------------------------------------
``eigh`` ports the cyclic Jacobi method of the C function ``jacobi_eigh`` (``gradagg/_kkt.c``): plane
rotations J that zero one off-diagonal entry a_pq at a time, A ← Jᵀ A J, V ← V J, skipping a pair
whose entry is negligible beside its diagonal, |a_pq| ≤ 1e-16 √|a_pp| √|a_qq| (the relative test of
Demmel & Veselić 1992, "Jacobi's method is more accurate than QR", which keeps the small eigenvalues
of graded positive definite matrices to high relative accuracy), until a whole sweep over the pairs
rotates nothing, within ``SWEEPS`` sweeps. The rotation is that of the C code (Golub & Van Loan 8.5):
θ = (a_qq − a_pp) / 2a_pq, t = sign θ / (|θ| + √(θ² + 1)), c = 1/√(t² + 1), s = t c; the new diagonal
is a_pp − t a_pq, a_qq + t a_pq (Golub & Van Loan's form; the C code rotates it with its rows).
Before the sweeps A is scaled by a power of two (exact) that brings its largest entry into [1, 2).

Instead of the row-cyclic order, a sweep is K_P − 1 rounds of the circle-method round robin (Brent &
Luk 1985): each round pairs every index with another, and the K_P / 2 disjoint rotations of a round
are applied at once as J = ⊕ 2 x 2 rotations, with the partner's row or column fetched by
``tl.gather``. Every pair meets once per sweep, so this is a cyclic Jacobi method in another
order, with the same convergence (quadratic) and the same relative accuracy; a round costs a few
O(K²) tile operations instead of K / 2 rounds of them. A is kept exactly symmetric (its upper
triangle mirrored), so that both members of a pair compute the same rotation.

``graded_range`` applies the same rotations from the left to the rows of the graded factor
F = N V_r Λ_r^(1/2): a one-sided (Hestenes) Jacobi SVD, which orthogonalises the rows of W = Qᵀ F
while U = Q accumulates the rotations, so that F = U W, W has orthogonal rows and G_c = F Fᵀ =
U diag(‖w_i‖²) Uᵀ. Rotating the rows of F = D B is rotating the columns of Fᵀ = Bᵀ D, for which
Demmel & Veselić show relative accuracy about ε κ(B) for every singular value, whatever D: it
replaces the row-sorted Householder QR + SVD of the torch version (``spectral.graded_range``). The
test is |w_p·w_q| ≤ tol ‖w_p‖ ‖w_q‖ with tol = K_P ε (the rounding of a computed dot product, which
no rotation removes). F has rank r = Σ keep: K − r rows of W end as rounding, which rotations only
shrink (down to subnormals, where the test means nothing). So a row whose share of every row of
F = U W, |U_ij| ‖w_j‖ / ‖F_i‖, is below tol is left alone, and is given σ² = 0: then F is
reconstructed to tol relative to each of its rows, as by the QR of the torch version. (The rows
of the kept directions have shares far above tol; the rows left are then exactly the K − r
smallest, and σ² keeps its r largest.)

Padding rows and columns (index ≥ K) hold the identity, are never paired with a nonzero entry and
stay decoupled exactly; so do the zero rows of a Gramian. A problem with a non-finite entry, or one
that runs out of its sweeps, gives NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import aot, padded, triton_op, warps
from ._tile import diagonal, load_square, load_vector, row, store_square

#: Sweeps of every Jacobi method here (that of C ``jacobi_eigh``).
SWEEPS = tl.constexpr(60)
#: Relative tolerance of the two-sided method (C ``jacobi_eigh``): a rotation sets a_pq to 0
#: exactly, so only the fill-in of later rotations is tested.
EIGH_TOL = tl.constexpr(1e-16)
#: Relative tolerance of the one-sided method, per padded index (tol = K_P ε): the computed w_p·w_q
#: of two orthogonal rows carries rounding up to about K ε ‖w_p‖ ‖w_q‖, which no rotation removes.
SVD_TOL = tl.constexpr(2.0**-52)

#: Flags of ``clean``'s status: those of ``native.prepare`` (RESCUE, NONFINITE), then whether an
#: eigenvalue was dropped (the result differs from (G, I)), and whether the Jacobi sweeps ran out.
RESCUE, NONFINITE, DROPPED, UNCONVERGED = 1, 2, 4, 8
_RESCUE, _NONFINITE, _DROPPED, _UNCONVERGED = (tl.constexpr(f) for f in (RESCUE, NONFINITE, DROPPED, UNCONVERGED))


def _warps(kp: int) -> int:
    """Warps per program: one up to 16 x 16 tiles, whose reductions and gathers then stay inside a
    warp (with two or four, ptxas spills a few registers around its float64 division and square
    root subroutines at some of these sizes); ``gpu.warps`` for larger tiles."""
    return 1 if kp <= 16 else warps(kp)


@triton.jit
def _partner(i: tl.tensor, rnd: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """Index paired with i in round ``rnd`` (0 … KP − 2) of the circle-method round robin: i and j
    meet where i + j ≡ 2 rnd (mod KP − 1); the index that would meet itself meets KP − 1."""
    m = KP - 1
    j = (2 * rnd - i + 2 * m) % m
    return tl.where(i == KP - 1, rnd, tl.where(j == i, KP - 1, j))


@triton.jit
def _rotation(app: tl.tensor, aqq: tl.tensor, apq: tl.tensor, lo: tl.tensor,
              tol: tl.tensor) -> tuple[tl.tensor, tl.tensor, tl.tensor, tl.tensor]:
    """(turn, t, signed s, c) of the Jacobi rotation for the pair of lane i (``lo``: i is p < q): s
    carries the sign of its side, so that x_i ← c x_i + s x_partner rotates both members. A pair
    with a_pq negligible by the relative test does not turn (t = 0, c = 1, s = 0)."""
    turn = tl.abs(apq) > tl.sqrt(tl.abs(app)) * tl.sqrt(tl.abs(aqq)) * tol
    theta = (aqq - app) / (2.0 * tl.where(turn, apq, 1.0))
    t = tl.where(theta >= 0.0, 1.0, -1.0) / (tl.abs(theta) + tl.sqrt(theta * theta + 1.0))
    t = tl.where(turn, t, 0.0)
    c = 1.0 / tl.sqrt(t * t + 1.0)
    return turn, t, tl.where(lo, -t * c, t * c), c


@triton.jit
def _jacobi(a: tl.tensor, done: tl.tensor, KP: tl.constexpr) -> tuple[tl.tensor, tl.tensor, tl.tensor]:
    """(λ, V, converged): two-sided Jacobi on the symmetric tile ``a`` (port of C ``jacobi_eigh``,
    round-robin order), starting with ``done`` (int32 0/1, 1 skips every sweep: then λ is the
    diagonal and V = I). λ is unsorted; V holds the eigenvectors as columns."""
    r = tl.arange(0, KP)
    rows = r[:, None]
    cols = r[None, :]
    v = tl.where(rows == cols, 1.0, 0.0).to(tl.float64)
    sweep = 0
    while (sweep < SWEEPS) & (done == 0):
        rotated: tl.tensor = 0  # (an int32 scalar in the compiled kernel)
        for rnd in range(KP - 1):
            pt = _partner(r, rnd, KP)
            by_col = tl.broadcast_to(pt[None, :], (KP, KP))
            by_row = tl.broadcast_to(pt[:, None], (KP, KP))
            d = diagonal(a, KP)
            dp = tl.gather(d, pt, 0)
            apq = tl.sum(tl.where(cols == pt[:, None], a, 0.0), 1)
            lo = r < pt
            turn, t, s, c = _rotation(tl.where(lo, d, dp), tl.where(lo, dp, d), apq, lo, EIGH_TOL)
            rotated = tl.maximum(rotated, tl.max(turn.to(tl.int32), 0))
            b = a * c[None, :] + tl.gather(a, by_col, 1) * s[None, :]  # A J
            b = b * c[:, None] + tl.gather(b, by_row, 0) * s[:, None]  # Jᵀ A J
            b = tl.where(rows <= cols, b, tl.trans(b))  # exactly symmetric
            # The diagonal by the accurate formula; the pair's entries are zero (or negligible).
            dnew = d + tl.where(lo, -t, t) * apq
            a = tl.where(rows == cols, dnew[:, None], tl.where(cols == pt[:, None], 0.0, b))
            v = v * c[None, :] + tl.gather(v, by_col, 1) * s[None, :]
        done = (rotated == 0).to(tl.int32)
        sweep += 1
    return diagonal(a, KP), v, done


@triton.jit
def _pow2_scale(a: tl.tensor) -> tl.tensor:
    """2^(1023 − e) for e the biased exponent of max |a_ij|: an exact scaling that brings the
    largest entry into [1, 2), so that θ and the products of the tests cannot overflow."""
    peak = tl.max(tl.max(tl.abs(a), 1), 0)
    e = (peak.to(tl.int64, bitcast=True) >> 52) & 0x7FF
    e = tl.minimum(tl.maximum(e, 1), 2045)
    return ((2046 - e) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _ranks(x: tl.tensor, k: tl.tensor, KP: tl.constexpr, DESCENDING: tl.constexpr) -> tl.tensor:
    """Position of each x_i (i < k) in the sorted order, ties by index."""
    r = tl.arange(0, KP)
    xi = x[:, None]
    xj = x[None, :]
    if DESCENDING:
        before = (xj > xi) | ((xj == xi) & (r[None, :] < r[:, None]))
    else:
        before = (xj < xi) | ((xj == xi) & (r[None, :] < r[:, None]))
    return tl.sum((before & (r[None, :] < k)).to(tl.int32), 1)


@triton.jit
def _negligible(u: tl.tensor, inv: tl.tensor, norm2: tl.tensor, tol: tl.tensor) -> tl.tensor:
    """Whether each row j of W adds less than tol of ‖F_i‖ to every row F_i = Σ_j U_ij w_j."""
    share = tl.max(tl.abs(u) * inv[:, None], 0)
    return tl.sqrt(norm2) * share <= tol


@triton.jit
def _finite(x: tl.tensor) -> tl.tensor:
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def _eigh_kernel(a_ptr: tl.tensor, lam_ptr: tl.tensor, vec_ptr: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> None:
    """Eigenvalues (ascending) and eigenvectors (columns) of the symmetric k x k matrix at ``a_ptr``
    (its lower triangle, like LAPACK's ``eigh``): ``_jacobi`` on the matrix scaled by a power of two."""
    r = tl.arange(0, KP)
    rows = r[:, None]
    cols = r[None, :]
    a = load_square(a_ptr, k, KP)
    a = tl.where(rows >= cols, a, tl.trans(a))
    finite = tl.min(tl.min(_finite(a).to(tl.int32), 1), 0)
    a = tl.where(finite != 0, a, 0.0)
    scale = _pow2_scale(a)
    lam, v, ok = _jacobi(a * scale, 1 - finite, KP)
    bad = (ok == 0) | (finite == 0)
    lam = tl.where(bad, float("nan"), lam / scale)
    v = tl.where(bad, float("nan"), v)
    rank = tl.where(bad, r, _ranks(lam, k, KP, False))  # NaN: every output still written once
    tl.store(lam_ptr + rank, lam, mask=r < k)
    tl.store(vec_ptr + rows * k + rank[None, :], v, mask=(rows < k) & (cols < k))


@triton.jit
def _clean_kernel(raw_ptr: tl.tensor, g_ptr: tl.tensor, proj_ptr: tl.tensor, status_ptr: tl.tensor, k: tl.tensor,
                  cut: tl.tensor, tiny: tl.tensor, KP: tl.constexpr) -> None:
    """The clean Gramian and its range projector: C ``py_prepare`` (symmetrise, flags), then, where
    a Cholesky factorisation of A − cut·I fails (``spectral.well_above``), ``spectral.denoise`` with
    this module's Jacobi in place of eigh.

    G = ½(raw + rawᵀ); RESCUE if some raw_ii is not finite or in (0, ``tiny``), NONFINITE if some entry
    of G is not. A = S G S (S = diag 1/√G_ii, 0 on zero rows) with cut + 1 on the diagonal of zero
    rows (exact and decoupled: never dropped, as the unit pivot of the C test). The eigenpairs with
    λ ≤ cut are removed: G_c = G − N (Σ λ v vᵀ) N, P = I − S (Σ v vᵀ) N; both are exactly (G, I)
    where nothing is dropped, and NaN where RESCUE, NONFINITE or the sweeps ran out."""
    r = tl.arange(0, KP)
    rows = r[:, None]
    cols = r[None, :]
    eye = tl.where(rows == cols, 1.0, 0.0).to(tl.float64)
    g = _symmetrised(raw_ptr, k, KP)
    d = diagonal(g, KP)  # ½(raw_ii + raw_ii) = raw_ii exactly
    # A zero diagonal is a zero gradient here: reading nothing back, the route cannot afford the
    # host's second pass to tell it from a row whose every square underflowed float32 (< ~1e-23).
    rescue = tl.max(((~_finite(d) | ((d > 0.0) & (d < tiny))) & (r < k)).to(tl.int32), 0)
    finite = tl.min(tl.min(_finite(g).to(tl.int32), 1), 0)
    pos = (d > 0.0) & (r < k) & (finite != 0)
    n = tl.where(pos, tl.sqrt(tl.where(pos, d, 1.0)), 0.0)
    s = tl.where(pos, 1.0 / tl.where(pos, n, 1.0), 0.0)
    a = tl.where(finite != 0, g, 0.0) * s[:, None] * s[None, :]
    a += tl.where((rows == cols) & ~pos[:, None], cut + 1.0, 0.0)
    # λ_min(A) > cut iff A − cut·I has a Cholesky factor: LDLᵀ on the tile, pivots tested.
    m = a - cut * eye
    above = 1
    for p in range(KP):
        prow = row(m, p, KP)
        pivot = tl.sum(tl.where(r == p, prow, 0.0), 0)
        above = tl.minimum(above, (pivot > 0.0).to(tl.int32))
        m = m - prow[:, None] * prow[None, :] / tl.where(pivot > 0.0, pivot, 1.0)
    skip = (above != 0) | (finite == 0) | (rescue != 0)
    lam, v, ok = _jacobi(a, skip.to(tl.int32), KP)
    drop = (lam <= cut) & ~skip
    bad = (finite == 0) | (rescue != 0) | (ok == 0)
    # G_c and P one after the other, each from its own sum over the dropped pairs (fewer live tiles);
    # G is read again rather than kept through the sweeps.
    removed = tl.zeros((KP, KP), tl.float64)
    for j in range(KP):
        vj = tl.sum(tl.where(cols == j, v, 0.0), 1)
        lj = tl.sum(tl.where((r == j) & drop, lam, 0.0), 0)
        removed += lj * (vj[:, None] * vj[None, :])
    gc = _symmetrised(raw_ptr, k, KP) - removed * n[:, None] * n[None, :]
    store_square(g_ptr, tl.where(bad, float("nan"), gc), k, KP)
    span = tl.zeros((KP, KP), tl.float64)
    for j in range(KP):
        vj = tl.sum(tl.where(cols == j, v, 0.0), 1)
        dj = tl.sum(tl.where((r == j) & drop, 1.0, 0.0), 0)
        span += dj * (vj[:, None] * vj[None, :])
    proj = eye - s[:, None] * span * n[None, :]
    store_square(proj_ptr, tl.where(bad, float("nan"), proj), k, KP)
    dropped = tl.max(drop.to(tl.int32), 0)
    status = rescue * _RESCUE + (1 - finite) * _NONFINITE + dropped * _DROPPED + (1 - ok) * _UNCONVERGED
    tl.store(status_ptr, status)


@triton.jit
def _symmetrised(raw_ptr: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """½(raw + rawᵀ) in float64, as C ``py_prepare`` forms it (exactly symmetric)."""
    raw = load_square(raw_ptr, k, KP)
    return 0.5 * (raw + tl.trans(raw))


@triton.jit
def _one_sided(w: tl.tensor, u: tl.tensor, settled: tl.tensor,
               KP: tl.constexpr) -> tuple[tl.tensor, tl.tensor, tl.tensor, tl.tensor]:
    """(W, U, converged, inv): the one-sided Jacobi SVD described above on the factor tile ``w``
    (rows F_i; zero rows and the padding are zero), rotating its rows while ``u`` (the identity, or
    the rotation so far) accumulates the rotations; ``settled`` (int32 0/1) runs no sweep. ``inv`` holds
    1/‖F_i‖ (0 for zero rows), for ``_graded_sigma2``."""
    r = tl.arange(0, KP)
    # 1/‖F_i‖ (0 for zero rows): row j of W is negligible where its share of every row of F = U W,
    # |U_ij| ‖w_j‖ / ‖F_i‖, is below tol.
    fnorm = tl.sqrt(tl.sum(w * w, 1))
    inv = tl.where(fnorm > 0.0, 1.0 / tl.where(fnorm > 0.0, fnorm, 1.0), 0.0)
    tol = KP * SVD_TOL
    sweep = 0
    done = settled
    while (sweep < SWEEPS) & (done == 0):
        rotated: tl.tensor = 0  # (an int32 scalar in the compiled kernel)
        for rnd in range(KP - 1):
            pt = _partner(r, rnd, KP)
            by_col = tl.broadcast_to(pt[None, :], (KP, KP))
            by_row = tl.broadcast_to(pt[:, None], (KP, KP))
            wp = tl.gather(w, by_row, 0)
            norm2 = tl.sum(w * w, 1)
            other = tl.gather(norm2, pt, 0)
            lo = r < pt
            # The lower index's dot product for both, so that the pair agrees bit for bit.
            dot = tl.sum(w * wp, 1)
            dot = tl.where(lo, dot, tl.gather(dot, pt, 0))
            # F has rank ≤ count: its other rows end as rounding, which no rotation makes orthogonal
            # (it only shrinks them, down to subnormals). A pair with a negligible row is done.
            small = (_negligible(u, inv, norm2, tol) != 0).to(tl.int32)
            skip = (small + tl.gather(small, pt, 0)) > 0
            turn, _, s, c = _rotation(tl.where(lo, norm2, other), tl.where(lo, other, norm2),
                                      tl.where(skip, 0.0, dot), lo, tol)
            rotated = tl.maximum(rotated, tl.max(turn.to(tl.int32), 0))
            w = w * c[:, None] + wp * s[:, None]
            u = u * c[None, :] + tl.gather(u, by_col, 1) * s[None, :]
        done = (rotated == 0).to(tl.int32)
        sweep += 1
    return w, u, done, inv


@triton.jit
def _graded_sigma2(w: tl.tensor, u: tl.tensor, inv: tl.tensor, count: tl.tensor, k: tl.tensor,
                   KP: tl.constexpr) -> tuple[tl.tensor, tl.tensor]:
    """(σ², rank) after ``_one_sided``: σ²_j = ‖w_j‖², 0 for a negligible row (rounding ranks last)
    and beyond the ``count`` largest; rank is each σ²'s position in descending order (σ² itself is
    in the order of U's columns)."""
    norm2 = tl.sum(w * w, 1)
    sigma2 = tl.where(_negligible(u, inv, norm2, KP * SVD_TOL), 0.0, norm2)
    rank = _ranks(sigma2, k, KP, True)
    return tl.where(rank < count, sigma2, 0.0), rank


@triton.jit
def _graded_kernel(n_ptr: tl.tensor, vec_ptr: tl.tensor, lam_ptr: tl.tensor, keep_ptr: tl.tensor, u_ptr: tl.tensor,
                   sigma2_ptr: tl.tensor, valid_ptr: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> None:
    """U, σ² (descending) and the valid columns of the graded factor F = N V Λ_keep^(1/2): the
    one-sided Jacobi SVD described above, in place of ``spectral.graded_range``'s QR + SVD."""
    r = tl.arange(0, KP)
    rows = r[:, None]
    cols = r[None, :]
    n = load_vector(n_ptr, k, KP, 0.0)
    lam = load_vector(lam_ptr, k, KP, 0.0)
    keep = (tl.load(keep_ptr + r, mask=r < k, other=0) != 0) & (r < k)
    root = tl.where(keep, tl.sqrt(tl.maximum(tl.where(keep, lam, 0.0), 0.0)), 0.0)
    w = n[:, None] * load_square(vec_ptr, k, KP) * root[None, :]
    finite = tl.min(tl.min(_finite(w).to(tl.int32), 1), 0)
    w = tl.where(finite != 0, w, 0.0)
    count = tl.sum(keep.to(tl.int32), 0)
    eye = tl.where(rows == cols, 1.0, 0.0).to(tl.float64)
    w, u, done, inv = _one_sided(w, eye, 1 - finite, KP)
    bad = (done == 0) | (finite == 0)
    sigma2, rank = _graded_sigma2(w, u, inv, count, k, KP)
    rank = tl.where(bad, r, rank)
    sigma2 = tl.where(bad, float("nan"), sigma2)
    tl.store(sigma2_ptr + rank, sigma2, mask=r < k)
    tl.store(u_ptr + rows * k + rank[None, :], tl.where(bad, float("nan"), u), mask=(rows < k) & (cols < k))
    tl.store(valid_ptr + r, r < count, mask=r < k)


@triton_op("gradagg::tr_eigh", mutates_args=())
def _eigh_op(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = a.shape[-1]
    lam = torch.empty(k, dtype=torch.float64, device=a.device)
    vec = torch.empty((k, k), dtype=torch.float64, device=a.device)
    torch.library.wrap_triton(_eigh_kernel)[(1,)](a, lam, vec, k, KP=padded(k), num_warps=_warps(padded(k)))
    return lam, vec


@triton_op("gradagg::tr_clean", mutates_args=())
def _clean_op(raw: torch.Tensor, cut: float, tiny: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = raw.shape[-1]
    g = torch.empty((k, k), dtype=torch.float64, device=raw.device)
    proj = torch.empty_like(g)
    status = torch.empty((), dtype=torch.int32, device=raw.device)
    torch.library.wrap_triton(_clean_kernel)[(1,)](raw, g, proj, status, k, cut, tiny, KP=padded(k),
                                                   num_warps=_warps(padded(k)))
    return g, proj, status


@triton_op("gradagg::tr_graded_range", mutates_args=())
def _graded_op(n: torch.Tensor, vec: torch.Tensor, lam: torch.Tensor,
               keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = n.shape[-1]
    u = torch.empty((k, k), dtype=torch.float64, device=n.device)
    sigma2 = torch.empty(k, dtype=torch.float64, device=n.device)
    valid = torch.empty(k, dtype=torch.bool, device=n.device)
    torch.library.wrap_triton(_graded_kernel)[(1,)](n, vec, lam, keep, u, sigma2, valid, k, KP=padded(k),
                                                    num_warps=_warps(padded(k)))
    return u, sigma2, valid


def eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ ascending, V with eigenvectors as columns) of the symmetric K x K ``a`` (its lower
    triangle is read), in float64, like ``torch.linalg.eigh`` but without host synchronisation:
    NaN where ``a`` holds a non-finite entry or Jacobi's sweeps run out."""
    return _eigh_op(a.contiguous())


def clean(raw: torch.Tensor, cut: float, tiny: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G_c, P, status) for the accumulated K x K Gramian ``raw`` (float32 or float64): C ``prepare``,
    ``spectral.well_above`` and ``spectral.denoise`` in one kernel (see ``_clean_kernel``). status
    (0-dim int32) holds RESCUE | NONFINITE | DROPPED | UNCONVERGED; G_c and P are NaN under any of
    RESCUE, NONFINITE, UNCONVERGED. RESCUE flags a diagonal entry that is not finite or lies in
    (0, ``tiny``): unlike C ``prepare`` and ``_gramian.needs_rescale``, a zero row counts as a zero
    gradient (``tiny`` = 0 tests for non-finite entries only)."""
    return _clean_op(raw.contiguous(), float(cut), float(tiny))


def graded_range(n: torch.Tensor, vec: torch.Tensor, lam: torch.Tensor,
                 keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, σ², valid) as ``spectral.graded_range`` for the spectrum (n, vec, lam, keep): the
    eigenpairs of G_c = N V_r Λ_r V_rᵀ N, σ² descending, valid = arange(K) < Σ keep."""
    return _graded_op(n.contiguous(), vec.contiguous(), lam.contiguous(), keep.contiguous())


AOT = [
    aot.Kernel(_eigh_kernel, {"a_ptr": "*fp64", "lam_ptr": "*fp64", "vec_ptr": "*fp64", "k": "i32", "KP": ""},
               warps=_warps),
    aot.Kernel(_clean_kernel, {"raw_ptr": "*fp64", "g_ptr": "*fp64", "proj_ptr": "*fp64", "status_ptr": "*i32",
                               "k": "i32", "cut": "fp64", "tiny": "fp64", "KP": ""}, warps=_warps),
    aot.Kernel(_graded_kernel, {"n_ptr": "*fp64", "vec_ptr": "*fp64", "lam_ptr": "*fp64", "keep_ptr": "*i1",
                                "u_ptr": "*fp64", "sigma2_ptr": "*fp64", "valid_ptr": "*i1", "k": "i32", "KP": ""},
               warps=_warps),
]
