"""The C solvers (gradagg._kkt) against the torch solvers, on the same hard cases.

The torch solvers are checked against independent oracles in test_mgda/test_dual_cone/test_cagrad/
test_weightings, and ``make test`` runs those files a second time with GRADAGG_NATIVE=0. Here the
two implementations of each algorithm must give the same direction d = Jᵀw.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradagg
from gradagg.solvers import native

from asserts import assert_close_direction, npy
from strategies import cases, large_k_cases

pytestmark = pytest.mark.skipif(not native.available(), reason="gradagg._kkt was not built")


def test_extension_is_built_where_required():
    """``make test`` sets GRADAGG_REQUIRE_NATIVE=1: a failed build there must not pass unnoticed."""
    if os.environ.get("GRADAGG_REQUIRE_NATIVE") == "1":
        assert native.available() and native.enabled()


def _both(j: torch.Tensor, method: str, **options) -> tuple[np.ndarray, np.ndarray]:
    def run():
        state = gradagg.init(method, j.shape[0]) if gradagg.methods()[method].stateful else None
        gen = torch.Generator().manual_seed(5)
        return npy(gradagg.weights(j, method, state=state, generator=gen, **options))

    fast = run()
    with native.disabled():
        reference = run()
    return fast, reference


SOLVED_IN_C = ["mgda", "upgrad", "dualproj", "cagrad", "pcgrad", "nash_mtl", "imtl_g", "config", "aligned_mtl"]


@pytest.mark.parametrize("method", SOLVED_IN_C)
@given(case=st.one_of(cases(), large_k_cases()))
def test_same_direction_as_the_torch_solver(method, case):
    j = case.tensor()
    fast, reference = _both(j, method)
    jn = case.numpy()
    scale = np.linalg.norm(jn, axis=1).max()
    weight = np.abs(reference).sum() + np.abs(fast).sum()
    assert_close_direction(fast @ jn, reference @ jn, rtol=1e-7, floor=1e-9 * weight * scale)


@given(case=cases(kinds=("random", "norm_spread", "orthogonal")), alpha=st.sampled_from([0.5, 1.0, 2.0]))
def test_fairgrad_same_weights_as_the_torch_solver(case, alpha):
    j = torch.tensor(case.full_rank())
    fast, reference = _both(j, "fairgrad", alpha=alpha)
    np.testing.assert_allclose(fast, reference, rtol=1e-7, atol=0)


def test_pcgrad_same_coefficients():
    j = torch.randn(9, 20, dtype=torch.float64)
    j[3] = -j[1]
    fast, reference = _both(j, "pcgrad")
    np.testing.assert_allclose(fast, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["mgda", "upgrad", "cagrad", "fairgrad", "nash_mtl"])
def test_non_finite_input_gives_nan(method):
    j = torch.randn(3, 5, dtype=torch.float64)
    j[1, 2] = float("nan")
    state = gradagg.init(method, 3) if gradagg.methods()[method].stateful else None
    w = gradagg.weights(j, method, state=state, check_finite=False)
    assert torch.isnan(w).all()


@given(k=st.integers(1, 12), n=st.integers(1, 1100), seed=st.integers(0, 2**31), strided=st.booleans(),
       double=st.booleans())
def test_trimmed_mean_same_as_torch(k, n, seed, strided, double):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    j = torch.randn(n, k, generator=gen, dtype=dtype).T if strided else torch.randn(k, n, generator=gen, dtype=dtype)
    for trim in range((k - 1) // 2 + 1):
        fast = gradagg.aggregate(j, "trimmed_mean", trim=trim)
        with native.disabled():
            reference = gradagg.aggregate(j, "trimmed_mean", trim=trim)
        tol = 1e-12 if double else 1e-5
        torch.testing.assert_close(fast, reference, rtol=tol, atol=tol)


@given(k=st.integers(1, 9), n=st.integers(1, 1100), seed=st.integers(0, 2**31), strided=st.booleans())
def test_graddrop_picks_a_sign_per_coordinate(k, n, seed, strided):
    """With leakage ℓ the result is ℓᵀJ + (1−ℓ)ᵀ(J⁺ or J⁻) per coordinate, in C as in torch."""
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(n, k, generator=gen, dtype=torch.float64).T if strided else torch.randn(k, n, generator=gen,
                                                                                          dtype=torch.float64)
    ell = torch.rand(k, generator=gen, dtype=torch.float64)
    d = gradagg.aggregate(j, "graddrop", leakage=ell.tolist(), generator=gen)
    base = ell @ j
    pos, neg = base + (1 - ell) @ j.clamp_min(0), base + (1 - ell) @ j.clamp_max(0)
    assert bool((torch.isclose(d, pos, rtol=1e-12, atol=1e-12) | torch.isclose(d, neg, rtol=1e-12, atol=1e-12)).all())
    torch.testing.assert_close(gradagg.aggregate(j, "graddrop", leakage=1.0), j.sum(0), rtol=1e-12, atol=1e-12)


def test_graddrop_draws_are_reproducible_and_fair():
    j = torch.stack([torch.ones(200_000), -torch.ones(200_000) / 3])  # P = 0.75 on every coordinate
    a = gradagg.aggregate(j, "graddrop", generator=torch.Generator().manual_seed(3))
    b = gradagg.aggregate(j, "graddrop", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    kept_positive = float((a > 0).double().mean())
    assert abs(kept_positive - 0.75) < 0.005  # ~5 standard deviations of a Bernoulli(0.75) mean


@given(case=cases(min_k=3), data=st.data())
def test_krum_same_choice_as_torch(case, data):
    k = case.k
    f = data.draw(st.integers(0, k - 3))
    m = data.draw(st.integers(1, k))
    j = case.tensor()
    fast, reference = _both(j, "krum", f=f, m=m)
    np.testing.assert_array_equal(fast, reference)


@given(case=cases(kinds=("random", "rank_deficient", "duplicate", "orthogonal", "zero_row")),
       mode=st.sampled_from(["min", "median", "rmse"]))
def test_aligned_mtl_jacobi_matches_eigh(case, mode):
    j = case.tensor()
    fast, reference = _both(j, "aligned_mtl", scale_mode=mode)
    jn = case.numpy()
    scale = np.linalg.norm(jn, axis=1).max()
    assert_close_direction(fast @ jn, reference @ jn, rtol=1e-7, floor=1e-9 * scale * (np.abs(reference).sum() + 1))


def test_a_c_breakdown_falls_back_to_the_torch_reference(monkeypatch):
    """Found by the fuzz suite: a float32 Jacobian with two opposite rows, in transposed layout,
    where the C Cholesky factorisation breaks down inside CAGrad's search (on the Gramian as gradagg
    formed it before its noise floor, and on the cleaned one): the torch reference (whose KKT checks
    certify its answer) takes over instead of an error."""
    from gradagg._methods import cagrad

    j = torch.tensor([
        [105311.5781, 177649.1250, -255329.1875, -13796.5059, 101371.9375, 135214.1875],
        [65378.8398, 149711.7812, 28995.7598, 55126.7148, 17873.7695, -107385.8672],
        [-84662.8984, 37958.4258, -58019.5195, 127155.1406, 129238.6562, 179878.6406],
        [-194003.4375, -327262.6250, 470363.6562, 25415.7207, -186745.8906, -249089.5781],
        [-159898.8281, -173072.4219, 35507.8398, -86218.8047, 120835.7031, 39454.6211],
        [30718.4609, 20844.2637, 89547.5078, -15304.6143, 108563.1016, -52591.4336]]).T.contiguous().T
    g = gradagg.gramian(j)
    with native.disabled():
        reference = cagrad._cagrad_impl(g, 1.0, 1.0)
    scale = float(j.double().norm(dim=1).max())
    torch.testing.assert_close(gradagg.weights(j, "cagrad", c=1.0) @ j.double(), reference @ j.double(),
                               rtol=1e-6, atol=1e-6 * scale)

    def breaks_down(*args):
        raise native.Unconverged("the C factorisation broke down")

    monkeypatch.setattr(native, "cagrad", breaks_down)
    torch.testing.assert_close(cagrad._cagrad_impl(g, 1.0, 1.0), reference)


def test_constants_agree_with_the_torch_implementations():
    from gradagg import _kkt
    from gradagg._methods import cagrad, dual_cone, fairgrad, mgda, nash_mtl
    from gradagg.solvers import active_set, barrier

    assert _kkt.SIGN_TOL == active_set.SIGN_TOL
    assert _kkt.QP_EPS == mgda.EPS == dual_cone.EPS
    assert _kkt.QP_REFINE == mgda.REFINE == dual_cone.REFINE
    assert _kkt.CAGRAD_EPS == cagrad.EPS
    assert _kkt.BARRIER_EPS == fairgrad.EPS == nash_mtl.EPS
    assert _kkt.RESIDUAL_TOL == barrier.RESIDUAL_TOL
    assert _kkt.CONVERGED_TOL == barrier.CONVERGED_TOL
