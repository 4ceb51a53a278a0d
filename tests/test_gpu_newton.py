"""The Newton kernels of ``gradagg.solvers.gpu.newton`` (FairGrad, Nash-MTL): against the C solvers
and the equations they solve, on hard Gramians, and through the public API on the Triton route.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1).
Both problems read (G + ε diag G) w = w^(−β) with ε = 1e-15 (β = 1: Nash-MTL's α ⊙ (Gα) = 1), and
zero rows get 0; the backward error below is the kernel's own convergence test, which is invariant
under the unit-diagonal scaling it solves in.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradagg
from gradagg import _device
from gradagg.solvers import native
from gradagg.solvers.barrier import CONVERGED_TOL, MAX_ITER

from asserts import assert_close_direction, npy
from strategies import Case, cases

pytest.importorskip("gradagg.solvers.gpu.newton")  # triton, and torch ≥ 2.6 for triton_op
from gradagg.solvers.gpu import newton

pytestmark = [
    pytest.mark.skipif(not _device.interpreting() and not torch.cuda.is_available(),
                       reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU) or CUDA"),
    pytest.mark.skipif(not native.available(), reason="the C solvers are the reference"),
    # The interpreter evaluates both sides of every tl.where: numpy warns about the discarded one.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-15
#: (kind, K): every size of the task's list, and one K in (32, 64].
WELL = [("random", 1), ("orthogonal", 2), ("norm_spread", 3), ("random", 5), ("norm_spread", 8),
        ("orthogonal", 16), ("random", 40)]
HARD = [("opposite", 3), ("duplicate", 5), ("zero_row", 5), ("rank_deficient", 8), ("low_rank_spread", 8),
        ("colinear", 3), ("norm_spread", 16)]


def jacobian(kind: str, k: int, seed: int = 0, full_rank: bool = False) -> np.ndarray:
    case = Case(kind, k, 24, 1.0, seed)
    return case.full_rank() if full_rank else case.numpy()


def on_device(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, device=DEVICE)


def backward_error(g: np.ndarray, w: np.ndarray, beta: float) -> float:
    """max_i |((G + ε diag G) w)_i − w_i^(−β)| / ((|G| w)_i + ε G_ii w_i + w_i^(−β)) over the nonzero rows."""
    rows = np.diag(g) > 0
    gr, wr = g[np.ix_(rows, rows)], w[rows]
    rhs = wr ** (-beta)
    lhs = gr @ wr + EPS * np.diag(gr) * wr
    return float(np.max(np.abs(lhs - rhs) / (np.abs(gr) @ wr + EPS * np.diag(gr) * wr + rhs), initial=0.0))


def c_or_none(fn, *args):
    try:
        return npy(fn(*args))
    except native.Unconverged:
        return None


@pytest.mark.parametrize("kind,k", WELL)
def test_fairgrad_equals_c_and_solves_its_equation(kind, k):
    g = (lambda j: j @ j.T)(jacobian(kind, k, full_rank=True))
    for alpha in ((0.5, 1.0, 2.0) if k <= 8 else (1.0,)):
        w = npy(newton.fairgrad(on_device(g), 1.0 / alpha, MAX_ITER))
        assert (w > 0).all()
        assert backward_error(g, w, 1.0 / alpha) <= 1e-12
        np.testing.assert_allclose(w, npy(native.fairgrad(torch.tensor(g), 1.0 / alpha, MAX_ITER)), rtol=1e-9)


@pytest.mark.parametrize("kind,k", WELL)
def test_nash_equals_c_from_a_warm_start_and_solves_its_equation(kind, k):
    g = (lambda j: j @ j.T)(jacobian(kind, k, full_rank=True))
    previous = np.random.default_rng(k).uniform(0.5, 2.0, k) / np.sqrt(np.diag(g))
    alpha = npy(newton.nash(on_device(g), on_device(previous), torch.tensor(True, device=DEVICE), MAX_ITER))
    assert (alpha > 0).all()
    np.testing.assert_allclose(alpha * (g @ alpha + EPS * np.diag(g) * alpha), 1.0, rtol=1e-11)
    np.testing.assert_allclose(alpha, npy(native.nash(torch.tensor(g), torch.tensor(previous), MAX_ITER)), rtol=1e-9)


@pytest.mark.parametrize("kind,k", HARD)
@pytest.mark.parametrize("method", ["fairgrad", "nash"])
def test_hard_gramians_give_the_direction_of_c_or_nan(method, kind, k):
    """Singular, duplicate, zero and norm-spread rows: a converged answer (backward error within
    CONVERGED_TOL, zero rows 0) with C's direction d = Jᵀw, whose weights may differ along the
    null space; or NaN where C does not converge either."""
    j = jacobian(kind, k, seed=3)
    g = j @ j.T
    zero = np.diag(g) == 0
    if method == "fairgrad":
        w = npy(newton.fairgrad(on_device(g), 1.0, MAX_ITER))
        expected = c_or_none(native.fairgrad, torch.tensor(g), 1.0, MAX_ITER)
    else:
        cold = torch.zeros(k, dtype=torch.float64)
        w = npy(newton.nash(on_device(g), cold.to(DEVICE), torch.tensor(True, device=DEVICE), MAX_ITER))
        expected = c_or_none(native.nash, torch.tensor(g), cold, MAX_ITER)
    if expected is None:
        assert np.isnan(w).all()
        return
    assert np.isfinite(w).all() and (w[zero] == 0).all() and (w[~zero] > 0).all()
    assert backward_error(g, w, 1.0) <= CONVERGED_TOL
    weight = np.abs(w).sum() + np.abs(expected).sum()
    assert_close_direction(w @ j, expected @ j, rtol=1e-7, floor=1e-9 * weight * np.linalg.norm(j, axis=1).max())


def test_nash_returns_previous_unchanged_where_recompute_is_false():
    g = on_device(np.array([[2.0, 0.5], [0.5, float("nan")]]))  # not even read
    previous = on_device(np.array([0.25, 3.0]))
    out = newton.nash(g, previous, torch.tensor(False, device=DEVICE), MAX_ITER)
    assert torch.equal(out, previous) and out.data_ptr() != previous.data_ptr()


def test_nash_starts_cold_without_a_positive_previous():
    """A previous α with an entry ≤ 0 (the state's initial zeros) is ignored, as in C."""
    g = (lambda j: j @ j.T)(jacobian("random", 4, full_rank=True))
    for previous in (np.zeros(4), np.array([1.0, -1.0, 1.0, 1.0])):
        alpha = npy(newton.nash(on_device(g), on_device(previous), torch.tensor(True, device=DEVICE), MAX_ITER))
        np.testing.assert_allclose(alpha, npy(native.nash(torch.tensor(g), torch.tensor(previous), MAX_ITER)),
                                   rtol=1e-9)


def test_fairgrad_closed_forms():
    """K = 1: G w = w^(−β) gives w = G^(−1/(1+β)). Orthogonal rows decouple: w_i = G_ii^(−1/(1+β))."""
    for beta in (0.5, 1.0, 2.0):
        w = npy(newton.fairgrad(on_device(np.array([[7.0]])), beta, MAX_ITER))
        np.testing.assert_allclose(w, 7.0 ** (-1.0 / (1.0 + beta)) / (1.0 + EPS) ** (1.0 / (1.0 + beta)), rtol=1e-14)
    diag = np.array([1e-6, 3.0, 1e6])
    w = npy(newton.fairgrad(on_device(np.diag(diag)), 2.0, MAX_ITER))
    np.testing.assert_allclose(w, (diag * (1 + EPS)) ** (-1.0 / 3.0), rtol=1e-13)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan(bad):
    g = (lambda j: j @ j.T)(jacobian("random", 3, full_rank=True))
    g[0, 2] = g[2, 0] = bad
    assert torch.isnan(newton.fairgrad(on_device(g), 1.0, MAX_ITER)).all()
    previous = on_device(np.ones(3))
    assert torch.isnan(newton.nash(on_device(g), previous, torch.tensor(True, device=DEVICE), MAX_ITER)).all()


def test_running_out_of_iterations_gives_nan_where_c_reports_it():
    g = (lambda j: j @ j.T)(jacobian("norm_spread", 5, full_rank=True))
    with pytest.raises(native.Unconverged):
        native.fairgrad(torch.tensor(g), 1.0, 1)
    assert torch.isnan(newton.fairgrad(on_device(g), 1.0, 1)).all()
    assert torch.isfinite(newton.fairgrad(on_device(g), 1.0, MAX_ITER)).all()
    # A start whose backward error is already NaN (c = s^(1−β) overflows): unconverged in C too.
    g = np.diag([1e-200, 1.0, 1e200])
    with pytest.raises(native.Unconverged):
        native.fairgrad(torch.tensor(g), 100.0, MAX_ITER)
    assert torch.isnan(newton.fairgrad(on_device(g), 100.0, MAX_ITER)).all()


@settings(max_examples=8)
@given(case=cases(kinds=("random", "norm_spread", "orthogonal", "low_rank_spread"), max_k=10),
       alpha=st.sampled_from([0.5, 1.0, 2.0]))
def test_fairgrad_equals_c_on_drawn_cases(case, alpha):
    j = case.full_rank()
    g = j @ j.T
    w = npy(newton.fairgrad(on_device(g), 1.0 / alpha, MAX_ITER))
    expected = c_or_none(native.fairgrad, torch.tensor(g), 1.0 / alpha, MAX_ITER)
    if expected is None:
        assert np.isnan(w).all()
        return
    assert backward_error(g, w, 1.0 / alpha) <= CONVERGED_TOL
    weight = np.abs(w).sum() + np.abs(expected).sum()
    assert_close_direction(w @ j, expected @ j, rtol=1e-7, floor=1e-9 * weight * np.linalg.norm(j, axis=1).max())


# --- the public API on the Triton route --------------------------------------------------------------

def api_jacobian(k: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, 12, generator=gen, dtype=torch.float64)
    j[1] = 0.5 * j[1] - 0.3 * j[0]  # a conflict
    j[2] *= 1e3  # spread norms
    return j.to(DEVICE)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad_api_equals_the_cpu_route(alpha):
    j = api_jacobian()
    expected = gradagg.weights(j.cpu(), "fairgrad", alpha=alpha)
    with _device.use_solver("triton"):
        got = gradagg.weights(j, "fairgrad", alpha=alpha)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("update_every", [1, 2])
def test_nash_mtl_api_with_state_equals_the_cpu_route(update_every):
    """Three calls sharing a state; with update_every=2 the second reuses the first's α (the
    kernel reads the recompute flag itself)."""
    states = gradagg.init("nash_mtl", 5), gradagg.init("nash_mtl", 5, device=DEVICE)
    kept = []
    for step in range(3):
        j = api_jacobian(seed=step)
        expected = gradagg.weights(j.cpu(), "nash_mtl", state=states[0], update_every=update_every)
        with _device.use_solver("triton"):
            got = gradagg.weights(j, "nash_mtl", state=states[1], update_every=update_every)
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-9, atol=0)
        torch.testing.assert_close(states[1].alpha.cpu(), states[0].alpha, rtol=1e-9, atol=0)
        assert int(states[1].step) == int(states[0].step) == step + 1
        kept.append(states[1].alpha.clone())
    assert torch.equal(kept[0], kept[1]) == (update_every == 2)
    assert not torch.equal(kept[1], kept[2])
