"""sdmgrad and modo: weightings of a cross-Gramian A = J_a J_bᵀ of two independent batches.

Checked against METHODS.md Part C (C14–C21), a written-out numpy re-derivation of each recurrence
with its own simplex projection (bisection), and exact simplex QPs solved by enumerating supports.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradagg
from gradagg._methods.cross import project_simplex

from asserts import DEVICES, assert_on_simplex, npy

# --- independent oracles -------------------------------------------------------------------------


def simplex_oracle(v: np.ndarray) -> np.ndarray:
    """Π_Δ(v) by bisection on θ in Σ max(v − θ, 0) = 1, then θ recomputed exactly on the support."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1 else (lo, mid)
    support = v > 0.5 * (lo + hi)
    theta = (v[support].sum() - 1.0) / support.sum()
    return np.maximum(v - theta, 0.0)


def sdmgrad_ref(a, w, lambda_=0.3, n_iter=20, lr=10.0, momentum=0.5, pref=None):
    """(output, new w) of one call, written out from METHODS.md A.1."""
    k = a.shape[0]
    pref = np.full(k, 1.0 / k) if pref is None else np.asarray(pref, float)
    scale = np.sqrt(np.maximum(np.diag(a), 0)).mean()
    a_hat = a / (scale**2 + 1e-8)
    v = None
    for _ in range(n_iter):
        q = a_hat @ (w + lambda_ * pref)
        v = q if v is None else momentum * v + q
        w = simplex_oracle(w - lr * v)
    return (w + lambda_ * pref) / (1 + lambda_), w


def modo_ref(a, lam, gamma=0.1, rho=0.1):
    return simplex_oracle(lam - gamma * (a @ lam + rho * lam))


