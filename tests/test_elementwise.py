"""GradDrop and trimmed mean, which act coordinate by coordinate."""

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradagg
from gradagg.solvers import native

from asserts import DEVICES, npy


@pytest.mark.parametrize("device", DEVICES)
def test_graddrop_keeps_coordinates_where_all_tasks_agree(device):
    """Defect f: P was clamped into [0, 0.5], dropping agreeing coordinates half the time."""
    j = torch.tensor([[1.0, -2.0, 3.0], [0.5, -1.0, 0.25], [2.0, -0.1, 1.0]], dtype=torch.float64, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(50):
        d = gradagg.aggregate(j, "graddrop", generator=gen)
        torch.testing.assert_close(d, j.sum(0))


@pytest.mark.parametrize("device", DEVICES)
def test_graddrop_keep_probability_is_p(device):
    """One coordinate with g = (3, −1): P = ½(1 + 2/4) = 0.75 keeps the positive part with prob 0.75."""
    j = torch.tensor([[3.0] * 4000, [-1.0] * 4000], dtype=torch.float64, device=device)
    d = npy(gradagg.aggregate(j, "graddrop", generator=torch.Generator(device=device).manual_seed(1)))
    assert set(np.unique(d)) <= {3.0, -1.0}
    kept_positive = (d == 3.0).mean()
    assert abs(kept_positive - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 4000)


@pytest.mark.parametrize("device", DEVICES)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 6), d=st.integers(1, 30))
def test_graddrop_full_leakage_is_sum_and_masks_are_sign_consistent(device, seed, k, d):
    jn = np.random.default_rng(seed).standard_normal((k, d))
    j = torch.tensor(jn, device=device)
    np.testing.assert_allclose(npy(gradagg.aggregate(j, "graddrop", leakage=1.0)), jn.sum(0), rtol=1e-12, atol=1e-12)
    out = npy(gradagg.aggregate(j, "graddrop", generator=torch.Generator(device=device).manual_seed(seed % 1000)))
    pos, neg = np.where(jn > 0, jn, 0).sum(0), np.where(jn < 0, jn, 0).sum(0)
    assert all(np.isclose(o, p) or np.isclose(o, n) or (p == 0 and n == 0) for o, p, n in zip(out, pos, neg))


@pytest.mark.parametrize("device", DEVICES)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 9), d=st.integers(1, 20), data=st.data())
def test_trimmed_mean_against_numpy(device, seed, k, d, data):
    jn = np.random.default_rng(seed).standard_normal((k, d))
    trim = data.draw(st.integers(0, (k - 1) // 2))
    expected = np.sort(jn, 0)[trim : k - trim].mean(0)
    out = npy(gradagg.aggregate(torch.tensor(jn, device=device), "trimmed_mean", trim=trim))
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("native_path", [True, False], ids=["C", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(3, 9), d=st.integers(1, 600), data=st.data())
def test_trimmed_mean_keeps_the_middle_beside_huge_extremes(native_path, dtype, seed, k, d, data):
    """Found by TorchJD's tests: the sum less the extremes cancelled the middle values away (float32,
    extremes of 1e11 around values of 1 gave 512 for 1.5). The middle values are summed themselves."""
    rng = np.random.default_rng(seed)
    trim = data.draw(st.integers(1, (k - 1) // 2))
    jn = rng.standard_normal((k, d))
    for row in range(2 * trim):  # trim huge values of each sign in every column, in random rows
        jn[row] = (1 if row % 2 else -1) * 10.0 ** rng.uniform(8, 12, size=d)
    jn = jn[rng.permutation(k)]
    j = torch.tensor(jn, dtype=dtype)
    expected = np.sort(j.double().numpy(), 0)[trim : k - trim].mean(0)
    with contextlib.nullcontext() if native_path else native.disabled():
        out = gradagg.aggregate(j, "trimmed_mean", trim=trim).double().numpy()
    u = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    np.testing.assert_allclose(out, expected, rtol=4 * k * u, atol=4 * k * u * np.abs(expected).max())


@pytest.mark.parametrize("method", ["graddrop", "trimmed_mean"])
def test_no_weights_for_elementwise_methods(method):
    with pytest.raises(ValueError, match="coordinate by coordinate"):
        gradagg.weights(torch.randn(3, 4), method, **({"trim": 1} if method == "trimmed_mean" else {}))
