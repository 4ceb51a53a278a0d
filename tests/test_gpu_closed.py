"""The fused closed-form kernels (``gradagg.solvers.gpu.closed``: IMTL-G, ConFIG, Aligned-MTL).

Without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1). Each launcher is checked on the hard cases against the torch spectral path it
fuses (the method's ``_impl`` with the C solvers disabled: LAPACK's eigh, then QR + SVD) and against
independent facts computed from J in 50-digit arithmetic: IMTL-G's w = G⁺n / Σ G⁺n and its equal
projections d·u_i, ConFIG's d = (Σ g_i·x̂) x̂ for x = U⁺1 and its equal cosines, Aligned-MTL's
σ V Λ^(−1/2) Vᵀ p with σ² from the mode. Through the public API the Triton route must agree with the
default route, and a whole call must dispatch few, constant ops, read nothing back and reach no
host-side operator.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import gradagg
from gradagg import _device
from gradagg._methods.aligned_mtl import _aligned_impl
from gradagg._methods.config import _config_impl
from gradagg._methods.imtl_g import _imtl_g_impl
from gradagg._numerics import FLOAT64_NOISE, eigen_cut
from gradagg.solvers import native

from asserts import OpLog, assert_close_direction
from strategies import Case, cases

closed = pytest.importorskip("gradagg.solvers.gpu.closed")
from gradagg.solvers.gpu.census import Census  # noqa: E402  (after triton is known to import)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not _device.interpreting(),
                                reason="the kernels need a GPU or TRITON_INTERPRET=1")
MODES = ("min", "median", "rmse")
#: The op budget of one call on the accelerator route.
MAX_OPS = 60

# (kind, K, D): the strategies' hard kinds at K in {1, 2, 3, 5, 8, 16}, and hand-made ones:
# "equal_opposite" (g, −g: no direction has equal projections, w = 0), "zeros" (a zero Jacobian),
# "duplicate_zero" (a, 0, a, b: a duplicate and a zero row at once).
CASES = [("random", 1, 3), ("random", 2, 5), ("opposite", 3, 6), ("duplicate", 5, 8), ("zero_row", 5, 7),
         ("rank_deficient", 8, 12), ("norm_spread", 8, 10), ("low_rank_spread", 8, 12), ("random", 16, 20),
         ("norm_spread", 16, 4), ("low_rank_spread", 16, 24), ("equal_opposite", 2, 5), ("zeros", 3, 4),
         ("duplicate_zero", 4, 6)]


def jacobian(kind: str, k: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "equal_opposite":
        a = rng.standard_normal(d)
        return np.stack([a, -a])
    if kind == "zeros":
        return np.zeros((k, d))
    if kind == "duplicate_zero":
        a, b = rng.standard_normal((2, d))
        return np.stack([a, np.zeros(d), a, b])
    return Case(kind, k, d, 1.0, seed).numpy()


def t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, device=DEVICE)


def npy(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


def setup(jn: np.ndarray) -> tuple[np.ndarray, float, int]:
    """(G, cut, r): G = J Jᵀ, the eigenvalue cut, and the rank r that the cut gives A = S G S. The
    cases are chosen so that the rank is unambiguous (no eigenvalue of A near the cut), which makes
    the oracles below well defined."""
    g = jn @ jn.T
    k = len(g)
    cut = eigen_cut(FLOAT64_NOISE, k)
    n = np.sqrt(np.diag(g))
    pos = n > 0
    a = (g / np.outer(np.where(pos, n, 1.0), np.where(pos, n, 1.0)))[np.ix_(pos, pos)]
    lam = np.linalg.eigvalsh(a) if pos.any() else np.zeros(0)
    assert not ((lam > cut / 30) & (lam < 1e3 * cut)).any(), "the rank is ambiguous at the cut"
    return g, cut, int((lam > cut).sum())


def mp_gramian(jn: np.ndarray, r: int) -> tuple[mpmath.matrix, list, mpmath.matrix]:
    """(G, its r largest eigenvalues, their eigenvectors), from J in 50-digit arithmetic."""
    k = len(jn)
    j = mpmath.matrix(jn.tolist())
    g = j * j.T
    lam, vec = mpmath.eigsy(g)
    order = sorted(range(k), key=lambda i: lam[i], reverse=True)[:r]
    return g, [lam[i] for i in order], mpmath.matrix([[vec[row, i] for i in order] for row in range(k)])


def floor_scale(d_expected: np.ndarray, jn: np.ndarray) -> float:
    """The size d is measured against: ‖d‖, at least 1e-5 of the largest gradient (an answer of 0
    is then checked to rounding of the gradients)."""
    return max(np.linalg.norm(d_expected), 1e-5 * np.linalg.norm(jn, axis=1).max(initial=0.0), 1e-300)


def torch_reference(name: str, g: np.ndarray, cut: float, pref: np.ndarray | None = None, mode: int = 0):
    """The method's torch spectral path (what the kernel fuses), on CPU with the C solvers disabled."""
    gt = torch.tensor(g)
    with native.disabled():
        if name == "imtl_g":
            return _imtl_g_impl(gt, cut).numpy()
        if name == "config":
            return _config_impl(gt, cut).numpy()
        return _aligned_impl(gt, torch.tensor(pref), mode, cut).numpy()