def simplex_qp(a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """argmin_{w ∈ Δ} (w + c)ᵀA(w + c) for a symmetric positive definite A, exactly: the support
    whose equality-constrained stationary point is feasible and satisfies the KKT sign conditions."""
    k = a.shape[0]
    for size in range(1, k + 1):
        for s in itertools.combinations(range(k), size):
            s = list(s)
            m = np.zeros((size + 1, size + 1))
            m[:size, :size] = 2 * a[np.ix_(s, s)]
            m[:size, size] = -1.0
            m[size, :size] = 1.0
            rhs = np.concatenate([-2 * (a @ c)[s], [1.0]])
            sol = np.linalg.solve(m, rhs)
            w = np.zeros(k)
            w[s] = sol[:size]
            nu = sol[size]
            grad = 2 * a @ (w + c)
            if w.min() >= -1e-13 and (grad >= nu - 1e-11 * max(1.0, abs(nu))).all():
                return np.maximum(w, 0.0)
    raise AssertionError("no KKT point found")


def spd(k: int, seed: int) -> np.ndarray:
    j = np.random.default_rng(seed).standard_normal((k, k + 3))
    return j @ j.T


def cross_matrix(k: int, seed: int, scale: float = 1.0) -> np.ndarray:
    """A non-symmetric, generally indefinite cross-Gramian of two correlated random batches."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((k, 7))
    return scale * (base + 0.7 * rng.standard_normal((k, 7))) @ (base + 0.7 * rng.standard_normal((k, 7))).T


def t64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def call(method: str, a: np.ndarray, state, **opts) -> np.ndarray:
    return npy(gradagg.weights_from_gramian(t64(a), method, state=state, **opts))


# --- the simplex projection ----------------------------------------------------------------------


@given(v=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=12), shift=st.sampled_from([0.0, 1e6, -1e6]))
def test_projection_is_the_euclidean_projection(v, shift):
    x = np.asarray(v) + shift
    got = npy(project_simplex(t64(x)))
    assert_on_simplex(got, 1e-12 * max(1.0, np.abs(x).max()))
    np.testing.assert_allclose(got, simplex_oracle(x), atol=1e-12 * max(1.0, np.abs(x).max()))


def test_projection_of_huge_values_stays_on_the_simplex():
    """A cross-Gramian with a vanishing diagonal makes the inner steps ~1e22: v − θ must still sum to 1."""
    np.testing.assert_array_equal(npy(project_simplex(t64([1e22]))), [1.0])
    got = npy(project_simplex(t64([1e22, 1e22 - 2**73, -3e22, 1e22])))
    np.testing.assert_allclose(got, [0.5, 0.0, 0.0, 0.5], atol=1e-15)
    out = call("sdmgrad", np.array([[-1e-3]]), gradagg.init("sdmgrad", 1))
    np.testing.assert_array_equal(out, [1.0])


def test_projection_of_nan_is_nan():
    assert torch.isnan(project_simplex(t64([0.2, float("nan"), 0.3]))).all()


# --- sdmgrad ------------------------------------------------------------------------------------


def test_c14_hand_example_two_calls():
    state = gradagg.init("sdmgrad", 3)
    w = call("sdmgrad", np.diag([1.0, 0.25, 0.0]), state, n_iter=1)
    np.testing.assert_allclose(w, [1 / 13, 1 / 13, 11 / 13], atol=1e-15)
    np.testing.assert_allclose(npy(state.w), [0, 0, 1], atol=1e-15)
    w = call("sdmgrad", np.eye(3), state, n_iter=1)
    np.testing.assert_allclose(w, [6 / 13, 6 / 13, 1 / 13], atol=1e-15)
    np.testing.assert_allclose(npy(state.w), [0.5, 0.5, 0], atol=1e-15)


def test_normalisation_clamps_negative_diagonal_entries():
    """One small step stays inside Δ, so Π_Δ only recentres: w₁ = w₀ − lr(q − mean q), which reads
    Â's scale directly. A_33 < 0 counts as 0 in the scale (without the clamp: NaN)."""
    a = np.array([[4.0, 1.0, -2.0], [0.5, 1.0, 0.3], [1.0, -0.4, -0.25]])
    state = gradagg.init("sdmgrad", 3)
    lam, lr = 0.3, 1e-3
    call("sdmgrad", a, state, n_iter=1, lr=lr, lambda_=lam)
    scale = (2.0 + 1.0 + 0.0) / 3
    q = a / (scale**2 + 1e-8) @ np.full(3, (1 + lam) / 3)
    np.testing.assert_allclose(npy(state.w), 1 / 3 - lr * (q - q.mean()), rtol=1e-14)


@pytest.mark.parametrize("seed", range(3))
def test_matches_the_written_out_recurrence_over_calls(seed):
    """Non-symmetric A used as it is, warm start from the state, velocity reset per call, pref."""
    k = 4
    pref = np.random.default_rng(seed).dirichlet(np.ones(k))
    state = gradagg.init("sdmgrad", k)
    w = np.full(k, 1 / k)
    for t in range(4):
        a = cross_matrix(k, 10 * seed + t, scale=10.0 ** (t - 2))
        opts = dict(lambda_=0.3 + 0.2 * t, n_iter=3 + t, lr=[10.0, 0.5, 2.0, 10.0][t], momentum=[0.5, 0.0, 0.9, 0.2][t])
        expected, w = sdmgrad_ref(a, w, pref=pref, **opts)
        got = call("sdmgrad", a, state, pref=pref.tolist(), **opts)
        np.testing.assert_allclose(got, expected, atol=1e-12)
        np.testing.assert_allclose(npy(state.w), w, atol=1e-12)


@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 8), scale=st.sampled_from([1e-8, 1e-3, 1.0, 1e6]),
       lam=st.sampled_from([0.0, 0.3, 2.0]), uniform=st.booleans(), symmetric=st.booleans())
def test_c15_output_on_simplex_and_above_the_preference_floor(seed, k, scale, lam, uniform, symmetric):
    rng = np.random.default_rng(seed)
    pref = None if uniform else rng.dirichlet(np.full(k, 0.5))
    w_tilde = np.full(k, 1 / k) if pref is None else pref
    state = gradagg.init("sdmgrad", k)
    for t in range(3):
        a = cross_matrix(k, seed + t, scale) if not symmetric else -spd(k, seed + t) * scale  # indefinite or NSD
        out = call("sdmgrad", a, state, lambda_=lam, pref=None if pref is None else t64(pref))
        assert_on_simplex(out, 1e-12)
        assert (out >= lam * w_tilde / (1 + lam) - 1e-15).all()
        assert_on_simplex(npy(state.w), 1e-12)


