"""Closed forms and defining properties of the remaining weightings, from G computed independently."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import fsolve

import gradagg

from asserts import DEVICES, assert_close_direction, npy
from strategies import cases


def tensor(a, device):
    return torch.tensor(a, dtype=torch.float64, device=device)


def full_rank(case) -> np.ndarray:
    return case.full_rank()


# --- sum, mean, constant, random -----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(max_k=8, scales=False))
def test_fixed_weightings(device, case):
    j = case.tensor(device)
    jn = npy(j)
    np.testing.assert_allclose(npy(gradagg.aggregate(j, "sum")), jn.sum(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(npy(gradagg.aggregate(j, "identity")), jn.sum(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(npy(gradagg.aggregate(j, "mean")), jn.mean(0), rtol=1e-12, atol=1e-12)
    w = np.arange(1.0, case.k + 1)
    np.testing.assert_allclose(npy(gradagg.aggregate(j, "constant", weights=w.tolist())), w @ jn, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_random_is_softmax_of_normal_draws(device):
    gen = torch.Generator(device=device).manual_seed(7)
    j = torch.randn(5, 3, dtype=torch.float64, device=device)
    w = gradagg.weights(j, "random", generator=gen)
    expected = torch.softmax(torch.randn(5, generator=torch.Generator(device=device).manual_seed(7),
                                         dtype=torch.float64, device=device), 0)
    torch.testing.assert_close(w, expected)
    assert abs(float(w.sum()) - 1) < 1e-12 and bool((w > 0).all())


# --- pcgrad --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@given(seed=st.integers(0, 2**32 - 1), d=st.integers(1, 10), scale=st.integers(-6, 6))
def test_pcgrad_two_tasks_closed_form(device, seed, d, scale):
    jn = np.random.default_rng(seed).standard_normal((2, d)) * 10.0**scale
    g = jn @ jn.T
    m = min(g[0, 1], 0)
    expected = [1 - m / g[0, 0], 1 - m / g[1, 1]]
    np.testing.assert_allclose(npy(gradagg.weights(tensor(jn, device), "pcgrad")), expected, rtol=1e-12)


def pcgrad_reference(jn: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """The sequential algorithm on the vectors themselves, with the given orders."""
    out = []
    for i, order in enumerate(orders):
        gi = jn[i].copy()
        for j in order:
            dot = gi @ jn[j]
            if dot < 0 and jn[j] @ jn[j] > 0:
                gi -= dot / (jn[j] @ jn[j]) * jn[j]
        out.append(gi)
    return np.sum(out, 0)


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(max_k=4, scales=False))
def test_pcgrad_is_one_of_the_sequential_orders(device, case):
    """With K ≤ 4 every combination of orders can be enumerated: the result must be one of them."""
    jn = case.numpy()
    d = npy(gradagg.aggregate(tensor(jn, device), "pcgrad", generator=torch.Generator(device=device).manual_seed(1)))
    per_task = [list(itertools.permutations([j for j in range(case.k) if j != i])) for i in range(case.k)]
    candidates = [pcgrad_reference(jn, list(orders)) for orders in itertools.product(*per_task)]
    assert min(np.linalg.norm(d - c) for c in candidates) <= 1e-9 * (np.linalg.norm(jn) + 1e-300)


@pytest.mark.parametrize("device", DEVICES)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 8), d=st.integers(1, 10))
def test_pcgrad_without_conflict_is_sum(device, seed, k, d):
    jn = np.abs(np.random.default_rng(seed).standard_normal((k, d)))
    np.testing.assert_allclose(npy(gradagg.weights(tensor(jn, device), "pcgrad")), np.ones(k), rtol=1e-15)


# --- imtl_g, config ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(max_k=8, kinds=("random", "norm_spread", "orthogonal"), max_d=30))
def test_imtl_g_equal_projections(device, case):
    jn = full_rank(case)
    w = npy(gradagg.weights(tensor(jn, device), "imtl_g"))
    assert abs(w.sum() - 1) < 1e-9
    units = jn / np.linalg.norm(jn, axis=1, keepdims=True)
    proj = units @ (jn.T @ w)
    np.testing.assert_allclose(proj, np.full(case.k, proj.mean()), rtol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(max_k=8, kinds=("random", "norm_spread", "orthogonal"), max_d=30))
def test_config_equal_cosines_and_length(device, case):
    jn = full_rank(case)
    d = npy(gradagg.aggregate(tensor(jn, device), "config"))
    units = jn / np.linalg.norm(jn, axis=1, keepdims=True)
    cos = units @ d / np.linalg.norm(d)
    np.testing.assert_allclose(cos, np.full(case.k, cos.mean()), rtol=1e-7)
    assert cos.mean() > 0
    d_hat = d / np.linalg.norm(d)
    np.testing.assert_allclose(np.linalg.norm(d), (jn @ d_hat).sum(), rtol=1e-7)


# --- aligned_mtl ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@given(case=cases(max_k=7, kinds=("random", "rank_deficient", "orthogonal"), scales=False))
def test_aligned_mtl_against_numpy_eig(device, mode, case):
    """(Gradients of very different norms are left out: eigenvalues spread over 1e24 are only known to
    eps·λ_max in any eigensolver, so the method itself is ill-conditioned there.)"""
    jn = case.numpy()
    g = jn @ jn.T
    lam, vec = np.linalg.eigh(g)
    keep = lam > 1e-12 * lam.max()
    lam_k, vec_k = lam[keep], vec[:, keep]
    sigma = {"min": lam_k.min(), "median": np.median(lam_k), "rmse": lam_k.mean()}[mode] ** 0.5
    p = np.random.default_rng(case.seed).uniform(0.1, 1, case.k)
    expected = sigma * vec_k @ np.diag(lam_k**-0.5) @ vec_k.T @ p
    w = npy(gradagg.weights(tensor(jn, device), "aligned_mtl", pref=p.tolist(), scale_mode=mode))
    assert_close_direction(w, expected, 1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_aligned_mtl_aligns_full_rank(device):
    """For full-rank J, Jᵀ B has orthonormal rows scaled by σ: (BG B) = σ² I."""
    jn = np.random.default_rng(3).standard_normal((4, 9))
    g = jn @ jn.T
    rows = [npy(gradagg.weights(tensor(jn, device), "aligned_mtl", pref=np.eye(4)[i].tolist())) for i in range(4)]
    b = np.stack(rows, 1)
    aligned = b.T @ g @ b
    np.testing.assert_allclose(aligned, np.eye(4) * np.linalg.eigvalsh(g).min(), atol=1e-9)


# --- krum ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(min_k=3, max_k=10, kinds=("random", "duplicate", "norm_spread"), scales=False), data=st.data())
def test_krum_against_brute_force(device, case, data):
    jn = case.numpy()
    f = data.draw(st.integers(0, case.k - 3))
    m = data.draw(st.integers(1, case.k))
    dist = ((jn[:, None] - jn[None]) ** 2).sum(-1)
    scores = [np.sort(np.delete(dist[i], i))[: case.k - f - 2].sum() for i in range(case.k)]
    order = np.argsort(scores, kind="stable")
    if m < case.k and np.isclose(scores[order[m - 1]], scores[order[m]], rtol=1e-9):
        return  # a tie at the cut: several answers are right
    expected = jn[order[:m]].mean(0)
    np.testing.assert_allclose(npy(gradagg.aggregate(tensor(jn, device), "krum", f=f, m=m)), expected,
                               rtol=1e-9, atol=1e-9 * np.abs(jn).max())


# --- fairgrad ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(max_k=8, kinds=("random", "norm_spread", "orthogonal")), alpha=st.sampled_from([0.5, 1.0, 2.0]))
def test_fairgrad_solves_its_equation(device, case, alpha):
    jn = full_rank(case)
    g = jn @ jn.T
    w = npy(gradagg.weights(tensor(jn, device), "fairgrad", alpha=alpha))
    assert (w > 0).all()
    # Componentwise backward error: each equation holds to 1e-9 of the size of its terms.
    rhs = w ** (-1 / alpha)
    assert (np.abs(g @ w - rhs) <= 1e-9 * (np.abs(g) @ w + rhs)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_fairgrad_matches_fsolve(device):
    jn = np.random.default_rng(0).standard_normal((3, 5))
    g = jn @ jn.T
    ref = np.exp(fsolve(lambda x: g @ np.exp(x) - np.exp(-x / 2.0), np.zeros(3), xtol=1e-14))
    w = npy(gradagg.weights(tensor(jn, device), "fairgrad", alpha=2.0))
    np.testing.assert_allclose(w, ref, rtol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_fairgrad_orthogonal_closed_form(device):
    """Orthogonal rows: ‖g_i‖² w_i = w_i^(−1/α), so w_i = ‖g_i‖^(−2α/(α+1))."""
    norms = np.array([0.5, 2.0, 7.0])
    jn = np.diag(norms)
    for alpha in (0.5, 1.0, 3.0):
        w = npy(gradagg.weights(tensor(jn, device), "fairgrad", alpha=alpha))
        np.testing.assert_allclose(w, norms ** (-2 * alpha / (alpha + 1)), rtol=1e-9)
