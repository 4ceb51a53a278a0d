"""The Triton spectral kernels (``gradagg.solvers.gpu.spectral``: eigh, clean, graded_range) and the
closed-form methods that use them (IMTL-G, ConFIG, Aligned-MTL) on the Triton route.

Without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1). Each kernel is checked against LAPACK (torch), the C solvers, the torch
reference it replaces, mpmath at 40 digits for the relative accuracy on graded matrices, and the
identities its output must satisfy. The methods must agree with the default CPU route and make no
host read (no ``.item()``/``bool(tensor)`` and no linalg function that checks its result).
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import gradagg
from gradagg import _device, _registry
from gradagg._numerics import FLOAT64_NOISE, eigen_cut
from gradagg._registry import Context
from gradagg.solvers import native, spectral

from asserts import OpLog, assert_close_direction
from strategies import Case, cases

gs = pytest.importorskip("gradagg.solvers.gpu.spectral")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not _device.interpreting(),
                                reason="the kernels need a GPU or TRITON_INTERPRET=1")
EPS = float(np.finfo(np.float64).eps)

# (kind, K, D): the hard cases, each at a few sizes.
HARD = [("random", 1, 3), ("random", 2, 5), ("opposite", 3, 6), ("duplicate", 5, 8), ("zero_row", 5, 7),
        ("rank_deficient", 8, 12), ("norm_spread", 8, 10), ("low_rank_spread", 8, 12), ("random", 16, 20),
        ("norm_spread", 16, 4)]


def gramian(kind: str, k: int, d: int, seed: int = 0) -> np.ndarray:
    jn = Case(kind, k, d, 1.0, seed).numpy()
    return jn @ jn.T


def t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, device=DEVICE)


def npy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def mp_eigvalsh(a: np.ndarray) -> np.ndarray:
    with mpmath.workdps(40):
        return np.array(sorted(float(x) for x in mpmath.eigsy(mpmath.matrix(a.tolist()), eigvals_only=True)))


def mp_sigma2(f: np.ndarray) -> np.ndarray:
    with mpmath.workdps(40):
        return np.array(sorted((float(x) ** 2 for x in mpmath.svd_r(mpmath.matrix(f.tolist()), compute_uv=False)),
                               reverse=True))


# ---- eigh --------------------------------------------------------------------------------------


def check_eigh(a: np.ndarray, lam: np.ndarray, vec: np.ndarray, factor: float = 20.0) -> None:
    k = a.shape[0]
    scale = np.abs(a).max()
    tol = factor * k * EPS
    assert (np.diff(lam) >= 0).all(), "eigenvalues not ascending"
    assert np.abs(vec.T @ vec - np.eye(k)).max() <= tol
    assert np.abs(vec @ np.diag(lam) @ vec.T - a).max() <= tol * scale
    assert np.abs(lam - np.linalg.eigvalsh(a)).max() <= tol * scale


@pytest.mark.parametrize("kind,k,d", HARD)
def test_eigh_hard_cases(kind, k, d):
    g = gramian(kind, k, d)
    lam, vec = gs.eigh(t(g))
    check_eigh(g, npy(lam), npy(vec))


def test_eigh_large_k():
    g = gramian("low_rank_spread", 40, 30, seed=3)
    a = g / np.sqrt(np.outer(np.diag(g), np.diag(g)))
    lam, vec = gs.eigh(t(a))
    check_eigh(a, npy(lam), npy(vec))


@pytest.mark.parametrize("k", [3, 8, 16])
def test_eigh_graded_relative_accuracy(k):
    """Norms spanning 1e-6..1e6: Jacobi keeps every eigenvalue of G to high relative accuracy
    (Demmel & Veselić); LAPACK's eigh only to ε λ_max, which loses the small ones."""
    rng = np.random.default_rng(k)
    j = rng.standard_normal((k, k + 3)) * np.logspace(-6, 6, k)[rng.permutation(k), None]
    g = j @ j.T
    exact = mp_eigvalsh(g)
    lam, _ = gs.eigh(t(g))
    assert (np.abs(npy(lam) - exact) / exact).max() <= 1e-11
    if k >= 8:  # the case is hard: the standard method is far off
        assert (np.abs(np.linalg.eigvalsh(g) - exact) / exact).max() > 1e-6


