"""Gradient surgery on K x K coefficients, and Krum, as Triton programs: PCGrad, GradVac, Krum.

PCGrad and GradVac rewrite every gradient as g_i' = Σ_j C_ij g_j, so they run on C and G alone:
row i of C starts at e_i and visits the other tasks in the order of its keys (row i of ``keys``,
the task itself left out; ties to the lower index), one partner j per step t = 0 … K−2, all rows
at once. The order is never sorted: rank[i, j] = #{l ≠ i : key_il < key_ij, or key_il = key_ij
and l < j} is counted by comparisons, and at step t row i takes the j with rank[i, j] = t. The
partner's row or column of G is gathered from memory (L1-resident for K ≤ 64), so a step costs
O(K²) and a handful of reductions, with no K x K x K product.

- PCGrad (C ``py_pcgrad``, torch ``_methods.pcgrad._pcgrad_impl``): with d = C_i · G_:j, if d < 0
  and G_jj > 0 then C_ij −= d / G_jj.
- GradVac (torch ``_methods.gradvac.gradvac_matrix``, which has no C version): towards a target
  cosine φ̂_ij (see that module), with (C G)_i kept up to date row by row.
- Krum (C ``krum_solve``, torch ``_methods.krum._krum_impl``): scores from the distances
  ‖g_i − g_j‖² = max(G_ii + G_jj − 2G_ij, 0), quantised to 36 significant bits, the m lowest averaged.

Non-finite input gives NaN (GradVac: NaN coefficients, and the targets come back unchanged).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import padded, triton_op, warps
from ._float import finite, nan, recip, sqrt
from ._tile import col, load_square, store_square
from .aot import Kernel

#: Krum's scores are rounded to 36 significant bits: the 53 − 36 = 17 low bits of the float64
#: significand go, rounded half to even (just under half a unit is added, plus the kept lowest bit).
DROPPED_BITS = 17
DROPPED = tl.constexpr(DROPPED_BITS)
BELOW_HALF = tl.constexpr((1 << (DROPPED_BITS - 1)) - 1)
KEPT = tl.constexpr(-(1 << DROPPED_BITS))  # the mask ~(2^17 − 1)
#: Scores below 2^−1000 are scaled by 2^100 for the rounding (subnormals have no implicit bit).
TINY = tl.constexpr(2.0**-1000)
UP = tl.constexpr(2.0**100)
DOWN = tl.constexpr(2.0**-100)


@triton.jit
def ranks(x: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """rank[i, j] = #{l < k, l ≠ i : x_il < x_ij, or x_il = x_ij and l < j}: where j falls in row i
    sorted stably with i itself left out (for j ≠ i, j < k)."""
    r = tl.arange(0, KP)
    rank = tl.zeros([KP, KP], tl.int32)
    for l in range(0, k):
        xl = col(x, l, KP)[:, None]
        before = (xl < x) | ((xl == x) & (l < r[None, :]))
        rank += (before & (r[:, None] != l)).to(tl.int32)
    return rank


@triton.jit
def _partners(keys_ptr: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """rank[i, j] of j in row i of the keys, KP (never a step) on the diagonal and the padding."""
    r = tl.arange(0, KP)
    square = (r[:, None] < k) & (r[None, :] < k)
    keys = tl.load(keys_ptr + r[:, None] * k + r[None, :], mask=square, other=0.0).to(tl.float64)
    return tl.where(square & (r[:, None] != r[None, :]), ranks(keys, k, KP), KP)


@triton.jit
def _all_finite(ptr: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    r = tl.arange(0, KP)
    x = tl.load(ptr + r[:, None] * k + r[None, :], mask=(r[:, None] < k) & (r[None, :] < k), other=0.0)
    return tl.sum((~finite(x.to(tl.float64))).to(tl.int32)) == 0


@triton.jit
def _pcgrad_kernel(g_ptr: tl.tensor, keys_ptr: tl.tensor, out_ptr: tl.tensor, k: tl.tensor, KP: tl.constexpr,
                   WEIGHTS: tl.constexpr) -> None:
    """PCGrad's C (C ``py_pcgrad``), or with WEIGHTS its column sums 1ᵀC."""
    r = tl.arange(0, KP)
    inside = r < k
    square = inside[:, None] & inside[None, :]
    ok = _all_finite(g_ptr, k, KP)
    rank = _partners(keys_ptr, k, KP)
    c = tl.where(r[:, None] == r[None, :], 1.0, 0.0).to(tl.float64)
    for t in range(0, k - 1):
        pick = rank == t
        j = tl.sum(tl.where(pick, r[None, :], 0), 1)  # row i's partner (0 in padding rows, unused)
        gj = tl.load(g_ptr + r[None, :] * k + j[:, None], mask=square, other=0.0).to(tl.float64)  # G_mj
        gjj = tl.load(g_ptr + j * (k + 1), mask=inside, other=0.0).to(tl.float64)
        dot = tl.sum(c * gj, 1)  # g_i'·g_j
        coef = tl.where((dot < 0) & (gjj > 0), dot * recip(tl.where(gjj > 0, gjj, 1.0)), 0.0)
        c = c - tl.where(pick, coef[:, None], 0.0)
    c = tl.where(ok, c, nan())
    if WEIGHTS:
        tl.store(out_ptr + r, tl.sum(tl.where(inside[:, None], c, 0.0), 0), mask=inside)
    else:
        store_square(out_ptr, c, k, KP)


