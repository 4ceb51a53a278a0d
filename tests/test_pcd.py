"""PCD (priority-constrained descent): METHODS.md Part C checks C1–C7, against closed forms, the KKT
conditions of the normalised problem and Dykstra's alternating projection written out here."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import gradagg

from asserts import npy
from strategies import cases


def call(j, state, fn=gradagg.aggregate, **options):
    return npy(fn(torch.as_tensor(j), "pcd", state=state, **options))


def scales_by_hand(jacs, beta=0.999, eps=1e-8):
    """s_i = 1/√(v̂_i + ε) after each call: v ← βv + (1−β)‖g_i‖², v̂ = v/(1−βᵗ); 0 where that is 1/0."""
    v, out = np.zeros(len(jacs[0])), []
    for t, j in enumerate(jacs, 1):
        v = beta * v + (1 - beta) * (np.asarray(j) ** 2).sum(1)
        den = np.sqrt(v / (1 - beta**t) + eps)
        out.append(np.divide(1.0, den, out=np.zeros_like(den), where=den > 0))
    return out, v


def dykstra(x0, c, b, sweeps=50000, tol=1e-15):
    """Euclidean projection of x0 onto {x : c_j·x ≥ b_j for all j} by Dykstra's algorithm."""
    x, inc = x0.copy(), np.zeros((len(b), len(x0)))
    for _ in range(sweeps):
        start = x.copy()
        for j in range(len(b)):
            y = x + inc[j]
            cc = c[j] @ c[j]
            x = y + max(b[j] - c[j] @ y, 0.0) / cc * c[j] if cc > 0 else y
            inc[j] = y - x
        if np.abs(x - start).max() <= tol * max(1.0, np.abs(x).max()):
            break
    return x


def normalised_problem(j, s, tau, primary=0):
    """(g̃_p, the secondaries' g̃_j, their bounds τ_j ‖g̃_j‖²) with g̃_i = s_i g_i."""
    gt = s[:, None] * np.asarray(j)
    sec = [i for i in range(len(gt)) if i != primary]
    taus = np.broadcast_to(np.asarray(tau, dtype=float), (len(sec),))
    return gt[primary], gt[sec], taus * (gt[sec] ** 2).sum(1)


def two_task_closed_form(g1, g2, tau):
    """C1 (Cor. 4.6): d = g_1 if cos ≥ τ, else ‖g_1‖ n̂(u_1 + (τ − cos) u_2), and 0 where that is 0
    (τ = 0 and opposite gradients)."""
    u1, u2 = g1 / np.linalg.norm(g1), g2 / np.linalg.norm(g2)
    c = u1 @ u2
    if c >= tau:
        return g1
    d = u1 + (tau - c) * u2
    if np.linalg.norm(d) <= 1e-15:
        return np.zeros_like(g1)
    return np.linalg.norm(g1) * d / np.linalg.norm(d)


# --- C1, C2: two tasks and the norm -----------------------------------------------------------------


@given(seed=st.integers(0, 2**32 - 1), d=st.integers(1, 8), tau=st.floats(0, 1), exp=st.integers(-6, 6))
def test_c1_two_tasks_closed_form(seed, d, tau, exp):
    """To 1e-12 of ‖g_1‖, or more where d̃ = u_1 + (τ − c)u_2 is much shorter than its terms: its
    norm comes from G, where cancellation costs ~eps (terms/‖d̃‖)² relative (e.g. opposite rows)."""
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((2, d)) * 10.0 ** rng.uniform(-3, 3, (2, 1)) * 10.0**exp
    got = call(j, gradagg.init("pcd", 2), tau=tau, eps=0.0)
    ref = two_task_closed_form(j[0], j[1], tau)
    u = j / np.linalg.norm(j, axis=1, keepdims=True)
    coef = max(tau - u[0] @ u[1], 0.0)
    short = min((1 + coef) / max(np.linalg.norm(u[0] + coef * u[1]), 1e-300), 1e100)
    assert np.abs(got - ref).max() <= 1e-12 * np.linalg.norm(j[0]) * max(1.0, 1e-3 * short**2)


def test_c1_no_conflict_beyond_tau_is_the_primary():
    j = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # cos = 0.707
    w = call(j, gradagg.init("pcd", 2), gradagg.weights, tau=0.7, eps=0.0)
    assert w.tolist() == [1.0, 0.0]
    w = call(j, gradagg.init("pcd", 2), gradagg.weights, tau=0.75, eps=0.0)
    assert w[1] > 0


