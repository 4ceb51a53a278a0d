"""The methods with a K x D state that read the full Jacobian: excess_mtl, moco, db_mtl.

Every answer is checked against float64 re-implementations written here from the formulas of
METHODS.md Part 2 (loops over numpy arrays), against the closed forms of its Part C (C8–C13,
C24–C30), and through gradagg.aggregate on a plain tensor and on a pytree of two leaves, both packed
into one buffer (the library's small-pytree path) and leaf by leaf (PACK_MAX = 0), so that the
reductions over D are summed across leaves.
"""

import io
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradagg
import gradagg._api as api
from gradagg._methods import moco as moco_module
from gradagg._registry import Context, lookup, resolve_options

from asserts import OpLog

WIDE = ["excess_mtl", "moco", "db_mtl"]
LAYOUTS = ["plain", "tree", "leaves"]
CUT = 3  # the pytree's first leaf takes columns [0, CUT) as [K, CUT, 1], the second the rest


# --- float64 references, from the formulas ------------------------------------------------------


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def project_simplex(v):
    """Π_Δ by bisection on θ in Σ max(v − θ, 0) = 1 (not the sort formula the library uses)."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1 else (lo, mid)
    return np.maximum(v - 0.5 * (lo + hi), 0)


class ExcessRef:
    def __init__(self, k, eta=1.0, warmup=0):
        self.eta, self.n = eta, max(warmup, 1)
        self.a, self.w, self.warm, self.base, self.t = None, np.full(k, 1.0 / k), np.zeros(k), None, 0
        self.r = None

    def step(self, j, losses=None):
        self.t += 1
        self.a = j * j if self.a is None else self.a + j * j
        e = np.array([sum(j[i, c] ** 2 / np.sqrt(self.a[i, c] + 1e-7) for c in range(j.shape[1]))
                      for i in range(len(j))])
        if self.t <= self.n:
            self.warm = self.warm + e
        if self.t == self.n:
            self.base = self.warm / self.n
        self.r = None
        if self.t > self.n:
            self.r = e / (self.base + 1e-7)
            self.w = softmax(np.log(self.w) + self.eta * self.r)
        return j.T @ self.w


class MoCoRef:
    def __init__(self, k, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0, simplex="softmax",
                 track="loss_unit"):
        self.o = dict(beta=beta, beta_sigma=beta_sigma, gamma=gamma, gamma_sigma=gamma_sigma, rho=rho)
        self.simplex, self.track = simplex, track
        self.y, self.lam, self.t, self.coef = None, np.full(k, 1.0 / k), 0, None

    def step(self, j, losses):
        o = self.o
        self.t += 1
        beta_t, gamma_t = o["beta"] / self.t ** o["beta_sigma"], o["gamma"] / self.t ** o["gamma_sigma"]
        c = losses / (np.sqrt((j * j).sum(1)) + 1e-8) if self.track == "loss_unit" else np.ones(len(j))
        target = c[:, None] * j
        self.y = np.zeros_like(j) if self.y is None else self.y
        self.y = self.y - beta_t * (self.y - target)
        v = self.lam - gamma_t * (self.y @ self.y.T + o["rho"] * np.eye(len(j))) @ self.lam
        self.lam = softmax(v) if self.simplex == "softmax" else project_simplex(v)
        self.coef = self.lam * beta_t * c  # the derivative of d in g_i
        return self.y.T @ self.lam


class DBRef:
    def __init__(self, k, beta=0.9, beta_sigma=0.0):
        self.beta, self.sigma, self.b, self.t, self.alpha = beta, beta_sigma, None, 0, None

    def step(self, j, losses):
        self.t += 1
        beta_t = self.beta / self.t ** self.sigma
        g = j / (losses + 1e-8)[:, None]
        self.b = np.zeros_like(j) if self.b is None else self.b
        self.b = g + beta_t * (self.b - g)
        n = np.sqrt((self.b * self.b).sum(1))
        self.alpha = n.max() / (n + 1e-8)
        return self.b.T @ self.alpha


REFS = {"excess_mtl": ExcessRef, "moco": MoCoRef, "db_mtl": DBRef}
#: Non-default options, to check that each one is read.
OPTIONS = {
    "excess_mtl": [{}, {"eta": 0.3, "warmup": 2}],
    "moco": [{}, {"beta": 0.8, "beta_sigma": 0.0, "gamma": 2.0, "gamma_sigma": 0.25, "rho": 0.3},
             {"simplex": "project", "track": "raw", "gamma": 0.05}],
    "db_mtl": [{}, {"beta": 0.6, "beta_sigma": 0.5}, {"beta": 0.0}],
}


# --- helpers --------------------------------------------------------------------------------------


@pytest.fixture
def layout_of(monkeypatch):
    """as_layout(j, layout): the Jacobian in that layout ("leaves": a pytree processed leaf by leaf)."""

    def as_layout(j, layout):
        if layout == "plain":
            return j
        if layout == "leaves":
            monkeypatch.setattr(api, "PACK_MAX", 0)
        return {"a": j[:, :CUT].reshape(j.shape[0], CUT, 1), "b": j[:, CUT:]}

    return as_layout


def flat(out):
    if isinstance(out, torch.Tensor):
        return out.detach().double().numpy()
    return np.concatenate([out["a"].detach().double().numpy().reshape(-1), out["b"].detach().double().numpy()])


def seq(k=3, d=7, calls=5, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return ([rng.standard_normal((k, d)) * scale for _ in range(calls)],
            [rng.uniform(0.3, 3.0, k) for _ in range(calls)])


def call(method, jac, state, losses, **opts):
    return gradagg.aggregate(jac, method, state=state, losses=torch.tensor(losses), **opts)


def wide(state, name):
    """A wide field's leaves concatenated along D (one [K, D] array)."""
    return np.concatenate([t.double().numpy() for t in getattr(state, name)], 1)