@triton.jit
def _clamp0(x: tl.tensor) -> tl.tensor:
    """max(x, 0), keeping NaN (as torch's clamp_min)."""
    return tl.where(x < 0, 0.0, x)


@triton.jit
def _gradvac_kernel(g_ptr: tl.tensor, target_ptr: tl.tensor, keys_ptr: tl.tensor, c_ptr: tl.tensor, new_ptr: tl.tensor,
                    k: tl.tensor, decay: tl.float64, KP: tl.constexpr) -> None:
    """GradVac's C and updated targets, step for step as ``_methods.gradvac.gradvac_matrix``."""
    decay = tl.zeros([], tl.float64) + decay  # float64 in the interpreter too
    r = tl.arange(0, KP)
    inside = r < k
    square = inside[:, None] & inside[None, :]
    ok = _all_finite(g_ptr, k, KP) & _all_finite(target_ptr, k, KP)
    rank = _partners(keys_ptr, k, KP)
    target = tl.load(target_ptr + r[:, None] * k + r[None, :], mask=square, other=0.0).to(tl.float64)
    c = tl.where(r[:, None] == r[None, :], 1.0, 0.0).to(tl.float64)
    cg = tl.load(g_ptr + r[:, None] * k + r[None, :], mask=square, other=0.0).to(tl.float64)  # C G
    for t in range(0, k - 1):
        pick = rank == t
        j = tl.sum(tl.where(pick, r[None, :], 0), 1)
        gj = tl.load(g_ptr + j[:, None] * k + r[None, :], mask=square, other=0.0).to(tl.float64)  # G_j:
        nj = sqrt(_clamp0(tl.load(g_ptr + j * (k + 1), mask=inside, other=0.0).to(tl.float64)))
        dot = tl.sum(tl.where(pick, cg, 0.0), 1)
        ni_sq = _clamp0(tl.sum(cg * c, 1))
        ni = sqrt(ni_sq)
        valid = (ni > 0) & (nj > 0)
        phi = tl.where(valid, dot * recip(tl.where(valid, ni * nj, 1.0)), 0.0)
        phi = tl.where(phi < -1.0, -1.0, tl.where(phi > 1.0, 1.0, phi))
        goal = tl.sum(tl.where(pick, target, 0.0), 1)
        root = sqrt(_clamp0(1.0 - goal * goal))
        # Not gated on ‖g_i'‖ > 0: a row that nearly cancelled has a norm known only to G's rounding,
        # and the correction below is continuous in it (PCGrad's where φ̂ = 0).
        adjust = (nj > 0) & (dot < goal * ni * nj) & (root > 0)
        # ‖g_i'‖(φ̂ √(1−φ²) − φ √(1−φ̂²)) / (‖g_j‖ √(1−φ̂²)), written so that ‖g_i'‖ cancels from the
        # PCGrad part −g_i'·g_j/‖g_j‖² (it is known only to G's rounding where g_i' nearly cancelled)
        # and enters only through ‖g_i'‖‖g_j‖ sin, times φ̂.
        nj_sq = tl.where(adjust, nj * nj, 1.0)
        sine = sqrt(_clamp0(ni_sq * nj * nj - dot * dot))
        step = goal * sine * recip(nj_sq * tl.where(adjust, root, 1.0)) - dot * recip(nj_sq)
        coef = tl.where(adjust, step, 0.0)
        c = c + tl.where(pick, coef[:, None], 0.0)
        cg = cg + coef[:, None] * gj  # (C G)_i gains coef · G_j:
        target = tl.where(pick, tl.where(valid, (1.0 - decay) * goal + decay * phi, goal)[:, None], target)
    store_square(c_ptr, tl.where(ok, c, nan()), k, KP)
    # Non-finite input leaves the targets as they were: one bad batch does not poison the state.
    old = tl.load(target_ptr + r[:, None] * k + r[None, :], mask=square, other=0.0).to(tl.float64)
    store_square(new_ptr, tl.where(ok, target, old), k, KP)