@given(case=cases(kinds=("random", "norm_spread", "orthogonal"), min_k=2, max_k=7), tau=st.floats(0, 0.5))
def test_c2_norm_is_the_primary_norm(case, tau):
    j = case.full_rank()
    d = call(j, gradagg.init("pcd", case.k), tau=tau)
    np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(j[0]), rtol=1e-9)


def test_c2_zero_primary_gives_zero_and_the_average_still_advances():
    state = gradagg.init("pcd", 3)
    j = np.array([[0.0, 0.0], [1.0, 2.0], [-3.0, 0.5]])
    for t in range(1, 4):
        assert call(j * t, state, gradagg.weights).tolist() == [0.0, 0.0, 0.0]
    _, v = scales_by_hand([j, 2 * j, 3 * j])
    assert int(state.step) == 3
    np.testing.assert_allclose(npy(state.v), v, rtol=1e-15)


def test_zero_direction_is_zero():
    """τ = 0 and g̃_1 in the negative cone of the secondaries: d̃ = 0, so w = 0 (not noise scaled up)."""
    j = np.array([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0], [0.0, 0.0, 3.0]])
    assert call(j, gradagg.init("pcd", 3), gradagg.weights, tau=0.0).tolist() == [0.0, 0.0, 0.0]
    # τ > 0: d̃ = τ(−u_1 + e_3) (the two constraints are orthogonal), small but well resolved.
    w = call(j, gradagg.init("pcd", 3), gradagg.weights, tau=0.1)
    np.testing.assert_allclose(w @ j, np.array([-1.0, -2.0, np.sqrt(5.0)]) / np.sqrt(2.0), atol=1e-12)


def test_one_task():
    state = gradagg.init("pcd", 1)
    assert call([[3.0, -4.0]], state, gradagg.weights).tolist() == [1.0]
    assert call([[0.0, 0.0]], state, gradagg.weights).tolist() == [0.0]
    assert int(state.step) == 2


# --- C3: infeasibility, and the boundary set by G's floor --------------------------------------------


def test_c3_infeasible_gives_the_primary():
    j = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -2.0]])
    assert call(j, gradagg.init("pcd", 3), gradagg.weights, tau=0.2).tolist() == [1.0, 0.0, 0.0]
    # The same input is feasible at τ = 0 (g_1 satisfies both constraints with equality).
    assert call(j, gradagg.init("pcd", 3), gradagg.weights, tau=0.0).tolist() == [1.0, 0.0, 0.0]
    # Tilted, so that the two answers differ: infeasible → g_1; at τ = 0, g_1 minus its e_2 part.
    tilted = j + np.array([[0.0, 0.5], [0, 0], [0, 0]])
    assert call(tilted, gradagg.init("pcd", 3), gradagg.weights, tau=0.2).tolist() == [1.0, 0.0, 0.0]
    d = call(tilted, gradagg.init("pcd", 3), tau=0.0, eps=0.0)
    np.testing.assert_allclose(d, [np.hypot(1.0, 0.5), 0.0], atol=1e-15)


@given(seed=st.integers(0, 2**32 - 1), k=st.integers(3, 7), d=st.integers(1, 6),
       tau=st.one_of(st.floats(1e-3, 1.0), st.sampled_from([1e-10, 1e-7, 1e-5])))
def test_c3_positively_dependent_secondaries_are_infeasible(seed, k, d, tau):
    """n ≥ 0 with Σ n_j g̃_j = 0 and τ > 0: infeasible (Farkas), whatever the size of τ above G's
    floor (here ≈ 1e-14)."""
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((k, d)) * 10.0 ** rng.uniform(-2, 2, (k, 1))
    m = int(rng.integers(1, k - 1))  # the last secondary cancels a positive combination of m others
    chosen = rng.choice(np.arange(1, k - 1), size=m, replace=False)
    j[k - 1] = -(rng.uniform(0.2, 3.0, m) @ j[chosen])
    w = call(j, gradagg.init("pcd", k), gradagg.weights, tau=tau)
    assert w.tolist() == np.eye(k)[0].tolist()


