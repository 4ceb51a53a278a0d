"""Loss weightings (gradagg.scalarize): METHODS.md checks C31–C43, closed-form weights against
autograd, properties, state round trips, misuse, and FAMO's loop against a re-implementation."""

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import logsumexp

import gradagg
from gradagg.scalarization import (
    DWAState,
    FAMOState,
    IMTLLState,
    ScalarizationState,
    STCHState,
    UWState,
    init_state,
    scalarizations,
    scalarize,
    weights_of,
)

from asserts import npy

METHODS = ["sum", "mean", "constant", "random", "uw", "imtl_l", "dwa", "famo", "geometric_mean", "stch",
           "stch_log", "pbi", "cosmos"]


def t64(a, requires_grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=requires_grad)


def val(t):
    return t.detach().item()


def grad_of(s, losses):
    return torch.autograd.grad(s, losses)[0]


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


@st.composite
def loss_vectors(draw, min_k=1, max_k=8):
    """Positive losses spread over three decades (so that every method applies)."""
    k = draw(st.integers(min_k, max_k))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return 10.0 ** rng.uniform(-1.5, 1.5, size=k)


def configured(method, k, rng):
    """(name, options, state) with a non-trivial state and options for K tasks."""
    pref = rng.uniform(0.1, 1.0, size=k)
    if method == "constant":
        return "constant", {"weights": rng.uniform(0, 2, size=k).tolist()}, None
    if method in ("uw", "imtl_l"):
        state = init_state(method, k)
        with torch.no_grad():
            state.s.copy_(t64(rng.standard_normal(k)))
        return method, {}, state
    if method == "dwa":
        state = init_state("dwa", k)
        for _ in range(2):
            scalarize(t64(rng.uniform(0.5, 2.0, size=k)), "dwa", state=state)
            state.end_epoch()
        return "dwa", {"T": float(rng.uniform(0.5, 3.0))}, state
    if method == "famo":
        state = init_state("famo", k, min_losses=(0.01 * rng.uniform(size=k)).tolist())
        before = rng.uniform(0.5, 2.0, size=k)
        scalarize(t64(before), "famo", state=state)
        state.update(t64(before * rng.uniform(0.5, 1.0, size=k)))
        return "famo", {}, state
    if method == "stch":
        return "stch", {"mu": float(rng.uniform(0.05, 2.0)), "pref": pref.tolist(),
                        "ref": (-rng.uniform(size=k)).tolist()}, None
    if method == "stch_log":
        state = init_state("stch", k, warmup_epochs=0)
        scalarize(t64(rng.uniform(0.5, 2.0, size=k)), "stch", state=state, log_nadir=True)
        state.end_epoch()
        return "stch", {"log_nadir": True, "mu": float(rng.uniform(0.2, 2.0))}, state
    if method == "pbi":
        return "pbi", {"theta": float(rng.uniform(0, 6)), "pref": pref.tolist(),
                       "ref": (-rng.uniform(size=k)).tolist()}, None
    if method == "cosmos":
        return "cosmos", {"lambda_": float(rng.uniform(0, 4)), "pref": pref.tolist()}, None
    return method, {}, None


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- C31 uw ----------------------------------------------------------------------------------------


def test_c31_uw_optimum_and_value():
    losses = t64([0.3, 1.0, 7.0], requires_grad=True)
    state = init_state("uw", 3)
    assert isinstance(state, UWState) and isinstance(state.s, torch.nn.Parameter)
    assert val(scalarize(losses, "uw", state=state)) == pytest.approx(0.5 * 8.3, rel=1e-15)  # s = 0: ½ΣL
    with torch.no_grad():
        state.s.copy_(torch.log(losses))
    s_value = scalarize(losses, "uw", state=state)
    ds, dl = torch.autograd.grad(s_value, [state.s, losses])
    assert float(ds.abs().max()) < 1e-15
    np.testing.assert_allclose(val(s_value), sum(0.5 * (1 + math.log(x)) for x in (0.3, 1.0, 7.0)), rtol=1e-14)
    np.testing.assert_allclose(npy(dl), [1 / 0.6, 0.5, 1 / 14], rtol=1e-14)
    np.testing.assert_allclose(npy(weights_of(losses, "uw", state=state)), [1 / 0.6, 0.5, 1 / 14], rtol=1e-14)