@triton.jit
def round36(x: tl.tensor) -> tl.tensor:
    """x ≥ 0 rounded to 36 significant bits, half to even: C's ldexp(nearbyint(m·2^36)·2^−36, e)
    for x = m·2^e, m ∈ [½, 1) (and torch's frexp/round/ldexp). inf and NaN stay as they are."""
    small = x < TINY
    y = tl.where(small, x * UP, x)
    bits = y.to(tl.int64, bitcast=True)
    bits = (bits + BELOW_HALF + ((bits >> DROPPED) & 1)) & KEPT
    y = bits.to(tl.float64, bitcast=True)
    return tl.where(finite(x), tl.where(small, y * DOWN, y), x)


@triton.jit
def _krum_kernel(g_ptr: tl.tensor, out_ptr: tl.tensor, k: tl.tensor, f: tl.tensor, m: tl.tensor,
                 KP: tl.constexpr) -> None:
    """Krum's weights (C ``krum_solve``): 1/m on the m rows of lowest quantised score."""
    r = tl.arange(0, KP)
    inside = r < k
    square = inside[:, None] & inside[None, :]
    eye = r[:, None] == r[None, :]
    g = load_square(g_ptr, k, KP)
    ok = tl.sum((~finite(g)).to(tl.int32)) == 0
    d = tl.sum(tl.where(eye, g, 0.0), 1)
    dist = d[:, None] + tl.sum(tl.where(eye, g, 0.0), 0)[None, :] - 2.0 * g
    dist = tl.where(dist > 0, dist, 0.0)
    # The sum of the K − f − 2 smallest distances of row i (itself left out), whatever the ties.
    near = (ranks(dist, k, KP) < k - f - 2) & square & ~eye
    score = round36(tl.sum(tl.where(near, dist, 0.0), 1))
    # Place of row i among the scores, ties to the lower index.
    other = tl.sum(tl.where(eye, score[:, None], 0.0), 0)[None, :]  # score_l along the columns
    below = (other < score[:, None]) | ((other == score[:, None]) & (r[None, :] < r[:, None]))
    place = tl.sum((below & inside[None, :]).to(tl.int32), 1)
    w = tl.where(place < m, recip(tl.zeros([], tl.float64) + m), 0.0)
    tl.store(out_ptr + r, tl.where(ok, w, nan()), mask=inside)