@pytest.mark.parametrize(("dtype", "eps", "feasible"), [
    (torch.float64, 1e-2, True), (torch.float64, 1e-3, True), (torch.float64, 1e-7, False),
    (torch.float32, 1e-2, True), (torch.float32, 1e-4, False),
])
def test_c3_boundary_of_infeasibility(dtype, eps, feasible):
    """g_2 = e_2 + ε e_3 and g_3 = −e_2: the feasible set shrinks as ε → 0 (d̃ = (1, −τ, τ(c + 1)/ε),
    c = √(1+ε²), for every ε > 0), and n = (1, 1) has ‖n_2 û_2 + n_3 û_3‖² ≈ ε²/2 ‖n‖². A combination
    under the resolution max(2√K δ, 1e-10) counts as null: float64 (2√K δ ≈ 3e-15, so the solver's
    1e-10 decides) resolves ε = 1e-3 but not 1e-7; float32 (2√K δ ≈ 2e-6) resolves 1e-2 but not 1e-4."""
    tau = 0.2
    j = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, eps], [0.0, -1.0, 0.0]])
    w = call(torch.tensor(j, dtype=dtype), gradagg.init("pcd", 3), gradagg.weights, tau=tau, eps=0.0)
    if not feasible:
        assert w.tolist() == [1.0, 0.0, 0.0]
        return
    c = np.sqrt(1 + eps**2)
    ref = np.array([1.0, -tau, tau * (c + 1) / eps])
    ref /= np.linalg.norm(ref)
    np.testing.assert_allclose(w @ j, ref, atol=1e-9 if dtype == torch.float64 else 1e-3)


def test_c3_demand_below_the_floor_counts_as_zero():
    """τ under G's rounding cannot be told from 0: the τ = 0 answer (here d̃ = 0)."""
    j = np.array([[1.0, 0.3], [0.0, 1.0], [0.0, -2.0], [-1.0, 0.0]])
    assert call(j, gradagg.init("pcd", 4), gradagg.weights, tau=1e-3).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert call(j, gradagg.init("pcd", 4), gradagg.weights, tau=1e-13).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert call(j, gradagg.init("pcd", 4), gradagg.weights, tau=1e-17).tolist() == [0.0, 0.0, 0.0, 0.0]


# --- C4: no active constraint ------------------------------------------------------------------------


@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 7), d=st.integers(2, 8), tau=st.floats(0, 0.9))
def test_c4_no_active_constraint_gives_the_primary(seed, k, d, tau):
    rng = np.random.default_rng(seed)
    u1 = rng.standard_normal(d)
    u1 /= np.linalg.norm(u1)
    j = np.empty((k, d))
    j[0] = u1 * rng.uniform(0.1, 10)
    for i in range(1, k):  # cos(g_1, g_i) ≥ τ + 0.01: a unit vector at angle arccos(cos) from u_1
        cos = rng.uniform(min(tau + 0.01, 1.0), 1.0)
        other = rng.standard_normal(d)
        other -= (other @ u1) * u1
        other /= max(np.linalg.norm(other), 1e-300)
        j[i] = (cos * u1 + np.sqrt(1 - cos**2) * other) * 10.0 ** rng.uniform(-3, 3)
    w = call(j, gradagg.init("pcd", k), gradagg.weights, tau=tau, eps=0.0)
    assert w.tolist() == np.eye(k)[0].tolist()


def test_c4_no_conflict_at_tau_zero():
    j = np.abs(np.random.default_rng(3).standard_normal((5, 6)))
    np.testing.assert_array_equal(call(j, gradagg.init("pcd", 5), tau=0.0), j[0])


# --- C5: KKT of the normalised problem, and Dykstra -------------------------------------------------


def check_kkt_and_dykstra(j, w, s, tau, primary=0):
    """μ from w: ŵ = (w/s)/(w_p/s_p). Checks μ ≥ 0, g̃_jᵀd̃ ≥ τ_j‖g̃_j‖², μ_j slack_j = 0, and d̃
    against Dykstra's projection of g̃_p onto the constraint set."""
    gp, gs, bounds = normalised_problem(j, s, tau, primary)
    sec = [i for i in range(len(j)) if i != primary]
    hat = (w / s) / (w[primary] / s[primary])
    mu = hat[sec]
    dt = gp + mu @ gs
    scale = max((gs**2).sum(1).max(), gp @ gp)
    slack = gs @ dt - bounds
    assert mu.min() >= -1e-12 * np.abs(mu).max(), mu
    assert slack.min() >= -1e-10 * scale, slack
    assert np.abs(mu * slack).max() <= 1e-10 * scale * max(1.0, np.abs(mu).max()), (mu, slack)
    ref = dykstra(gp, gs, bounds)
    np.testing.assert_allclose(dt, ref, atol=1e-8 * np.sqrt(scale))


