"""The surgery kernels of ``gradagg.solvers.gpu.surgery`` (PCGrad, GradVac, Krum): against the C
solvers and torch references with the same keys, against the surgery done on the gradients
themselves, and through the public API on the Triton route.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradagg
from gradagg import _device
from gradagg._methods.gradvac import gradvac_matrix
from gradagg._methods.pcgrad import _keys, _pcgrad_impl
from gradagg.solvers import native

from asserts import npy
from strategies import Case, cases

pytest.importorskip("gradagg.solvers.gpu.surgery")  # triton, and torch ≥ 2.6 for triton_op
import triton
import triton.language as tl

from gradagg.solvers.gpu import surgery

pytestmark = [
    pytest.mark.skipif(not _device.interpreting() and not torch.cuda.is_available(),
                       reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU) or CUDA"),
    pytest.mark.skipif(not native.available(), reason="the C solvers are a reference"),
    # The interpreter evaluates both sides of every tl.where: numpy warns about the discarded one.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Hard rows at every size of the task's list, and one K in (32, 64].
CASES = [("random", 1), ("opposite", 2), ("duplicate", 3), ("zero_row", 5), ("rank_deficient", 5),
         ("norm_spread", 8), ("colinear", 8), ("low_rank_spread", 16), ("opposite", 16), ("norm_spread", 40)]


def jacobian(kind: str, k: int, seed: int = 0) -> np.ndarray:
    return Case(kind, k, 24, 1.0, seed).numpy()


def on_device(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).to(DEVICE)


def draw_keys(k: int, seed: int) -> torch.Tensor:
    """The keys the methods draw (``pcgrad._keys``) from a seeded generator."""
    return _keys(k, torch.zeros((), dtype=torch.float64), torch.Generator().manual_seed(seed))


def orders(keys: np.ndarray) -> list[list[int]]:
    """Row i: the other tasks by increasing key (ties to the lower index)."""
    k = len(keys)
    return [[j for j in np.argsort(keys[i], kind="stable") if j != i] for i in range(k)]


def surgery_on_rows(j: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """PCGrad done on the gradients themselves (Yu et al. 2020): the rows g_i'."""
    out = j.copy()
    for i, order in enumerate(orders(keys)):
        for p in order:
            dot, sq = out[i] @ j[p], j[p] @ j[p]
            if dot < 0 and sq > 0:
                out[i] = out[i] - dot / sq * j[p]
    return out


def vaccine_on_rows(j: np.ndarray, target: np.ndarray, keys: np.ndarray, decay: float):
    """GradVac done on the gradients (Wang et al. 2021, as the module docstring states it)."""
    out, target = j.copy(), target.copy()
    for i, order in enumerate(orders(keys)):
        for p in order:
            ni, nj = np.linalg.norm(out[i]), np.linalg.norm(j[p])
            if ni == 0 or nj == 0:
                continue
            phi = np.clip(out[i] @ j[p] / (ni * nj), -1.0, 1.0)
            goal = target[i, p]
            if phi < goal:
                out[i] = out[i] + ni * (goal * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - goal**2)) / (
                    nj * np.sqrt(1 - goal**2)) * j[p]
            target[i, p] = (1 - decay) * goal + decay * phi
    return out, target


# --- PCGrad -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,k", CASES)
def test_pcgrad_equals_c_and_torch_with_the_same_keys(kind, k):
    j = jacobian(kind, k)
    g = torch.tensor(j @ j.T)
    keys = draw_keys(k, k)
    c = npy(surgery.pcgrad(on_device(g), on_device(keys), False))
    w = npy(surgery.pcgrad(on_device(g), on_device(keys), True))
    np.testing.assert_allclose(c, npy(native.pcgrad(g, keys, False)), rtol=0, atol=1e-12 * max(1.0, np.abs(c).max()))
    with native.disabled():
        reference = npy(_pcgrad_impl(g, keys, False))
    np.testing.assert_allclose(c, reference, rtol=0, atol=1e-12 * max(1.0, np.abs(c).max()))
    np.testing.assert_allclose(w, c.sum(0), rtol=0, atol=1e-13 * max(1.0, np.abs(c).max()))
    # Independent facts: C_ii = 1; nobody projects onto a zero gradient; each row ends without a
    # conflict with its last partner (projected on last, or not in conflict with it).
    assert (np.diag(c) == 1).all()
    zero = np.diag(g.numpy()) == 0
    assert (c[:, zero] == np.eye(k)[:, zero]).all()
    rows = c @ j
    norms = np.linalg.norm(j, axis=1)
    for i, order in enumerate(orders(keys.numpy())):
        if order:
            last = order[-1]
            assert rows[i] @ j[last] >= -1e-12 * np.abs(c[i]) @ norms * norms[last]