def test_c15_minimum_of_the_worked_example():
    """The floor λ/(K(1+λ)) = 0.3/(4·1.3) is reached where a task's stored weight is 0."""
    state = gradagg.init("sdmgrad", 4)
    out = call("sdmgrad", np.diag([1.0, 1.0, 1.0, 0.0]), state)
    np.testing.assert_allclose(out.min(), 0.3 / (4 * 1.3), rtol=1e-14)


@pytest.mark.parametrize("c", [1e-2, 3.0, 1e5])
def test_c16_scaling_a_leaves_the_output_unchanged(c):
    """Exact up to the 1e-8 in the normaliser, which is a relative 1e-18/c here (diag scale² ≈ 1e10);
    with lr = 10 the inner iteration amplifies perturbations, so a larger relative term shows."""
    a_list = [1e9 * cross_matrix(5, s) for s in range(3)]
    s1, s2 = gradagg.init("sdmgrad", 5), gradagg.init("sdmgrad", 5)
    for a in a_list:
        np.testing.assert_allclose(call("sdmgrad", c * a, s1), call("sdmgrad", a, s2), atol=1e-11)


def test_c16_large_lambda_gives_the_preference():
    pref = [0.1, 0.2, 0.3, 0.4]
    state = gradagg.init("sdmgrad", 4)
    for s in range(3):
        out = call("sdmgrad", cross_matrix(4, s), state, lambda_=1e9, pref=pref)
        np.testing.assert_allclose(out, pref, atol=2e-9)


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("seed", range(3))
def test_c17_fixed_point_is_the_simplex_qp(lam, seed):
    """Momentum 0, lr below 1/λ_max(Â): projected gradient descent on (w + λw̃)ᵀÂ(w + λw̃)."""
    k = 4
    a = spd(k, seed)
    pref = np.random.default_rng(seed).dirichlet(np.ones(k))
    a_hat = a / (np.sqrt(np.diag(a)).mean() ** 2 + 1e-8)
    lr = 1.0 / np.linalg.eigvalsh(a_hat).max()
    w_star = simplex_qp(a_hat, lam * pref)
    state = gradagg.init("sdmgrad", k)
    for _ in range(40):
        out = call("sdmgrad", a, state, lambda_=lam, momentum=0.0, lr=lr, n_iter=100, pref=pref.tolist())
    np.testing.assert_allclose(npy(state.w), w_star, atol=1e-9)
    np.testing.assert_allclose(out, (w_star + lam * pref) / (1 + lam), atol=1e-9)
    if lam == 0.0:  # then it is mgda's w
        np.testing.assert_allclose(npy(gradagg.weights_from_gramian(t64(a), "mgda")), w_star, atol=1e-8)


def test_simplex_qp_oracle_agrees_with_slsqp():
    optimize = pytest.importorskip("scipy.optimize")
    a, c = spd(4, 7), np.array([0.05, 0.0, 0.3, 0.1])
    res = optimize.minimize(lambda w: (w + c) @ a @ (w + c), np.full(4, 0.25), jac=lambda w: 2 * a @ (w + c),
                            bounds=[(0, 1)] * 4, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                            method="SLSQP", options={"ftol": 1e-15, "maxiter": 500})
    np.testing.assert_allclose(simplex_qp(a, c), res.x, atol=1e-6)


def test_permuting_tasks_permutes_sdmgrad():
    k, perm = 5, [3, 0, 4, 1, 2]
    pref = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    s1, s2 = gradagg.init("sdmgrad", k), gradagg.init("sdmgrad", k)
    for t in range(3):
        a = cross_matrix(k, t)
        w = call("sdmgrad", a, s1, pref=pref.tolist())
        wp = call("sdmgrad", a[np.ix_(perm, perm)], s2, pref=pref[perm].tolist())
        np.testing.assert_allclose(wp, w[perm], atol=1e-12)


# --- modo ---------------------------------------------------------------------------------------


