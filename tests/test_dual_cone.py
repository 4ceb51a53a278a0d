"""UPGrad and DualProj against an independent bounded least-squares solver (scipy's BVLS)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradagg

from asserts import DEVICES, assert_close_direction, assert_non_conflicting, gram, npy
from oracles import dual_cone_projection
from strategies import cases, large_k_cases


def rounding_floor(jn: np.ndarray, w: np.ndarray) -> float:
    """The accuracy floor of Σ w_i g_i (regularisation 1e-10 and rounding): where the exact answer
    is 0, only this much remains."""
    return 1e-8 * (np.abs(w) * np.linalg.norm(jn, axis=1)).sum()


def prefs(k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.1, 1.0, k)


@pytest.mark.parametrize("device", DEVICES)
@given(case=st.one_of(cases(max_k=10), large_k_cases()), pseed=st.integers(0, 100), uniform=st.booleans())
def test_upgrad_matches_bvls(device, case, pseed, uniform):
    j = case.tensor(device)
    jn = npy(j)
    p = np.full(case.k, 1 / case.k) if uniform else prefs(case.k, pseed)
    ref = sum(jn.T @ dual_cone_projection(jn, p[i] * np.eye(case.k)[i]) for i in range(case.k))
    w = npy(gradagg.weights(j, "upgrad", pref=None if uniform else p.tolist()))
    d = jn.T @ w
    assert_close_direction(d, ref, 1e-6, floor=rounding_floor(jn, w))
    assert_non_conflicting(jn, d, w=w)


@pytest.mark.parametrize("device", DEVICES)
@given(case=st.one_of(cases(max_k=10), large_k_cases()), pseed=st.integers(0, 100))
def test_dualproj_matches_bvls(device, case, pseed):
    j = case.tensor(device)
    jn = npy(j)
    p = prefs(case.k, pseed)
    ref = jn.T @ dual_cone_projection(jn, p)
    w = npy(gradagg.weights(j, "dualproj", pref=torch.tensor(p)))
    d = jn.T @ w
    assert_close_direction(d, ref, 1e-6, floor=rounding_floor(jn, w))
    assert_non_conflicting(jn, d, w=w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["upgrad", "dualproj"])
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 8), d=st.integers(1, 12))
def test_no_conflict_gives_weighted_sum(device, method, seed, k, d):
    """All G_ij ≥ 0: Jᵀp is already in the dual cone, so both return it."""
    rng = np.random.default_rng(seed)
    jn = np.abs(rng.standard_normal((k, d)))
    p = rng.uniform(0.1, 1, k)
    w = npy(gradagg.weights(torch.tensor(jn, device=device), method, pref=p.tolist()))
    np.testing.assert_allclose(w, p, rtol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_upgrad_projects_each_row(device):
    """Two orthogonal-ish rows in conflict: the projection of g_1 keeps g_2·d ≥ 0 exactly at 0."""
    j = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64, device=device)
    w = npy(gradagg.weights(j, "dualproj", pref=[1.0, 0.0]))
    d = npy(j).T @ w
    assert abs(d @ npy(j)[1]) < 1e-12 and d @ npy(j)[0] > 0
    g = gram(j)
    assert (g @ w >= -1e-12).all()
