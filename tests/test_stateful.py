"""Stateful methods: recurrences and closed forms, checked against independent re-derivations."""

import io

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import gradagg

from asserts import DEVICES, STATEFUL, init_for, npy, options_for
from strategies import cases


def jac(k=3, d=6, device="cpu", seed=0, scale=1.0):
    return torch.tensor(np.random.default_rng(seed).standard_normal((k, d)) * scale, device=device)


def extra_for(method, k, device="cpu"):
    losses = {"losses": torch.linspace(1.0, 2.0, k, dtype=torch.float64, device=device)} \
        if gradagg.methods()[method].uses_losses else {}
    return {**options_for(method, k), **losses}


# --- NSGD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(max_k=6, kinds=("random", "norm_spread")), update_at=st.integers(0, 3))
def test_nsgd_recurrence(device, case, update_at):
    jacs = [torch.tensor(case.numpy() * (1 + 0.3 * t), device=device) for t in range(5)]
    state = gradagg.init("nsgd", case.k)
    ref = np.ones(case.k)
    for t, j in enumerate(jacs):
        n = np.linalg.norm(npy(j), axis=1)
        if t == update_at:
            ref = n.copy()
        alpha = (n / ref) / (n / ref).sum()
        expected = (alpha * n).sum() / n
        np.testing.assert_allclose(npy(gradagg.weights(j, "nsgd", state=state, update_at=update_at)), expected,
                                   rtol=1e-9)
        units = npy(j) / n[:, None]
        d = npy(gradagg.aggregate(j, "nsgd", state=gradagg.init("nsgd", case.k), update_at=update_at))
        direction = units.sum(0)
        if np.linalg.norm(direction) > 1e-6:  # opposite unit gradients cancel: no direction to compare
            np.testing.assert_allclose(d / np.linalg.norm(d), direction / np.linalg.norm(direction), atol=1e-9)
    assert int(state.step) == 5


# --- GradNorm ------------------------------------------------------------------------------------


def gradnorm_reference(theta, n, current, ref, alpha, lr):
    """One step by autograd on the written-out objective (independent of the closed form)."""
    th = torch.tensor(theta, requires_grad=True)
    k = len(theta)
    w = k * torch.softmax(th, 0)
    q = torch.tensor(current / ref)
    rho = q / q.mean()
    wn = w * torch.tensor(n)
    target = (wn.mean() * rho**alpha).detach()
    (wn - target).abs().sum().backward()
    return (w.detach().numpy(), theta - lr * th.grad.numpy())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["gradnorm", "gradnorm_loss"])
@given(case=cases(max_k=6, kinds=("random", "orthogonal"), scales=False), alpha=st.sampled_from([0.0, 1.0, 1.5]))
def test_gradnorm_step_and_weights(device, method, case, alpha):
    """(Unit-scale gradients: the θ step is proportional to ‖g_i‖, so large norms saturate the softmax.)"""
    state = gradagg.init(method, case.k)
    theta, ref = np.zeros(case.k), None
    rng = np.random.default_rng(case.seed)
    for t in range(4):
        j = torch.tensor(case.numpy() * rng.uniform(0.5, 2.0, (case.k, 1)), device=device)
        n = np.linalg.norm(npy(j), axis=1)
        losses = rng.uniform(0.5, 3.0, case.k)
        current = n if method == "gradnorm" else losses
        ref = current.copy() if t == 0 else ref
        w_ref, theta = gradnorm_reference(theta, n, current, ref, alpha, 0.025)
        w = npy(gradagg.weights(j, method, state=state, alpha=alpha,
                                **({"losses": torch.tensor(losses, device=device)} if method != "gradnorm" else {})))
        np.testing.assert_allclose(w, w_ref, rtol=1e-9)
        assert (w > 0).all() and abs(w.sum() - case.k) < 1e-9
        np.testing.assert_allclose(npy(state.theta), theta, rtol=1e-9, atol=1e-12)