@pytest.mark.parametrize("seed", range(3))
def test_pcgrad_equals_the_surgery_on_the_gradients(seed):
    j = jacobian(("random", "norm_spread", "orthogonal")[seed], 6, seed)
    keys = draw_keys(6, seed)
    c = npy(surgery.pcgrad(on_device(j @ j.T), on_device(keys), False))
    expected = surgery_on_rows(j, keys.numpy())
    scale = np.linalg.norm(j, axis=1).max()
    np.testing.assert_allclose(c @ j, expected, rtol=0, atol=1e-11 * scale)


def test_pcgrad_two_tasks_closed_form():
    """K = 2: each row loses its component along the other where they conflict, else nothing."""
    pairs = [[[1.0, 0.0], [-1.0, 2.0]], [[3.0, 1.0], [1.0, 2.0]], [[1e-6, 0.0], [-1e6, 1.0]]]
    for j in map(np.array, pairs):
        g = j @ j.T
        c = npy(surgery.pcgrad(on_device(g), on_device(draw_keys(2, 0)), False))
        conflict = min(g[0, 1], 0.0)
        expected = np.array([[1.0, -conflict / g[1, 1]], [-conflict / g[0, 0], 1.0]])
        np.testing.assert_allclose(c, expected, rtol=1e-15, atol=0)


@settings(max_examples=10)
@given(case=cases(max_k=12), seed=st.integers(0, 2**31))
def test_pcgrad_equals_c_on_drawn_cases(case, seed):
    j = case.numpy()
    g = torch.tensor(j @ j.T)
    keys = draw_keys(case.k, seed)
    c = npy(surgery.pcgrad(on_device(g), on_device(keys), False))
    np.testing.assert_allclose(c, npy(native.pcgrad(g, keys, False)), rtol=0, atol=1e-12 * max(1.0, np.abs(c).max()))


# --- GradVac ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,k", [("random", 1), ("random", 2), ("norm_spread", 3), ("orthogonal", 5),
                                    ("random", 8), ("norm_spread", 16), ("random", 40)])
def test_gradvac_equals_the_torch_reference_and_the_vaccine_on_the_gradients(kind, k):
    j = Case(kind, k, 24, 1.0, 1).full_rank()
    g = torch.tensor(j @ j.T)
    target = torch.tensor(np.random.default_rng(k).uniform(-0.6, 0.6, (k, k)))
    keys = draw_keys(k, 7)
    c, new = map(npy, surgery.gradvac(on_device(g), on_device(target), on_device(keys), 0.3))
    c0, new0 = map(npy, gradvac_matrix(g, target, 0.3, torch.Generator().manual_seed(7)))
    np.testing.assert_allclose(c, c0, rtol=0, atol=1e-12 * max(1.0, np.abs(c0).max()))
    np.testing.assert_allclose(new, new0, rtol=0, atol=1e-12)
    if k <= 8:
        rows, expected = vaccine_on_rows(j, target.numpy(), keys.numpy(), 0.3)
        np.testing.assert_allclose(c @ j, rows, rtol=0, atol=1e-10 * np.linalg.norm(j, axis=1).max())
        np.testing.assert_allclose(new, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind,k", [c for c in CASES if c[1] <= 16])
def test_gradvac_from_zero_targets_is_pcgrad(kind, k):
    """φ̂ = 0 (a fresh state): the update is PCGrad's, on hard Gramians too."""
    j = jacobian(kind, k)
    g = on_device(j @ j.T)
    keys = on_device(draw_keys(k, 2))
    c, new = surgery.gradvac(g, torch.zeros_like(g), keys, 0.01)
    expected = npy(surgery.pcgrad(g, keys, False))
    np.testing.assert_allclose(npy(c), expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))
    assert (npy(new).diagonal() == 0).all() and (np.abs(npy(new)) <= 0.01).all()


# --- Krum ---------------------------------------------------------------------------------------------

def krum_by_brute_force(g: np.ndarray, f: int, m: int) -> np.ndarray:
    k = len(g)
    d = np.diag(g)
    dist = np.maximum(d[:, None] + d[None, :] - 2.0 * g, 0.0)
    scores = np.array([np.sort(np.delete(dist[i], i))[: k - f - 2].sum() for i in range(k)])
    mantissa, exponent = np.frexp(scores)
    quantised = np.ldexp(np.round(mantissa * 2.0**36) / 2.0**36, exponent)
    w = np.zeros(k)
    w[np.argsort(quantised, kind="stable")[:m]] = 1.0 / m
    return w


