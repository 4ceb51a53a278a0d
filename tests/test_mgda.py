"""MGDA: exact min-norm point, checked by closed forms, KKT certificates and exhaustive search."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradagg

from asserts import DEVICES, assert_non_conflicting, assert_on_simplex, gram, npy
from oracles import frank_wolfe_gap, mgda_enumerate
from strategies import cases, large_k_cases


def suboptimality_bound(g: np.ndarray, w_ref: np.ndarray) -> float:
    """The 1e-9 bar: relative to f*, plus the same relative slack on Σ w_i² ‖g_i‖² for f* ≈ 0."""
    return 1e-9 * (w_ref @ g @ w_ref + (w_ref**2 * np.diag(g)).sum()) + 1e-300


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(max_k=7, scales=True))
def test_matches_exhaustive_search(device, case):
    j = case.tensor(device)
    g = gram(j)
    w = npy(gradagg.weights(j, "mgda"))
    w_ref = mgda_enumerate(g)
    assert_on_simplex(w)
    assert w @ g @ w - w_ref @ g @ w_ref <= suboptimality_bound(g, w_ref)


@pytest.mark.parametrize("device", DEVICES)
@given(case=st.one_of(cases(max_k=12), large_k_cases()))
def test_kkt_certificate(device, case):
    """(Gw)_i ≥ wᵀGw for all i, equality on the support: the Frank-Wolfe gap bounds f − f*."""
    j = case.tensor(device)
    g = gram(j)
    w = npy(gradagg.weights(j, "mgda"))
    assert_on_simplex(w)
    value = w @ g @ w
    gap = frank_wolfe_gap(g, w)
    # The gap is linear in the error of w, so its rounding floor is ~1e-12 max G_ii.
    assert gap <= 1e-9 * (value + (w**2 * np.diag(g)).sum()) + 1e-12 * np.diag(g).max()
    assert_non_conflicting(npy(j), npy(j).T @ w, rtol=1e-6, w=w)


@pytest.mark.parametrize("device", DEVICES)
@given(seed=st.integers(0, 2**32 - 1), d=st.integers(1, 20))
def test_two_tasks_closed_form(device, seed, d):
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((2, d)) * 10.0 ** rng.uniform(-3, 3, size=(2, 1))
    g1, g2 = j
    w1 = np.clip((g2 - g1) @ g2 / max((g1 - g2) @ (g1 - g2), 1e-300), 0, 1)
    w = npy(gradagg.weights(torch.tensor(j, device=device), "mgda"))
    np.testing.assert_allclose(w, [w1, 1 - w1], atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_two_vector_step_is_exact_at_the_boundary(device):
    """Defect d: the old 2-vector step returned 0.999/0.001 where the answer is exactly 1/0."""
    j = torch.tensor([[1.0, 0.0], [3.0, 1.0]], dtype=torch.float64, device=device)  # g1·g2 ≥ ‖g1‖²
    w = gradagg.weights(j, "mgda")
    assert w.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
def test_not_the_plain_sum(device):
    """Defect a: min(w, 1e-3) in place of max made the old MGDA-UB the plain sum."""
    j = torch.tensor([[1.0, 0.0], [0.0, 10.0]], dtype=torch.float64, device=device)
    w = npy(gradagg.weights(j, "mgda"))
    np.testing.assert_allclose(w, [100 / 101, 1 / 101], rtol=1e-12)
    d = npy(gradagg.aggregate(j, "mgda"))
    assert not np.allclose(d, [1.0, 10.0])


@pytest.mark.parametrize("device", DEVICES)
def test_zero_in_hull_gives_zero_direction(device):
    j = torch.tensor([[1.0, 2.0], [-2.0, -4.0], [0.5, 3.0]], dtype=torch.float64, device=device)
    d = npy(gradagg.aggregate(j, "mgda"))
    assert np.linalg.norm(d) <= 1e-6 * np.linalg.norm(npy(j))


@pytest.mark.parametrize("device", DEVICES)
def test_hard_problem_terminates_within_budget(device):
    """Defect c: the old solver could loop far past its cap. Ours has a fixed budget and converges."""
    from gradagg.solvers import nnqp, scaled_gramian
    from gradagg.solvers.active_set import default_budget

    rng = np.random.default_rng(0)
    k = 64
    base = rng.standard_normal((k, 4))
    j = torch.tensor(base @ rng.standard_normal((4, 200)) + 1e-9 * rng.standard_normal((k, 200)), device=device)
    a, s, _ = scaled_gramian(torch.tensor(gram(j), device=device), 1e-10)
    _, converged = nnqp(a, s.unsqueeze(0), None, default_budget(k))
    assert bool(converged.all())