def test_c18_one_step_hand_example():
    """A = diag(1, .25, 0): no coordinate hits 0, so Π_Δ adds back (1 − Σ)/3 to each."""
    state = gradagg.init("modo", 3)
    a_diag, gamma, rho = np.array([1.0, 0.25, 0.0]), 0.1, 0.1
    step = (1 - gamma * (a_diag + rho)) / 3
    expected = step + (1 - step.sum()) / 3
    np.testing.assert_allclose(call("modo", np.diag(a_diag), state), expected, rtol=1e-15)
    np.testing.assert_allclose(expected, [113 / 360, 122 / 360, 125 / 360], rtol=1e-15)
    np.testing.assert_allclose(npy(state.lam), expected, rtol=1e-15)


@pytest.mark.parametrize("seed", range(4))
def test_c18_one_step_and_recurrence_with_clipping(seed):
    k = 5
    state = gradagg.init("modo", k)
    lam = np.full(k, 1 / k)
    for t in range(4):
        a = cross_matrix(k, 10 * seed + t, scale=3.0)
        gamma, rho = [0.1, 0.5, 1.0, 0.02][t], [0.1, 0.0, 2.0, 0.1][t]
        lam = modo_ref(a, lam, gamma, rho)
        got = call("modo", a, state, gamma=gamma, rho=rho)
        np.testing.assert_allclose(got, lam, atol=1e-13)
        np.testing.assert_array_equal(npy(state.lam), got)
    assert (lam == 0).any() or seed != 0  # the first seed's steps reach a face (Π_Δ clips)


def test_c19_equal_row_sums_keep_lambda_uniform():
    k = 5
    state = gradagg.init("modo", k)
    for t in range(10):  # (uniform is an unstable fixed point for indefinite A: rounding grows)
        r = cross_matrix(k, t)
        a = r - r.sum(1, keepdims=True) / k + 0.3 * t  # A·1 = 0.3tK·1; not symmetric
        out = call("modo", a, state)
        np.testing.assert_allclose(out, np.full(k, 1 / k), atol=1e-13)


@pytest.mark.parametrize("rho", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_c20_fixed_point_is_the_regularised_mgda(rho, seed):
    k = 4
    a = spd(k, seed)
    gamma = 1.0 / (np.linalg.eigvalsh(a).max() + rho)
    state = gradagg.init("modo", k)
    for _ in range(3000):
        out = gradagg.weights_from_gramian(t64(a), "modo", state=state, gamma=gamma, rho=rho)
    expected = simplex_qp(a + rho * np.eye(k), np.zeros(k))
    np.testing.assert_allclose(npy(out), expected, atol=1e-6)


@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 7), c=st.sampled_from([1e-6, 0.25, 3.0, 1e4]),
       gamma=st.sampled_from([1e-3, 0.1, 2.0]), rho=st.sampled_from([0.0, 0.1, 5.0]))
def test_c21_scaling_law_and_simplex(seed, k, c, gamma, rho):
    s1, s2 = gradagg.init("modo", k), gradagg.init("modo", k)
    for t in range(3):
        a = cross_matrix(k, seed + t)
        left = call("modo", c * a, s1, gamma=gamma, rho=rho)
        right = call("modo", a, s2, gamma=c * gamma, rho=rho / c)
        assert_on_simplex(left, 1e-12)
        np.testing.assert_allclose(left, right, atol=1e-12 * max(1.0, c * gamma * np.abs(a).max()))


def test_c21_permuting_tasks_permutes_lambda():
    k, perm = 5, [2, 4, 0, 1, 3]
    s1, s2 = gradagg.init("modo", k), gradagg.init("modo", k)
    for t in range(5):
        a = cross_matrix(k, t)
        lam = call("modo", a, s1, gamma=0.3)
        lam_p = call("modo", a[np.ix_(perm, perm)], s2, gamma=0.3)
        np.testing.assert_allclose(lam_p, lam[perm], atol=1e-14)


# --- through the API: cross=, cross_gramian, weights_from_gramian -------------------------------