@pytest.mark.parametrize("kind,k", [c for c in CASES if c[1] >= 3] + [("random", 3)])
def test_krum_equals_c_and_the_brute_force_choice(kind, k):
    j = jacobian(kind, k, seed=4)
    g = j @ j.T
    for f, m in {(0, 1), (k - 3, 1), (min(k // 3, k - 3), 2), (0, k)}:
        w = npy(surgery.krum(on_device(g), f, m))
        assert (w == krum_by_brute_force(g, f, m)).all(), (f, m, w)
        assert (w == npy(native.krum(torch.tensor(g), f, m))).all()


def test_krum_ties_go_to_the_lower_index():
    """±e1, ±e2 in the plane: every row scores the same; so do a duplicated pair."""
    j = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert (npy(surgery.krum(on_device(j @ j.T), 0, 2)) == [0.5, 0.5, 0.0, 0.0]).all()
    j = np.array([[5.0, 1.0], [0.0, 1.0], [0.0, 1.0 + 1e-15], [3.0, 3.0]])  # rows 1, 2: equal to rounding
    assert (npy(surgery.krum(on_device(j @ j.T), 1, 1)) == [0.0, 1.0, 0.0, 0.0]).all()


@triton.jit
def _round36_kernel(x_ptr, out_ptr, n, B: tl.constexpr):
    r = tl.arange(0, B)
    tl.store(out_ptr + r, surgery.round36(tl.load(x_ptr + r, mask=r < n)), mask=r < n)


def test_score_rounding_is_frexp_round_ldexp():
    """36 significant bits, half to even, as the torch reference: also for ties, subnormals, 0, inf."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 1.0, 200) * 2.0 ** rng.integers(-1074, 1000, 200)
    halfway = (np.floor(rng.uniform(2**35, 2**36, 20)) + 0.5) * 2.0 ** rng.integers(-900, 900, 20)
    x = torch.tensor(np.concatenate([base, halfway, [0.0, 5e-324, 2.0**-1030 * 3, np.inf, 1.0, 1 - 2**-53]]))
    out = on_device(torch.empty_like(x))
    _round36_kernel[(1,)](on_device(x), out, len(x), B=256)
    mantissa, exponent = torch.frexp(x)
    expected = torch.where(torch.isfinite(x), torch.ldexp(torch.round(mantissa * 2.0**36) / 2.0**36, exponent), x)
    assert torch.equal(out.cpu(), expected)


# --- non-finite input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan(bad):
    j = jacobian("random", 4)
    g = j @ j.T
    g[1, 3] = g[3, 1] = bad
    g, keys = on_device(g), on_device(draw_keys(4, 0))
    assert torch.isnan(surgery.pcgrad(g, keys, True)).all()
    assert torch.isnan(surgery.pcgrad(g, keys, False)).all()
    assert torch.isnan(surgery.krum(g, 1, 1)).all()
    target = on_device(np.full((4, 4), 0.1))
    c, new = surgery.gradvac(g, target, keys, 0.5)
    assert torch.isnan(c).all() and torch.equal(new, target)  # the state is left as it was


# --- the public API on the Triton route --------------------------------------------------------------

def api_jacobian(k: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, 12, generator=gen, dtype=torch.float64)
    j[1] = 0.5 * j[1] - 0.8 * j[0]  # a conflict
    j[2] *= 1e3
    return j.to(DEVICE)


@pytest.mark.parametrize("method,options", [("pcgrad", {}), (("pcgrad", "mean"), {}), ("krum", {"f": 1, "m": 2}),
                                            ("krum", {"f": 0})])
def test_api_equals_the_cpu_route(method, options):
    """PCGrad as a weighting and as a chain's transform (pcgrad_matrix), Krum with its options."""
    j = api_jacobian()
    expected = gradagg.weights(j.cpu(), method, generator=torch.Generator().manual_seed(0), **options)
    with _device.use_solver("triton"):
        got = gradagg.weights(j, method, generator=torch.Generator().manual_seed(0), **options)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["gradvac", (("gradvac", {"decay": 0.2}), "sum")])
def test_gradvac_api_with_state_equals_the_cpu_route(method):
    """Three calls sharing a state and a generator: the same orders, C and targets as on the CPU."""
    options = {"decay": 0.2} if method == "gradvac" else {}
    states = gradagg.init(method, 5), gradagg.init(method, 5, device=DEVICE)
    gens = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for step in range(3):
        j = api_jacobian(seed=step)
        expected = gradagg.aggregate(j.cpu(), method, state=states[0], generator=gens[0], **options)
        with _device.use_solver("triton"):
            got = gradagg.aggregate(j, method, state=states[1], generator=gens[1], **options)
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-10 * float(j.abs().max()))
        torch.testing.assert_close(states[1].target.cpu(), states[0].target, rtol=0, atol=1e-12)
    assert states[1].target.abs().max() > 0
