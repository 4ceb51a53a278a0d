"""The closed-form weightings' whole K x K stage in one Triton program each: IMTL-G, ConFIG and
Aligned-MTL (``gradagg/_methods/imtl_g.py``, ``config.py``, ``aligned_mtl.py``).

Each kernel follows its method's torch reference (``_imtl_g_impl``, ``_config_impl``,
``_aligned_impl``) on its spectral path, with the device functions of ``gpu.spectral`` in place of
``scaled_spectrum``'s eigh and ``graded_range``'s QR + SVD, and takes the C solvers' fast path
(``unit_pinv_ones``, ``aligned_solve`` in ``gradagg/_kkt.c``) where A = S G S is provably above the
cut: there an elimination replaces both Jacobi methods (IMTL-G, ConFIG) or the one-sided one
(Aligned-MTL). Either way a call is one launch of one program, whatever K.

With n_i = ‖g_i‖ = √G_ii, s_i = 1/n_i (n = s = 0 on zero rows), A = S G S:

- the spectrum (``scaled_spectrum``): A = V Λ Vᵀ by two-sided Jacobi (``spectral._jacobi``);
  keep = λ > max(RTOL λ_max, cut), low = the smallest kept λ (∞ if none);
- the graded range (``graded_range``): F = N V_keep Λ_keep^(1/2) = U W by one-sided Jacobi
  (``spectral._one_sided``), σ²_j = ‖w_j‖², valid = the Σ keep largest;
- tol = min(max(cut / low, 1e-12), ½) (``perpendicular_tol``).

IMTL-G: along = Uᵀn, v = U (along / σ² on valid) = G⁺n; w = v / Σv where |Σv| > tol Σ|v| and
‖along_valid‖ > tol ‖n‖, else 0. ConFIG: along = V_keepᵀ 1_P (P the nonzero rows),
v = S V (along / λ on keep) = S A⁺ 1_P; w = (1ᵀGv / vᵀGv) v where vᵀGv > 0 and
‖along‖ > tol ‖1_P‖, else 0. Aligned-MTL: σ² the smallest, median or mean valid σ²_j (mode 0, 1,
2), w = σ U diag(valid / σ_j) Uᵀ p (0 where nothing is valid).

The fast paths, both from ``_kkt.c``:

- IMTL-G and ConFIG (``unit_pinv_ones``): Gauss–Jordan inversion of A_PP, whose pivots are those of
  LDLᵀ (the squares of the Cholesky factor's diagonal: all positive iff C's Cholesky factorisation
  succeeds). A_PP has unit diagonal, so
  λ_max ≤ |P| and λ_min ≥ bound = 1/‖A_PP⁻¹‖_F; where bound > max(cut, 1e-10 |P|) no eigenvalue
  falls under the cut, the spectrum would keep every direction, and v = S A_PP⁻¹ 1_P (the same
  G⁺n for IMTL-G), with tol from bound in place of low and the range tests true.
- Aligned-MTL (``aligned_solve``): where no row is zero and A − max(cut, 1e-12 K) I has a Cholesky
  factor (pivots tested by LDLᵀ elimination), every eigenvalue of G counts: the two-sided Jacobi
  runs on G itself (scaled by a power of two; it resolves the eigenvalues of G = N A N to about
  κ(A) ε relative, as the graded factor does), U = V, σ² = λ(G), and the one-sided sweeps are skipped.
  (C falls back to the graded factor if some λ(G) ≤ 0, which that accuracy rules out since
  κ(A) < 1e12; the kernel gives NaN there.)

Non-finite G, or a Jacobi method that runs out of its sweeps, gives NaN. G is read from its lower
triangle (as eigh reads it); inputs and outputs are float64. The kernels' own divisions and square
roots are those of ``_float`` (no slow-path subroutine calls for ptxas to spill around); the Jacobi
device functions of ``gpu.spectral`` keep theirs. ``_definite`` and ``_unit_inverse`` are generic
(any kernel may use them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .. import spectral as _spectral
from . import aot, padded, triton_op
from ._float import div, f64, inf, nan, recip, rsqrt, sqrt
from ._tile import col, diagonal, entry, load_square, load_vector, row, store_vector
from .spectral import SVD_TOL, _finite, _jacobi, _negligible, _one_sided, _pow2_scale, _ranks, _warps

#: The spectrum's relative cut (``solvers.spectral.RTOL``).
RTOL = tl.constexpr(_spectral.RTOL)
#: ``unit_pinv_ones``: the bound on λ_min(A_PP) must exceed this times |P| (and the cut).
BOUND_TOL = tl.constexpr(1e-10)
#: ``aligned_solve``: A − max(cut, SHIFT_TOL · K) I must be positive definite.
SHIFT_TOL = tl.constexpr(1e-12)
#: ``perpendicular_tol``'s clamp.
PERP_MIN = tl.constexpr(1e-12)
PERP_MAX = tl.constexpr(0.5)
#: Aligned-MTL's scale modes (``aligned_mtl._MODES``: 1 is the median).
MIN = tl.constexpr(0)
RMSE = tl.constexpr(2)


# ------------------------------------------------------------------------------------------------
# Device functions

@triton.jit
def _gramian(g_ptr: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> tuple[tl.tensor, tl.tensor]:
    """(G, finite): the k x k Gramian at ``g_ptr`` as a tile with identity padding, its lower
    triangle mirrored (as eigh reads it), zeroed where some entry is not finite (finite: int32)."""
    r = tl.arange(0, KP)
    g = load_square(g_ptr, k, KP)
    g = tl.where(r[:, None] >= r[None, :], g, tl.trans(g))
    finite = tl.min(tl.min(_finite(g).to(tl.int32), 1), 0)
    return tl.where(finite != 0, g, 0.0), finite


@triton.jit
def _norms(g: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> tuple[tl.tensor, tl.tensor, tl.tensor]:
    """(n, s, pos) of ``solvers.spectral.norms``: √G_ii, 1/√G_ii and G_ii > 0 on the rows i < k,
    n = s = 0 elsewhere."""
    r = tl.arange(0, KP)
    d = diagonal(g, KP)
    pos = (d > 0.0) & (r < k)
    n = tl.where(pos, sqrt(tl.where(pos, d, 1.0)), 0.0)
    s = tl.where(pos, rsqrt(tl.where(pos, d, 1.0)), 0.0)
    return n, s, pos


@triton.jit
def _unit_scaled(g: tl.tensor, s: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """A = S G S on the k x k block (zero rows stay zero, as in torch), identity padding."""
    r = tl.arange(0, KP)
    inside = (r[:, None] < k) & (r[None, :] < k)
    return tl.where(inside, g * s[:, None] * s[None, :], tl.where(r[:, None] == r[None, :], 1.0, 0.0))


@triton.jit
def _scaled_eigh(a: tl.tensor, settled: tl.tensor, k: tl.tensor,
                 KP: tl.constexpr) -> tuple[tl.tensor, tl.tensor, tl.tensor, tl.tensor]:
    """(λ, V, converged, scale) of the k x k block of the symmetric tile ``a`` by ``spectral._jacobi``
    after an exact power-of-two scaling of the block (the padding keeps its unit diagonal and stays
    decoupled): λ is unsorted and of (scale · A); ``settled`` (int32) skips the sweeps."""
    r = tl.arange(0, KP)
    inside = (r[:, None] < k) & (r[None, :] < k)
    scale = _pow2_scale(tl.where(inside, a, 0.0))
    lam, v, ok = _jacobi(tl.where(inside, a * scale, tl.where(r[:, None] == r[None, :], 1.0, 0.0)), settled, KP)
    return lam, v, ok, scale


@triton.jit
def _kept(lam: tl.tensor, cut: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> tuple[tl.tensor, tl.tensor]:
    """(keep, low) of ``scaled_spectrum``: λ > max(RTOL max λ, cut) on i < k, and the smallest
    kept λ (∞ if none)."""
    r = tl.arange(0, KP)
    real = r < k
    top = tl.max(tl.where(real, lam, -inf()), 0)
    keep = real & (lam > tl.maximum(top * RTOL, cut))
    return keep, tl.min(tl.where(keep, lam, inf()), 0)


@triton.jit
def _perpendicular_tol(cut: tl.tensor, low: tl.tensor) -> tl.tensor:
    """``spectral.perpendicular_tol``: cut / low within [1e-12, ½]."""
    t = div(cut, low)
    return tl.where(t < PERP_MIN, f64(PERP_MIN), tl.where(t > PERP_MAX, f64(PERP_MAX), t))


@triton.jit
def _unit_inverse(a: tl.tensor, pos: tl.tensor, cut: tl.tensor,
                  KP: tl.constexpr) -> tuple[tl.tensor, tl.tensor, tl.tensor]:
    """(coef, bound, fast) of C ``unit_pinv_ones``: coef = A_PP⁻¹ 1_P (0 off P), bound =
    1/‖A_PP⁻¹‖_F ≤ λ_min(A_PP), and fast (int32) where every pivot is positive and bound exceeds
    both the cut and 1e-10 |P| (then no eigenvalue of A_PP is under the spectrum's cut).

    A_PP⁻¹ by Gauss–Jordan in place (the sweep operator), rows off P kept as unit pivots: for a
    positive definite A_PP its pivots are those of LDLᵀ, so a pivot ≤ 0 is where C's Cholesky
    factorisation fails."""
    r = tl.arange(0, KP)
    rows = r[:, None]
    cols = r[None, :]
    block = pos[:, None] & pos[None, :]
    m = tl.where(block, a, tl.where(rows == cols, 1.0, 0.0))
    definite = 1
    for p in range(KP):
        prow = row(m, p, KP)
        pcol = col(m, p, KP)
        pivot = entry(prow, p, KP)
        definite = tl.minimum(definite, (pivot > 0.0).to(tl.int32))
        inv = recip(tl.where(pivot > 0.0, pivot, 1.0))
        prow = prow * inv
        rest = tl.where(cols == p, -pcol[:, None] * inv, m - pcol[:, None] * prow[None, :])
        m = tl.where(rows == p, tl.where(cols == p, inv, prow[None, :]), rest)
    frob = tl.sum(tl.sum(tl.where(block, m * m, 0.0), 1), 0)
    size = tl.sum(pos.to(tl.int32), 0).to(tl.float64)
    bound = rsqrt(frob)  # ∞ where P is empty, as in C
    fast = (definite != 0) & (bound > size * BOUND_TOL) & (bound > cut)
    return tl.sum(tl.where(block, m, 0.0), 1), bound, fast.to(tl.int32)


@triton.jit
def _definite(m: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """Whether the symmetric tile ``m`` has a Cholesky factor (int32): every pivot of its LDLᵀ
    elimination is positive (C ``cholesky``'s test)."""
    ok = 1
    for p in range(KP):
        prow = row(m, p, KP)
        pivot = entry(prow, p, KP)
        ok = tl.minimum(ok, (pivot > 0.0).to(tl.int32))
        m = m - prow[:, None] * (prow[None, :] * recip(tl.where(pivot > 0.0, pivot, 1.0)))
    return ok


@triton.jit
def _pinv_front(g_ptr: tl.tensor, k: tl.tensor, cut: tl.tensor, KP: tl.constexpr) -> tuple[tl.tensor, ...]:
    """What IMTL-G and ConFIG share: the fast path's (coef, bound, fast), then the spectrum of A
    (its sweeps skipped where fast or G is not finite): (coef, bound, fast, λ, V, keep, low, ok)
    with ok (int32) false where G is not finite or the sweeps ran out."""
    g, finite = _gramian(g_ptr, k, KP)
    _, s, pos = _norms(g, k, KP)
    a = _unit_scaled(g, s, k, KP)
    coef, bound, fast = _unit_inverse(a, pos, cut, KP)
    lam, v, converged, scale = _scaled_eigh(a, ((fast != 0) | (finite == 0)).to(tl.int32), k, KP)
    lam = lam * recip(scale)  # (exact: a power of two)
    keep, low = _kept(lam, cut, k, KP)
    return coef, bound, fast, lam, v, keep, low, converged * finite


# ------------------------------------------------------------------------------------------------
# Kernels

@triton.jit
def _imtl_g_kernel(g_ptr: tl.tensor, w_ptr: tl.tensor, k: tl.tensor, cut: tl.tensor, KP: tl.constexpr) -> None:
    """IMTL-G's w = G⁺n / Σ G⁺n (``_imtl_g_impl``; C ``imtl_g_solve`` where A is invertible)."""
    r = tl.arange(0, KP)
    eye = tl.where(r[:, None] == r[None, :], 1.0, 0.0).to(tl.float64)
    cut = f64(cut)
    coef, bound, fast, lam, v, keep, low, ok = _pinv_front(g_ptr, k, cut, KP)
    # The graded factor F = N V_keep Λ_keep^(1/2), with n from G again (nothing from before the
    # sweeps needs to stay live).
    g, _ = _gramian(g_ptr, k, KP)
    n, s, _ = _norms(g, k, KP)
    count = tl.sum(keep.to(tl.int32), 0)
    root = sqrt(tl.maximum(tl.where(keep, lam, 0.0), 0.0))
    f = n[:, None] * v * root[None, :]
    w, u, converged, inv = _one_sided(f, eye, ((fast != 0) | (ok == 0)).to(tl.int32), KP)
    norm2 = tl.sum(w * w, 1)
    sigma2 = tl.where(_negligible(u, inv, norm2, KP * SVD_TOL), 0.0, norm2)
    valid = (_ranks(sigma2, k, KP, True) < count) & (r < k)
    along = tl.sum(u * n[:, None], 0)  # n's coordinates in the range of G
    x = tl.where(valid, div(along, tl.where(valid, sigma2, 1.0)), 0.0)
    y = tl.where(fast != 0, s * coef, tl.sum(u * x[None, :], 1))  # G⁺n
    total = tl.sum(y, 0)
    tol = _perpendicular_tol(cut, tl.where(fast != 0, bound, low))
    reach = sqrt(tl.sum(tl.where(valid, along * along, 0.0), 0)) > tol * sqrt(tl.sum(n * n, 0))
    solved = (tl.abs(total) > tol * tl.sum(tl.abs(y), 0)) & ((fast != 0) | reach)
    out = tl.where(solved, div(y, tl.where(solved, total, 1.0)), 0.0)
    store_vector(w_ptr, tl.where((ok == 0) | (converged == 0), nan(), out), k, KP)


@triton.jit
def _config_kernel(g_ptr: tl.tensor, w_ptr: tl.tensor, k: tl.tensor, cut: tl.tensor, KP: tl.constexpr) -> None:
    """ConFIG's w = (1ᵀGv / vᵀGv) v, v = S A⁺ 1_P (``_config_impl``; C ``config_solve`` where A
    is invertible)."""
    r = tl.arange(0, KP)
    cut = f64(cut)
    coef, _, fast, lam, v, keep, low, ok = _pinv_front(g_ptr, k, cut, KP)
    g, _ = _gramian(g_ptr, k, KP)
    _, s, pos = _norms(g, k, KP)
    ones = tl.where(pos, 1.0, 0.0).to(tl.float64)
    along = tl.where(keep, tl.sum(v * ones[:, None], 0), 0.0)  # 1's coordinates in the kept range of A
    x = tl.sum(v * tl.where(keep, div(along, tl.where(keep, lam, 1.0)), 0.0)[None, :], 1)
    y = s * tl.where(fast != 0, coef, x)  # S A⁺ 1_P
    g = tl.where((r[:, None] < k) & (r[None, :] < k), g, 0.0)
    norm_sq = tl.sum(tl.sum(g * y[None, :], 1) * y, 0)
    pull = tl.sum(tl.sum(g, 0) * y, 0)  # (Σ_i g_i)·d for d = Jᵀy
    tol = _perpendicular_tol(cut, low)
    reach = sqrt(tl.sum(along * along, 0)) > tol * sqrt(tl.sum(ones, 0))
    solved = (norm_sq > 0.0) & ((fast != 0) | reach)
    out = tl.where(solved, div(pull, tl.where(solved, norm_sq, 1.0)), 0.0) * y
    store_vector(w_ptr, tl.where(ok == 0, nan(), out), k, KP)


@triton.jit
def _aligned_kernel(g_ptr: tl.tensor, pref_ptr: tl.tensor, w_ptr: tl.tensor, k: tl.tensor, mode: tl.tensor,
                    cut: tl.tensor, KP: tl.constexpr) -> None:
    """Aligned-MTL's w = σ U diag(1/σ_j) Uᵀ p over the valid eigenpairs of G (``_aligned_impl``;
    C ``aligned_solve`` where A is provably above the cut)."""
    r = tl.arange(0, KP)
    real = r < k
    eye = tl.where(r[:, None] == r[None, :], 1.0, 0.0).to(tl.float64)
    inside = real[:, None] & real[None, :]
    cut = f64(cut)
    g, finite = _gramian(g_ptr, k, KP)
    _, s, pos = _norms(g, k, KP)
    a = _unit_scaled(g, s, k, KP)
    shift = tl.maximum(cut, f64(k) * SHIFT_TOL)
    full = tl.sum(pos.to(tl.int32), 0) == k
    fast = (full & (_definite(tl.where(inside, a - shift * eye, eye), KP) != 0) & (finite != 0)).to(tl.int32)
    # One two-sided Jacobi: of G where fast (every eigenvalue of G is kept), of A otherwise.
    lam, v, ok, scale = _scaled_eigh(tl.where(fast != 0, g, a), 1 - finite, k, KP)
    unscaled = lam * recip(scale)  # (exact: a power of two)
    keep, _ = _kept(unscaled, cut, k, KP)
    keep = keep & (fast == 0)
    count = tl.where(fast != 0, k, tl.sum(keep.to(tl.int32), 0))
    g, _ = _gramian(g_ptr, k, KP)  # n from G again (nothing from before the sweeps needs to stay live)
    n, _, _ = _norms(g, k, KP)
    root = sqrt(tl.maximum(tl.where(keep, unscaled, 0.0), 0.0))
    f = n[:, None] * v * root[None, :]
    # Where fast, U = V and the one-sided sweeps are skipped.
    w, u, converged, inv = _one_sided(f, tl.where(fast != 0, v, eye), ((fast != 0) | (ok == 0)).to(tl.int32), KP)
    norm2 = tl.sum(w * w, 1)
    sigma2 = tl.where(fast != 0, lam, tl.where(_negligible(u, inv, norm2, KP * SVD_TOL), 0.0, norm2))
    rank = _ranks(sigma2, k, KP, True)
    valid = (rank < count) & real
    sigma2 = tl.where(valid, sigma2, 0.0)
    # C falls back to the graded factor on an eigenvalue of G ≤ 0, which κ(A) < 1e12 rules out.
    lost = (fast != 0) & (tl.sum((valid & ~(sigma2 > 0.0)).to(tl.int32), 0) > 0)
    # σ²: the smallest, the median (the mean of the two middle values for an even count; the
    # ascending position a is the descending rank count − 1 − a) or the mean of the valid σ²_j.
    low = tl.min(tl.where(valid, sigma2, inf()), 0)
    mean = div(tl.sum(sigma2, 0), tl.maximum(count, 1).to(tl.float64))
    below = count - 1 - (count - 1) // 2
    above = count - 1 - count // 2
    middle = 0.5 * (tl.sum(tl.where(valid & (rank == below), sigma2, 0.0), 0)
                    + tl.sum(tl.where(valid & (rank == above), sigma2, 0.0), 0))
    chosen = tl.where(mode == MIN, low, tl.where(mode == RMSE, mean, middle))
    sigma = tl.where(count > 0, sqrt(tl.where(count > 0, chosen, 0.0)), 0.0)
    p = load_vector(pref_ptr, k, KP, 0.0)
    along = tl.sum(u * p[:, None], 0)  # Uᵀp
    x = tl.where(valid, along * rsqrt(tl.where(valid, sigma2, 1.0)), 0.0)
    out = sigma * tl.sum(u * x[None, :], 1)
    bad = (finite == 0) | (ok == 0) | (converged == 0) | lost
    store_vector(w_ptr, tl.where(bad, nan(), out), k, KP)


# ------------------------------------------------------------------------------------------------
# Launchers

def _aligned_warps(kp: int) -> int:
    """Warps of the Aligned-MTL kernel: ``spectral._warps``, but eight for 32 x 32 tiles: with four,
    ptxas stops at 168 registers there and spills a few masks around the float64 division and
    square root subroutines of the Jacobi methods (both methods and the ranking live in one program)."""
    return 8 if kp == 32 else _warps(kp)


def _launch(kernel: triton.JITFunction, k: int, *args: torch.Tensor | int | float,
            warps: Callable[[int], int] = _warps) -> None:
    kp = padded(k)
    torch.library.wrap_triton(kernel)[(1,)](*args, KP=kp, num_warps=warps(kp))


@triton_op("gradagg::tr_imtl_g", mutates_args=())
def _imtl_g_op(g: torch.Tensor, cut: float) -> torch.Tensor:
    k = g.shape[-1]
    w = torch.empty(k, dtype=torch.float64, device=g.device)
    _launch(_imtl_g_kernel, k, g, w, k, cut)
    return w


@triton_op("gradagg::tr_config", mutates_args=())
def _config_op(g: torch.Tensor, cut: float) -> torch.Tensor:
    k = g.shape[-1]
    w = torch.empty(k, dtype=torch.float64, device=g.device)
    _launch(_config_kernel, k, g, w, k, cut)
    return w


@triton_op("gradagg::tr_aligned_mtl", mutates_args=())
def _aligned_op(g: torch.Tensor, pref: torch.Tensor, mode: int, cut: float) -> torch.Tensor:
    k = g.shape[-1]
    w = torch.empty(k, dtype=torch.float64, device=g.device)
    _launch(_aligned_kernel, k, g, pref, w, k, mode, cut, warps=_aligned_warps)
    return w


def imtl_g(g: torch.Tensor, cut: float) -> torch.Tensor:
    """IMTL-G's weights for the float64 K x K Gramian ``g`` and the eigenvalue cut of A = S G S
    (``_imtl_g_impl``), in one kernel launch; NaN for non-finite G or unconverged sweeps."""
    return _imtl_g_op(g.contiguous(), float(cut))


def config(g: torch.Tensor, cut: float) -> torch.Tensor:
    """ConFIG's weights (``_config_impl``), in one kernel launch; NaN as ``imtl_g``."""
    return _config_op(g.contiguous(), float(cut))


def aligned_mtl(g: torch.Tensor, pref: torch.Tensor, mode: int, cut: float) -> torch.Tensor:
    """Aligned-MTL's weights (``_aligned_impl``) for the preference K-vector ``pref`` (float64) and
    the scale mode 0 (min), 1 (median) or 2 (rmse), in one kernel launch; NaN as ``imtl_g``."""
    return _aligned_op(g.contiguous(), pref.contiguous(), int(mode), float(cut))


_PINV = {"g_ptr": "*fp64", "w_ptr": "*fp64", "k": "i32", "cut": "fp64", "KP": ""}
AOT = [
    aot.Kernel(_imtl_g_kernel, _PINV, warps=_warps),
    aot.Kernel(_config_kernel, _PINV, warps=_warps),
    aot.Kernel(_aligned_kernel, {"g_ptr": "*fp64", "pref_ptr": "*fp64", "w_ptr": "*fp64", "k": "i32", "mode": "i32",
                                 "cut": "fp64", "KP": ""}, warps=_aligned_warps),
]