def pytree(seed: int, k: int = 3, dtype=torch.float64, device="cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(k, 4, 3, generator=gen, dtype=torch.float64).to(device, dtype),
            "b": torch.randn(k, 5, generator=gen, dtype=torch.float64).to(device, dtype),
            "s": torch.randn(k, generator=gen, dtype=torch.float64).to(device, dtype)}


def hand_cross(ja: dict, jb: dict) -> np.ndarray:
    k = ja["w"].shape[0]
    return sum(npy(ja[n]).reshape(k, -1) @ npy(jb[n]).reshape(k, -1).T for n in ja)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_gramian_of_a_pytree(device):
    ja, jb = pytree(1, device=device), pytree(2, device=device)
    a = gradagg.cross_gramian(ja, jb)
    assert a.dtype == torch.float64 and a.shape == (3, 3) and a.device.type == device
    np.testing.assert_allclose(npy(a), hand_cross(ja, jb), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(npy(gradagg.cross_gramian(jb, ja)), npy(a).T, rtol=1e-13)
    assert not np.allclose(npy(a), npy(a).T)  # used as it is: not symmetrised


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["sdmgrad", "modo"])
def test_aggregate_with_cross_combines_the_step_jacobian(device, method):
    ja, jb, js = pytree(1, device=device), pytree(2, device=device), pytree(3, device=device)
    a = hand_cross(ja, jb)
    s_pair, s_tensor, s_ref = (gradagg.init(method, 3) for _ in range(3))
    for _ in range(3):
        w = call(method, a, s_ref)
        d = gradagg.aggregate(js, method, cross=(ja, jb), state=s_pair)
        d_t = gradagg.aggregate(js, method, cross=gradagg.cross_gramian(ja, jb), state=s_tensor)
        for name, leaf in js.items():
            expected = np.tensordot(w, npy(leaf), 1)
            np.testing.assert_allclose(npy(d[name]), expected, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(npy(d_t[name]), expected, rtol=1e-12, atol=1e-14)
            assert d[name].shape == leaf.shape[1:] and d[name].device.type == device
    np.testing.assert_allclose(npy(s_pair.w if method == "sdmgrad" else s_pair.lam),
                               npy(s_ref.w if method == "sdmgrad" else s_ref.lam), atol=1e-13)


@pytest.mark.parametrize("method", ["sdmgrad", "modo"])
def test_weights_with_cross_equals_weights_from_gramian(method):
    ja, jb, js = pytree(4), pytree(5), pytree(6)
    s1, s2, s3 = (gradagg.init(method, 3) for _ in range(3))
    for _ in range(2):
        w1 = gradagg.weights(js, method, cross=(ja, jb), state=s1)
        w2 = gradagg.weights(js, method, cross=t64(hand_cross(ja, jb)), state=s2)
        w3 = gradagg.weights_from_gramian(gradagg.cross_gramian(ja, jb), method, state=s3)
        assert w1.dtype == torch.float64
        np.testing.assert_allclose(npy(w1), npy(w2), atol=1e-13)
        np.testing.assert_allclose(npy(w1), npy(w3), atol=1e-13)


def test_weights_from_gramian_passes_a_through_unsymmetrised():
    a = cross_matrix(4, 3)
    got = call("modo", a, gradagg.init("modo", 4), gamma=0.5)
    np.testing.assert_allclose(got, modo_ref(a, np.full(4, 0.25), gamma=0.5), atol=1e-14)
    assert not np.allclose(got, modo_ref((a + a.T) / 2, np.full(4, 0.25), gamma=0.5), atol=1e-6)


@pytest.mark.parametrize("method", ["sdmgrad", "modo"])
def test_float32_jacobians(method):
    ja, jb, js = (pytree(s, dtype=torch.float32) for s in (7, 8, 9))
    ja64, jb64, js64 = (pytree(s) for s in (7, 8, 9))
    # The float32 run also keeps its state in float32; the float64 run in float64.
    s32, s64 = gradagg.init(method, 3, dtype=torch.float32), gradagg.init(method, 3)
    opts = {"lr": 0.5} if method == "sdmgrad" else {}  # (lr = 10 amplifies rounding: C17)
    for _ in range(3):
        d32 = gradagg.aggregate(js, method, cross=(ja, jb), state=s32, **opts)
        d64 = gradagg.aggregate(js64, method, cross=(ja64, jb64), state=s64, **opts)
        for name in js:
            assert d32[name].dtype == torch.float32
            np.testing.assert_allclose(npy(d32[name]), npy(d64[name]), rtol=1e-5, atol=1e-5)
    field = "w" if method == "sdmgrad" else "lam"
    assert getattr(s32, field).dtype == torch.float32
    assert_on_simplex(npy(getattr(s32, field)), 1e-6)


@pytest.mark.parametrize("method", ["sdmgrad", "modo"])
def test_host_route_equals_the_cpu_route(method):
    """The route accelerators take (one round trip of A and the state to the host), run on CPU
    tensors, where its copies are no-ops: bit for bit the CPU route's weights and states."""
    from gradagg import _device

    ja, jb, js = pytree(1), pytree(2), pytree(3)
    s_cpu, s_host = gradagg.init(method, 3), gradagg.init(method, 3)
    for t in range(3):
        cross = (pytree(10 + t), pytree(20 + t))
        expected = gradagg.aggregate(js, method, cross=cross, state=s_cpu)
        with _device.use_solver("host"):
            got = gradagg.aggregate(js, method, cross=cross, state=s_host)
        for name in js:
            assert torch.equal(got[name], expected[name])
        assert all(torch.equal(getattr(s_cpu, f), getattr(s_host, f)) for f in s_cpu.fields)
    with _device.use_solver("host"):
        w = gradagg.weights_from_gramian(gradagg.cross_gramian(ja, jb), method, state=s_host)
    assert torch.equal(w, gradagg.weights_from_gramian(gradagg.cross_gramian(ja, jb), method, state=s_cpu))


def test_non_finite_cross_raises_or_gives_nan_and_keeps_the_state():
    a = cross_matrix(3, 0)
    a[1, 2] = np.nan
    for method in ("sdmgrad", "modo"):
        state = gradagg.init(method, 3)
        with pytest.raises(gradagg.NonFiniteError):
            gradagg.weights_from_gramian(t64(a), method, state=state)
        with pytest.raises(gradagg.NonFiniteError):
            gradagg.aggregate(torch.ones(3, 2), method, cross=t64(a), state=state)
        w = gradagg.weights_from_gramian(t64(a), method, state=state, check_finite=False)
        assert torch.isnan(w).all()
        before = state.state_dict()
        gradagg.weights_from_gramian(t64(a), method, state=state, check_finite=False)
        for name in state.fields:
            np.testing.assert_array_equal(npy(getattr(state, name)), np.full(3, 1 / 3))
            assert torch.equal(before[name], getattr(state, name))


# --- misuse --------------------------------------------------------------------------------------


def test_errors():
    ja, jb, js = pytree(1), pytree(2), pytree(3)
    st_ = gradagg.init("sdmgrad", 3)
    with pytest.raises(ValueError, match="cross="):
        gradagg.aggregate(js, "sdmgrad", state=st_)
    with pytest.raises(ValueError, match="cross="):
        gradagg.weights(js, "modo", state=gradagg.init("modo", 3))
    with pytest.raises(ValueError, match=r"cross= is for the methods.*sdmgrad"):
        gradagg.aggregate(js, "mgda", cross=(ja, jb))
    with pytest.raises(ValueError, match="one structure"):
        gradagg.aggregate(js, "sdmgrad", cross=(ja, {"w": ja["w"], "b": ja["b"]}), state=st_)
    with pytest.raises(ValueError, match="leaf"):
        gradagg.aggregate(js, "sdmgrad", cross=(ja, {**jb, "b": torch.zeros(3, 6, dtype=torch.float64)}), state=st_)
    with pytest.raises(ValueError, match="K=4"):
        gradagg.aggregate(js, "sdmgrad", cross=(pytree(1, k=4), pytree(2, k=4)), state=st_)
    with pytest.raises(ValueError, match=r"expected shape \(3, 3\)"):
        gradagg.aggregate(js, "sdmgrad", cross=torch.eye(4, dtype=torch.float64), state=st_)
    with pytest.raises(TypeError, match="pair"):
        gradagg.aggregate(js, "sdmgrad", cross=(ja, jb, js), state=st_)
    with pytest.raises(ValueError, match="cannot be chained"):
        gradagg.aggregate(js, ("sdmgrad", "mean"), cross=(ja, jb), state=st_)
    with pytest.raises(ValueError, match="cannot be chained"):
        gradagg.aggregate(js, ("nsgd", "modo"), cross=(ja, jb), state=(gradagg.init("nsgd", 3), st_))
    with pytest.raises(ValueError, match="normalize"):
        gradagg.aggregate(js, "sdmgrad", cross=(ja, jb), state=st_, normalize="sum")
    with pytest.raises(ValueError, match="grad_normalizer"):
        gradagg.weights(js, "modo", cross=(ja, jb), state=gradagg.init("modo", 3), grad_normalizer="l2")
    with pytest.raises(ValueError, match="stateful"):
        gradagg.aggregate(js, "sdmgrad", cross=(ja, jb))
    with pytest.raises(ValueError, match="made for 'modo'"):
        gradagg.aggregate(js, "sdmgrad", cross=(ja, jb), state=gradagg.init("modo", 3))
    np.testing.assert_array_equal(npy(st_.w), np.full(3, 1 / 3))  # no failed call touched the state


@pytest.mark.parametrize(("method", "options", "match"), [
    ("sdmgrad", {"pref": [0.5, 0.5, 0.5]}, "simplex"),
    ("sdmgrad", {"pref": [1.2, -0.2, 0.0]}, "nonnegative"),
    ("sdmgrad", {"pref": [0.5, 0.5]}, "length"),
    ("sdmgrad", {"momentum": 1.0}, r"\[0\.0, 1\.0\)"),
    ("sdmgrad", {"momentum": -0.1}, "momentum"),
    ("sdmgrad", {"lr": 0.0}, "lr"),
    ("sdmgrad", {"n_iter": 0}, "n_iter"),
    ("sdmgrad", {"lambda_": -1.0}, "lambda_"),
    ("sdmgrad", {"lamda": 1.0}, "lambda_"),
    ("modo", {"gamma": 0.0}, "gamma"),
    ("modo", {"rho": -0.1}, "rho"),
])
def test_option_errors(method, options, match):
    with pytest.raises(ValueError, match=match):
        gradagg.weights_from_gramian(torch.eye(3, dtype=torch.float64), method, state=gradagg.init(method, 3),
                                     **options)


def test_pref_tensor_on_the_simplex_is_accepted():
    pref = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float32)  # sums to 1 in float32 rounding
    state = gradagg.init("sdmgrad", 3)
    out = gradagg.weights_from_gramian(torch.eye(3, dtype=torch.float64), "sdmgrad", state=state, pref=pref)
    assert_on_simplex(npy(out), 1e-7)