@given(case=cases(kinds=("random", "norm_spread"), min_k=3, max_k=6, max_d=10, scales=False),
       tau=st.one_of(st.floats(0, 0.6), st.lists(st.floats(0, 0.6), min_size=5, max_size=5)),
       beta=st.sampled_from([0.0, 0.5, 0.999]))
def test_c5_kkt_and_dykstra_over_several_calls(case, tau, beta):
    jn = case.full_rank()
    taus = tau if isinstance(tau, float) else tau[: case.k - 1]
    rng = np.random.default_rng(case.seed)
    jacs = [jn * rng.uniform(0.3, 3.0, (case.k, 1)) for _ in range(3)]
    state = gradagg.init("pcd", case.k)
    for j, s in zip(jacs, scales_by_hand(jacs, beta, 1e-8)[0]):
        w = call(j, state, gradagg.weights, tau=taus, beta=beta)
        check_kkt_and_dykstra(j, w, s, taus)


def test_c5_degenerate_but_feasible():
    """Degenerate but feasible inputs (a zero secondary, a duplicated one, τ = 0 with a positive
    dependence): the KKT conditions still hold."""
    j = np.array([[1.0, 0.2, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [-0.3, 1.0, 0.2, 0.1],
                  [-0.3, 1.0, 0.2, 0.1], [0.3, -1.0, -0.2, -0.1], [0.5, 0.5, 1.0, -1.0]])
    for tau in (0.0, [0.0, 0.0, 0.0, 0.0, 0.3]):
        w = call(j, gradagg.init("pcd", 6), gradagg.weights, tau=tau, eps=0.0)
        assert w[1] == 0.0
        s = np.where(np.linalg.norm(j, axis=1) > 0, 1 / np.maximum(np.linalg.norm(j, axis=1), 1e-300), 0.0)
        keep = [0, 2, 3, 4, 5]
        check_kkt_and_dykstra(j[keep], w[keep], s[keep], np.broadcast_to(tau, (5,))[1:])


# --- C6: scale invariance ----------------------------------------------------------------------------


@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 6), tau=st.floats(0, 0.5))
def test_c6_rescaling_secondaries_changes_nothing(seed, k, tau):
    rng = np.random.default_rng(seed)
    jacs = [rng.standard_normal((k, k + 3)) for _ in range(3)]
    powers = np.r_[1.0, 2.0 ** rng.integers(-30, 30, k - 1)]
    factors = np.r_[1.0, 10.0 ** rng.uniform(-6, 6, k - 1)]
    plain, pow2, any_c = (gradagg.init("pcd", k) for _ in range(3))
    for j in jacs:
        d = call(j, plain, tau=tau, eps=0.0)
        np.testing.assert_array_equal(call(j * powers[:, None], pow2, tau=tau, eps=0.0), d)  # exact
        np.testing.assert_allclose(call(j * factors[:, None], any_c, tau=tau, eps=0.0), d,
                                   atol=1e-12 * np.linalg.norm(j[0]))


def test_c6_rescaling_the_primary_scales_d():
    rng = np.random.default_rng(1)
    jacs = [rng.standard_normal((4, 6)) for _ in range(3)]
    plain, scaled = gradagg.init("pcd", 4), gradagg.init("pcd", 4)
    for j in jacs:
        d = call(j, plain, tau=0.3, eps=0.0)
        j2 = j.copy()
        j2[0] *= 8.0
        np.testing.assert_array_equal(call(j2, scaled, tau=0.3, eps=0.0), 8.0 * d)


# --- C7: permutations, parallel and zero secondaries, τ vectors --------------------------------------


