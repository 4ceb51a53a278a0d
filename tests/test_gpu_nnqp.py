"""The Triton NNQP kernels (``gradagg.solvers.gpu.nnqp``: MGDA, the dual-cone projections of UPGrad
and DualProj, CAGrad) and those methods on the Triton route.

Without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1). Each kernel is checked against the C solver it ports and against independent
facts on the hard cases: the KKT conditions of the simplex QP (and exhaustive search) for MGDA,
those of min_{v ≥ u} vᵀGv (and scipy's BVLS) for the dual cone, the primal conditions and an SLSQP
bound for CAGrad. The methods must agree with the default CPU route and read nothing on the host;
unsolved or non-finite problems give NaN.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradagg
from gradagg import _device, _registry
from gradagg._methods import cagrad as cagrad_method
from gradagg._numerics import FLOAT64_NOISE
from gradagg._registry import Context
from gradagg.solvers import native
from gradagg.solvers.active_set import SIGN_TOL, default_budget

from asserts import OpLog, assert_close_direction
from oracles import cagrad_inner, dual_cone_projection, frank_wolfe_gap, mgda_enumerate
from strategies import Case, cases

gn = pytest.importorskip("gradagg.solvers.gpu.nnqp")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif(DEVICE == "cpu" and not _device.interpreting(),
                       reason="the kernels need a GPU or TRITON_INTERPRET=1"),
    # The interpreter evaluates masked-out lanes too (inf − inf, x / 0): numpy warns, harmlessly.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

# (kind, K, D): the hard cases; one K in (32, 64] as well.
HARD = [("random", 1, 3), ("random", 2, 5), ("opposite", 3, 6), ("orthogonal", 3, 5), ("duplicate", 5, 8),
        ("zero_row", 5, 7), ("colinear", 5, 6), ("rank_deficient", 8, 12), ("norm_spread", 8, 10),
        ("low_rank_spread", 8, 12), ("random", 16, 20), ("norm_spread", 16, 4)]
LARGE = ("random", 40, 50)


def jacobian(kind: str, k: int, d: int, seed: int = 0) -> np.ndarray:
    return Case(kind, k, d, 1.0, seed).numpy()


def t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, device=DEVICE)


def npy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def floor(jn: np.ndarray, *weights: np.ndarray) -> float:
    """What remains of Σ w_i g_i where the exact answer is 0: the 1e-10 regularisation and rounding
    of the largest terms."""
    norms = np.linalg.norm(jn, axis=1)
    return 1e-9 * max((np.abs(w) * norms).sum() for w in weights) + 1e-12 * norms.max()


def same_direction(jn: np.ndarray, w: np.ndarray, ref: np.ndarray) -> None:
    """The C solver's answer to rounding: the two implementations take the same pivots, so their
    directions differ by about an ulp of the largest terms Σ|w_i| ‖g_i‖ (measured: ≤ 3e-16), where
    a skipped proximal step (1e-10) or a different active set would show."""
    assert np.isfinite(w).all(), w
    norms = np.linalg.norm(jn, axis=1)
    terms = max((np.abs(w) * norms).sum(), (np.abs(ref) * norms).sum())
    assert_close_direction(w @ jn, ref @ jn, 1e-12, floor=1e-12 * terms)


def test_constants_are_those_of_the_c_solvers():
    kkt = native._kkt
    if kkt is None:
        pytest.skip("gradagg._kkt was not built")
    assert gn._SIGN_TOL.value == kkt.SIGN_TOL == SIGN_TOL
    assert gn._MGDA_EPS.value == gn._CONE_EPS.value == kkt.QP_EPS
    assert gn._REFINE.value == kkt.QP_REFINE
    assert gn._CAGRAD_EPS.value == kkt.CAGRAD_EPS
    assert cagrad_method.MAX_OUTER == 60 and default_budget(7) == 51


@pytest.mark.parametrize("kind,k,d", [*HARD, LARGE])
def test_mgda(kind, k, d):
    """The C solver's weights, on the simplex, with the KKT conditions of min_{w ∈ Δ} wᵀGw: the
    Frank–Wolfe gap wᵀGw − min_i (Gw)_i bounds f(w) − f*; exhaustive search for K ≤ 8."""
    jn = jacobian(kind, k, d)
    g = jn @ jn.T
    w = npy(gn.mgda(t(g)))
    same_direction(jn, w, npy(native.mgda(torch.tensor(g))))
    assert w.min() >= 0 and abs(w.sum() - 1) <= 1e-12 * k
    value = w @ g @ w
    scale = (w**2 * np.diag(g)).sum()
    assert frank_wolfe_gap(g, w) <= 1e-9 * (value + scale) + 1e-12 * np.diag(g).max()
    if k <= 8:
        ref = mgda_enumerate(g)
        assert value - ref @ g @ ref <= 1e-9 * (ref @ g @ ref + (ref**2 * np.diag(g)).sum()) + 1e-300


def test_mgda_closed_forms():
    """Two tasks: w₁ = clamp((g₂ − g₁)·g₂ / ‖g₁ − g₂‖², 0, 1) (exactly 1 at the boundary); a zero
    gradient is the answer by itself."""
    rng = np.random.default_rng(3)
    jn = rng.standard_normal((2, 6)) * [[1e-3], [1e3]]
    g1, g2 = jn
    w1 = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1)
    np.testing.assert_allclose(npy(gn.mgda(t(jn @ jn.T))), [w1, 1 - w1], atol=1e-12)
    np.testing.assert_allclose(npy(gn.mgda(t(np.diag([1.0, 100.0])))), [100 / 101, 1 / 101], rtol=1e-14)
    assert npy(gn.mgda(t(np.array([[1.0, 3.0], [3.0, 10.0]])))).tolist() == [1.0, 0.0]  # g₁·g₂ ≥ ‖g₁‖²
    jz = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 3.0]])
    np.testing.assert_allclose(npy(gn.mgda(t(jz @ jz.T))), [0.0, 1.0, 0.0], atol=1e-12)


def cone_rows(k: int, seed: int) -> np.ndarray:
    """UPGrad's rows p_i e_i (at most three of them) and DualProj's row p, for a random preference p."""
    p = np.random.default_rng(seed).uniform(0.1, 1.0, k)
    rows = np.diag(p)[np.unique(np.linspace(0, k - 1, 3).round().astype(int))]
    return np.concatenate([rows, p[None, :]])


def assert_dual_cone_kkt(jn: np.ndarray, lower: np.ndarray, v: np.ndarray) -> None:
    """KKT of min_{v ≥ u} ½vᵀGv: v ≥ u, μ = Gv ≥ 0, μ_i (v_i − u_i) = 0, each to the rounding of its
    terms (‖g_i‖ ‖Jᵀv‖ for μ_i, plus the regularisation's 1e-10 relative bias)."""
    g = jn @ jn.T
    norms = np.linalg.norm(jn, axis=1)
    for u, x in zip(lower, v, strict=True):
        mu = g @ x
        size = norms * (1e-8 * np.linalg.norm(x @ jn) + floor(jn, x))
        assert (x >= u - 1e-12 * np.abs(u).max()).all()
        assert (mu >= -size).all(), (mu, size)
        # Complementarity: each constraint is either active (v_i = u_i to rounding) or has μ_i ≈ 0.
        active = np.abs(x - u) <= 1e-10 * (np.abs(u) + np.abs(x)) + 1e-300
        assert (active | (np.abs(mu) <= size)).all(), (x - u, mu, size)


@pytest.mark.parametrize("kind,k,d", [*HARD, LARGE])
def test_dual_cone(kind, k, d):
    """Every row as the C solver gives it, the KKT conditions of min_{v ≥ u} vᵀGv, scipy's BVLS on
    the directions (K ≤ 8), and the summed form."""
    jn = jacobian(kind, k, d)
    g = jn @ jn.T
    lower = cone_rows(k, 7)[-3 if k <= 8 else -2 if k <= 16 else -1:]
    v = npy(gn.dual_cone(t(g), t(lower), False))
    assert v.shape == lower.shape
    ref = npy(native.dual_cone(torch.tensor(g), torch.tensor(lower), False))
    for x, r in zip(v, ref, strict=True):
        same_direction(jn, x, r)
    assert_dual_cone_kkt(jn, lower, v)
    if k <= 8:
        for u, x in zip(lower, v, strict=True):
            assert_close_direction(x @ jn, dual_cone_projection(jn, u) @ jn, 1e-6, floor=10 * floor(jn, x))
    total = npy(gn.dual_cone(t(g), t(lower), True))
    np.testing.assert_allclose(total, v.sum(0), rtol=1e-15, atol=1e-15 * np.abs(v).max())


@pytest.mark.parametrize("kind,k,d,seed,i", [("random", 14, 11, 30, 10), ("random", 13, 7, 114, 6)])
def test_dual_cone_after_lawson_hanson(kind, k, d, seed, i):
    """Problems on which block pivoting stalls and hands over to Lawson–Hanson (found by searching
    with the torch reference, which takes the same steps): the C answer and the KKT conditions."""
    jn = jacobian(kind, k, d, seed)
    g = jn @ jn.T
    lower = np.eye(k)[i:i + 1]
    v = npy(gn.dual_cone(t(g), t(lower), False))
    same_direction(jn, v[0], npy(native.dual_cone(torch.tensor(g), torch.tensor(lower), False))[0])
    assert_dual_cone_kkt(jn, lower, v)


# Every c on the small cases; the slower searches (c = 0.4 on spread or rank-deficient K ≥ 8) once.
CAGRAD = [(case, c) for case in HARD if case[1] <= 8 for c in (0.4, 2.0, 10.0)
          if c != 0.4 or case[1] < 8 or case[0] == "norm_spread"] + \
         [(("random", 16, 20), 10.0), (("norm_spread", 16, 4), 2.0), (("random", 36, 60), 2.0)]


@pytest.mark.parametrize("case,c", CAGRAD, ids=lambda x: "-".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_cagrad(case, c):
    """The C solver's weights (degenerate case included) and CAGrad's primal conditions: d = Jᵀw in
    the ball ‖d − g0‖ ≤ c‖g0‖ and min_i g_i·d at least SLSQP's value of min_w F(w) (strong duality,
    K ≤ 5). (The division by 1 + c² or 1 + c is checked through the public API below.)"""
    kind, k, d = case
    jn = jacobian(kind, k, d)
    g = jn @ jn.T
    w = npy(gn.cagrad(t(g), c, cagrad_method.MAX_OUTER, 1.0))
    same_direction(jn, w, npy(native.cagrad(torch.tensor(g), c, cagrad_method.MAX_OUTER, 1.0)))
    g0 = jn.mean(0)
    direction = w @ jn
    assert np.linalg.norm(direction - g0) <= c * np.linalg.norm(g0) * (1 + 1e-9) + 1e-12 * np.linalg.norm(jn)
    if k <= 5:
        _, upper = cagrad_inner(g, c)
        scale = np.linalg.norm(jn, axis=1).max() * max(np.linalg.norm(g0), 1e-300)
        assert (jn @ direction).min() >= upper - 1e-6 * scale


def test_cagrad_degenerate_case_takes_the_dual_cone_projection():
    """Opposite gradients put 0 in the hull: with c large the ball reaches the dual cone, and the
    answer is g0 projected onto it (DualProj with uniform preference); c = 0 is the mean."""
    jn = np.array([[1.0, 0.5, 0.0], [-1.0, -0.5, 0.0], [0.2, 1.0, 1.0]])
    g = jn @ jn.T
    w = npy(gn.cagrad(t(g), 10.0, cagrad_method.MAX_OUTER, 1.0))
    cone = npy(gn.dual_cone(t(g), t(np.full((1, 3), 1 / 3)), True))
    np.testing.assert_allclose(w, cone, rtol=0, atol=0)
    same_direction(jn, w, npy(native.cagrad(torch.tensor(g), 10.0, cagrad_method.MAX_OUTER, 1.0)))
    assert (jn @ (w @ jn) >= -1e-12).all()
    np.testing.assert_allclose(npy(gn.cagrad(t(g), 0.0, cagrad_method.MAX_OUTER, 1.0)), np.full(3, 1 / 3),
                               rtol=1e-15)


def test_nan_on_failure():
    """A budget too small, or non-finite input, gives NaN, never a finite wrong number: with a small
    budget each problem is NaN or the full budget's answer."""
    jn = jacobian("rank_deficient", 4, 8)
    g = t(jn @ jn.T)
    lower = t(np.eye(4) / 4)
    full = default_budget(4)
    solved = gn.launch_mgda(g, full), gn.launch_dual_cone(g, lower, full), gn.launch_cagrad(g, 2.0, 60, 1.0, full)
    assert all(torch.isfinite(x).all() for x in solved)
    for budget in (0, 1):
        for answer, reference in zip(
                (gn.launch_mgda(g, budget), gn.launch_dual_cone(g, lower, budget),
                 gn.launch_cagrad(g, 2.0, 60, 1.0, budget)), solved, strict=True):
            for row, ref in zip(answer.reshape(-1, 4), reference.reshape(-1, 4), strict=True):
                assert torch.isnan(row).all() or torch.equal(row, ref)
            if budget == 0:
                assert torch.isnan(answer).all()
    # Cold-started pivoting needs more than one iteration for MGDA here, and CAGrad more than one λ.
    assert torch.isnan(gn.launch_mgda(g, 1)).all()
    assert torch.isnan(gn.launch_cagrad(g, 2.0, 1, 1.0, full)).all()
    for bad in (float("nan"), float("inf")):
        h = g.clone()
        h[1, 2] = h[2, 1] = bad
        assert torch.isnan(gn.mgda(h)).all()
        assert torch.isnan(gn.dual_cone(h, lower, False)).all()
        assert torch.isnan(gn.cagrad(h, 0.5, 60, 1.0)).all()
    row = lower.clone()
    row[3, 0] = float("nan")
    out = gn.dual_cone(g, row, False)
    assert torch.isnan(out[3]).all() and torch.isfinite(out[:3]).all()


def test_solve_on_fails_where_cholesky_does():
    """An indefinite working set is a failure (C's Cholesky factorisation fails there), not an answer:
    A = [[1, 2], [2, 1]] with q > 0 starts with both variables free."""
    assert torch.isnan(gn.launch_mgda(t(np.array([[1.0, 2.0], [2.0, 1.0]])), 51)).all()


API = [("mgda", {}), ("dualproj", {}), ("upgrad", {"pref": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]})] + \
      [("cagrad", {"c": c, "rescale": rescale}) for c, rescale in ((0.4, 0), (2.0, 1), (10.0, 2))]


@pytest.mark.parametrize("method,options", API, ids=lambda x: x if isinstance(x, str) else str(x))
def test_public_api_on_the_triton_route(method, options):
    """gradagg.weights on the Triton route against the default (C) route; the weighting itself runs
    the kernel's op and reads nothing on the host."""
    jn = jacobian("random", 6, 9, seed=5)
    with _device.use_solver("triton"):
        w = npy(gradagg.weights(t(jn), method, **options))
        g = t(jn @ jn.T)
        info = _registry.lookup(method)
        values = {o.name: o.default for o in info.options} | {
            name: t(np.array(v)) if isinstance(v, list) else v for name, v in options.items()}
        with OpLog() as mode:
            info.weighting(g, Context(noise=FLOAT64_NOISE), **values)
    assert any(op in ("gradagg.tr_mgda.default", "gradagg.tr_dual_cone.default", "gradagg.tr_cagrad.default")
               for op in mode.ops), mode.ops
    assert not mode.banned(), mode.banned()
    ref = npy(gradagg.weights(torch.tensor(jn), method, **options))
    np.testing.assert_allclose(w, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


@settings(max_examples=5)
@given(case=cases(max_k=6), method=st.sampled_from(["mgda", "upgrad", "dualproj", "cagrad"]))
def test_kernels_agree_with_c_on_hard_jacobians(case, method):
    jn = case.numpy()
    g = jn @ jn.T
    k = case.k
    if method == "mgda":
        w, ref = gn.mgda(t(g)), native.mgda(torch.tensor(g))
    elif method == "cagrad":
        w, ref = gn.cagrad(t(g), 0.5, 60, 1.0), native.cagrad(torch.tensor(g), 0.5, 60, 1.0)
    else:
        lower = np.eye(k) / k if method == "upgrad" else np.full((1, k), 1 / k)
        w, ref = gn.dual_cone(t(g), t(lower), True), native.dual_cone(torch.tensor(g), torch.tensor(lower), True)
    same_direction(jn, npy(w), npy(ref))


def test_launches_do_not_grow_with_k():
    """One custom op per call whatever K (inside: one or two kernel launches)."""
    counts = []
    for k in (2, 3):
        jn = jacobian("random", k, k + 2)
        g, lower = t(jn @ jn.T), t(np.eye(k) / k)
        with OpLog() as mode:
            gn.mgda(g)
            gn.dual_cone(g, lower, True)
            gn.cagrad(g, 0.5, 60, 2.0)
        counts.append(mode.ops)
    assert counts[0] == counts[1] == ["gradagg.tr_mgda.default", "gradagg.tr_dual_cone.default",
                                      "gradagg.tr_cagrad.default"], counts