# --- state -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "field", "cls"), [("sdmgrad", "w", "SDMGradState"), ("modo", "lam", "MoDoState")])
def test_state_starts_uniform_and_resets(method, field, cls):
    state = gradagg.init(method, 5)
    assert type(state).__name__ == cls and isinstance(state, gradagg.State)
    np.testing.assert_array_equal(npy(getattr(state, field)), np.full(5, 0.2))
    call(method, cross_matrix(5, 0), state)
    assert not np.allclose(npy(getattr(state, field)), 0.2)
    state.reset()
    np.testing.assert_array_equal(npy(getattr(state, field)), np.full(5, 0.2))
    assert gradagg.init(method, 4, dtype=torch.float32).to(dtype=torch.float64).state_dict()[field].dtype == \
        torch.float64
    assert gradagg.methods()[method].uses_cross and gradagg.methods()[method].stateful


@pytest.mark.parametrize("method", ["sdmgrad", "modo"])
def test_checkpoint_resume_is_bit_identical(method):
    js = pytree(3)
    state = gradagg.init(method, 3)
    for t in range(2):
        gradagg.aggregate(js, method, cross=(pytree(10 + t), pytree(20 + t)), state=state)
    resumed = gradagg.init(method, 3).load_state_dict(state.state_dict())
    for t in range(3):
        cross = (pytree(30 + t), pytree(40 + t))
        a = gradagg.aggregate(js, method, cross=cross, state=state)
        b = gradagg.aggregate(js, method, cross=cross, state=resumed)
        for name in js:
            assert torch.equal(a[name], b[name])
    with pytest.raises(ValueError, match=r"sdmgrad|modo"):
        gradagg.init("modo" if method == "sdmgrad" else "sdmgrad", 3).load_state_dict(state.state_dict())