# --- every method against its reference -----------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("method", "opts"), [(m, o) for m in WIDE for o in OPTIONS[m]])
def test_sequence_equals_the_float64_reference(layout_of, method, opts, layout):
    jacs, losses = seq()
    ref, state = REFS[method](3, **opts), gradagg.init(method, 3)
    for j, loss in zip(jacs, losses):
        d = flat(call(method, layout_of(torch.tensor(j), layout), state, loss, **opts))
        np.testing.assert_allclose(d, ref.step(j, loss), rtol=1e-12, atol=1e-14)
    assert int(state.step) == len(jacs)
    if method == "excess_mtl":
        np.testing.assert_allclose(state.w.numpy(), ref.w, rtol=1e-13)
    if method == "moco":
        np.testing.assert_allclose(state.lam.numpy(), ref.lam, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(wide(state, "y"), ref.y, rtol=1e-13, atol=1e-15)
    widths = {"plain": (7,), "tree": (7,), "leaves": (CUT, 7 - CUT)}[layout]
    if method == "db_mtl" and opts.get("beta") == 0.0:  # no K x D buffer at β = 0
        assert state.buffer is None and state.widths is None
    else:
        assert state.widths == widths


# --- excess_mtl: C8–C13 ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_excess_c8_first_call_sets_the_baseline_and_keeps_w(layout_of, layout):
    rng = np.random.default_rng(1)
    j = rng.uniform(1.0, 3.0, (4, 7)) * rng.choice([-1.0, 1.0], (4, 7))
    state = gradagg.init("excess_mtl", 4)
    d = flat(gradagg.aggregate(layout_of(torch.tensor(j), layout), "excess_mtl", state=state))
    base = (j * j / np.sqrt(j * j + 1e-7)).sum(1)
    np.testing.assert_allclose(state.base.numpy(), base, rtol=1e-14)
    np.testing.assert_allclose(state.base.numpy(), np.abs(j).sum(1), rtol=1e-7)  # ≈ ‖g_i‖₁ (|J_ij| ≥ 1)
    np.testing.assert_array_equal(state.w.numpy(), np.full(4, 0.25))
    np.testing.assert_allclose(d, j.mean(0), rtol=1e-14)
    np.testing.assert_allclose(wide(state, "root") ** 2, j * j, rtol=1e-14)  # √A


@pytest.mark.parametrize("eta", [1.0, 0.3, 5.0])
def test_excess_c9_constant_jacobian_keeps_w_uniform(eta):
    """e(t) = Σ_j g²/√(t g² + 1e-7) ≈ e⁰/√t for every task: r is common to the tasks up to the 1e-7
    terms, so w stays 1/K; exactly, w_t ∝ exp(η Σ_{s=2..t} r_s) with that closed form of e."""
    j = np.random.default_rng(2).standard_normal((3, 6))
    state = gradagg.init("excess_mtl", 3)
    base = (j * j / np.sqrt(j * j + 1e-7)).sum(1)
    total = np.zeros(3)
    for t in range(1, 7):
        d = gradagg.aggregate(torch.tensor(j), "excess_mtl", state=state, eta=eta).numpy()
        if t > 1:
            total += (j * j / np.sqrt(t * j * j + 1e-7)).sum(1) / (base + 1e-7)
        np.testing.assert_allclose(state.w.numpy(), softmax(eta * total), rtol=1e-12)
        np.testing.assert_allclose(state.w.numpy(), np.full(3, 1 / 3), atol=2e-6)
        np.testing.assert_allclose(d, j.T @ state.w.numpy(), rtol=1e-13)


def test_excess_c10_equal_excess_ratios_keep_w_uniform():
    rng = np.random.default_rng(3)
    row = rng.standard_normal(5)
    # Entries well above √1e-7 in size, so that the 1e-7 terms stay relative 1e-7 perturbations.
    j0 = rng.uniform(0.5, 2.0, (4, 5)) * rng.choice([-1.0, 1.0], (4, 5))
    state = gradagg.init("excess_mtl", 4)
    for t in range(5):  # identical rows: e_i identical, so r is exactly common
        j = np.tile(row * (1 + t), (4, 1))
        d = gradagg.aggregate(torch.tensor(j), "excess_mtl", state=state).numpy()
        np.testing.assert_allclose(state.w.numpy(), np.full(4, 0.25), rtol=1e-15)
        np.testing.assert_allclose(d, j.mean(0), rtol=1e-14)
    state = gradagg.init("excess_mtl", 4)
    for c in [1.0, 3.0, 0.2, 7.0, 0.5]:  # every row scaled by a common c_t: r common up to the 1e-7 terms
        d = gradagg.aggregate(torch.tensor(c * j0), "excess_mtl", state=state).numpy()
        np.testing.assert_allclose(state.w.numpy(), np.full(4, 0.25), atol=1e-6)
        np.testing.assert_allclose(d, (c * j0).mean(0), atol=1e-5 * np.abs(c * j0).max())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_excess_c11_exponentiated_gradient(layout_of, layout):
    jacs, _ = seq(4, 9, 6, seed=4)
    state, ref, previous = gradagg.init("excess_mtl", 4), ExcessRef(4, eta=0.7), np.full(4, 0.25)
    for j in jacs:
        gradagg.aggregate(layout_of(torch.tensor(j), layout), "excess_mtl", state=state, eta=0.7)
        ref.step(j)
        w = state.w.numpy()
        assert w.min() > 0 and abs(w.sum() - 1) < 1e-15
        if ref.r is not None:
            shift = np.log(w) - np.log(previous) - 0.7 * ref.r
            np.testing.assert_allclose(shift, np.full(4, shift.mean()), atol=1e-12)
        previous = w.copy()


@pytest.mark.parametrize("eta", [1.0, 0.4])
def test_excess_c12_two_calls_by_hand(eta):
    state = gradagg.init("excess_mtl", 2)
    j1, j2 = torch.tensor([[2.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    d1 = gradagg.aggregate(j1.double(), "excess_mtl", state=state, eta=eta)
    np.testing.assert_allclose(state.base.numpy(), [2.0, 1.0], rtol=1e-7)
    np.testing.assert_array_equal(state.w.numpy(), [0.5, 0.5])
    np.testing.assert_allclose(d1.numpy(), [1.5, 0.0], rtol=1e-15)
    d2 = gradagg.aggregate(j2.double(), "excess_mtl", state=state, eta=eta)
    np.testing.assert_allclose(wide(state, "root") ** 2, [[5.0, 0.0], [5.0, 0.0]], rtol=1e-15)
    s5 = np.sqrt(5.0)
    approx = np.exp(eta * np.array([1 / (2 * s5), 4 / s5]))
    np.testing.assert_allclose(state.w.numpy(), approx / approx.sum(), rtol=1e-6)
    e0 = np.array([4 / np.sqrt(4 + 1e-7), 1 / np.sqrt(1 + 1e-7)])
    e = np.array([1 / np.sqrt(5 + 1e-7), 4 / np.sqrt(5 + 1e-7)])
    exact = softmax(eta * e / (e0 + 1e-7))
    np.testing.assert_allclose(state.w.numpy(), exact, rtol=1e-14)
    np.testing.assert_allclose(d2.numpy(), [exact[0] + 2 * exact[1], 0.0], rtol=1e-14)


def test_excess_c13_per_task_scale_invariance():
    rng = np.random.default_rng(5)
    jacs = [rng.uniform(0.5, 2.0, (3, 6)) * rng.choice([-1.0, 1.0], (3, 6)) for _ in range(6)]
    c = np.array([0.1, 1.0, 20.0])
    plain, scaled = gradagg.init("excess_mtl", 3), gradagg.init("excess_mtl", 3)
    for j in jacs:
        gradagg.aggregate(torch.tensor(j), "excess_mtl", state=plain)
        d = gradagg.aggregate(torch.tensor(c[:, None] * j), "excess_mtl", state=scaled).numpy()
        np.testing.assert_allclose(scaled.w.numpy(), plain.w.numpy(), rtol=1e-5)
        np.testing.assert_allclose(d, (c[:, None] * j).T @ scaled.w.numpy(), rtol=1e-13)
    assert np.ptp(plain.w.numpy()) > 1e-2  # the weights did move


def test_excess_warmup_averages_the_baseline():
    jacs, _ = seq(3, 5, 5, seed=6)
    state = gradagg.init("excess_mtl", 3)
    a = np.zeros((3, 5))
    es = []
    for j in jacs[:3]:
        gradagg.aggregate(torch.tensor(j), "excess_mtl", state=state, warmup=3)
        a = a + j * j
        es.append((j * j / np.sqrt(a + 1e-7)).sum(1))
        np.testing.assert_array_equal(state.w.numpy(), np.full(3, 1 / 3))
    np.testing.assert_allclose(state.base.numpy(), np.mean(es, 0), rtol=1e-14)
    gradagg.aggregate(torch.tensor(jacs[3]), "excess_mtl", state=state, warmup=3)
    assert np.ptp(state.w.numpy()) > 1e-3


# --- moco: C24–C26 --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_moco_c24_no_lambda_step_keeps_lambda_uniform(layout_of, layout):
    rng = np.random.default_rng(7)
    state = gradagg.init("moco", 4)
    for _ in range(4):
        j = rng.standard_normal((4, 8)) * rng.uniform(10, 100, (4, 1))
        loss = rng.uniform(0.5, 2.0, 4)
        d = flat(call("moco", layout_of(torch.tensor(j), layout), state, loss, gamma=0.0, beta=1.0, beta_sigma=0.0))
        np.testing.assert_allclose(state.lam.numpy(), np.full(4, 0.25), rtol=1e-15)
        unit = j / np.linalg.norm(j, axis=1, keepdims=True)
        expected = (loss[:, None] * unit).mean(0)
        np.testing.assert_allclose(d, expected, rtol=0, atol=1e-9 * np.abs(expected).max())
        exact = (loss[:, None] * j / (np.linalg.norm(j, axis=1, keepdims=True) + 1e-8)).mean(0)
        np.testing.assert_allclose(d, exact, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_moco_c25_constant_input_tracks_geometrically(layout_of, layout, beta):
    rng = np.random.default_rng(8)
    j, loss = rng.standard_normal((3, 7)), np.array([0.5, 1.0, 2.0])
    target = loss[:, None] * j / (np.linalg.norm(j, axis=1, keepdims=True) + 1e-8)
    state = gradagg.init("moco", 3)
    for t in range(1, 7):
        call("moco", layout_of(torch.tensor(j), layout), state, loss, beta=beta, beta_sigma=0.0)
        np.testing.assert_allclose(wide(state, "y"), (1 - (1 - beta) ** t) * target, rtol=1e-13, atol=1e-16)
        lam = state.lam.numpy()
        assert lam.min() > 0 and abs(lam.sum() - 1) < 1e-15


def qp_on_simplex(m):
    """argmin_{λ∈Δ} λᵀMλ for a positive definite M, by enumerating supports (KKT)."""
    k = len(m)
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            x = np.linalg.solve(m[np.ix_(s, s)], np.ones(size))
            lam = np.zeros(k)
            lam[s] = x / x.sum()
            value = lam @ m @ lam
            if lam.min() >= -1e-14 and (m @ lam >= value - 1e-12).all():
                return lam
    raise AssertionError("no KKT point")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_moco_c26_projected_steps_converge_to_the_regularised_min_norm_point(layout_of, layout):
    j = np.array([[2.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [2.0, 2.0, 0.5, 0.1]])
    loss = np.array([1.0, 1.2, 3.0])
    rho = 0.1
    target = loss[:, None] * j / (np.linalg.norm(j, axis=1, keepdims=True) + 1e-8)
    m = target @ target.T + rho * np.eye(3)
    best = qp_on_simplex(m)
    assert best[2] == 0 and best.min() == 0  # the answer lies on a face: softmax cannot reach it
    gamma = 1.0 / np.linalg.eigvalsh(m).max()
    opts = dict(beta=1.0, beta_sigma=0.0, gamma=gamma, gamma_sigma=0.0, rho=rho)
    projected, soft = gradagg.init("moco", 3), gradagg.init("moco", 3)
    jac = layout_of(torch.tensor(j), layout)
    for _ in range(150):
        d = flat(call("moco", jac, projected, loss, simplex="project", **opts))
        call("moco", jac, soft, loss, **opts)
    np.testing.assert_allclose(projected.lam.numpy(), best, atol=1e-10)
    np.testing.assert_allclose(d, target.T @ best, atol=1e-10)
    assert np.abs(soft.lam.numpy() - best).max() > 1e-2  # not for softmax


# --- db_mtl: C27–C30 ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_db_mtl_c27_no_memory_is_the_sum_of_rescaled_unit_gradients(layout_of, layout):
    rng = np.random.default_rng(9)
    state = gradagg.init("db_mtl", 4)
    for _ in range(3):
        j = rng.standard_normal((4, 9)) * rng.uniform(0.01, 100, (4, 1))
        loss = rng.uniform(0.01, 10.0, 4)
        d = flat(call("db_mtl", layout_of(torch.tensor(j), layout), state, loss, beta=0.0))
        n = np.linalg.norm(j, axis=1)
        big = (n / (loss + 1e-8)).max()
        np.testing.assert_allclose(d, big * (j / (n + 1e-8 * (loss + 1e-8))[:, None]).sum(0), rtol=1e-14)
        np.testing.assert_allclose(d, big * (j / n[:, None]).sum(0), rtol=1e-7)
    assert state.buffer is None and int(state.step) == 3


def test_db_mtl_without_memory_gives_the_same_results_with_a_buffer():
    """β = 0 without a buffer (a fresh state) equals β = 0 on a state whose buffer exists."""
    jacs, losses = seq(3, 6, 4, seed=10)
    fresh, kept = gradagg.init("db_mtl", 3), gradagg.init("db_mtl", 3)
    call("db_mtl", torch.tensor(jacs[0]), kept, losses[0])  # allocates the buffer (β = 0.9)
    for j, loss in zip(jacs[1:], losses[1:]):
        a = call("db_mtl", torch.tensor(j), fresh, loss, beta=0.0).numpy()
        b = call("db_mtl", torch.tensor(j), kept, loss, beta=0.0).numpy()
        np.testing.assert_allclose(a, b, rtol=1e-14)
    assert fresh.buffer is None and kept.buffer is not None
    np.testing.assert_allclose(wide(kept, "buffer"), jacs[-1] / (losses[-1] + 1e-8)[:, None], rtol=1e-15)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_db_mtl_c28_every_term_has_the_largest_norm(layout_of, layout):
    jacs, losses = seq(4, 8, 5, seed=11)
    ref, state = DBRef(4, beta=0.7), gradagg.init("db_mtl", 4)
    for j, loss in zip(jacs, losses):
        d = flat(call("db_mtl", layout_of(torch.tensor(j), layout), state, loss, beta=0.7))
        ref.step(j, loss)
        n = np.linalg.norm(ref.b, axis=1)
        np.testing.assert_allclose(d, n.max() * (ref.b / n[:, None]).sum(0), rtol=1e-7)


def test_db_mtl_c29_loss_scale_invariance():
    jacs, losses = seq(3, 6, 5, seed=12)
    c = np.array([0.1, 1.0, 50.0])
    plain, scaled = gradagg.init("db_mtl", 3), gradagg.init("db_mtl", 3)
    for j, loss in zip(jacs, losses):
        a = call("db_mtl", torch.tensor(j), plain, loss).numpy()
        b = call("db_mtl", torch.tensor(c[:, None] * j), scaled, c * loss).numpy()
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * np.abs(a).max())


@pytest.mark.parametrize("beta", [0.9, 0.5])
def test_db_mtl_c30_the_first_step_is_shrunk(beta):
    j, loss = np.random.default_rng(13).standard_normal((3, 6)), np.array([0.5, 1.0, 4.0])
    first = call("db_mtl", torch.tensor(j), gradagg.init("db_mtl", 3), loss, beta=beta).numpy()
    memoryless = call("db_mtl", torch.tensor(j), gradagg.init("db_mtl", 3), loss, beta=0.0).numpy()
    np.testing.assert_allclose(first, (1 - beta) * memoryless, rtol=0, atol=1e-6 * np.abs(first).max())
    g = j / (loss + 1e-8)[:, None]  # exactly: B_1 = (1 − β)ĝ, so the ε acts as ε/(1 − β) on ‖ĝ_i‖
    n = np.linalg.norm(g, axis=1)
    np.testing.assert_allclose(first, (1 - beta) * n.max() * (g / (n + 1e-8 / (1 - beta))[:, None]).sum(0),
                               rtol=1e-13)
    state = gradagg.init("db_mtl", 3)
    for t in range(1, 6):  # constant inputs: d_t = (1 − β^t) d(β = 0)
        d = call("db_mtl", torch.tensor(j), state, loss, beta=beta).numpy()
        np.testing.assert_allclose(d, (1 - beta**t) * memoryless, rtol=0, atol=1e-6 * np.abs(d).max())


# --- properties -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", WIDE)
@given(k=st.integers(1, 5), d=st.integers(1, 8), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_permuting_tasks_permutes_the_state_and_keeps_d(method, k, d, seed, data):
    perm = data.draw(st.permutations(range(k)))
    jacs, losses = seq(k, d, 4, seed=seed, scale=10.0 ** data.draw(st.integers(-3, 3)))
    a, b = gradagg.init(method, k), gradagg.init(method, k)
    for j, loss in zip(jacs, losses):
        da = call(method, torch.tensor(j), a, loss).numpy()
        db = call(method, torch.tensor(j[perm]), b, loss[perm]).numpy()
        np.testing.assert_allclose(db, da, rtol=1e-10, atol=1e-12 * np.abs(j).max())
        for name in {"excess_mtl": ["w", "base"], "moco": ["lam"], "db_mtl": []}[method]:
            np.testing.assert_allclose(getattr(b, name).numpy(), getattr(a, name).numpy()[perm], rtol=1e-10)
        for name in a.wide:
            if getattr(a, name) is not None:
                np.testing.assert_allclose(wide(b, name), wide(a, name)[perm], rtol=1e-10, atol=1e-300)
    for name in {"excess_mtl": ["w"], "moco": ["lam"], "db_mtl": []}[method]:
        w = getattr(a, name).numpy()
        assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12


@pytest.mark.parametrize("method", WIDE)
def test_float32_against_float64(method):
    jacs, losses = seq(4, 40, 4, seed=14)
    s32, s64 = gradagg.init(method, 4), gradagg.init(method, 4)
    for j, loss in zip(jacs, losses):
        d32 = call(method, torch.tensor(j, dtype=torch.float32), s32, loss)
        d64 = call(method, torch.tensor(j, dtype=torch.float32).double(), s64, loss)
        assert d32.dtype == torch.float32
        np.testing.assert_allclose(d32.double().numpy(), d64.numpy(), rtol=2e-5, atol=2e-6 * np.abs(d64.numpy()).max())
    assert all(t.dtype == torch.float32 for name in s32.wide for t in getattr(s32, name))
    assert all(getattr(s32, name).dtype in (torch.float64, torch.int64) for name in s32.fields)


@pytest.mark.parametrize(("method", "opts"), [("excess_mtl", {}), ("moco", {}), ("moco", {"track": "raw"}),
                                              ("db_mtl", {}), ("db_mtl", {"beta": 0.0})])
@pytest.mark.parametrize("power", [-20, 20])
@pytest.mark.parametrize("layout", ["plain", "leaves"])
def test_float32_extreme_magnitudes(layout_of, method, opts, power, layout):
    """Squares of such entries overflow or underflow float32: the norms, √A and YYᵀ are rescued."""
    jacs, losses = seq(3, 30, 3, seed=15, scale=10.0**power)
    s32, s64 = gradagg.init(method, 3), gradagg.init(method, 3)
    for j, loss in zip(jacs, losses):
        j32 = torch.tensor(j, dtype=torch.float32)
        d32 = flat(call(method, layout_of(j32, layout), s32, loss, **opts))
        d64 = flat(call(method, layout_of(j32.double(), layout), s64, loss, **opts))
        assert np.isfinite(d32).all()
        np.testing.assert_allclose(d32, d64, rtol=1e-4, atol=1e-5 * np.abs(d64).max())


@pytest.mark.parametrize("method", WIDE)
def test_zero_jacobian_gives_zero(method):
    state = gradagg.init(method, 3)
    for _ in range(2):
        assert torch.equal(call(method, torch.zeros(3, 4), state, np.ones(3)), torch.zeros(4))


@pytest.mark.parametrize("method", WIDE)
def test_differentiable_in_j_with_the_coefficients_held_constant(method):
    jacs, losses = seq(3, 5, 3, seed=16)
    ref, state = REFS[method](3), gradagg.init(method, 3)
    v = torch.arange(5.0, dtype=torch.float64)
    for j, loss in zip(jacs, losses):
        jt = torch.tensor(j, requires_grad=True)
        d = call(method, jt, state, loss)
        ref.step(j, loss)
        (d * v).sum().backward()
        if method == "excess_mtl":
            coef = ref.w
        elif method == "moco":
            coef = ref.coef
        else:
            coef = ref.alpha * (1 - ref.beta) / (loss + 1e-8)
        np.testing.assert_allclose(jt.grad.numpy(), np.outer(coef, v.numpy()), rtol=1e-7, atol=1e-15)


@pytest.mark.parametrize("method", WIDE)
def test_no_host_reads_on_the_accelerator_path(monkeypatch, method):
    """The combine, as it runs off the CPU (flags not read): no op that reads a tensor on the host,
    and the same numbers as the CPU path, overflow rescue included."""
    jacs, losses = seq(3, 12, 3, seed=17, scale=1e20)
    spec = lookup(method)
    cpu, device = gradagg.init(method, 3), gradagg.init(method, 3)
    for j, loss in zip(jacs, losses):
        rows = [torch.tensor(j[:, :5], dtype=torch.float32), torch.tensor(j[:, 5:], dtype=torch.float32)]
        options = resolve_options(spec, {}, 3)
        expected = spec.combine(rows, Context(state=cpu, losses=torch.tensor(loss)), **options)
        monkeypatch.setattr(moco_module, "can_stop_early", lambda t: False)
        with OpLog() as log:
            got = spec.combine(rows, Context(state=device, losses=torch.tensor(loss)), **options)
        monkeypatch.undo()
        assert log.banned() == [] and log.ops
        for a, b in zip(got, expected):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)


# --- states ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", WIDE)
def test_checkpoint_resume_is_bit_identical(layout_of, method, layout):
    jacs, losses = seq(3, 7, 6, seed=18)
    jacs = [layout_of(torch.tensor(j), layout) for j in jacs]
    straight = gradagg.init(method, 3)
    results = [call(method, j, straight, loss) for j, loss in zip(jacs, losses)]
    interrupted = gradagg.init(method, 3)
    for j, loss in zip(jacs[:3], losses[:3]):
        call(method, j, interrupted, loss)
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = gradagg.init(method, 3).load_state_dict(torch.load(buffer))
    for j, loss, expected in zip(jacs[3:], losses[3:], results[3:]):
        assert np.array_equal(flat(call(method, j, resumed, loss)), flat(expected))
    for name in resumed.fields:
        assert torch.equal(getattr(resumed, name), getattr(straight, name))
    for name in resumed.wide:
        assert all(torch.equal(a, b) for a, b in zip(getattr(resumed, name), getattr(straight, name)))
    assert resumed.widths == straight.widths


@pytest.mark.parametrize("method", WIDE)
def test_a_wide_state_refuses_other_widths_k_and_devices(layout_of, method):
    loss = np.ones(3)
    state = gradagg.init(method, 3)
    call(method, torch.randn(3, 7, dtype=torch.float64), state, loss)
    with pytest.raises(ValueError, match="D cannot change"):
        call(method, torch.randn(3, 8, dtype=torch.float64), state, loss)
    with pytest.raises(ValueError, match="K cannot change"):
        call(method, torch.randn(4, 7, dtype=torch.float64), state, np.ones(4))
    leafwise = gradagg.init(method, 3)
    call(method, layout_of(torch.randn(3, 7, dtype=torch.float64), "leaves"), leafwise, loss)
    with pytest.raises(ValueError, match=r"widths \[3, 4\].*widths \[4, 4\]"):
        call(method, {"a": torch.randn(3, 4, 1, dtype=torch.float64), "b": torch.randn(3, 4, dtype=torch.float64)},
             leafwise, loss)
    elsewhere = gradagg.init(method, 3, device="meta")
    with pytest.raises(ValueError, match=r"state\.to"):
        call(method, torch.randn(3, 7, dtype=torch.float64), elsewhere, loss)
    resumed = gradagg.init(method, 3).load_state_dict(state.state_dict())
    with pytest.raises(ValueError, match="D cannot change"):
        call(method, torch.randn(3, 6, dtype=torch.float64), resumed, loss)


@pytest.mark.parametrize("method", WIDE)
def test_a_state_follows_its_pytree_between_packed_and_leafwise(monkeypatch, method):
    """Eager calls pack a small pytree into one [K, D] buffer, compiled ones do not: the state's
    columns are re-split between the two, in order, and the answers are those of one layout."""
    jacs, losses = seq(3, 7, 6, seed=24)
    ref, state = REFS[method](3), gradagg.init(method, 3)
    for t, (j, loss) in enumerate(zip(jacs, losses)):
        monkeypatch.setattr(api, "PACK_MAX", 0 if t % 2 else api.PACK_MAX)
        d = flat(call(method, {"a": torch.tensor(j[:, :CUT]).reshape(3, CUT, 1), "b": torch.tensor(j[:, CUT:])},
                      state, loss))
        monkeypatch.undo()
        np.testing.assert_allclose(d, ref.step(j, loss), rtol=1e-12, atol=1e-14)
        assert state.widths == ((CUT, 7 - CUT) if t % 2 else (7,))


@pytest.mark.parametrize("method", WIDE)
def test_reset_and_lifecycle(method):
    state = gradagg.init(method, 3)
    assert not state.bound and state.widths is None
    first = call(method, torch.ones(3, 4, dtype=torch.float64), state, np.ones(3))
    state.reset()
    assert state.widths is None and int(state.step) == 0
    assert torch.equal(call(method, torch.ones(3, 4, dtype=torch.float64), state, np.ones(3)), first)


def test_losses_are_required_where_read():
    j = torch.randn(3, 4, dtype=torch.float64)
    for method in ("moco", "db_mtl"):
        assert gradagg.methods()[method].uses_losses
        with pytest.raises(ValueError, match="needs the task losses"):
            gradagg.aggregate(j, method, state=gradagg.init(method, 3))
    assert not gradagg.methods()["excess_mtl"].uses_losses
    gradagg.aggregate(j, "excess_mtl", state=gradagg.init("excess_mtl", 3))


@pytest.mark.parametrize(("method", "opts", "message"), [
    ("moco", {"simplex": "sparsemax"}, "'softmax', 'project'"),
    ("moco", {"track": "unit"}, "'loss_unit', 'raw'"),
    ("moco", {"beta": 0.0}, r"\(0\.0, 1\.0\]"),
    ("moco", {"gamma": -1.0}, "≥ 0"),
    ("db_mtl", {"beta": 1.0}, r"\[0\.0, 1\.0\)"),
    ("db_mtl", {"beta_sigma": -0.5}, "≥ 0"),
    ("excess_mtl", {"eta": 0.0}, "> 0"),
    ("excess_mtl", {"warmup": -1}, "≥ 0"),
    ("excess_mtl", {"warmup": 1.5}, "must be an int"),
])
def test_bad_options_are_refused(method, opts, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(method, torch.randn(3, 4, dtype=torch.float64), gradagg.init(method, 3), np.ones(3), **opts)


@pytest.mark.parametrize("method", WIDE)
def test_weights_are_refused(method):
    with pytest.raises(ValueError, match="coordinate by coordinate"):
        gradagg.weights(torch.randn(3, 4), method, state=gradagg.init(method, 3), losses=torch.ones(3))


# --- chains ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", WIDE)
def test_a_chain_ending_in_a_wide_method_reads_the_transformed_rows(layout_of, method, layout):
    """K = 2: PCGrad's rows in closed form (g_i' = g_i − min(g_i·g_j, 0)/‖g_j‖² g_j)."""
    rng = np.random.default_rng(19)
    ref, state = REFS[method](2), gradagg.init(method, 2)
    for _ in range(3):
        j = rng.standard_normal((2, 7))
        j[1] -= 2 * j[0]  # conflicting
        dot = j[0] @ j[1]
        rows = np.array([j[0] - min(dot, 0) / (j[1] @ j[1]) * j[1], j[1] - min(dot, 0) / (j[0] @ j[0]) * j[0]])
        loss = rng.uniform(0.5, 2.0, 2)
        d = flat(call(("pcgrad", method), layout_of(torch.tensor(j), layout), state, loss,
                 generator=torch.Generator().manual_seed(0)))
        np.testing.assert_allclose(d, ref.step(rows, loss), rtol=1e-10, atol=1e-13)


def test_chains_with_two_states_and_normalize():
    jacs, losses = seq(3, 6, 3, seed=20)
    states = gradagg.init(("nsgd", "db_mtl"), 3)
    assert [type(s).__name__ for s in states] == ["NSGDState", "DBMTLState"]
    for j, loss in zip(jacs, losses):
        d = call(("nsgd", "db_mtl"), torch.tensor(j), states, loss, normalize="sum")
        np.testing.assert_allclose(np.linalg.norm(d.numpy()), np.linalg.norm(j.sum(0)), rtol=1e-13)
    assert int(states[0].step) == int(states[1].step) == 3


# --- peers ----------------------------------------------------------------------------------------


def _torchjd_excess(**kwargs):
    aggregation = pytest.importorskip("torchjd.aggregation")
    return aggregation.ExcessMTLWeighting(**kwargs)


@pytest.mark.parametrize(("ours", "theirs"), [(0, 1), (1, 1), (3, 3)])
def test_excess_mtl_equals_torchjd_from_its_warmup(ours, theirs):
    """gradagg's ``warmup=W`` is TorchJD's ``n_warmup_steps=max(W, 1)``: the same weights at every call."""
    peer = _torchjd_excess(robust_step_size=0.8, n_warmup_steps=theirs)
    jacs, _ = seq(3, 6, 7, seed=21)
    state = gradagg.init("excess_mtl", 3)
    for j in jacs:
        gradagg.aggregate(torch.tensor(j), "excess_mtl", state=state, eta=0.8, warmup=ours)
        np.testing.assert_allclose(state.w.numpy(), peer(torch.tensor(j)).numpy(), rtol=1e-12)


def test_excess_mtl_first_call_differs_from_torchjd_deliberately():
    """C9: TorchJD 0.18 with ``n_warmup_steps=0`` updates w on the first call with the raw e ≈ ‖g_i‖₁
    and, for a constant J, stays at softmax(η‖g_i‖₁); gradagg (the official first call) stays at
    1/K. From the second call on both take the same exponentiated-gradient steps."""
    peer = _torchjd_excess(n_warmup_steps=0)
    j = np.random.default_rng(22).uniform(0.5, 1.5, (3, 4)) * np.array([[1.0], [0.5], [0.2]])
    state = gradagg.init("excess_mtl", 3)
    for t in range(4):
        gradagg.aggregate(torch.tensor(j), "excess_mtl", state=state)
        theirs = peer(torch.tensor(j)).numpy()
        if t == 0:  # exactly softmax(log(1/K) + η e⁰)
            np.testing.assert_allclose(theirs, softmax((j * j / np.sqrt(j * j + 1e-7)).sum(1)), rtol=1e-12)
        np.testing.assert_allclose(theirs, softmax(np.abs(j).sum(1)), rtol=1e-5)
        np.testing.assert_allclose(state.w.numpy(), np.full(3, 1 / 3), atol=1e-6)
    peer, state = _torchjd_excess(n_warmup_steps=0), gradagg.init("excess_mtl", 3)
    previous = None
    for j in seq(3, 5, 5, seed=23)[0]:
        gradagg.aggregate(torch.tensor(j), "excess_mtl", state=state)
        both = np.log(state.w.numpy()), np.log(peer(torch.tensor(j)).numpy())
        if previous is not None:
            step = [b - a for a, b in zip(previous, both)]
            np.testing.assert_allclose(step[0] - step[0].mean(), step[1] - step[1].mean(), atol=1e-12)
        previous = both


@pytest.mark.parametrize(("method", "name"), [("moco", "MoCo"), ("db_mtl", "DBMTL")])
def test_moco_and_db_mtl_peers(method, name):
    aggregation = pytest.importorskip("torchjd.aggregation")
    if not hasattr(aggregation, name):
        pytest.skip(f"torchjd {getattr(__import__('torchjd'), '__version__', '?')} has no {name} "
                    f"(MoCo is TorchJD PR #676, unreleased; DB-MTL exists only in LibMTL)")
    pytest.fail(f"torchjd now has {name}: compare it with gradagg's {method!r} here")


@pytest.mark.parametrize("method", WIDE)
def test_compiled_steps_continue_an_eager_state(method):
    """An eager call (the pytree packed), then compiled ones (leaf by leaf, the state re-split), then
    eager again: the answers of the float64 reference throughout. (Traced whole by dynamo; inductor's
    code for these methods is covered by test_stateful's compiled step.)"""
    torch._dynamo.reset()
    jacs, losses = seq(3, 7, 4, seed=25)
    ref, state = REFS[method](3), gradagg.init(method, 3)
    step = torch.compile(lambda jac, s, loss: gradagg.aggregate(jac, method, state=s, losses=loss), fullgraph=True,
                         backend="eager")
    for t, (j, loss) in enumerate(zip(jacs, losses)):
        jac = {"a": torch.tensor(j[:, :CUT]).reshape(3, CUT, 1), "b": torch.tensor(j[:, CUT:])}
        d = step(jac, state, torch.tensor(loss)) if t in (1, 2) else call(method, jac, state, loss)
        np.testing.assert_allclose(flat(d), ref.step(j, loss), rtol=1e-12, atol=1e-14)
    torch._dynamo.reset()


def test_a_non_finite_jacobian_leaves_a_stateful_tail_untouched():
    """The finite check of a stateful per-coordinate method runs before its state moves, so a caller
    that catches NonFiniteError and skips the batch keeps a clean state."""
    import gradagg

    state = gradagg.init("db_mtl", 2)
    jac = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    losses = torch.tensor([1.0, 2.0], dtype=torch.float64)
    gradagg.aggregate(jac, "db_mtl", state=state, losses=losses)
    before = state.state_dict()
    with pytest.raises(gradagg.NonFiniteError):
        gradagg.aggregate(torch.tensor([[1.0, float("nan")], [3.0, 4.0]], dtype=torch.float64), "db_mtl",
                          state=state, losses=losses)
    after = state.state_dict()
    assert int(after["step"]) == int(before["step"])
    assert all(torch.equal(a, b) for a, b in zip(after["buffer"], before["buffer"]))