def assert_matches_torch(w: np.ndarray, ref: np.ndarray, jn: np.ndarray) -> None:
    """d = Jᵀw against the torch path's, to 1e-7 relative (the torch path's QR + SVD of a graded
    factor is the less accurate of the two on norm-spread low-rank cases), with a floor at the
    rounding of Σ|w_j|‖g_j‖."""
    scale = np.linalg.norm(jn, axis=1).max(initial=0.0)
    floor = 1e-9 * (np.abs(ref).sum() + np.abs(w).sum()) * scale
    assert_close_direction(w @ jn, ref @ jn, rtol=1e-7, floor=floor)


def unit_inverse_is_fast(g: np.ndarray, cut: float) -> bool:
    """Whether C ``unit_pinv_ones`` (and the kernels' fast path) takes the Cholesky route."""
    n = np.sqrt(np.diag(g))
    pos = n > 0
    if not pos.any():
        return True
    a = (g / np.outer(np.where(pos, n, 1.0), np.where(pos, n, 1.0)))[np.ix_(pos, pos)]
    try:
        np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        return False
    bound = 1.0 / np.linalg.norm(np.linalg.inv(a))
    return bound > max(cut, 1e-10 * pos.sum())


def test_the_cases_take_both_paths():
    """The cases exercise the fast path (Cholesky) and the spectral path (Jacobi sweeps)."""
    fast = [unit_inverse_is_fast(*setup(jacobian(*c))[:2]) for c in CASES]
    assert 3 <= sum(fast) <= len(CASES) - 3, fast


# ---- IMTL-G ----------------------------------------------------------------------------------------


def mp_imtl_g(jn: np.ndarray, r: int) -> np.ndarray:
    """w = G⁺n / Σ G⁺n over G's r nonzero eigenpairs, 0 where Σ G⁺n vanishes (50 digits)."""
    with mpmath.workdps(50):
        g, lam, vec = mp_gramian(jn, r)
        if r == 0:
            return np.zeros(len(jn))
        n = mpmath.matrix([mpmath.sqrt(g[i, i]) for i in range(len(jn))])
        v = vec * mpmath.diag([1 / x for x in lam]) * (vec.T * n)
        total, size = sum(v), sum(abs(x) for x in v)
        assert abs(total) > 1e-6 * size or abs(total) < 1e-30 * (size + 1), "a borderline case"
        if abs(total) <= 1e-6 * size:
            return np.zeros(len(jn))
        return np.array([float(x / total) for x in v])


@pytest.mark.parametrize("kind,k,d", CASES)
def test_imtl_g(kind, k, d):
    jn = jacobian(kind, k, d)
    g, cut, r = setup(jn)
    w = npy(closed.imtl_g(t(g), cut))
    assert_matches_torch(w, torch_reference("imtl_g", g, cut), jn)
    expected = mp_imtl_g(jn, r)
    d_w, d_exp = w @ jn, expected @ jn
    scale = floor_scale(d_exp, jn)
    assert np.linalg.norm(d_w - d_exp) <= 1e-10 * max(np.abs(expected).sum(), 1.0) * scale
    norms = np.linalg.norm(jn, axis=1)
    pos = norms > 0
    if 0 < r == pos.sum() and expected.any():
        # Independent nonzero gradients: d has the same projection on every unit task gradient.
        proj = (jn[pos] @ d_w) / norms[pos]
        assert np.abs(proj - proj.mean()).max() <= 1e-10 * np.abs(expected).sum() * np.linalg.norm(d_w)
        assert proj.mean() > 0


# ---- ConFIG ---------------------------------------------------------------------------------------


def mp_config(jn: np.ndarray, cut: float) -> np.ndarray:
    """d = (Σ g_i·x̂) x̂ for x = U⁺1 on the nonzero unit rows U (A⁺ over A's eigenvalues above the
    cut), 0 where 1 is orthogonal to the range (50 digits)."""
    norms = np.linalg.norm(jn, axis=1)
    rows = jn[norms > 0]
    if len(rows) == 0:
        return np.zeros(jn.shape[1])
    with mpmath.workdps(50):
        j = mpmath.matrix(rows.tolist())
        units = mpmath.matrix([[j[i, c] / mpmath.sqrt(sum(j[i, m] ** 2 for m in range(j.cols)))
                                for c in range(j.cols)] for i in range(j.rows)])
        lam, vec = mpmath.eigsy(units * units.T)
        keep = [i for i in range(len(rows)) if lam[i] > cut]
        along = [sum(vec[m, i] for m in range(len(rows))) for i in keep]
        if mpmath.sqrt(sum(a * a for a in along)) < 1e-8 * mpmath.sqrt(len(rows)):
            return np.zeros(jn.shape[1])
        a = mpmath.matrix(len(rows), 1)
        for i, c in zip(keep, along):
            a += vec[:, i] * (c / lam[i])
        x = units.T * a
        unit = x / mpmath.norm(x)
        total = sum((j * unit)[i] for i in range(len(rows)))
        return np.array([float(total * u) for u in unit])