# --- TorchJD 0.18 peer check -----------------------------------------------------------------


def test_torchjd_peer():
    """TorchJD's SDMGradWeighting / MoDoWeighting implement the same recurrences. Deliberate
    differences: gradagg validates pref on Δ (TorchJD accepts any vector), and keeps w in an explicit
    state instead of the module (TorchJD re-initialises it when the dtype or device changes)."""
    agg = pytest.importorskip("torchjd.aggregation")
    k = 4
    pref = [0.1, 0.4, 0.2, 0.3]
    sdm = agg.SDMGradWeighting(pref_vector=torch.tensor(pref, dtype=torch.float64))
    modo = agg.MoDoWeighting(gamma=0.3, rho=0.2)
    sdm_default, modo_default = agg.SDMGradWeighting(), agg.MoDoWeighting()
    s_sdm, s_modo, s_sdm_d, s_modo_d = (gradagg.init(m, k) for m in ("sdmgrad", "modo", "sdmgrad", "modo"))
    for t in range(5):
        a = cross_matrix(k, t, scale=10.0 ** (t - 2))
        np.testing.assert_allclose(call("sdmgrad", a, s_sdm, pref=pref), npy(sdm(t64(a))), atol=1e-12)
        np.testing.assert_allclose(call("modo", a, s_modo, gamma=0.3, rho=0.2), npy(modo(t64(a))), atol=1e-13)
        np.testing.assert_allclose(call("sdmgrad", a, s_sdm_d), npy(sdm_default(t64(a))), atol=1e-12)
        np.testing.assert_allclose(call("modo", a, s_modo_d), npy(modo_default(t64(a))), atol=1e-13)


