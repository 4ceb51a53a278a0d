"""The Gramian's noise floor and the rank decisions taken at it (README, "Numerics")."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

import gradagg
from gradagg._gramian import fast
from gradagg.solvers import native

from precision import error
from strategies import conditioned_low_rank


def _documented_noise(acc_u: float, length: int, narrow_u: float = 0.0) -> float:
    """δ = u_acc (8 + √L / 2) + 2 u_in², L = min(D, 2¹⁵), as the README states it."""
    return acc_u * (8 + math.sqrt(min(length, 2**15)) / 2) + 2 * narrow_u**2


@pytest.mark.parametrize("dtype,acc,narrow", [(torch.float32, 2.0**-24, 0.0), (torch.float64, 2.0**-53, 0.0),
                                              (torch.bfloat16, 2.0**-24, 2.0**-8), (torch.float16, 2.0**-24, 2.0**-11)])
@pytest.mark.parametrize("d", [1, 100, 10**5])
def test_gramian_noise_is_the_documented_rule(dtype, acc, narrow, d):
    jac = {"w": torch.zeros(3, d, dtype=dtype), "b": torch.zeros(3, dtype=dtype)}
    assert gradagg.gramian_noise(jac) == pytest.approx(_documented_noise(acc, d + 1, narrow), rel=1e-12)
    # Mixed leaves: float64 anywhere accumulates in float64; a narrow leaf adds its rounding.
    mixed = [torch.zeros(3, d, dtype=torch.float32), torch.zeros(3, 4, dtype=torch.bfloat16)]
    assert gradagg.gramian_noise(mixed) == pytest.approx(_documented_noise(2.0**-24, d + 4, 2.0**-8), rel=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "expanded", "leaves"])
@pytest.mark.parametrize("k,d", [(2, 300_000), (8, 100_000), (33, 40_000), (5, 7)])
def test_float32_gramian_is_within_its_floor(layout, k, d):
    """Every entry of the float32 Gramian within δ ‖g_i‖‖g_j‖ of the exact Gramian of the same values,
    with all-positive entries (where rounding accumulates most) and over several chunks."""
    j = torch.rand(k, d, generator=torch.Generator().manual_seed(k))
    jac = {"contiguous": j, "transposed": j.T.contiguous().T, "expanded": j[:1].expand(k, d),
           "leaves": list(j.split(d // 3 + 1, dim=1))}[layout]
    values = torch.cat([leaf.reshape(k, -1) for leaf in ([jac] if torch.is_tensor(jac) else jac)], 1)
    exact = values.double() @ values.double().T
    n = exact.diagonal().sqrt()
    raw = fast([jac] if torch.is_tensor(jac) else jac, torch.float32)
    assert ((raw - exact).abs() / (n[:, None] * n[None, :])).max() <= gradagg.gramian_noise(jac)


def test_a_tf32_setting_does_not_reach_the_gramian():
    j = torch.randn(6, 50_000, generator=torch.Generator().manual_seed(0))
    expected = gradagg.gramian(j)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        torch.testing.assert_close(gradagg.gramian(j), expected, rtol=0, atol=0)
        assert torch.get_float32_matmul_precision() == "medium"  # the user's setting is restored
    finally:
        torch.set_float32_matmul_precision(before)


def _low_rank(k=12, d=80, r=4, spread=0.0, seed=0) -> np.ndarray:
    return conditioned_low_rank(k, d, r, spread, np.random.default_rng(seed))


def test_the_cleaned_gramian_has_the_rank_of_the_data():
    """float32 G of a rank-4 J: its scaled eigenvalues beyond the rank are exactly 0 after cleaning
    (the raw float32 product has them at ~1e-7, as large as the smallest signal of a bad cut)."""
    j = torch.tensor(_low_rank(spread=6.0))
    g = gradagg.gramian(j.float())
    n = g.diagonal().sqrt()
    lam = torch.linalg.eigvalsh(g / n[:, None] / n[None, :])
    assert (lam[:-4].abs() <= 1e-14).all() and (lam[-4:] > 1e-3).all()
    raw = (j.float() @ j.float().T).double()
    m = raw.diagonal().sqrt()
    assert torch.linalg.eigvalsh(raw / m[:, None] / m[None, :])[:-4].abs().max() > 1e-9


def test_weights_from_gramian_takes_the_floor_it_is_given():
    """A float32-accumulated Gramian passed as float64 (uncleaned): with ``noise=gramian_noise(jac)``
    its rank decisions are those of ``weights(jac)``; read as float64, noise becomes signal."""
    j = torch.tensor(_low_rank()).float()
    raw = (j @ j.T).double()
    d = gradagg.aggregate(j, "imtl_g").double()
    right = gradagg.weights_from_gramian(raw, "imtl_g", noise=gradagg.gramian_noise(j)) @ j.double()
    wrong = gradagg.weights_from_gramian(raw, "imtl_g") @ j.double()
    jn = j.double().numpy()
    assert error(right, d, jn) <= 1e-5
    assert error(wrong, d, jn) > 1e-2
    with pytest.raises(ValueError, match="noise"):
        gradagg.weights_from_gramian(raw, "imtl_g", noise=-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_in_the_hull_gives_exactly_small_directions(dtype):
    """0 in the hull of low-rank gradients (K = 40 ≫ rank 3): MGDA's d is 0, and so is UPGrad's and
    DualProj's (the dual cone meets the range only in 0); the float32 answers are within 1e-9 of
    the largest gradient, not at the ~1e-6 that the Gramian's unresolved null space would leave."""
    j = torch.tensor(_low_rank(k=40, d=60, r=3, seed=1)).to(dtype)
    scale = float(j.double().norm(dim=1).max())
    for method in ("mgda", "upgrad", "dualproj"):
        assert float(gradagg.aggregate(j, method).double().norm()) <= 1e-9 * scale, method