def test_gradnorm_loss_reads_the_losses():
    """Defect g: the old loss-based GradNorm read losses the hook never passed."""
    j = jac()
    with pytest.raises(ValueError, match=r"needs the task losses: pass losses="):
        gradagg.aggregate(j, "gradnorm_loss", state=gradagg.init("gradnorm_loss", 3))
    thetas = []
    for losses in ([1.0, 1.0, 1.0], [1.0, 5.0, 1.0]):
        state = gradagg.init("gradnorm_loss", 3)
        for scale in (1.0, 1.0):
            gradagg.aggregate(j, "gradnorm_loss", state=state, losses=torch.tensor(losses) * scale)
        gradagg.aggregate(j, "gradnorm_loss", state=state, losses=torch.tensor([0.5, 0.5, 0.5]))
        thetas.append(state.theta.clone())
    assert not torch.allclose(thetas[0], thetas[1])
    with pytest.raises(ValueError, match=r"shape \[K\] = \[3\]"):
        gradagg.aggregate(j, "gradnorm_loss", state=gradagg.init("gradnorm_loss", 3), losses=torch.ones(2))


# --- GradVac -------------------------------------------------------------------------------------


def gradvac_two_tasks(jn, target, decay):
    """Two tasks have one partner each: the update on the vectors themselves."""
    out, new = [], target.copy()
    for i, j in ((0, 1), (1, 0)):
        gi, gj = jn[i].copy(), jn[j]
        phi = gi @ gj / (np.linalg.norm(gi) * np.linalg.norm(gj))
        goal = target[i, j]
        if phi < goal:
            gi += (np.linalg.norm(gi) * (goal * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - goal**2))
                   / (np.linalg.norm(gj) * np.sqrt(1 - goal**2))) * gj
        new[i, j] = (1 - decay) * goal + decay * phi
        out.append(gi)
    return np.sum(out, 0), new


@pytest.mark.parametrize("device", DEVICES)
@given(seed=st.integers(0, 2**32 - 1), d=st.integers(2, 10), decay=st.sampled_from([0.01, 0.3, 1.0]))
def test_gradvac_two_task_recurrence(device, seed, d, decay):
    rng = np.random.default_rng(seed)
    state = gradagg.init("gradvac", 2)
    target = np.zeros((2, 2))
    for _ in range(4):
        jn = rng.standard_normal((2, d))
        expected, target = gradvac_two_tasks(jn, target, decay)
        got = npy(gradagg.aggregate(torch.tensor(jn, device=device), "gradvac", state=state, decay=decay))
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(npy(state.target), target, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(min_k=2, max_k=8, kinds=("random", "norm_spread"), scales=False), seed=st.integers(0, 99))
def test_gradvac_first_step_is_pcgrad_then_diverges(device, case, seed):
    """Defect b: the old GradVac re-created its targets on every call and so was always PCGrad.
    (With D ≤ K the gradients can be exactly opposite, where both remove everything alike.)"""
    assume(case.d > case.k)
    j = case.tensor(device)
    state = gradagg.init("gradvac", case.k)
    gen = lambda: torch.Generator(device=device).manual_seed(seed)  # noqa: E731
    first = gradagg.weights(j, "gradvac", state=state, generator=gen(), decay=0.5)
    torch.testing.assert_close(first, gradagg.weights(j, "pcgrad", generator=gen()), rtol=1e-9, atol=1e-12)
    g = npy(j) @ npy(j).T
    if (g[~np.eye(case.k, dtype=bool)] > 0).all():
        return  # no conflict and positive cosines: PCGrad leaves everything alone, and so will GradVac
    assert (npy(state.target) != 0).any()  # the targets persist...
    for _ in range(3):
        later = gradagg.weights(j, "gradvac", state=state, generator=gen(), decay=0.5)
    assert not torch.allclose(later, first)  # ...and change the update


# --- Nash-MTL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_nash_mtl_orthogonal_closed_form(device):
    norms = torch.tensor([0.1, 1.0, 30.0], dtype=torch.float64, device=device)
    j = torch.diag(norms)
    alpha = gradagg.weights(j, "nash_mtl", state=gradagg.init("nash_mtl", 3))
    torch.testing.assert_close(alpha, 1.0 / norms, rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases(max_k=10, kinds=("random", "orthogonal", "norm_spread")))