def test_eigh_reads_the_lower_triangle_and_any_scale():
    g = gramian("random", 5, 7, seed=1)
    upper_garbage = g + np.triu(np.full_like(g, 7.0), 1)
    for scale in (1e-300, 1.0, 1e300):
        lam, vec = gs.eigh(t(upper_garbage * scale))
        check_eigh(g * scale, npy(lam), npy(vec))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_eigh_non_finite_gives_nan(bad):
    g = gramian("random", 3, 4)
    g[2, 1] = g[1, 2] = bad
    lam, vec = gs.eigh(t(g))
    assert torch.isnan(lam).all() and torch.isnan(vec).all()


# ---- clean ---------------------------------------------------------------------------------------


def check_clean(raw: np.ndarray, cut: float, tiny: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Runs the kernel and checks it against C ``prepare`` (flags and ½(G + Gᵀ)), ``denoise`` (G_c,
    P) and the identities G_c P = G_c, P² = P, no eigenvalue of S G_c S in (1e-12, cut]."""
    g_c, proj, status = (npy(x) for x in gs.clean(t(raw), cut, tiny))
    status = int(status)
    sym, flags = native.prepare(torch.tensor(raw), cut, tiny)
    # C prepare's flags, except that a zero row is a zero gradient here, not a suspected underflow.
    d = np.diag(raw)
    rescue = bool((~np.isfinite(d) | ((d > 0) & (d < tiny))).any())
    flags = (flags & ~gs.RESCUE) | (gs.RESCUE if rescue else 0)
    assert status & 3 == flags & 3
    if flags & 3:
        assert np.isnan(g_c).all() and np.isnan(proj).all()
        return g_c, proj, status
    assert bool(status & gs.DROPPED) == bool(flags & native.INDEFINITE)
    if not status & gs.DROPPED:  # nothing removed: exactly the symmetrised G and the identity
        assert np.array_equal(g_c, sym.numpy()) and np.array_equal(proj, np.eye(len(raw)))
        return g_c, proj, status
    ref_g, ref_p = (x.numpy() for x in spectral.denoise(sym, cut))
    n = np.sqrt(np.maximum(np.diag(sym.numpy()), 0.0))
    s = np.where(n > 0, 1.0 / np.where(n > 0, n, 1.0), 0.0)
    k = len(raw)
    nn = np.outer(n, n) + 1e-300
    assert (np.abs(g_c - ref_g) <= (2.0 * cut + 100 * k * EPS) * nn).all()
    ratio = np.outer(s, n) + np.eye(k)  # P_ij is measured in units of ‖g_j‖ / ‖g_i‖
    assert (np.abs(proj - ref_p) <= 1e-8 * ratio).all()
    assert (np.abs(g_c @ proj - g_c) <= 1e-12 * k * nn).all()
    assert (np.abs(proj @ proj - proj) <= 1e-8 * ratio).all()
    pos = n > 0
    lam = np.linalg.eigvalsh((g_c * np.outer(s, s))[np.ix_(pos, pos)])
    assert not ((lam > 1e-12) & (lam <= cut)).any()
    return g_c, proj, status


@pytest.mark.parametrize("kind,k,d", HARD)
@pytest.mark.parametrize("noise", [FLOAT64_NOISE, 1e-7])
def test_clean_matches_prepare_and_denoise(kind, k, d, noise):
    g = gramian(kind, k, d)
    n = np.sqrt(np.diag(g))
    raw = g + 1e-17 * np.triu(np.outer(n, n), 1)  # a hair asymmetric, as accumulated Gramians are
    check_clean(raw, eigen_cut(noise, k), 0.0)


def test_clean_removes_the_null_space():
    """Rows a, 0, b, a + b: the eigenvalue 0 of A on the nonzero rows is dropped, P has rank 3 and
    the zero row keeps its unit weight."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 6)) * np.array([[1e-3], [1e3]])
    j = np.stack([a, np.zeros(6), b, a + b])
    _, proj, status = check_clean(j @ j.T, eigen_cut(FLOAT64_NOISE, 4), 0.0)
    assert status == gs.DROPPED
    assert proj[1, 1] == 1.0 and (np.delete(proj[1], 1) == 0).all() and (np.delete(proj[:, 1], 1) == 0).all()
    assert np.linalg.matrix_rank(proj, tol=1e-6) == 3
    assert np.abs(proj @ np.array([1.0, 0.0, 1.0, -1.0])).max() <= 1e-9  # the null combination is gone


@pytest.mark.parametrize("change,tiny", [
    ("inf_diag", 2.0**-60), ("nan_off", 0.0), ("tiny_diag", 2.0**-60), ("zero_row", 2.0**-60), ("zero_row", 0.0),
])
def test_clean_flags(change, tiny):
    """The flags of C ``prepare``: RESCUE for a non-finite or tiny diagonal entry (in (0, tiny); a
    zero row is a zero gradient), NONFINITE for any non-finite entry; then G_c and P are NaN."""
    g = gramian("random", 3, 5)
    if change == "inf_diag":
        g[0, 0] = np.inf
    elif change == "nan_off":
        g[0, 2] = np.nan
    elif change == "tiny_diag":
        g[2] *= 1e-20
        g[:, 2] *= 1e-20
    else:
        g[1] = g[:, 1] = 0.0
    _, _, status = check_clean(g, eigen_cut(1e-7, 3), tiny)
    assert bool(status & gs.RESCUE) == (change in ("inf_diag", "tiny_diag"))


def test_clean_of_a_float32_gramian():
    g = gramian("duplicate", 5, 9, seed=4).astype(np.float32)
    g_c, proj, status = gs.clean(torch.tensor(g, device=DEVICE), eigen_cut(1e-7, 5), 2.0**-60)
    sym, flags = native.prepare(torch.tensor(g), eigen_cut(1e-7, 5), 2.0**-60)
    assert int(status) == flags == gs.DROPPED
    ref_g, ref_p = spectral.denoise(sym, eigen_cut(1e-7, 5))
    assert np.abs(npy(proj) - ref_p.numpy()).max() <= 1e-8
    assert np.abs(npy(g_c) - ref_g.numpy()).max() <= 1e-6 * np.abs(g).max()


# ---- graded_range --------------------------------------------------------------------------------


def factor(n, vec, lam, keep) -> np.ndarray:
    return n[:, None] * vec * np.sqrt(np.where(keep, np.maximum(lam, 0.0), 0.0))


def check_graded(n, vec, lam, keep) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's (U, σ², valid) for the spectrum: U orthogonal, σ² descending and zero beyond
    Σ keep, U diag(σ²) Uᵀ = F Fᵀ to rounding relative to n_i n_j."""
    u, sigma2, valid = (npy(x) for x in gs.graded_range(t(n), t(vec), t(lam), torch.tensor(keep, device=DEVICE)))
    k, r = len(n), int(keep.sum())
    assert (valid == (np.arange(k) < r)).all()
    assert (np.diff(sigma2[:r]) <= 0).all() and (sigma2[r:] == 0).all() and (sigma2[:r] > 0).all()
    assert np.abs(u.T @ u - np.eye(k)).max() <= 50 * k * EPS
    f = factor(n, vec, lam, keep)
    err = np.abs(u @ np.diag(sigma2) @ u.T - f @ f.T)
    assert (err <= 1e-12 * k * (np.outer(n, n) + 1e-300)).all()
    return u, sigma2, valid


@pytest.mark.parametrize("kind,k,d", HARD)
def test_graded_range_matches_torch(kind, k, d):
    g = torch.tensor(gramian(kind, k, d))
    sp = spectral.scaled_spectrum(g, eigen_cut(FLOAT64_NOISE, k))
    _, sigma2, _ = check_graded(*(x.numpy() for x in (sp.n, sp.vec, sp.lam, sp.keep)))
    _, ref_sigma2, ref_valid = spectral.graded_range(sp)  # the torch route (QR + SVD)
    r = int(ref_valid.sum())
    top = ref_sigma2[0].item() if r else 0.0
    assert (np.abs(sigma2[:r] - ref_sigma2.numpy()[:r]) <= 1e-8 * sigma2[:r] + 1e-13 * top).all()


def test_clean_and_graded_range_large_k():
    """K = 40 (a 64 x 64 tile): clean keeps a well-conditioned G exactly (its Cholesky test
    passes, no sweep runs); graded_range resolves a rank-25 spectrum with norms spanning 1e-6..1e6
    like the torch route."""
    check_clean(gramian("random", 40, 60, seed=8), eigen_cut(1e-7, 40), 2.0**-60)
    g = torch.tensor(gramian("low_rank_spread", 40, 25, seed=8))
    sp = spectral.scaled_spectrum(g, eigen_cut(FLOAT64_NOISE, 40))
    _, sigma2, valid = check_graded(*(x.numpy() for x in (sp.n, sp.vec, sp.lam, sp.keep)))
    _, ref, ref_valid = (x.numpy() for x in spectral.graded_range(sp))
    assert (valid == ref_valid).all() and 0 < valid.sum() < 40
    assert (np.abs(sigma2 - ref) <= 1e-8 * sigma2 + 1e-13 * ref.max()).all()


@pytest.mark.parametrize("k,rank", [(3, 3), (8, 8), (8, 5), (16, 16), (16, 9)])
def test_graded_range_relative_accuracy(k, rank):
    """F = N V Λ^(1/2) with well-conditioned V Λ^(1/2) and norms spanning 1e-6..1e6: every σ² to
    high relative accuracy against mpmath (the one-sided Jacobi SVD of Demmel & Veselić)."""
    rng = np.random.default_rng(100 + k + rank)
    vec, _ = np.linalg.qr(rng.standard_normal((k, k)))
    lam = np.sort(rng.uniform(0.05, 2.0, k))
    keep = np.arange(k) >= k - rank
    n = np.logspace(-6, 6, k)[rng.permutation(k)]
    _, sigma2, _ = check_graded(n, vec, lam, keep)
    exact = mp_sigma2(factor(n, vec, lam, keep))[:rank]
    assert (np.abs(sigma2[:rank] - exact) / exact).max() <= 1e-12 * k


def test_graded_range_of_duplicates_and_zero_rows():
    """Three equal rows and a zero one: A has the single eigenvalue 3 on them, F_i = 2 on the
    nonzero rows, so σ² = 12 and the other three are exactly 0 and not valid."""
    v = np.array([1.0, 1.0, 0.0, 1.0]) / np.sqrt(3.0)
    q, _ = np.linalg.qr(np.concatenate([v[:, None], np.random.default_rng(0).standard_normal((4, 3))], 1))
    vec = np.concatenate([q[:, 1:], v[:, None]], 1)
    _, sigma2, _ = check_graded(np.array([2.0, 2.0, 0.0, 2.0]), vec, np.array([0.0, 0.0, 0.0, 3.0]),
                                np.array([False, False, False, True]))
    assert sigma2[0] == pytest.approx(12.0, rel=1e-14)


def test_graded_range_non_finite_gives_nan():
    n, vec = np.array([1.0, np.nan, 2.0]), np.eye(3)
    u, sigma2, _ = gs.graded_range(t(n), t(vec), t(np.ones(3)), torch.ones(3, dtype=torch.bool, device=DEVICE))
    assert torch.isnan(u).all() and torch.isnan(sigma2).all()


# ---- the closed-form methods on the Triton route ------------------------------------------------

METHODS = [("imtl_g", {}), ("config", {})] + [("aligned_mtl", {"pref": None, "scale_mode": mode})
                                              for mode in ("min", "median", "rmse")]
METHOD_CASES = [("random", 1, 3), ("opposite", 3, 6), ("duplicate", 5, 8), ("zero_row", 5, 7),
                ("rank_deficient", 8, 12), ("norm_spread", 8, 10), ("low_rank_spread", 16, 24)]


def weighting(name: str, g: torch.Tensor, options: dict) -> torch.Tensor:
    return _registry.lookup(name).weighting(g, Context(noise=FLOAT64_NOISE), **options)


@pytest.mark.parametrize("name,options", METHODS, ids=lambda x: x if isinstance(x, str) else x.get("scale_mode", ""))
@pytest.mark.parametrize("kind,k,d", METHOD_CASES)
def test_methods_agree_with_the_cpu_route(name, options, kind, k, d):
    jn = Case(kind, k, d, 1.0, 7).numpy()
    g, _ = spectral.denoise(torch.tensor(jn @ jn.T), eigen_cut(FLOAT64_NOISE, k))  # the clean G the methods see
    reference = weighting(name, g, options).numpy()  # the C solvers and the torch reference
    with _device.use_solver("triton"):
        w = npy(weighting(name, g.to(DEVICE), options))
    scale = np.linalg.norm(jn, axis=1).max()
    floor = 1e-9 * (np.abs(reference).sum() + np.abs(w).sum()) * scale
    assert_close_direction(w @ jn, reference @ jn, rtol=1e-7, floor=floor)


@pytest.mark.parametrize("name,options", METHODS, ids=lambda x: x if isinstance(x, str) else x.get("scale_mode", ""))
@pytest.mark.parametrize("kind", ["low_rank_spread", "random"])
def test_methods_make_no_host_read(name, options, kind):
    jn = Case(kind, 6, 9, 1.0, 11).numpy()
    g = t(jn @ jn.T)
    with _device.use_solver("triton"):
        with OpLog() as mode:
            weighting(name, g, options)
    assert f"gradagg.tr_{name}.default" in mode.ops  # the (fused) kernel ran, not the C solvers
    assert not mode.banned(), mode.banned()
    # and the check can fail: the default route checks LAPACK's result
    with OpLog() as mode, native.disabled():
        weighting(name, g.cpu(), options)
    assert mode.banned()


@pytest.mark.parametrize("name", ["imtl_g", "config", "aligned_mtl"])
def test_public_api_on_the_triton_route(name):
    jn = Case("norm_spread", 6, 10, 1.0, 5).numpy()
    j = torch.tensor(jn, device=DEVICE)
    reference = gradagg.weights(j.cpu(), name).numpy()
    with _device.use_solver("triton"):
        w = npy(gradagg.weights(j, name))
    scale = np.linalg.norm(jn, axis=1).max()
    assert_close_direction(w @ jn, reference @ jn, rtol=1e-9, floor=1e-12 * np.abs(reference).sum() * scale)


@settings(max_examples=12)
@given(case=cases(max_k=8, max_d=12))
def test_drawn_cases(case):
    jn = case.numpy()
    g = jn @ jn.T
    k = len(g)
    lam, vec = gs.eigh(t(g))
    check_eigh(g, npy(lam), npy(vec))
    g_c, _, status = check_clean(g, eigen_cut(FLOAT64_NOISE, k), 0.0)
    if status & 3:
        return
    sp = spectral.scaled_spectrum(torch.tensor(g_c), eigen_cut(FLOAT64_NOISE, k))
    _, sigma2, _ = check_graded(*(x.numpy() for x in (sp.n, sp.vec, sp.lam, sp.keep)))
    ref = spectral.graded_range(sp)[1].numpy()
    assert (np.abs(sigma2 - ref) <= 1e-8 * sigma2 + 1e-13 * np.abs(ref).max(initial=0.0)).all()