@pytest.mark.parametrize("kind,k,d", CASES)
def test_config(kind, k, d):
    jn = jacobian(kind, k, d)
    g, cut, r = setup(jn)
    w = npy(closed.config(t(g), cut))
    assert_matches_torch(w, torch_reference("config", g, cut), jn)
    d_exp = mp_config(jn, cut)
    d_w = w @ jn
    assert np.linalg.norm(d_w - d_exp) <= 1e-10 * floor_scale(d_exp, jn)
    norms = np.linalg.norm(jn, axis=1)
    pos = norms > 0
    if 0 < r == pos.sum():
        # Independent nonzero gradients: d has the same positive cosine with every one.
        cosines = (jn[pos] @ d_w) / (norms[pos] * np.linalg.norm(d_w))
        assert np.abs(cosines - cosines.mean()).max() <= 1e-10 and cosines.mean() > 0


# ---- Aligned-MTL ----------------------------------------------------------------------------------


def mp_aligned(jn: np.ndarray, r: int, pref: np.ndarray, mode: str) -> tuple[np.ndarray, float]:
    """(w, σ²): w = σ V Λ^(−1/2) Vᵀ p over G's r nonzero eigenpairs, σ² their smallest, median or
    mean eigenvalue (50 digits)."""
    if r == 0:
        return np.zeros(len(jn)), 0.0
    with mpmath.workdps(50):
        _, lam, vec = mp_gramian(jn, r)
        ordered = sorted(lam)
        median = (ordered[(r - 1) // 2] + ordered[r // 2]) / 2
        sigma2 = {"min": ordered[0], "rmse": sum(lam) / r, "median": median}[mode]
        p = mpmath.matrix(pref.tolist())
        w = mpmath.sqrt(sigma2) * vec * mpmath.diag([1 / mpmath.sqrt(x) for x in lam]) * (vec.T * p)
        return np.array([float(x) for x in w]), float(sigma2)


def check_aligned(jn: np.ndarray, pref: np.ndarray, mode: str) -> None:
    g, cut, r = setup(jn)
    w = npy(closed.aligned_mtl(t(g), t(pref), MODES.index(mode), cut))
    assert_matches_torch(w, torch_reference("aligned_mtl", g, cut, pref, MODES.index(mode)), jn)
    expected, sigma2 = mp_aligned(jn, r, pref, mode)
    d_w, d_exp = w @ jn, expected @ jn
    assert np.linalg.norm(d_w - d_exp) <= 1e-9 * floor_scale(d_exp, jn)
    if 0 < r == len(jn):
        # Full rank: Jᵀ B has orthogonal rows of norm σ, so ‖Jᵀ B p‖² = σ² ‖p‖².
        assert d_w @ d_w == pytest.approx(sigma2 * (pref @ pref), rel=1e-9)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_aligned_mtl(index):
    """Each case in one of the modes (all three over the cases), with a uniform or a drawn preference."""
    kind, k, d = CASES[index]
    jn = jacobian(kind, k, d)
    pref = np.full(k, 1.0 / k) if index % 2 else np.random.default_rng(index).uniform(0.1, 1.0, k)
    check_aligned(jn, pref, MODES[index % 3])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind,k,d", [("norm_spread", 6, 9), ("low_rank_spread", 8, 12)])
def test_aligned_mtl_modes_on_spread_norms(kind, k, d, mode):
    """Every mode where the norms spread over 10^±6: σ² = λ_min belongs to the small tasks."""
    check_aligned(jacobian(kind, k, d, seed=3), np.full(k, 1.0 / k), mode)


# ---- K in (32, 64], degenerate input ---------------------------------------------------------------


def test_large_k():
    """K = 40 (64 x 64 tiles): the spectral path on a rank-25 Jacobian with spread norms (IMTL-G,
    Aligned-MTL), the fast path on a full-rank one (ConFIG)."""
    low = jacobian("low_rank_spread", 40, 25, seed=8)
    g, cut, r = setup(low)
    assert 0 < r < 40 and not unit_inverse_is_fast(g, cut)
    w = npy(closed.imtl_g(t(g), cut))
    assert_matches_torch(w, torch_reference("imtl_g", g, cut), low)
    expected = mp_imtl_g(low, r)
    assert np.linalg.norm((w - expected) @ low) <= 1e-10 * np.abs(expected).sum() * floor_scale(expected @ low, low)
    check_aligned(low, np.full(40, 1.0 / 40), "median")
    full = jacobian("random", 40, 60, seed=8)
    g, cut, r = setup(full)
    assert r == 40 and unit_inverse_is_fast(g, cut)
    w = npy(closed.config(t(g), cut))
    assert_matches_torch(w, torch_reference("config", g, cut), full)
    assert np.linalg.norm(w @ full - mp_config(full, cut)) <= 1e-10 * np.linalg.norm(w @ full)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gives_nan(bad):
    g = jacobian("random", 3, 5) @ jacobian("random", 3, 5).T
    g[2, 1] = g[1, 2] = bad
    cut = eigen_cut(FLOAT64_NOISE, 3)
    outs = [closed.imtl_g(t(g), cut), closed.config(t(g), cut), closed.aligned_mtl(t(g), t(np.full(3, 1 / 3)), 0, cut)]
    assert all(torch.isnan(w).all() for w in outs)


@settings(max_examples=8)
@given(case=cases(max_k=6, max_d=10))
def test_drawn_cases(case):
    """Drawn Jacobians of every kind and scale: the three launchers against the torch path."""
    jn = case.numpy()
    g = jn @ jn.T
    k = len(g)
    cut = eigen_cut(FLOAT64_NOISE, k)
    pref = np.full(k, 1.0 / k)
    for name, w in (("imtl_g", closed.imtl_g(t(g), cut)), ("config", closed.config(t(g), cut)),
                    ("aligned_mtl", closed.aligned_mtl(t(g), t(pref), 1, cut))):
        w = npy(w)
        assert np.isfinite(w).all()
        ref = torch_reference(name, g, cut, pref, 1)
        # Drawn cases can sit near the cut, where the two paths may decide a rank differently;
        # compare only where the torch path's answer is far from that (its d is not tiny).
        scale = np.linalg.norm(jn, axis=1).max(initial=0.0)
        floor = 1e-8 * (np.abs(ref).sum() + np.abs(w).sum()) * scale
        assert_close_direction(w @ jn, ref @ jn, rtol=1e-6, floor=floor)


# ---- the public API on the Triton route ------------------------------------------------------------

API_CALLS = [("imtl_g", {}), ("config", {})] + [("aligned_mtl", {"scale_mode": m}) for m in MODES] + \
            [("aligned_mtl", {"scale_mode": "median", "pref": [0.5, 0.1, 0.1, 0.2, 0.05, 0.05]})]


@pytest.mark.parametrize("name,options", API_CALLS,
                         ids=lambda x: x if isinstance(x, str) else str(x.get("scale_mode", "")))
@pytest.mark.parametrize("kind", ["norm_spread", "low_rank_spread"])
def test_public_api_agrees_with_the_default_route(name, options, kind):
    jn = jacobian(kind, 6, 10, seed=5)
    j = torch.tensor(jn, device=DEVICE)
    expected = gradagg.weights(j.cpu(), name, **options).numpy()
    with _device.use_solver("triton"), OpLog() as names:
        w = npy(gradagg.weights(j, name, **options))
    assert f"gradagg.tr_{name}.default" in names.ops  # the fused kernel ran ...
    assert not any("tr_eigh" in op or "tr_graded_range" in op for op in names.ops)  # ... and nothing else
    scale = np.linalg.norm(jn, axis=1).max()
    assert_close_direction(w @ jn, expected @ jn, rtol=1e-9, floor=1e-12 * np.abs(expected).sum() * scale)


def route_jacobian(k: int) -> torch.Tensor:
    """float32 rows with a conflict, a near-duplicate, a zero row and spread norms."""
    gen = torch.Generator().manual_seed(k)
    j = torch.randn(k, 48, generator=gen, dtype=torch.float64)
    j[1] = -0.5 * j[0]
    j[2] = j[0] * 1e-3
    j[3] = 0.0
    return j.to(device=DEVICE, dtype=torch.float32)


@pytest.mark.parametrize("name", ["imtl_g", "config", "aligned_mtl"])
def test_a_call_dispatches_few_constant_ops_and_reads_nothing(name):
    counts = []
    for k in (4, 12):
        j = route_jacobian(k)
        with _device.use_solver("triton"):
            gradagg.aggregate(j, name, check_finite=False)  # a first call fills the caches
            with Census() as census:
                gradagg.aggregate(j, name, check_finite=False)
        assert census.total <= MAX_OPS, dict(census.ops)
        assert not census.reads, census.reads
        assert not census.opaque, census.opaque
        counts.append(census.total)
    assert counts[0] == counts[1], counts