def test_nash_mtl_bargaining_equation(device, case):
    jn = case.full_rank()
    g = jn @ jn.T
    state = gradagg.init("nash_mtl", case.k)
    for _ in range(2):  # the second call is warm-started from the first
        a = npy(gradagg.weights(torch.tensor(jn, device=device), "nash_mtl", state=state))
        assert (a > 0).all()
        assert (np.abs(a * (g @ a) - 1) <= 1e-6 * (a * (np.abs(g) @ a) + 1)).all()
    d = jn.T @ a
    np.testing.assert_allclose(d @ d, case.k, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_nash_mtl_update_every_and_max_norm(device):
    state = gradagg.init("nash_mtl", 3)
    j1, j2 = jac(device=device, seed=1), jac(device=device, seed=2)
    a1 = gradagg.weights(j1, "nash_mtl", state=state, update_every=2)
    a2 = gradagg.weights(j2, "nash_mtl", state=state, update_every=2)  # reused
    a3 = gradagg.weights(j2, "nash_mtl", state=state, update_every=2)  # recomputed
    torch.testing.assert_close(a2, a1)
    torch.testing.assert_close(a3, gradagg.weights(j2, "nash_mtl", state=gradagg.init("nash_mtl", 3)))
    d = gradagg.aggregate(j1, "nash_mtl", state=gradagg.init("nash_mtl", 3), max_norm=0.5)
    assert float(d.norm()) == pytest.approx(0.5, rel=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_nash_mtl_singular_is_finite_and_documented(device):
    """Two opposite gradients: no solution exists; the regularised one is finite with ‖d‖² ≤ K."""
    j = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.0, 1.0]], dtype=torch.float64, device=device)
    d = gradagg.aggregate(j, "nash_mtl", state=gradagg.init("nash_mtl", 3))
    assert torch.isfinite(d).all() and float(d @ d) <= 3 * (1 + 1e-9)


# --- states --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", STATEFUL)
def test_checkpoint_resume_is_bit_identical(device, method):
    jacs = [jac(4, 7, device, seed=s) for s in range(6)]
    gen = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731
    extra = extra_for(method, 4, device)
    straight = init_for(method, 4)
    results = [gradagg.aggregate(j, method, state=straight, generator=gen(), **extra) for j in jacs]
    interrupted = init_for(method, 4)
    for j in jacs[:3]:
        gradagg.aggregate(j, method, state=interrupted, generator=gen(), **extra)
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = init_for(method, 4).load_state_dict(torch.load(buffer))
    for j, expected in zip(jacs[3:], results[3:]):
        assert torch.equal(gradagg.aggregate(j, method, state=resumed, generator=gen(), **extra), expected)
    for name in resumed.fields:
        assert torch.equal(getattr(resumed, name), getattr(straight, name))


@pytest.mark.parametrize("method", STATEFUL)
def test_state_lifecycle(method):
    state = init_for(method, 3)
    assert not state.bound
    gradagg.aggregate(jac(), method, state=state, **extra_for(method, 3))
    assert state.device == torch.device("cpu") and int(state.step) == 1
    snapshot = state.state_dict()
    state.reset()
    assert int(state.step) == 0
    state.load_state_dict(snapshot)
    assert int(state.step) == 1
    moved = state.to(dtype=torch.float32)
    assert moved is state and all(getattr(state, n).dtype in (torch.float32, torch.int64) for n in state.fields)
    with pytest.raises(ValueError, match="K cannot change"):
        gradagg.aggregate(jac(4), method, state=state, **extra_for(method, 4))
    other = "nsgd" if method != "nsgd" else "gradvac"
    with pytest.raises(ValueError, match=f"made for {method!r}, not {other!r}"):
        gradagg.aggregate(jac(), other, state=state)
    with pytest.raises(ValueError, match="is stateful"):
        gradagg.aggregate(jac(), method, **extra_for(method, 3))
    with pytest.raises(ValueError, match="for 'nsgd' with K=5"):
        state.load_state_dict(gradagg.init("nsgd", 5).state_dict())