def test_c31_uw_trains_to_log_loss():
    """Minimising over s alone with an ordinary optimiser (state.parameters()) reaches s* = log L."""
    losses = t64([0.2, 1.5, 4.0])
    state = init_state("uw", 3, init=-0.5)
    assert torch.equal(state.s.detach(), t64([-0.5] * 3))
    opt = torch.optim.Adam(state.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        scalarize(losses, "uw", state=state).backward()
        opt.step()
    np.testing.assert_allclose(npy(state.s), np.log([0.2, 1.5, 4.0]), atol=1e-3)


# --- C32 imtl_l ------------------------------------------------------------------------------------


@given(losses=loss_vectors(), seed=st.integers(0, 1000))
def test_c32_imtl_l_is_twice_uw_at_minus_s(losses, seed):
    s = np.random.default_rng(seed).standard_normal(len(losses))
    imtl, uw = init_state("imtl_l", len(losses)), init_state("uw", len(losses))
    with torch.no_grad():
        imtl.s.copy_(t64(s))
        uw.s.copy_(t64(-s))
    a = val(scalarize(t64(losses), "imtl_l", state=imtl))
    b = val(scalarize(t64(losses), "uw", state=uw))
    np.testing.assert_allclose(a, 2 * b, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(a, np.sum(np.exp(s) * losses - s), rtol=1e-12, atol=1e-12)


def test_c32_imtl_l_optimum():
    values = [0.3, 1.0, 7.0]
    losses = t64(values, requires_grad=True)
    state = init_state("imtl_l", 3)
    assert val(scalarize(losses, "imtl_l", state=state)) == pytest.approx(8.3, rel=1e-15)  # s = 0: ΣL
    with torch.no_grad():
        state.s.copy_(-torch.log(losses))
    value = scalarize(losses, "imtl_l", state=state)
    ds, dl = torch.autograd.grad(value, [state.s, losses])
    assert float(ds.abs().max()) < 1e-15
    np.testing.assert_allclose(npy(dl), [1 / x for x in values], rtol=1e-14)
    np.testing.assert_allclose(val(value), sum(1 + math.log(x) for x in values), rtol=1e-14)


# --- C33 geometric mean ----------------------------------------------------------------------------


@given(losses=loss_vectors(), c=st.floats(1e-3, 1e3))
def test_c33_geometric_mean(losses, c):
    k = len(losses)
    x = t64(losses, requires_grad=True)
    gm = scalarize(x, "geometric_mean")
    expected = np.prod(losses) ** (1 / k)
    np.testing.assert_allclose(val(gm), expected, rtol=1e-12)
    np.testing.assert_allclose(npy(grad_of(gm, x)), expected / (k * losses), rtol=1e-12)
    np.testing.assert_allclose(val(scalarize(t64(c * losses), "gls")), c * expected, rtol=1e-12)
    np.testing.assert_allclose(npy(weights_of(t64(np.full(k, losses[0])), "geometric_mean")), np.full(k, 1 / k),
                               rtol=1e-14)


def test_c33_geometric_mean_direction_ignores_loss_scales():
    """∇_θ GM ∥ Σ_i ∇_θ log L_i, so scaling each loss by a constant changes only its length."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)

    def losses(scale):
        return ((model(x) - y) ** 2).mean(0) * scale

    grads = []
    for scale in (t64([1.0, 1.0, 1.0]), t64([1e-3, 5.0, 40.0])):
        model.zero_grad()
        scalarize(losses(scale), "geometric_mean").backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad()
    torch.log(losses(1.0)).sum().backward()
    log_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    for g in grads:
        np.testing.assert_allclose(npy(g / g.norm()), npy(log_grad / log_grad.norm()), atol=1e-12)


# --- C34 dwa ---------------------------------------------------------------------------------------


def run_epoch(state, batches, T=2.0):
    ws = []
    for batch in batches:
        x = t64(batch, requires_grad=True)
        ws.append(npy(grad_of(scalarize(x, "dwa", state=state, T=T), x)))
    state.end_epoch()
    return ws


def test_c34_dwa_example_and_epoch_boundaries():
    state = init_state("dwa", 3)
    assert isinstance(state, DWAState)
    # epoch means (1, 2, 4) and (.5, 1.8, 4), each from two batches
    first = run_epoch(state, [[0.5, 1.0, 3.0], [1.5, 3.0, 5.0]])
    for w in first + run_epoch(state, [[0.4, 1.6, 4.0], [0.6, 2.0, 4.0]]):
        np.testing.assert_array_equal(w, [1.0, 1.0, 1.0])  # epochs 0 and 1
    ws = run_epoch(state, [[9.0, 0.1, 2.0], [0.2, 5.0, 1.0], [1.0, 1.0, 1.0]])
    for w in ws:  # epoch 2: the same weights for every batch
        np.testing.assert_allclose(w, [0.8558, 1.0453, 1.0989], atol=5e-5)
        np.testing.assert_allclose(w, ws[0], rtol=0, atol=0)
        assert w.sum() == pytest.approx(3.0, rel=1e-14)


@given(rates=st.lists(st.floats(0.2, 3.0), min_size=2, max_size=6))
def test_c34_dwa_temperature_limits_and_sum(rates):
    k = len(rates)
    state = init_state("dwa", k)
    run_epoch(state, [[1.0] * k])
    run_epoch(state, [rates])
    r = np.array(rates)
    for T, expected in ((2.0, k * softmax(r / 2.0)), (1e9, np.ones(k))):
        w = npy(weights_of(t64([1.0] * k), "dwa", state=state, T=T))
        np.testing.assert_allclose(w, expected, rtol=1e-8)
        assert w.sum() == pytest.approx(k, rel=1e-13)
    if np.sort(r)[-1] - np.sort(r)[-2] > 1e-3:
        np.testing.assert_allclose(npy(weights_of(t64([1.0] * k), "dwa", state=state, T=1e-5)),
                                   k * np.eye(k)[np.argmax(r)], atol=1e-12)
    equal = init_state("dwa", k)
    run_epoch(equal, [[2.0 + i for i in range(k)]])
    run_epoch(equal, [[0.5 * (2.0 + i) for i in range(k)]])
    np.testing.assert_allclose(npy(weights_of(t64([1.0] * k), "dwa", state=equal)), np.ones(k), rtol=1e-14)


# --- C35–C37 famo ----------------------------------------------------------------------------------


def test_c35_famo_weights_are_harmonic_from_uniform_logits():
    state = init_state("famo", 3)
    x = t64([0.5, 2.0, 3.0], requires_grad=True)
    w = npy(grad_of(scalarize(x, "famo", state=state), x))
    np.testing.assert_allclose(w, [0.7059, 0.1765, 0.1176], atol=5e-5)
    inv = 1 / np.array([0.5, 2.0, 3.0])
    np.testing.assert_allclose(w, inv / inv.sum(), rtol=1e-7)  # up to the ε = 1e-8 in L + ε
    assert w.sum() == pytest.approx(1.0, rel=1e-14)


@given(losses=loss_vectors(min_k=2), seed=st.integers(0, 1000))
def test_c36_famo_first_update_is_sign_step(losses, seed):
    k = len(losses)
    after = losses * np.random.default_rng(seed).uniform(0.3, 1.2, size=k)
    state = init_state("famo", k)
    scalarize(t64(losses), "famo", state=state)
    state.update(t64(after))
    delta = np.log(losses + 1e-8) - np.log(after + 1e-8)
    g = (delta - delta.mean()) / k  # z = 1/K
    xi = npy(state.xi)
    np.testing.assert_allclose(xi, -0.025 * g / (np.abs(g) + 1e-8), rtol=1e-9, atol=1e-12)
    fell_more = delta > delta.mean() + 1e-6
    assert (xi[fell_more] < 0).all()  # tasks whose log-loss fell more than average lose weight


def test_c37_famo_equal_losses_keep_weights():
    state = init_state("famo", 4)
    scalarize(t64([2.0] * 4), "famo", state=state)
    state.update(t64([0.7] * 4))
    xi = npy(state.xi)
    assert np.ptp(xi) <= 1e-15 and np.abs(xi).max() < 1e-9
    np.testing.assert_allclose(npy(state.z), np.full(4, 0.25), rtol=1e-14)


def test_famo_training_loop_matches_independent_reimplementation():
    """Three steps on a tiny model; the reference writes S, z, c and Adam out in numpy."""
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 3).double()
    ref_w, ref_b = model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    xn, yn = x.numpy(), y.numpy()
    b = np.array([0.01, 0.0, 0.02])
    lr_model, lr, gamma, (b1, b2), eps = 0.3, 0.1, 1e-3, (0.9, 0.999), 1e-8
    state = init_state("famo", 3, lr=lr, min_losses=b.tolist())
    opt = torch.optim.SGD(model.parameters(), lr=lr_model)

    def ref_losses(w, bias):
        r = xn @ w.T + bias - yn
        return (r**2).mean(0), r

    xi, m, v = np.zeros(3), np.zeros(3), np.zeros(3)
    for t in range(1, 4):
        # gradagg
        s = scalarize(((model(x) - y) ** 2).mean(0), "famo", state=state)
        opt.zero_grad()
        s.backward()
        opt.step()
        with torch.no_grad():
            state.update(((model(x) - y) ** 2).mean(0))
        # reference: w = c z/(L − b + ε), dL_i/dW = 2/n Σ r_i x
        losses, r = ref_losses(ref_w, ref_b)
        z = np.exp(xi) / np.exp(xi).sum()
        c = 1 / (z / (losses - b + 1e-8)).sum()
        np.testing.assert_allclose(val(s), c * (z * np.log(losses - b + 1e-8)).sum(), rtol=1e-12)
        w = c * z / (losses - b + 1e-8)
        ref_w = ref_w - lr_model * (2 / len(xn)) * (w[:, None] * (r.T @ xn))
        ref_b = ref_b - lr_model * (2 / len(xn)) * (w * r.sum(0))
        new, _ = ref_losses(ref_w, ref_b)
        delta = np.log(losses - b + 1e-8) - np.log(new - b + 1e-8)
        g = np.array([sum(z[i] * ((i == j) - z[j]) * delta[j] for j in range(3)) for i in range(3)]) + gamma * xi
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        xi = xi - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        np.testing.assert_allclose(model.weight.detach().numpy(), ref_w, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(npy(state.xi), xi, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(npy(state.m), m, rtol=1e-10, atol=1e-16)
        np.testing.assert_allclose(npy(state.v), v, rtol=1e-10, atol=1e-20)
    assert int(state.step) == 3


# --- C38, C39 stch ---------------------------------------------------------------------------------


@given(losses=loss_vectors(), seed=st.integers(0, 1000), mu=st.floats(1e-3, 1e2))
def test_c38_stch_bounds_and_gradient(losses, seed, mu):
    k = len(losses)
    rng = np.random.default_rng(seed)
    lam, z = rng.uniform(0.1, 1.0, size=k), rng.uniform(-1, 0.05, size=k)
    y = lam * (losses - z)
    x = t64(losses, requires_grad=True)
    s = scalarize(x, "stch", mu=mu, pref=lam.tolist(), ref=t64(z))
    np.testing.assert_allclose(val(s), mu * logsumexp(y / mu), rtol=1e-12)
    assert y.max() - 1e-12 * abs(y.max()) <= val(s) <= y.max() + mu * math.log(k) + 1e-12 * abs(val(s))
    np.testing.assert_allclose(npy(grad_of(s, x)), lam * softmax(y / mu), rtol=1e-9, atol=1e-300)


def test_c38_stch_limits_and_equal_terms():
    x = t64([2.0, 2.0, 2.0, 2.0])
    assert val(scalarize(x, "stch", mu=0.3)) == 0.5 + 0.3 * math.log(4)  # y_i = c = 1/2: c + μ log K
    losses = t64([1.0, 3.0, 2.0])
    lam = np.array([0.5, 0.2, 0.3])
    assert val(scalarize(losses, "stch", mu=1e-6, pref=lam.tolist())) == pytest.approx(0.6, abs=1e-5)
    np.testing.assert_allclose(npy(weights_of(losses, "stch", mu=1e9, pref=lam.tolist())), lam / 3, rtol=1e-8)
    for dtype in (torch.float32, torch.float64):
        big = torch.tensor([1e4, 1e4 - 1, 5.0], dtype=dtype, requires_grad=True)
        s = scalarize(big, "stch", mu=1e-3)
        g = grad_of(s, big)
        assert torch.isfinite(s) and torch.isfinite(g).all() and s.dtype == dtype
        assert val(s) == pytest.approx(1e4 / 3, rel=1e-6)


def test_c39_stch_libmtl_recipe():
    state = init_state("stch", 3, warmup_epochs=1)
    assert isinstance(state, STCHState)
    epoch0, epoch1 = [[0.5, 2.0, 3.0]], [[1.0, 4.0, 2.0], [3.0, 2.0, 4.0]]
    for batches in (epoch0, epoch1):  # warm-up, then the nadir epoch: Σ log(L + 1e-20)
        for batch in batches:
            x = t64(batch, requires_grad=True)
            s = scalarize(x, "stch", state=state, log_nadir=True)
            np.testing.assert_allclose(val(s), np.log(batch).sum(), rtol=1e-14)
            np.testing.assert_allclose(npy(grad_of(s, x)), 1 / np.array(batch), rtol=1e-14)
        state.end_epoch()
    nadir = np.array([2.0, 3.0, 3.0])
    np.testing.assert_allclose(npy(state.nadir), nadir, rtol=1e-15)
    losses, mu = np.array([1.5, 6.0, 0.9]), 0.7
    x = t64(losses, requires_grad=True)
    s = scalarize(x, "stch", state=state, log_nadir=True, mu=mu)
    f = np.log(losses / nadir)
    np.testing.assert_allclose(npy(grad_of(s, x)), 3 * softmax(f / mu) / losses, rtol=1e-12)
    np.testing.assert_allclose(val(s), 3 * mu * logsumexp((f - f.max()) / mu), rtol=1e-12)  # the max left out
    state.end_epoch()  # nothing changes after the nadir epoch
    np.testing.assert_allclose(npy(state.nadir), nadir, rtol=1e-15)


# --- C40 pbi, C41 cosmos ---------------------------------------------------------------------------


def test_c40_pbi():
    w = [1.0, 2.0, 2.0]  # ‖w‖ = 3
    z = np.array([0.5, -1.0, 0.0])
    losses = t64(2.0 * np.array(w) + z)
    np.testing.assert_allclose(val(scalarize(losses, "pbi", theta=5.0, pref=w, ref=z.tolist())), 6.000005,
                               rtol=1e-12)
    other = np.array([0.3, 4.0, 1.0])
    np.testing.assert_allclose(val(scalarize(t64(other), "pbi", theta=0.0, pref=w)), other @ np.array(w) / 3,
                               rtol=1e-14)
    shifted = other - z
    d1 = shifted @ np.array(w) / 3
    p = shifted - d1 * np.array(w) / 3
    d2 = np.sqrt(p @ p + 1e-12)
    x = t64(other, requires_grad=True)
    s = scalarize(x, "pbi", theta=5.0, pref=w, ref=z.tolist())
    np.testing.assert_allclose(val(s), d1 + 5 * d2, rtol=1e-14)
    np.testing.assert_allclose(npy(grad_of(s, x)), np.array(w) / 3 + 5 * p / d2, rtol=1e-12)


@given(losses=loss_vectors(), a=st.floats(0.01, 100), lam=st.floats(0, 8), seed=st.integers(0, 1000))
def test_c41_cosmos(losses, a, lam, seed):
    r = np.random.default_rng(seed).uniform(0.05, 1.0, size=len(losses))
    np.testing.assert_allclose(val(scalarize(t64(losses), "cosmos", lambda_=0.0, pref=r.tolist())), r @ losses,
                               rtol=1e-13)
    np.testing.assert_allclose(val(scalarize(t64(a * r), "cosmos", lambda_=lam, pref=r.tolist())),
                               a * (r @ r) - lam, rtol=1e-12, atol=1e-12 * (1 + lam))
    cos = r @ losses / (np.linalg.norm(r) * np.linalg.norm(losses))
    np.testing.assert_allclose(val(scalarize(t64(losses), "cosmos", lambda_=lam, pref=r.tolist())),
                               r @ losses - lam * cos, rtol=1e-12, atol=1e-12 * (1 + lam))


# --- C42 random ------------------------------------------------------------------------------------


def test_c42_random():
    x = t64([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    w = npy(grad_of(scalarize(x, "random", generator=gen(5)), x))
    np.testing.assert_allclose(w, npy(torch.softmax(torch.randn(4, generator=gen(5), dtype=torch.float64), 0)),
                               rtol=1e-15)
    assert (w > 0).all() and w.sum() == pytest.approx(1.0, rel=1e-14)
    np.testing.assert_array_equal(npy(weights_of(x, "rlw", generator=gen(5))), w)
    np.testing.assert_array_equal(npy(weights_of(x.flip(0) * 7, "random", generator=gen(5))), w)  # w ignores L
    # drawn in float64 whatever the losses' dtype: the draw of gradagg.weights(j, "random") on a float64 G
    np.testing.assert_allclose(npy(weights_of(x.float(), "random", generator=gen(5))), w, rtol=1e-6)
    g = gen(1)
    draws = np.stack([npy(weights_of(x, "random", generator=g)) for _ in range(4000)])
    assert (draws > 0).all()
    np.testing.assert_allclose(draws.mean(0), np.full(4, 0.25), atol=4 * draws.std(0).max() / np.sqrt(4000))


def test_c42_random_matches_the_random_weighting():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    losses = ((model(x) - y) ** 2).mean(0)
    params = list(model.parameters())
    jac = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], params, retain_graph=True)])
                       for i in range(3)])
    d = gradagg.aggregate(jac, "random", generator=gen(11))
    grads = torch.autograd.grad(scalarize(losses, "random", generator=gen(11)), params)
    np.testing.assert_allclose(npy(torch.cat([g.flatten() for g in grads])), npy(d), rtol=1e-12, atol=1e-15)


# --- C43: closed forms against autograd -------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@given(losses=loss_vectors(), seed=st.integers(0, 2**32 - 1))
def test_c43_closed_form_weights_equal_autograd(method, losses, seed):
    name, options, state = configured(method, len(losses), np.random.default_rng(seed))
    x = t64(losses, requires_grad=True)
    w = weights_of(x, name, state=state, generator=gen(seed), **options)
    assert w.shape == x.shape and not w.requires_grad and w.dtype == x.dtype
    g = grad_of(scalarize(x, name, state=state, generator=gen(seed), **options), x)
    np.testing.assert_allclose(npy(w), npy(g), rtol=1e-11, atol=1e-13 * val(g.abs().max()))


@pytest.mark.parametrize("method", METHODS)
def test_c43_on_a_model_gradient_is_jacobian_transpose_weights(method):
    torch.manual_seed(1)
    k = 3
    shared = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh()).double()
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(k)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, k, dtype=torch.float64)
    feats = shared(x)
    losses = torch.stack([((heads[i](feats)[:, 0] - y[:, i]) ** 2).mean() + 0.1 for i in range(k)])
    params = list(shared.parameters())
    jac = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], params, retain_graph=True)])
                       for i in range(k)])
    name, options, state = configured(method, k, np.random.default_rng(7))
    w = weights_of(losses, name, state=state, generator=gen(3), **options)
    s = scalarize(losses, name, state=state, generator=gen(3), **options)
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(s, params)])
    np.testing.assert_allclose(npy(grad), npy(jac.T @ w), rtol=1e-10, atol=1e-13 * val(grad.abs().max()))


# --- properties ------------------------------------------------------------------------------------


SYMMETRIC = ["sum", "mean", "uw", "imtl_l", "dwa", "famo", "geometric_mean", "stch", "stch_log"]


@pytest.mark.parametrize("method", [*SYMMETRIC, "constant", "pbi", "cosmos"])
@given(losses=loss_vectors(min_k=2), data=st.data())
def test_permuting_tasks_permutes_weights(method, losses, data):
    """For the symmetric methods (fresh state; default preference) and for the others with their
    K-vectors permuted alike, w(PL) = P w(L)."""
    k = len(losses)
    perm = list(data.draw(st.permutations(range(k))))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    options = {}
    if method in ("constant", "pbi", "cosmos"):
        name, options, _ = configured(method, k, rng)
    else:
        name = "stch" if method == "stch_log" else method
        options = {"mu": 0.5} if method == "stch" else {"log_nadir": True} if method == "stch_log" else {}

    def w_of(order):
        opts = {key: (np.array(v)[order].tolist() if isinstance(v, list) else v) for key, v in options.items()}
        state = init_state(name, k) if scalarizations()[name].stateful and method != "stch" else None
        return npy(weights_of(t64(losses[order]), name, state=state, generator=gen(0), **opts))

    w = w_of(list(range(k)))
    np.testing.assert_allclose(w_of(perm), w[perm], rtol=1e-12, atol=1e-15)


@given(losses=loss_vectors(), seed=st.integers(0, 2**32 - 1))
def test_positivity_and_sums(losses, seed):
    k = len(losses)
    x = t64(losses)
    rng = np.random.default_rng(seed)
    sums = {"mean": 1.0, "random": 1.0, "famo": 1.0, "dwa": float(k)}
    for method in ["sum", "mean", "random", "uw", "imtl_l", "dwa", "famo", "geometric_mean", "stch", "stch_log"]:
        name, options, state = configured(method, k, rng)
        w = npy(weights_of(x, name, state=state, generator=gen(seed), **options))
        assert (w > 0).all(), method
        if method in sums:
            assert w.sum() == pytest.approx(sums[method], rel=1e-12), method
    # Euler's identity for the homogeneous ones: wᵀL = GM; wᵀL = rᵀL for cosmos (cos is 0-homogeneous)
    np.testing.assert_allclose(npy(weights_of(x, "geometric_mean")) @ losses, np.prod(losses) ** (1 / k),
                               rtol=1e-12)
    _, options, _ = configured("cosmos", k, rng)
    w = npy(weights_of(x, "cosmos", **options))
    np.testing.assert_allclose(w @ losses, np.array(options["pref"]) @ losses, rtol=1e-10)
    np.testing.assert_allclose(npy(weights_of(x, "stch", mu=0.4)).sum(), 1 / k, rtol=1e-12)


def test_float32_losses_give_float32_results():
    x = torch.tensor([0.5, 2.0, 3.0], requires_grad=True)
    for method in METHODS:
        name, options, state = configured(method, 3, np.random.default_rng(0))
        s = scalarize(x, name, state=state, generator=gen(), **options)
        assert s.dtype == torch.float32 and s.shape == () and torch.isfinite(s), method
        assert weights_of(x, name, state=state, generator=gen(), **options).dtype == torch.float32


def test_geometric_mean_does_not_overflow():
    for value in (1e-30, 1e30):
        x = torch.full((400,), value, dtype=torch.float32, requires_grad=True)
        s = scalarize(x, "geometric_mean")
        assert val(s) == pytest.approx(value, rel=1e-4)
        assert torch.isfinite(grad_of(s, x)).all()


# --- reduction="none" and the hybrid IMTL ----------------------------------------------------------


def test_terms_sum_to_the_scalar():
    x = t64([0.5, 2.0, 3.0])
    for method in ("sum", "mean", "constant", "random", "uw", "imtl_l", "dwa"):
        name, options, state = configured(method, 3, np.random.default_rng(0))
        terms = scalarize(x, name, state=state, generator=gen(), reduction="none", **options)
        total = scalarize(x, name, state=state, generator=gen(), **options)
        assert terms.shape == (3,)
        np.testing.assert_allclose(val(terms.sum()), val(total), rtol=1e-15)
    state = init_state("uw", 3)
    with torch.no_grad():
        state.s.copy_(t64([0.1, -0.2, 0.3]))
    np.testing.assert_allclose(npy(scalarize(x, "uw", state=state, reduction="none")),
                               0.5 * np.exp(-np.array([0.1, -0.2, 0.3])) * npy(x) + 0.5 * np.array([0.1, -0.2, 0.3]),
                               rtol=1e-15)


def test_hybrid_imtl_feeds_imtl_g_and_trains_s():
    torch.manual_seed(2)
    shared = torch.nn.Linear(4, 5).double()
    heads = torch.nn.ModuleList(torch.nn.Linear(5, 1) for _ in range(3)).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    feats = shared(x)
    losses = torch.stack([((heads[i](feats)[:, 0] - y[:, i]) ** 2).mean() for i in range(3)])
    state = init_state("imtl_l", 3)
    with torch.no_grad():
        state.s.copy_(t64([0.2, -0.1, 0.4]))
    opt = torch.optim.Adam([*shared.parameters(), *heads.parameters(), *state.parameters()], lr=1e-2)
    terms = scalarize(losses, "imtl_l", state=state, reduction="none")
    w = gradagg.backward(terms, shared, "imtl_g")
    assert state.s.grad is not None and bool((state.s.grad != 0).all())
    expected = npy(w) * (np.exp([0.2, -0.1, 0.4]) * npy(losses) - 1)  # w_i ∂term_i/∂s_i
    np.testing.assert_allclose(npy(state.s.grad), expected, rtol=1e-10)
    assert all(p.grad is not None for p in shared.parameters())
    before = state.s.detach().clone()
    opt.step()
    assert not torch.equal(before, state.s.detach())


# --- states ----------------------------------------------------------------------------------------


def advance(method, state, rng, k, steps=3):
    """Drive a state through a few calls; returns the outputs (values and weights)."""
    out = []
    name = "stch" if method == "stch_log" else method
    options = {"log_nadir": True} if method == "stch_log" else {}
    for _ in range(steps):
        losses = t64(rng.uniform(0.5, 2.0, size=k))
        out.append(weights_of(losses, name, state=state, **options))
        out.append(scalarize(losses, name, state=state, **options).detach())
        if method == "famo":
            state.update(losses * 0.9)
        if method in ("dwa", "stch_log"):
            state.end_epoch()
    return out


@pytest.mark.parametrize("method", ["uw", "imtl_l", "dwa", "famo", "stch_log"])
def test_state_round_trip_is_bit_exact(method):
    k = 4
    name = "stch" if method == "stch_log" else method
    options = {"lr": 0.2, "min_losses": [0.1, 0.0, 0.0, 0.05]} if method == "famo" else \
        {"warmup_epochs": 1} if method == "stch_log" else {"init": -0.5} if method in ("uw", "imtl_l") else {}
    state = init_state(name, k, **options)
    if method in ("uw", "imtl_l"):
        with torch.no_grad():
            state.s.add_(t64([0.1, 0.2, -0.3, 0.4]))
    advance(method, state, np.random.default_rng(0), k)
    if method == "famo":  # a checkpoint between scalarize and update
        scalarize(t64([1.0, 2.0, 0.5, 0.7]), "famo", state=state)
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    restored = init_state(name, k)  # default options: the checkpoint's are restored
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.options == state.options
    if method == "famo":
        for st_ in (state, restored):
            st_.update(t64([0.9, 1.5, 0.4, 0.7]))
    a = advance(method, state, np.random.default_rng(1), k)
    b = advance(method, restored, np.random.default_rng(1), k)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for (key, x), (key2, y) in zip(state.state_dict().items(), restored.state_dict().items()):
        assert key == key2 and (x == y if key == "_extra_state" else torch.equal(x, y)), key


def test_state_reset_to_and_parameters():
    state = init_state("famo", 3)
    advance("famo", state, np.random.default_rng(0), 3)
    assert not torch.equal(state.xi, torch.zeros(3, dtype=torch.float64))
    state.reset()
    assert torch.equal(state.xi, torch.zeros(3, dtype=torch.float64)) and int(state.step) == 0
    assert list(state.parameters()) == []
    uw = init_state("uw", 3, dtype=torch.float32)
    assert [p.shape for p in uw.parameters()] == [(3,)] and uw.dtype == torch.float32
    uw.to(torch.float64)
    assert uw.s.dtype == torch.float64 and isinstance(uw.s, torch.nn.Parameter)
    assert isinstance(init_state("imtl_l", 2), IMTLLState) and isinstance(init_state("famo", 2), FAMOState)


def test_state_moves_to_the_first_device_unless_placed():
    """meta tensors stand in for an accelerator: an unplaced state follows the losses; a placed one
    refuses them."""
    losses = torch.ones(3, dtype=torch.float64, device="meta")
    free = init_state("dwa", 3)
    scalarize(losses, "dwa", state=free)
    assert free.device.type == "meta"
    for placed in (init_state("dwa", 3, device="cpu"), init_state("dwa", 3).to("cpu")):
        with pytest.raises(ValueError, match=r"state is on cpu but the losses are on meta.*state.to\('meta'\)"):
            scalarize(losses, "dwa", state=placed)


def test_registry():
    info = scalarizations()
    assert set(info) == {"sum", "mean", "constant", "random", "uw", "imtl_l", "dwa", "famo", "geometric_mean",
                         "stch", "pbi", "cosmos"}
    assert {n for n, i in info.items() if i.stateful} == {"uw", "imtl_l", "dwa", "famo", "stch"}
    assert {n for n, i in info.items() if i.trainable} == {"uw", "imtl_l"}
    assert {n for n, i in info.items() if i.random} == {"random"}
    assert {n for n, i in info.items() if i.terms} == {"sum", "mean", "constant", "random", "uw", "imtl_l", "dwa"}
    assert "gls" in info["geometric_mean"].aliases
    assert info["famo"].state_options["lr"] == 0.025 and info["famo"].state_options["weight_decay"] == 1e-3
    assert info["dwa"].options == {"T": 2.0} and info["uw"].state_options == {"init": 0.0}
    assert info["stch"].state_options == {"warmup_epochs": 4}


# --- misuse ----------------------------------------------------------------------------------------


X = t64([0.5, 2.0, 3.0])


@pytest.mark.parametrize(("call", "error", "pattern"), [
    (lambda: scalarize(X, "famoo"), ValueError, r"unknown loss weighting 'famoo'.*Did you mean 'famo'"),
    (lambda: scalarize(X, 3), TypeError, "method must be a string"),
    (lambda: scalarize(X, "pbi", tehta=1.0, pref=[1, 1, 1]), ValueError, r"unknown option 'tehta'.*'theta'"),
    (lambda: scalarize(X, "pbi", pref=[1, 1, 1]), ValueError, "requires the option 'theta'"),
    (lambda: scalarize(X, "constant"), ValueError, "requires the option 'weights'"),
    (lambda: scalarize(X, "cosmos", pref=[1, 1, 1]), ValueError, "requires the option 'lambda_'"),
    (lambda: scalarize(X, "stch"), ValueError, "requires the option 'mu'.*log_nadir=True"),
    (lambda: scalarize(X, "stch", mu=-1.0), ValueError, "'mu' must be > 0"),
    (lambda: scalarize(X, "pbi", theta=-1.0, pref=[1, 1, 1]), ValueError, "'theta' must be ≥ 0"),
    (lambda: scalarize(X, "pbi", theta=1.0, pref=[1, 1]), ValueError, "'pref' must have length K=3"),
    (lambda: scalarize(X, "cosmos", lambda_=1.0, pref=[1, -1, 1]), ValueError, "'pref' must be nonnegative"),
    (lambda: scalarize(X, "stch", mu=1.0, log_nadir=True, pref=[1, 1, 1], state=init_state("stch", 3)),
     ValueError, "pref apply to the plain"),
    (lambda: scalarize(X, "stch", mu=1.0, log_nadir=1), TypeError, "'log_nadir' must be True or False"),
    (lambda: scalarize(X, "dwa", T=0.0, state=init_state("dwa", 3)), ValueError, "'T' must be > 0"),
    (lambda: scalarize(X, "famo", lr=0.1, state=init_state("famo", 3)), ValueError,
     r"'lr' is an option of the state of 'famo'.*gradagg.init\('famo', num_tasks=3, lr=...\)"),
    (lambda: init_state("dwa", 3, T=1.0), ValueError, "'T' is an option of gradagg.scalarize"),
    (lambda: init_state("famo", 3, betas=(1.0, 0.9)), ValueError, r"betas\[0\] must be a real number in \[0, 1\)"),
    (lambda: init_state("famo", 3, lrr=0.1), ValueError, r"unknown option 'lrr'.*'lr'"),
    (lambda: init_state("famo", 3, min_losses=[0.0, 0.0]), ValueError, "'min_losses' must have length K=3"),
    (lambda: init_state("stch", 3, warmup_epochs=-1), ValueError, "'warmup_epochs' must be an int ≥ 0"),
    (lambda: init_state("sum", 3), ValueError, "stateless and needs no state; stateful loss weightings: dwa, famo"),
    (lambda: init_state("uw", 0), ValueError, "num_tasks must be a positive int"),
    (lambda: scalarize(X.reshape(3, 1), "sum"), ValueError, r"1-D Tensor \[K\].*got shape \(3, 1\)"),
    (lambda: scalarize(X[0], "sum"), ValueError, r"1-D Tensor \[K\]"),
    (lambda: scalarize(X[:0], "sum"), ValueError, r"K ≥ 1"),
    (lambda: scalarize([1.0, 2.0], "sum"), TypeError, "torch.stack"),
    (lambda: scalarize(torch.tensor([1, 2]), "sum"), TypeError, "real floating point"),
    (lambda: scalarize(t64([1.0, float("nan")]), "sum"), ValueError, "losses must be finite"),
    (lambda: scalarize(t64([1.0, float("inf")]), "mean"), ValueError, "losses must be finite"),
    (lambda: scalarize(t64([1.0, 0.0]), "geometric_mean"), ValueError, "must be positive"),
    (lambda: scalarize(t64([1.0, -1.0]), "stch", log_nadir=True, state=init_state("stch", 2)), ValueError,
     "must be positive"),
    (lambda: scalarize(t64([1.0, 0.1]), "famo", state=init_state("famo", 2, min_losses=[0.0, 0.2])), ValueError,
     "above min_losses"),
    (lambda: scalarize(t64([0.0, 0.0]), "cosmos", lambda_=1.0, pref=[1, 1]), ValueError, "must not all be zero"),
    (lambda: scalarize(X, "uw"), ValueError, r"'uw' is stateful.*gradagg.init\('uw', num_tasks=3\)"),
    (lambda: scalarize(X, "stch", log_nadir=True), ValueError, "with log_nadir=True is stateful"),
    (lambda: scalarize(X, "stch", mu=1.0, state=init_state("stch", 3)), ValueError, "pass log_nadir=True"),
    (lambda: scalarize(X, "sum", state=init_state("uw", 3)), ValueError, "stateless and takes no state"),
    (lambda: scalarize(X, "uw", state=init_state("imtl_l", 3)), ValueError, "made for 'imtl_l', not 'uw'"),
    (lambda: scalarize(X, "dwa", state=init_state("dwa", 4)), ValueError, "made for K=4 tasks but the losses have K=3"),
    (lambda: scalarize(X, "famo", state=gradagg.init("nsgd", 3)), TypeError, "gradient weighting 'nsgd'"),
    (lambda: scalarize(X, "famo", state=init_state("famo", 3), reduction="none"), ValueError,
     "reduction='none'.*available for: sum, mean"),
    (lambda: scalarize(X, "sum", reduction="mean"), ValueError, "reduction must be 'sum'"),
    (lambda: scalarize(X, "random", generator=3), TypeError, "generator must be a torch.Generator"),
    (lambda: init_state("famo", 3).update(X), ValueError, "update\\(\\) needs the losses of a scalarize"),
    (lambda: init_state("famo", 3).update(t64([1.0, 2.0])), ValueError, "made for K=3 tasks"),
    (lambda: init_state("dwa", 3).end_epoch(), ValueError, "end_epoch\\(\\) was called with no scalarize"),
    (lambda: init_state("stch", 3, warmup_epochs=0).end_epoch(), ValueError, "records the nadir"),
    (lambda: init_state("dwa", 3).load_state_dict(init_state("dwa", 4).state_dict()), ValueError,
     "for 'dwa' with K=3; the state_dict is for 'dwa' with K=4"),
    (lambda: init_state("uw", 3).load_state_dict(init_state("imtl_l", 3).state_dict()), ValueError,
     "the state_dict is for 'imtl_l'"),
    (lambda: init_state("uw", 3).load_state_dict({"s": torch.zeros(3)}), ValueError, "no '_extra_state'"),
])
def test_misuse_is_refused_clearly(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_famo_update_is_used_once_and_checks_losses():
    state = init_state("famo", 2)
    scalarize(t64([1.0, 2.0]), "famo", state=state)
    with pytest.raises(ValueError, match="above min_losses"):
        state.update(t64([1.0, 0.0]))
    state.update(t64([0.9, 1.9]))
    with pytest.raises(ValueError, match="since the previous update"):
        state.update(t64([0.8, 1.8]))


def test_dwa_refuses_non_positive_epoch_means_and_check_finite_false_skips_checks():
    state = init_state("dwa", 2)
    scalarize(t64([1.0, -1.0]), "dwa", state=state)
    with pytest.raises(ValueError, match="finite and positive"):
        state.end_epoch()
    assert torch.isnan(scalarize(t64([1.0, float("nan")]), "sum", check_finite=False))
    with pytest.raises(TypeError, match="check_finite"):
        scalarize(X, "sum", check_finite="yes")


def test_load_restores_nothing_when_refused():
    state = init_state("dwa", 3)
    run_epoch(state, [[1.0, 2.0, 3.0]])
    before = {k: v.clone() for k, v in state.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError):
        state.load_state_dict(init_state("famo", 3).state_dict())
    for key, value in before.items():
        assert torch.equal(state.state_dict()[key], value)
    assert isinstance(state, ScalarizationState)


# --- peer check: TorchJD 0.18's scalarizers --------------------------------------------------------


def test_agrees_with_torchjd_scalarization():
    tj = pytest.importorskip("torchjd.scalarization", reason="torchjd (with its scalarization module) is not installed")
    rng = np.random.default_rng(4)
    k = 4
    values = rng.uniform(0.3, 3.0, size=k)
    pref = rng.uniform(0.1, 1.0, size=k)
    ref = -rng.uniform(size=k)

    def compare(ours, theirs, make_state=lambda: None, seed=None, **options):
        x1, x2 = t64(values, requires_grad=True), t64(values, requires_grad=True)
        if seed is not None:
            torch.manual_seed(seed)
        s2 = theirs(x2)
        s1 = scalarize(x1, ours, state=make_state(), generator=None if seed is None else gen(seed), **options)
        np.testing.assert_allclose(val(s1), val(s2), rtol=1e-12)
        np.testing.assert_allclose(npy(grad_of(s1, x1)), npy(grad_of(s2, x2)), rtol=1e-11, atol=1e-15)

    compare("sum", tj.Sum())
    compare("mean", tj.Mean())
    compare("constant", tj.Constant(t64(pref)), weights=pref.tolist())
    compare("random", tj.Random(), seed=17)
    compare("geometric_mean", tj.GeometricMean())
    compare("stch", tj.STCH(0.3, weights=t64(pref), reference=t64(ref)), mu=0.3, pref=pref.tolist(), ref=ref.tolist())
    compare("pbi", tj.PBI(5.0, weights=t64(pref), reference=t64(ref)), theta=5.0, pref=pref.tolist(),
            ref=ref.tolist())
    compare("cosmos", tj.COSMOS(2.0, weights=t64(pref)), lambda_=2.0, pref=pref.tolist())
    s = rng.standard_normal(k)
    for name, cls, attribute in (("uw", tj.UW, "log_var"), ("imtl_l", tj.IMTLL, "log_scale")):
        theirs = cls(k).double()
        with torch.no_grad():
            getattr(theirs, attribute).copy_(t64(s))

        def state(name=name):
            st_ = init_state(name, k)
            with torch.no_grad():
                st_.s.copy_(t64(s))
            return st_

        compare(name, theirs, state)

    # dwa and famo over several steps
    ours_dwa, theirs_dwa = init_state("dwa", k), tj.DWA(temperature=1.5)
    ours_famo, theirs_famo = init_state("famo", k, lr=0.1), tj.FAMO(k, lr=0.1).double()
    for step in range(6):
        batch = t64(rng.uniform(0.3, 3.0, size=k))
        x1, x2 = batch.clone().requires_grad_(), batch.clone().requires_grad_()
        s1, s2 = scalarize(x1, "dwa", state=ours_dwa, T=1.5), theirs_dwa(x2)
        np.testing.assert_allclose(npy(grad_of(s1, x1)), npy(grad_of(s2, x2)), rtol=1e-13)
        if step % 2 == 1:
            ours_dwa.end_epoch()
            theirs_dwa.step()
        x1, x2 = batch.clone().requires_grad_(), batch.clone().requires_grad_()
        s1, s2 = scalarize(x1, "famo", state=ours_famo), theirs_famo(x2)
        np.testing.assert_allclose(val(s1), val(s2), rtol=1e-12)
        np.testing.assert_allclose(npy(grad_of(s1, x1)), npy(grad_of(s2, x2)), rtol=1e-11)
        after = batch * t64(rng.uniform(0.5, 1.0, size=k))
        ours_famo.update(after)
        theirs_famo.update(after)
        np.testing.assert_allclose(npy(ours_famo.xi), npy(theirs_famo._w), rtol=1e-9, atol=1e-14)


def test_top_level_entry_points():
    """gradagg.scalarize / gradagg.scalarizations / gradagg.init reach the loss weightings; a
    gradient method's options are refused by init, and the names that both families share stay
    gradient methods there."""
    import gradagg

    st = gradagg.init("famo", 3, lr=0.01)
    assert isinstance(st, FAMOState) and st.options["lr"] == 0.01
    assert isinstance(gradagg.init("uw", 2), UWState)
    losses = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(gradagg.scalarize(losses, "famo", state=st), losses)
    torch.testing.assert_close(grad, torch.tensor([0.7059, 0.1765, 0.1176], dtype=torch.float64), atol=1e-4, rtol=0)
    assert set(gradagg.scalarizations()) >= {"uw", "dwa", "famo", "geometric_mean", "imtl_l", "stch", "pbi", "cosmos"}
    with pytest.raises(ValueError, match="only for loss weightings"):
        gradagg.init("nash_mtl", 3, lr=0.1)
    with pytest.raises(ValueError, match="stateless"):
        gradagg.init("random", 3)
