"""Every method in float32, bfloat16 and float16 against its float64 answer on the same Jacobian.

The Jacobians have exact structure in float64 (``strategies.conditioned_low_rank``): low rank (rank
1 to K − 1, K up to 64), norms spread over 10^±6 (10^±2 in float16, whose range ends at 6.5e4),
and both at once. The low-precision call gets them rounded to its dtype. The bounds are in
``precision.py``: 1e-4 in float32 by ‖d_x − d_64‖ / max(‖d_64‖, 1e-5 max‖g_i‖), 16 units of
rounding in bfloat16 and float16, with the documented exceptions (IMTL-G's cancelling
normalisation, degenerate Nash-MTL and FairGrad) and oracles for the discontinuous methods.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch

import gradagg

from asserts import CROSS
from precision import BOUND, check_against_float64, run
from strategies import conditioned_low_rank

METHODS = [m for m in sorted(gradagg.methods()) if m not in CROSS]  # cross=: tests/test_cross.py
#: Chains run on the full-rank family only: on low-rank Jacobians PCGrad and GradVac leave rows
#: nearly cancelled (‖g_i'‖ ~ 1e-4 of the terms that make them), whose norm a float32 Gramian knows
#: only to √δ ≈ 1e-3; NSGD then scales their noise to unit length, MGDA reads them as zero rows.
#: (``test_cancelled_rows_are_zero_at_the_floor`` checks what gradagg does there.)
CHAINS = [("pcgrad", "nsgd"), ("gradvac", "mgda"), ("nsgd", "imtl_g"),
          (("cagrad", {"c": 1.0}), ("trimmed_mean", {"trim": 1}))]
FAMILIES = ("low_rank", "norm_spread", "low_rank_spread")
SEEDS = range(12)
CASES = [(m, f) for m in METHODS for f in FAMILIES] + [(c, "norm_spread") for c in CHAINS]


def family(name: str, seed: int, spread: float) -> np.ndarray:
    rng = np.random.default_rng([seed, FAMILIES.index(name)])
    k = int(rng.integers(2, 65))
    if name == "norm_spread":
        return conditioned_low_rank(k, int(rng.integers(k, k + 300)), k, spread, rng)
    r = int(rng.integers(1, k))
    return conditioned_low_rank(k, int(rng.integers(2, 300)), r, spread if name == "low_rank_spread" else 0.0, rng)


@pytest.mark.parametrize(("method", "family_name"), CASES, ids=str)
def test_low_precision_agrees_with_float64(method, family_name):
    worst = {}
    for seed in SEEDS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            j64 = family(family_name, seed, 2.0 if dtype == torch.float16 else 6.0)
            if "trimmed_mean" in str(method) and len(j64) < 3:
                continue
            ref = run(method, torch.tensor(j64))
            if ref is None:
                continue
            jx = torch.tensor(j64).to(dtype)
            out = run(method, jx)
            assert out.dtype == dtype and torch.isfinite(out).all()
            worst[dtype] = max(worst.get(dtype, 0.0), check_against_float64(method, out, ref, j64, jx))
    assert worst, "no case ran"


# --- the float64 answers of the pseudo-inverse methods, against 50-digit arithmetic -----------------


def _mp_gramian_spectrum(j64: np.ndarray, rank: int) -> tuple[mpmath.matrix, list, mpmath.matrix]:
    """(G, its r largest eigenvalues, their eigenvectors), from J in 50-digit arithmetic."""
    mpmath.mp.dps = 50
    j = mpmath.matrix(j64.tolist())
    g = j * j.T
    lam, vec = mpmath.eigsy(g)
    order = sorted(range(len(j64)), key=lambda i: lam[i], reverse=True)[:rank]
    return g, [lam[i] for i in order], mpmath.matrix([[vec[r, i] for i in order] for r in range(len(j64))])


def _spread_low_rank(seed: int, spread: float) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 9))
    r = int(rng.integers(1, k))
    return conditioned_low_rank(k, int(rng.integers(r, 30)), r, spread, rng), r


@pytest.mark.parametrize("spread", [0.0, 3.0, 6.0])
@pytest.mark.parametrize("seed", range(6))
def test_imtl_g_is_the_pseudo_inverse_of_g_on_singular_gramians(seed, spread):
    """w = G⁺√diag G / Σ(G⁺√diag G), with G⁺ the pseudo-inverse of G itself (not of S G S)."""
    j64, r = _spread_low_rank(seed, spread)
    g, lam, vec = _mp_gramian_spectrum(j64, r)
    n = mpmath.matrix([mpmath.sqrt(g[i, i]) for i in range(len(j64))])
    v = vec * mpmath.diag([1 / x for x in lam]) * (vec.T * n)
    total = sum(v)
    expected = np.array([float(x / total) for x in v])
    w = gradagg.weights(torch.tensor(j64), "imtl_g").numpy()
    d, d_expected = w @ j64, expected @ j64
    scale = max(np.linalg.norm(d_expected), 1e-5 * np.linalg.norm(j64, axis=1).max())
    assert np.linalg.norm(d - d_expected) <= 1e-9 * np.abs(expected).sum() * scale
    # The same from the float32 Jacobian, to the bound of the precision test.
    d32 = gradagg.aggregate(torch.tensor(j64).float(), "imtl_g").double().numpy()
    assert np.linalg.norm(d32 - d_expected) <= (BOUND[torch.float32] + 16 * 2.0**-24 * np.abs(expected).sum()) * scale


@pytest.mark.parametrize("seed", range(6))
def test_config_is_the_least_squares_direction_on_low_rank(seed):
    """x = U⁺1, the least-norm least-squares solution of u_i·x = 1 (numpy's lstsq on the unit rows)."""
    j64, _ = _spread_low_rank(seed, 6.0)
    units = j64 / np.linalg.norm(j64, axis=1, keepdims=True)
    x = np.linalg.lstsq(units, np.ones(len(j64)), rcond=1e-10)[0]
    unit = x / np.linalg.norm(x)
    expected = (j64 @ unit).sum() * unit
    for dtype, bound in ((torch.float64, 1e-10), (torch.float32, BOUND[torch.float32])):
        d = gradagg.aggregate(torch.tensor(j64).to(dtype), "config").double().numpy()
        assert np.linalg.norm(d - expected) <= bound * max(np.linalg.norm(expected), 1e-5 * np.abs(j64).max())


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("seed", range(6))
def test_aligned_mtl_under_spread_norms(seed, mode):
    """σ V Λ^(−1/2) Vᵀ p over G's nonzero eigenpairs, in 50-digit arithmetic, where the norms spread
    over 10^±6 (the small eigenvalues, which set σ in mode "min", belong to the small tasks)."""
    j64, r = _spread_low_rank(seed, 6.0)
    _, lam, vec = _mp_gramian_spectrum(j64, r)
    ordered = sorted(lam)
    sigma2 = {"min": ordered[0], "rmse": sum(lam) / r,
              "median": (ordered[(r - 1) // 2] + ordered[r // 2]) / 2}[mode]
    p = mpmath.matrix([mpmath.mpf(1) / len(j64)] * len(j64))
    w = mpmath.sqrt(sigma2) * vec * mpmath.diag([1 / mpmath.sqrt(x) for x in lam]) * (vec.T * p)
    expected = np.array([float(x) for x in w]) @ j64
    scale = max(np.linalg.norm(expected), 1e-5 * np.linalg.norm(j64, axis=1).max())
    for dtype, bound in ((torch.float64, 1e-7), (torch.float32, BOUND[torch.float32])):
        d = gradagg.aggregate(torch.tensor(j64).to(dtype), "aligned_mtl", scale_mode=mode).double().numpy()
        assert np.linalg.norm(d - expected) <= bound * scale, f"{dtype}: {np.linalg.norm(d - expected) / scale:.2e}"


def test_cancelled_rows_are_zero_at_the_floor():
    """PCGrad on g_2 = −2 g_1 + ε h (ε = 1e-4) leaves g_1' and g_2' of relative norm ~ε. float64
    resolves them (to its own δ / ε² ≈ 1e-7), and NSGD scales them to unit length; a float32 Gramian
    knows their squared norms only to δ ~ 1e-6 ≫ ε², so they are cancelled rows (zero) there, and
    NSGD keeps only g_3."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((40, 3)))
    g1, h, g3 = q.T * np.array([[3.0], [1.0], [2.0]])
    j64 = np.stack([g1, -2 * g1 + 1e-4 * h, g3])
    state = gradagg.init(("pcgrad", "nsgd"), 3)
    d64 = gradagg.aggregate(torch.tensor(j64), ("pcgrad", "nsgd"), state=state).numpy()
    # By hand: g_3 is orthogonal to both, so only g_1 and g_2 project, each off the other.
    r1 = j64[0] - (j64[0] @ j64[1]) / (j64[1] @ j64[1]) * j64[1]
    r2 = j64[1] - (j64[1] @ j64[0]) / (j64[0] @ j64[0]) * j64[0]
    rows = np.stack([r1, r2, g3])
    n = np.linalg.norm(rows, axis=1)
    m = (n / n.sum()) @ n  # NSGD before update_at: α = n / Σn, m = Σ α_i n_i, w_i = m / n_i
    np.testing.assert_allclose(d64, (m / n) @ rows, rtol=1e-5, atol=1e-5 * np.abs(d64).max())
    state = gradagg.init(("pcgrad", "nsgd"), 3)
    d32 = gradagg.aggregate(torch.tensor(j64).float(), ("pcgrad", "nsgd"), state=state).double().numpy()
    np.testing.assert_allclose(d32, g3, rtol=1e-6, atol=1e-6 * np.abs(g3).max())