def test_init_refuses_stateless_and_bad_arguments():
    with pytest.raises(ValueError, match="stateless and needs no state"):
        gradagg.init("mgda", 3)
    with pytest.raises(ValueError, match="num_tasks must be a positive int"):
        gradagg.init("nsgd", 0)
    with pytest.raises(TypeError, match="gradagg state object"):
        gradagg.aggregate(jac(), "nsgd", state={"ref": 1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_state_device_binding_and_moves():
    state = gradagg.init("nsgd", 3)
    gradagg.aggregate(jac(device="cuda"), "nsgd", state=state)
    assert state.device.type == "cuda"
    with pytest.raises(ValueError, match=r"state\.to"):
        gradagg.aggregate(jac(), "nsgd", state=state)
    state.to("cpu")
    gradagg.aggregate(jac(), "nsgd", state=state)


# --- compilation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", STATEFUL)
def test_compiled_step_updates_state_as_eager(device, method):
    torch._dynamo.reset()
    k = 2 if method == "gradvac" else 3  # K = 2: one partner order, so no randomness to compare
    extra = extra_for(method, k, device)
    eager_state, compiled_state = init_for(method, k), init_for(method, k)
    step = torch.compile(lambda j, s: gradagg.aggregate(j, method, state=s, **extra), fullgraph=True)
    for seed in range(3):
        j = jac(k, 5, device, seed=seed)
        torch.testing.assert_close(step(j, compiled_state), gradagg.aggregate(j, method, state=eager_state, **extra))
    for name in eager_state.fields:
        torch.testing.assert_close(getattr(compiled_state, name), getattr(eager_state, name))
    torch._dynamo.reset()


# --- the generic numeric properties, for the stateful methods ------------------------------------


def fresh(method, j, **kw):
    k = j.shape[0] if isinstance(j, torch.Tensor) else next(iter(j.values())).shape[0]
    device = j.device if isinstance(j, torch.Tensor) else next(iter(j.values())).device
    return gradagg.aggregate(j, method, state=init_for(method, k), **extra_for(method, k, device), **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", STATEFUL)
def test_stateful_zero_single_and_non_finite(device, method):
    assert torch.equal(fresh(method, torch.zeros(3, 4, device=device)), torch.zeros(4, device=device))
    g = torch.tensor([[3.0, -4.0]], dtype=torch.float64, device=device)
    d = fresh(method, g)
    assert float(d @ g[0]) / float(d.norm() * g[0].norm()) == pytest.approx(1.0, abs=1e-12)
    bad = jac(3, 4, device)
    bad[2, 1] = float("nan")
    with pytest.raises(gradagg.NonFiniteError, match=r"tasks \[2\]"):
        fresh(method, bad)
    assert not torch.isfinite(fresh(method, bad, check_finite=False)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", STATEFUL)
@pytest.mark.parametrize("power", [-20, 20])
def test_stateful_extreme_magnitudes_in_float32(device, method, power):
    j = jac(4, 50, device, seed=5) * 10.0**power
    j32 = j.float()
    gen = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731
    d32 = fresh(method, j32, generator=gen())
    d64 = fresh(method, j32.double(), generator=gen())
    assert d32.dtype == torch.float32 and torch.isfinite(d32).all()
    cos = float(d32.double() @ d64) / float(d32.double().norm() * d64.norm())
    assert cos == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", STATEFUL)
def test_stateful_pytree_equals_flat(device, method):
    j = jac(3, 9, device, seed=4)
    tree = {"a": j[:, :4].reshape(3, 2, 2), "b": j[:, 4:]}
    out = fresh(method, tree, generator=torch.Generator(device=device).manual_seed(0))
    flat = fresh(method, j, generator=torch.Generator(device=device).manual_seed(0))
    torch.testing.assert_close(torch.cat([out["a"].reshape(-1), out["b"]]), flat)