@pytest.mark.parametrize("method", ["nash_mtl", "fairgrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nash_and_fairgrad_where_a_combination_vanishes(method, dtype):
    """g_2 = −2 g_1 and g_3 ⊥ g_1: no α > 0 solves the equation (a nonnegative combination of
    gradients vanishes). gradagg solves it regularised by ε = 1e-15 and drops the diverging
    combination; the limit is the equation of the remaining task, d = g_3/‖g_3‖ (α_3 ‖g_3‖ = 1), and
    both precisions reach it to the documented residue (1e-6 √K)."""
    a, b = np.zeros(30), np.zeros(30)
    a[:3], b[5:8] = [1.0, 2.0, -1.0], [0.5, 0.5, 3.0]
    j = torch.tensor(np.stack([a, -2 * a, b])).to(dtype)
    state = gradagg.init(method, 3) if method == "nash_mtl" else None
    d = gradagg.aggregate(j, method, state=state).double().numpy()
    np.testing.assert_allclose(d, b / np.linalg.norm(b), atol=1e-6 * math.sqrt(3))


def test_krum_still_averages_its_rows_on_a_singular_gramian():
    """Krum's weights are a selection, not computed from G's off-diagonal: they are combined as they
    are (no reduction to G's range), so d is exactly the chosen row, also for duplicate rows."""
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((4, 20))
    j = torch.tensor(np.concatenate([rows, rows[:2]])).float()  # two duplicates: G is singular
    w = gradagg.weights(j, "krum", f=1)
    torch.testing.assert_close(gradagg.aggregate(j, "krum", f=1), (w.float() @ j), rtol=0, atol=0)


@pytest.mark.parametrize("native_path", [True, False], ids=["C", "torch"])
def test_pcgrad_without_conflicts_is_the_sum_on_low_rank(native_path):
    """No conflict (G ≥ 0): PCGrad projects nothing, w = 1, and on a low-rank float32 J the result is
    the sum to float32's rounding (the reduction to G's range changes nothing there)."""
    rng = np.random.default_rng(0)
    q = np.abs(rng.standard_normal((3, 50)))
    j = torch.tensor(rng.uniform(0.1, 1.0, (10, 3)) @ q).float()
    with contextlib.nullcontext() if native_path else native.disabled():
        d = gradagg.aggregate(j, "pcgrad", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(d.double(), j.double().sum(0), rtol=1e-6, atol=0)


def test_every_rank_of_a_group_takes_the_floor_of_the_widest_shard():
    """With ``group=`` each rank holds its own columns; the floor must not depend on their number, or
    ranks with different shard widths would cut the all-reduced Gramian at different places."""
    from gradagg._gramian import noise_of

    narrow, wide = [torch.zeros(4, 3)], [torch.zeros(4, 5000), torch.zeros(4, 7)]
    assert noise_of(narrow, sharded=True) == noise_of(wide, sharded=True) == gradagg.gramian_noise(
        torch.zeros(4, 2**15))
    assert noise_of(narrow) < noise_of(wide)
