"""Properties every method must satisfy: task order, scaling, pytrees, K = 1, zeros, precision."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import gradagg

from asserts import ALL, DETERMINISTIC_WEIGHTINGS, DEVICES, RANDOM, STATELESS, assert_close_direction, npy, options_for
from strategies import cases


def run(method, j, k=None, **extra):
    opts = options_for(method, j.shape[0] if k is None else k)
    assume(opts is not None)
    return gradagg.aggregate(j, method, **opts, **extra)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", [m for m in DETERMINISTIC_WEIGHTINGS if m not in ("constant", "krum")])
@given(case=cases(max_k=8, kinds=("random", "norm_spread", "orthogonal", "duplicate")), data=st.data())
def test_permuting_tasks_permutes_weights(device, method, case, data):
    """d is unchanged; w is permuted wherever it is unique (G well conditioned)."""
    # Aligned-MTL eigendecomposes G itself: with norms spread over 1e12 it is ill-conditioned.
    assume(not (method == "aligned_mtl" and case.kind == "norm_spread"))
    perm = list(data.draw(st.permutations(range(case.k))))
    j = case.tensor(device)
    jn = npy(j)
    w = npy(gradagg.weights(j, method))
    w_perm = npy(gradagg.weights(j[perm], method))
    floor = 1e-8 * (np.abs(w) * np.linalg.norm(jn, axis=1)).sum()
    assert_close_direction(jn[perm].T @ w_perm, jn.T @ w, 1e-7, floor=floor)
    if np.linalg.cond(jn @ jn.T) < 1e8:
        np.testing.assert_allclose(w_perm, w[perm], rtol=1e-6, atol=1e-8 * np.abs(w).max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", [m for m in DETERMINISTIC_WEIGHTINGS if m not in ("fairgrad",)]
                         + ["trimmed_mean"])
@given(case=cases(max_k=8, kinds=("random", "norm_spread", "orthogonal")), power=st.integers(-6, 6))
def test_scaling_scales_result(device, method, case, power):
    # Aligned-MTL: see the permutation test. Krum: with norms spread over 1e12 its distances
    # cancel, and near-ties in its scores may be broken differently at another scale.
    assume(not (method in ("aligned_mtl", "krum") and case.kind == "norm_spread"))
    j = case.tensor(device)
    s = 10.0**power
    d = npy(run(method, j))
    d_scaled = npy(run(method, j * s))
    expected = d if method == "nash_mtl" else d * s
    assert_close_direction(d_scaled, expected, 1e-7, floor=1e-12 * s * np.abs(npy(j)).max())


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(max_k=6, kinds=("random", "orthogonal")), power=st.integers(-4, 4),
       alpha=st.sampled_from([0.5, 1.0, 2.0]))
def test_fairgrad_scaling_law(device, case, power, alpha):
    """G w = w^(−1/α): scaling J by s scales w by s^(−2α/(1+α)) and d by s^((1−α)/(1+α))."""
    j = torch.tensor(case.full_rank(), device=device)
    s = 10.0**power
    w = npy(gradagg.weights(j, "fairgrad", alpha=alpha))
    w_scaled = npy(gradagg.weights(j * s, "fairgrad", alpha=alpha))
    np.testing.assert_allclose(w_scaled, w * s ** (-2 * alpha / (1 + alpha)), rtol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ALL)
@given(case=cases(min_k=3, max_k=6, kinds=("random", "norm_spread"), max_d=30, scales=False), seed=st.integers(0, 99))
def test_pytree_equals_flat(device, method, case, seed):
    """A dict of leaves (as vmap(grad) returns it) gives the flat result, split the same way."""
    assume(case.d >= 3 and not (method == "aligned_mtl" and case.kind == "norm_spread"))
    # FairGrad with D < K: G is singular and the regularised weights (~ε^(-1/2)) amplify rounding.
    assume(not (method == "fairgrad" and case.d < case.k))
    j = case.tensor(device)
    cut1, cut2 = 1, case.d // 2 + 1
    tree = {"w": j[:, :cut1].reshape(case.k, 1, 1), "b": [j[:, cut1:cut2], (j[:, cut2:].reshape(case.k, -1, 1),)]}
    gen = (lambda: torch.Generator(device=device).manual_seed(seed)) if method in RANDOM else (lambda: None)
    flat = npy(run(method, j, generator=gen()))
    out = run(method, tree, k=case.k, generator=gen())
    if method == "graddrop":
        return  # its uniform draws are made per leaf, so a different split draws differently
    if method == "krum":  # a tie for the lowest score is broken by rounding, which the split changes
        g = npy(j) @ npy(j).T
        dist = np.diag(g)[:, None] + np.diag(g)[None] - 2 * g
        scores = np.sort(np.sort(dist + np.diag(np.full(case.k, np.inf)), 1)[:, : case.k - 3].sum(1))
        assume(scores[1] - scores[0] > 1e-9 * scores[1])
    got = np.concatenate([npy(out["w"]).reshape(-1), npy(out["b"][0]), npy(out["b"][1][0]).reshape(-1)])
    np.testing.assert_allclose(got, flat, rtol=1e-9, atol=1e-12 * np.abs(npy(j)).max())
    assert out["w"].shape == (1, 1) and out["b"][1][0].shape == (case.d - cut2, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", STATELESS)
def test_single_task_returns_its_gradient_up_to_scale(device, method):
    g = torch.tensor([[3.0, -4.0, 1.0]], dtype=torch.float64, device=device)
    opts = options_for(method, 1)
    if opts is None:
        pytest.skip(f"{method} needs K ≥ 3")
    d = npy(gradagg.aggregate(g, method, **opts))
    cos = d @ npy(g[0]) / (np.linalg.norm(d) * np.linalg.norm(npy(g[0])))
    assert cos == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_zero_jacobian_gives_exact_zeros(device, method, k):
    opts = options_for(method, k)
    if opts is None:
        pytest.skip(f"{method} needs K ≥ 3")
    d = gradagg.aggregate(torch.zeros(k, 7, device=device), method, **opts)
    assert torch.equal(d, torch.zeros(7, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", [m for m in ALL if m not in RANDOM])
@pytest.mark.parametrize("power", [-20, 20])
def test_extreme_magnitudes_in_float32_match_float64(device, method, power):
    """Squares of 1e20 overflow float32: the Gramian is formed with exact power-of-two scaling."""
    j64 = torch.tensor(np.random.default_rng(0).standard_normal((4, 50)), dtype=torch.float64, device=device)
    j64 = j64 * (10.0**power)
    j32 = j64.float()
    opts = options_for(method, 4)
    d64 = npy(gradagg.aggregate(j32.double(), method, **opts))
    d32 = gradagg.aggregate(j32, method, **opts)
    assert d32.dtype == torch.float32 and torch.isfinite(d32).all()
    assert_close_direction(npy(d32), d64, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", [m for m in ALL if m not in RANDOM])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32(device, method, dtype):
    j = torch.tensor(np.random.default_rng(1).standard_normal((4, 64)), dtype=dtype, device=device)
    opts = options_for(method, 4)
    d = gradagg.aggregate(j, method, **opts)
    assert d.dtype == dtype
    ref = gradagg.aggregate(j.float(), method, **opts).to(dtype)
    torch.testing.assert_close(d, ref, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", [m for m in ALL if m not in RANDOM])
def test_float64_stays_float64_and_layout_does_not_matter(device, method):
    base = torch.tensor(np.random.default_rng(2).standard_normal((6, 4, 5)), device=device)
    opts = options_for(method, 4)
    ref = gradagg.aggregate(base[:4].contiguous(), method, **opts)
    assert ref.dtype == torch.float64
    strided = base.transpose(1, 2)[:4].transpose(1, 2)  # non-contiguous
    torch.testing.assert_close(gradagg.aggregate(strided, method, **opts), ref)
    row = base[0:1]
    expanded = row.expand(4, 4, 5)  # stride 0 over K, as vmap may return for shared terms
    torch.testing.assert_close(gradagg.aggregate(expanded, method, **opts),
                               gradagg.aggregate(expanded.contiguous(), method, **opts))
