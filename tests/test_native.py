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


@pytest.mark.parametrize("method", ["mgda", "upgrad", "dualproj", "cagrad", "pcgrad", "nash_mtl", "imtl_g", "config"])
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