@given(seed=st.integers(0, 2**32 - 1), k=st.integers(3, 6))
def test_c7_permuting_secondaries(seed, k):
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((k, k + 2))
    taus = rng.uniform(0, 0.5, k - 1)
    perm = np.r_[0, 1 + rng.permutation(k - 1)]
    w = call(j, gradagg.init("pcd", k), gradagg.weights, tau=taus.tolist())
    wp = call(j[perm], gradagg.init("pcd", k), gradagg.weights, tau=taus[perm[1:] - 1].tolist())
    np.testing.assert_allclose(wp, w[perm], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(wp @ j[perm], w @ j, atol=1e-12 * np.linalg.norm(j[0]))


@pytest.mark.parametrize("taus", [(0.1, 0.4), (0.4, 0.1), (0.25, 0.25)])
def test_c7_parallel_secondaries_are_decided_by_the_more_demanding(taus):
    rng = np.random.default_rng(7)
    g1, g2 = rng.standard_normal(5), rng.standard_normal(5)
    g1 -= 1.5 * (g1 @ g2) / (g2 @ g2) * g2  # a conflict with g_2
    j3 = np.stack([g1, g2, 3.0 * g2])
    d3 = call(j3, gradagg.init("pcd", 3), tau=list(taus), eps=0.0)
    d2 = call(j3[:2], gradagg.init("pcd", 2), tau=max(taus), eps=0.0)
    np.testing.assert_allclose(d3, d2, atol=1e-12)
    np.testing.assert_allclose(d2, two_task_closed_form(g1, g2, max(taus)), atol=1e-12)


def test_c7_equal_tau_vector_is_the_scalar():
    rng = np.random.default_rng(2)
    j = rng.standard_normal((5, 7))
    vec, scalar = gradagg.init("pcd", 5), gradagg.init("pcd", 5)
    for t in range(3):
        a = call(j * (1 + t), vec, tau=torch.full((4,), 0.3, dtype=torch.float64))
        assert np.array_equal(a, call(j * (1 + t), scalar, tau=0.3))


def test_c7_zero_secondary_gets_zero_and_changes_nothing():
    """Row 2 is zero except at call 1: its EMA is then nonzero, but a zero row has G̃_jj = G̃_j1 = 0,
    hence no constraint; the other rows' EMAs are their own, so both runs stay in step."""
    rng = np.random.default_rng(4)
    with_zero, without = gradagg.init("pcd", 4), gradagg.init("pcd", 3)
    for t in range(4):
        j = rng.standard_normal((3, 6))
        j[1] -= (j[1] @ j[0] / (j[0] @ j[0]) + 1.0) * j[0]  # g_1·g_2 = −‖g_1‖²: an active constraint
        jz = np.insert(j, 2, rng.standard_normal(6) if t == 1 else 0.0, axis=0)
        w = call(jz, with_zero, gradagg.weights, tau=[0.1, 0.5, 0.2])
        w3 = call(j, without, gradagg.weights, tau=[0.1, 0.2])
        if t != 1:
            assert w[2] == 0.0 and w3[1] > 0
            np.testing.assert_allclose(w[[0, 1, 3]], w3, rtol=1e-12)


# --- the primary option, the EMA, the state ----------------------------------------------------------


@pytest.mark.parametrize("primary", [0, 1, 3])
def test_primary_option_equals_reordering(primary):
    rng = np.random.default_rng(primary)
    k = 4
    order = [primary] + [i for i in range(k) if i != primary]
    taus = [0.1, 0.3, 0.6]
    with_option, reordered = gradagg.init("pcd", k), gradagg.init("pcd", k)
    for _ in range(3):
        j = rng.standard_normal((k, 5)) * rng.uniform(0.5, 2, (k, 1))
        w = call(j, with_option, gradagg.weights, tau=taus, primary=primary, beta=0.5)
        wr = call(j[order], reordered, gradagg.weights, tau=taus, beta=0.5)
        np.testing.assert_allclose(w[order], wr, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(np.linalg.norm(w @ j), np.linalg.norm(j[primary]), rtol=1e-10)
    np.testing.assert_allclose(npy(with_option.v)[order], npy(reordered.v), rtol=1e-15)


@pytest.mark.parametrize(("beta", "eps"), [(0.5, 1e-2), (0.0, 0.0), (0.999, 1e-8), (0.9, 0.3)])
def test_ema_and_bias_correction_by_hand(beta, eps):
    """K = 2 with the EMA's scales: d̃ = g̃_1 + max(0, τ − g̃_1·g̃_2/‖g̃_2‖²) g̃_2 (one constraint)."""
    rng = np.random.default_rng(5)
    jacs = [rng.standard_normal((2, 4)) * rng.uniform(0.1, 3.0, (2, 1)) for _ in range(5)]
    state = gradagg.init("pcd", 2)
    scales, v = scales_by_hand(jacs, beta, eps)
    for j, s in zip(jacs, scales):
        d = call(j, state, tau=0.4, beta=beta, eps=eps)
        a, b = s[0] * j[0], s[1] * j[1]
        dt = a + max(0.0, 0.4 - a @ b / (b @ b)) * b
        np.testing.assert_allclose(d, np.linalg.norm(j[0]) * dt / np.linalg.norm(dt), atol=1e-12)
    assert int(state.step) == 5 and state.step.dtype == torch.int64
    np.testing.assert_allclose(npy(state.v), v, rtol=1e-14)


def test_state_round_trip_is_bit_identical():
    rng = np.random.default_rng(6)
    jacs = [torch.tensor(rng.standard_normal((4, 6))) for _ in range(6)]
    straight = gradagg.init("pcd", 4)
    expected = [gradagg.aggregate(j, "pcd", state=straight, tau=0.3, beta=0.9) for j in jacs]
    first = gradagg.init("pcd", 4)
    for j in jacs[:3]:
        gradagg.aggregate(j, "pcd", state=first, tau=0.3, beta=0.9)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = gradagg.init("pcd", 4).load_state_dict(torch.load(buffer))
    assert set(first.state_dict()) == {"method", "num_tasks", "v", "step"}
    for j, e in zip(jacs[3:], expected[3:]):
        assert torch.equal(gradagg.aggregate(j, "pcd", state=resumed, tau=0.3, beta=0.9), e)
    assert torch.equal(resumed.v, straight.v) and torch.equal(resumed.step, straight.step)


def test_state_fields_and_dtype():
    state = gradagg.init("pcd", 3)
    assert state.v.dtype == torch.float64 and state.v.tolist() == [0.0, 0.0, 0.0] and int(state.step) == 0
    assert gradagg.init("pcd", 3, dtype=torch.bfloat16).v.dtype == torch.float32  # at least float32
    assert state.to(dtype=torch.float16).v.dtype == torch.float32
    assert gradagg.methods()["pcd"].stateful and not gradagg.methods()["pcd"].random


def test_non_finite_input_gives_nan_and_leaves_the_state():
    rng = np.random.default_rng(8)
    j = torch.tensor(rng.standard_normal((3, 5)))
    state = gradagg.init("pcd", 3)
    gradagg.aggregate(j, "pcd", state=state)
    before = {k: v.clone() for k, v in state.state_dict().items() if isinstance(v, torch.Tensor)}
    bad = j.clone()
    bad[1, 2] = float("nan")
    assert torch.isnan(gradagg.aggregate(bad, "pcd", state=state, check_finite=False)).all()
    bad[1, 2] = float("inf")
    assert torch.isnan(gradagg.weights(bad, "pcd", state=state, check_finite=False)).all()
    g = j @ j.T
    g[0, 2] = g[2, 0] = float("nan")
    assert torch.isnan(gradagg.weights_from_gramian(g, "pcd", state=state, check_finite=False)).all()
    with pytest.raises(gradagg.NonFiniteError):
        gradagg.aggregate(bad, "pcd", state=state)
    for name, value in before.items():
        assert torch.equal(getattr(state, name), value), name
    gradagg.aggregate(j, "pcd", state=state)
    assert int(state.step) == 2


def test_the_weighting_itself_returns_nan_for_non_finite_g():
    """The library also forces NaN after the fact; the method must not rely on that, nor advance."""
    from gradagg._registry import Context, lookup

    state = gradagg.init("pcd", 3)
    g = torch.eye(3, dtype=torch.float64)
    g[1, 1] = float("inf")
    w = lookup("pcd").weighting(g, Context(state=state), tau=0.1, beta=0.9, eps=0.0, primary=0)
    assert torch.isnan(w).all() and int(state.step) == 0 and not state.v.any()


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"tau": -0.1}, ValueError, r"tau.*\[0\.0, 1\.0\]"),
    ({"tau": 1.5}, ValueError, r"tau.*\[0\.0, 1\.0\]"),
    ({"tau": float("nan")}, ValueError, "finite"),
    ({"tau": [0.1, 0.2, 0.3]}, ValueError, r"K−1 = 2"),
    ({"tau": torch.tensor([0.1, 2.0])}, ValueError, r"\[0, 1\]"),
    ({"tau": [0.1, -0.2]}, ValueError, r"tau\[1\]"),
    ({"tau": "high"}, TypeError, "float or a sequence"),
    ({"beta": 1.0}, ValueError, r"\[0, 1\)"),
    ({"beta": -0.5}, ValueError, "beta"),
    ({"eps": -1e-8}, ValueError, "eps"),
    ({"primary": 3}, ValueError, r"0 ≤ primary < K"),
    ({"primary": -1}, ValueError, r"0 ≤ primary < K"),
    ({"primary": 1.0}, TypeError, "int"),
    ({"primary": True}, TypeError, "int"),
    ({"taus": 0.1}, ValueError, "Did you mean 'tau'"),
])
def test_option_errors(options, error, match):
    j = torch.randn(3, 4, dtype=torch.float64)
    state = gradagg.init("pcd", 3)
    with pytest.raises(error, match=match):
        gradagg.aggregate(j, "pcd", state=state, **options)
    assert int(state.step) == 0