@triton_op("gradagg::tr_pcgrad", mutates_args=())
def pcgrad(g: torch.Tensor, keys: torch.Tensor, weights: bool) -> torch.Tensor:
    """PCGrad's coefficient matrix C [K, K] (rows g_i' = Σ_j C_ij g_j), or its column sums 1ᵀC [K]
    (``weights``), for the K x K float64 Gramian g and the projection orders given by sorting each
    row of ``keys`` [K, K] (the task itself last), as C ``py_pcgrad``. NaN for non-finite g."""
    k = g.shape[-1]
    g, keys = g.contiguous(), keys.contiguous()
    out = torch.empty(k if weights else (k, k), dtype=torch.float64, device=g.device)
    wrap_triton(_pcgrad_kernel)[(1,)](g, keys, out, k, KP=padded(k), WEIGHTS=weights, num_warps=warps(k))
    return out


def _gradvac_warps(kp: int) -> int:
    """GradVac keeps four K x K tiles (C, C G, the targets, the ranks): at K = 32 they stay in
    registers with 8 warps, not with 4. (At K = 64, 16 warps spill more than 8.)"""
    return 8 if kp >= 32 else 4


@triton_op("gradagg::tr_gradvac", mutates_args=())
def gradvac(g: torch.Tensor, target: torch.Tensor, keys: torch.Tensor, decay: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, updated target cosines) of GradVac (``_methods.gradvac.gradvac_matrix``) for the K x K
    float64 Gramian g, the targets [K, K] and the orders of ``keys`` (as ``pcgrad``). For non-finite
    g or targets: C is NaN and the targets are returned unchanged."""
    k = g.shape[-1]
    g, target, keys = g.contiguous(), target.contiguous(), keys.contiguous()
    c = torch.empty((k, k), dtype=torch.float64, device=g.device)
    new = torch.empty((k, k), dtype=torch.float64, device=g.device)
    wrap_triton(_gradvac_kernel)[(1,)](g, target, keys, c, new, k, float(decay), KP=padded(k),
                                       num_warps=_gradvac_warps(padded(k)))
    return c, new


@triton_op("gradagg::tr_krum", mutates_args=())
def krum(g: torch.Tensor, f: int, m: int) -> torch.Tensor:
    """Krum's weights [K] for the K x K float64 Gramian g (0 ≤ f ≤ K − 3, 1 ≤ m ≤ K), as C
    ``krum_solve``; NaN for non-finite g."""
    k = g.shape[-1]
    g = g.contiguous()
    out = torch.empty(k, dtype=torch.float64, device=g.device)
    wrap_triton(_krum_kernel)[(1,)](g, out, k, f, m, KP=padded(k), num_warps=warps(k))
    return out


AOT = [
    Kernel(_pcgrad_kernel, {"g_ptr": "*fp64", "keys_ptr": "*fp64", "out_ptr": "*fp64", "k": "i32", "KP": "constexpr",
                            "WEIGHTS": "constexpr"}, {"WEIGHTS": True}),
    Kernel(_pcgrad_kernel, {"g_ptr": "*fp64", "keys_ptr": "*fp64", "out_ptr": "*fp64", "k": "i32", "KP": "constexpr",
                            "WEIGHTS": "constexpr"}, {"WEIGHTS": False}),
    Kernel(_gradvac_kernel, {"g_ptr": "*fp64", "target_ptr": "*fp64", "keys_ptr": "*fp64", "c_ptr": "*fp64",
                             "new_ptr": "*fp64", "k": "i32", "decay": "fp64", "KP": "constexpr"}, warps=_gradvac_warps),
    Kernel(_krum_kernel, {"g_ptr": "*fp64", "out_ptr": "*fp64", "k": "i32", "f": "i32", "m": "i32",
                          "KP": "constexpr"}),
]