def test_defaults_are_the_contract():
    """METHODS.md A.2: TorchJD's defaults for both (LibMTL's lr 5 and γ 1e-3 are options)."""
    assert gradagg.methods()["sdmgrad"].options == {"lambda_": 0.3, "n_iter": 20, "lr": 10.0, "momentum": 0.5,
                                                    "pref": None}
    assert gradagg.methods()["modo"].options == {"gamma": 0.1, "rho": 0.1}
    s_sdm, s_modo, lam, w = gradagg.init("sdmgrad", 4), gradagg.init("modo", 4), np.full(4, 0.25), np.full(4, 0.25)
    for t in range(3):
        a = cross_matrix(4, t)
        lam = modo_ref(a, lam, gamma=0.1, rho=0.1)
        expected, w = sdmgrad_ref(a, w, lambda_=0.3, n_iter=20, lr=10.0, momentum=0.5)
        np.testing.assert_allclose(call("modo", a, s_modo), lam, atol=1e-13)
        np.testing.assert_allclose(call("sdmgrad", a, s_sdm), expected, atol=1e-12)


@pytest.mark.parametrize("method", ["sdmgrad", "modo"])
def test_a_non_finite_step_jacobian_raises_before_the_state_moves(method):
    """The step's J with a NaN (cross batches finite): the default CPU check raises NonFiniteError
    naming the task, and the state is as it was."""
    torch.manual_seed(0)
    jac, a, b = (torch.randn(3, 8, dtype=torch.float64) for _ in range(3))
    state = gradagg.init(method, 3)
    gradagg.aggregate(jac, method, state=state, cross=(a, b))
    before = {k: v.clone() for k, v in state.state_dict().items() if isinstance(v, torch.Tensor)}
    jac[2, 4] = float("nan")
    with pytest.raises(gradagg.NonFiniteError, match=r"tasks \[2\]"):
        gradagg.aggregate(jac, method, state=state, cross=(a, b))
    assert all(torch.equal(v, state.state_dict()[k]) for k, v in before.items())
