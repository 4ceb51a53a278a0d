"""CAGrad: closed forms, an independent SLSQP solve of the inner problem, and non-conflict for c ≥ 1."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import gradagg

from asserts import DEVICES, assert_non_conflicting, gram, npy
from oracles import cagrad_inner
from strategies import cases


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(max_k=6, kinds=("random", "norm_spread", "duplicate", "rank_deficient", "opposite")),
       c=st.sampled_from([0.1, 0.5, 1.0, 2.0]))
def test_primal_optimal_against_slsqp_dual(device, case, c):
    """d is feasible, ‖d − g0‖ ≤ c‖g0‖, and attains min_i g_i·d = min_w F(w) (strong duality), where
    an independent SLSQP gives an upper bound on min_w F(w)."""
    j = case.tensor(device)
    jn = npy(j)
    g = gram(j)
    g0 = jn.mean(0)
    r = c * np.linalg.norm(g0)
    d = npy(gradagg.aggregate(j, "cagrad", c=c))
    scale = np.linalg.norm(jn, axis=1).max() * max(np.linalg.norm(g0), 1e-300)
    assert np.linalg.norm(d - g0) <= r * (1 + 1e-9) + 1e-12 * np.linalg.norm(jn)
    _, upper = cagrad_inner(g, c)
    # 1e-6: SLSQP's own accuracy at the kink, and CAGrad's 1e-10 regularisation on rank-deficient G.
    assert (jn @ d).min() >= upper - 1e-6 * scale


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(max_k=12))
def test_c_zero_is_mean(device, case):
    j = case.tensor(device)
    np.testing.assert_allclose(npy(gradagg.weights(j, "cagrad", c=0.0)), np.full(case.k, 1 / case.k), rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(max_k=12), c=st.sampled_from([1.0, 1.5, 4.0]))
def test_large_c_does_not_conflict(device, case, c):
    j = case.tensor(device)
    w = npy(gradagg.weights(j, "cagrad", c=c))
    assert_non_conflicting(npy(j), npy(j).T @ w, rtol=1e-6, w=w)


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(max_k=8, kinds=("random", "norm_spread")))
def test_direction_definition(device, case):
    """d = g0 + r Jᵀw*/‖Jᵀw*‖ has ‖d − g0‖ = c‖g0‖ exactly, and rescale divides as documented.
    (D > K: 0 is then not in the hull of the gradients, so the formula applies.)"""
    assume(case.d > case.k)
    j = case.tensor(device)
    jn = npy(j)
    g0 = jn.mean(0)
    d = npy(gradagg.aggregate(j, "cagrad", c=0.5))
    np.testing.assert_allclose(np.linalg.norm(d - g0), 0.5 * np.linalg.norm(g0), rtol=1e-7,
                               atol=1e-12 * np.abs(jn).max())
    for rescale, div in ((1, 1.25), (2, 1.5)):
        np.testing.assert_allclose(npy(gradagg.aggregate(j, "cagrad", c=0.5, rescale=rescale)), d / div,
                                   rtol=1e-12, atol=1e-14 * np.abs(d).max())


@pytest.mark.parametrize("device", DEVICES)
def test_worst_task_improves(device):
    """The CAGrad direction maximises min_i g_i·d over the ball: better than the mean's worst task."""
    j = torch.tensor([[1.0, 0.1], [-0.6, 1.0]], dtype=torch.float64, device=device)
    d = npy(gradagg.aggregate(j, "cagrad", c=0.8))
    g0 = npy(j).mean(0)
    assert (npy(j) @ d).min() > (npy(j) @ g0).min()