def test_needs_its_state():
    with pytest.raises(ValueError, match="stateful"):
        gradagg.aggregate(torch.randn(3, 4), "pcd")
    with pytest.raises(ValueError, match="made for 'pcd', not 'nsgd'"):
        gradagg.aggregate(torch.randn(3, 4), "nsgd", state=gradagg.init("pcd", 3))


# --- precision and peers -----------------------------------------------------------------------------


@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 8), extra=st.integers(2, 20), tau=st.floats(0, 0.5))
def test_float32_agrees_with_float64(seed, k, extra, tau):
    """Well-conditioned rows (λ_min of the unit-diagonal Gramian ≥ 0.05, far above float32's floor
    of ~2e-6), norms spread over 10^±3: the float32 answer is the float64 one to ~δ/λ_min."""
    rng = np.random.default_rng(seed)
    jn = rng.standard_normal((k, k + extra))
    u = jn / np.linalg.norm(jn, axis=1, keepdims=True)
    assume(np.linalg.eigvalsh(u @ u.T)[0] >= 0.05)
    j64 = torch.tensor(jn * 10.0 ** rng.uniform(-3, 3, (k, 1))).float().double()
    s32, s64 = gradagg.init("pcd", k), gradagg.init("pcd", k)
    for t in range(3):
        d32 = gradagg.aggregate(j64.float() * (1 + t), "pcd", state=s32, tau=tau)
        d64 = gradagg.aggregate(j64 * (1 + t), "pcd", state=s64, tau=tau)
        assert d32.dtype == torch.float32
        err = float((d32.double() - d64).norm()) / float(j64[0].norm() * (1 + t))
        assert err <= 1e-5, err  # measured up to 5e-7
    torch.testing.assert_close(s32.v, s64.v, rtol=1e-5, atol=0)


@pytest.mark.parametrize("vector_tau", [False, True])
def test_torchjd_peer(vector_tau):
    """TorchJD 0.18's PCD has the same contract (primary first; gradagg adds ``primary``)."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    rng = np.random.default_rng(9)
    k = 5
    tau = torch.tensor([0.05, 0.3, 0.0, 0.6], dtype=torch.float64) if vector_tau else 0.2
    peer = aggregation.PCD(tau=tau, beta=0.9, eps=1e-6)
    ours, moved = gradagg.init("pcd", k), gradagg.init("pcd", k)
    for _ in range(6):
        j = torch.tensor(rng.standard_normal((k, 8)) * rng.uniform(0.1, 10, (k, 1)))
        expected = peer(j)
        got = gradagg.aggregate(j, "pcd", state=ours, tau=tau, beta=0.9, eps=1e-6)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12 * float(j[0].norm()))
        # With the primary moved to the end, the option puts it back.
        got = gradagg.aggregate(j[[1, 2, 3, 4, 0]], "pcd", state=moved, tau=tau, beta=0.9, eps=1e-6, primary=4)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12 * float(j[0].norm()))
