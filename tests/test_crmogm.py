"""crmogm: the weights of an inner weighting smoothed across calls (METHODS.md C22, C23).

Every expected value is computed here from the inner method run on its own (``gradagg.weights``
with its own state, advanced in parallel) and the written-out recurrence's closed form, never from
crmogm's outputs.
"""

import io

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import gradagg
from gradagg import _device
from gradagg._gramian import clean_gramian
from gradagg._methods.crmogm import inner_uses_losses
from gradagg._registry import lookup

from asserts import npy
from strategies import cases

K = 4
STATELESS_INNERS = ["upgrad", "mgda", "imtl_g", ("upgrad", {"pref": [1.0, 2.0, 3.0, 4.0]})]
STATEFUL_INNERS = [("nash_mtl", {"update_every": 2}), "nash_mtl", "gradvac"]


def jacobians(n=5, k=K, d=9, seed=0):
    """n Jacobians that change from call to call, each with a conflict (nontrivial active sets)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        j = rng.standard_normal((k, d))
        if k > 1:
            j[1] = -0.6 * j[0] + 0.4 * j[1]
        out.append(torch.tensor(j))
    return out


def name_of(inner):
    return inner if isinstance(inner, str) else inner[0]


def options_of(inner):
    return {} if isinstance(inner, str) else dict(inner[1])


def make(inner, k=K):
    return gradagg.init([("crmogm", {"inner": inner})], k)


class Alone:
    """The inner method run by itself, with its own fresh state (the independent ŵ_j)."""

    def __init__(self, inner, k=K):
        self.name, self.options = name_of(inner), options_of(inner)
        self.state = gradagg.init(self.name, k) if gradagg.methods()[self.name].stateful else None

    def __call__(self, j, **extra):
        return gradagg.weights(j, self.name, state=self.state, **self.options, **extra)


def in_range(j, w, inner):
    """ŵ as crmogm smooths it: for an inner whose weights may grow without bound along G's null space
    (nash_mtl, fairgrad), without those components (the library's range projector of the clean G,
    itself tested in test_numerics/test_weightings); else as it is."""
    if not lookup(name_of(inner)).unbounded_null:
        return w
    _, proj = clean_gramian([j.detach()], True, gradagg.gramian_noise(j))
    return w if proj is None else proj.to(w.dtype) @ w


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def closed_form(w_hat, alphas, w0):
    """w_k = (Π_{i≤k} α_i) w_0 + Σ_{j≤k} (1 − α_j) (Π_{j<i≤k} α_i) ŵ_j, for every k (α_k may vary)."""
    out = []
    for k in range(1, len(w_hat) + 1):
        w = np.prod(alphas[:k]) * w0
        for j in range(1, k + 1):
            w = w + (1 - alphas[j - 1]) * np.prod(alphas[j:k]) * w_hat[j - 1]
        out.append(w)
    return out


# --- C22 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", STATELESS_INNERS + STATEFUL_INNERS, ids=str)
@pytest.mark.parametrize("init", [None, [0.1, 0.2, 0.3, 0.4]])
def test_c22_alpha_zero_gives_the_inner_weights_exactly(inner, init):
    state, alone = make(inner), Alone(inner)
    for t, j in enumerate(jacobians()):
        got = gradagg.weights(j, "crmogm", inner=inner, alpha=0.0, init=init, state=state, generator=gen(t))
        assert torch.equal(got, alone(j, generator=gen(t))), t


@pytest.mark.parametrize("inner", STATELESS_INNERS + STATEFUL_INNERS, ids=str)
def test_c22_alpha_one_freezes_w0(inner):
    jacs = jacobians()
    w1 = Alone(inner)(jacs[0], generator=gen(0))  # ŵ_1
    state, init = make(inner), torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    state_init = make(inner)
    for t, j in enumerate(jacs):
        assert torch.equal(gradagg.weights(j, "crmogm", inner=inner, alpha=1.0, state=state, generator=gen(t)), w1)
        got = gradagg.weights(j, "crmogm", inner=inner, alpha=1.0, init=init, state=state_init, generator=gen(t))
        assert torch.equal(got, init)
    assert int(state.step) == len(jacs)


# --- C23 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", STATELESS_INNERS + STATEFUL_INNERS, ids=str)
@pytest.mark.parametrize("alpha", [0.3, 0.9])
@pytest.mark.parametrize("init", [None, [0.5, -0.25, 1.0, 2.0]])
def test_c23_closed_form_over_five_calls(inner, alpha, init):
    jacs = jacobians(seed=1)
    state, alone = make(inner), Alone(inner)
    got = [npy(gradagg.weights(j, "crmogm", inner=inner, alpha=alpha, init=init, state=state, generator=gen(t)))
           for t, j in enumerate(jacs)]
    w_hat = [npy(alone(j, generator=gen(t))) for t, j in enumerate(jacs)]
    w0 = w_hat[0] if init is None else np.array(init)
    for k, (g, e) in enumerate(zip(got, closed_form(w_hat, [alpha] * len(jacs), w0))):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-12, err_msg=f"call {k + 1}")
    if init is None:  # without init, the first call is ŵ_1 whatever α
        np.testing.assert_array_equal(got[0], w_hat[0])


@given(case=cases(max_k=6, max_d=12), alpha=st.floats(0.0, 1.0), with_init=st.booleans(),
       inner=st.sampled_from(["upgrad", "mgda", "imtl_g", "nash_mtl"]), data=st.data())
def test_c23_closed_form_on_hard_jacobians(case, alpha, with_init, inner, data):
    rng = np.random.default_rng(case.seed)
    base = case.numpy()
    jacs = [torch.tensor(base * (1 + 0.2 * t) + 0.1 * rng.standard_normal(base.shape) * case.scale)
            for t in range(5)]
    init = data.draw(st.lists(st.floats(-3, 3), min_size=case.k, max_size=case.k)) if with_init else None
    state, alone = make(inner, case.k), Alone(inner, case.k)
    got = [npy(gradagg.weights(j, "crmogm", inner=inner, alpha=alpha, init=init, state=state)) for j in jacs]
    w_hat = [npy(in_range(j, alone(j), inner)) for j in jacs]
    w0 = w_hat[0] if init is None else np.array(init)
    scale = max(1.0, max(np.abs(w).max() for w in w_hat), np.abs(w0).max())
    for g, e in zip(got, closed_form(w_hat, [alpha] * 5, w0)):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-12 * scale)


def test_alpha_may_change_between_calls():
    """The α_k schedule of Corollary 1 as TorchJD's example writes it: α_k = 1 − lr_k/lr_0."""
    jacs = jacobians(6, seed=2)
    lrs = [0.1, 0.1, 0.05, 0.03, 0.01, 0.001]
    alphas = [1 - lr / lrs[0] for lr in lrs]
    state, alone = make("nash_mtl"), Alone("nash_mtl")
    got = [npy(gradagg.weights(j, "crmogm", inner="nash_mtl", alpha=a, state=state)) for j, a in zip(jacs, alphas)]
    w_hat = [npy(alone(j)) for j in jacs]
    for g, e in zip(got, closed_form(w_hat, alphas, w_hat[0])):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("inner", ["mean", ("constant", {"weights": [0.5, 3.0, 0.0, 1.25]})], ids=str)
@pytest.mark.parametrize("alpha", [0.0, 0.37, 0.9, 1.0])
def test_constant_inner_weights_stay_constant(inner, alpha):
    c = np.full(K, 1 / K) if inner == "mean" else np.array(inner[1]["weights"])
    state = make(inner)
    for t, j in enumerate(jacobians(6, seed=3)):
        np.testing.assert_allclose(npy(gradagg.weights(j, "crmogm", inner=inner, alpha=alpha, state=state)), c,
                                   rtol=1e-15, atol=0, err_msg=f"call {t + 1}")


@given(case=cases(max_k=6, max_d=12, kinds=("random", "opposite", "duplicate", "zero_row", "norm_spread")),
       alpha=st.floats(0.0, 1.0), inner=st.sampled_from(["mgda", "random", "mean"]), with_init=st.booleans())
def test_simplex_inner_and_init_give_simplex_weights(case, alpha, inner, with_init):
    rng = np.random.default_rng(case.seed)
    init = rng.dirichlet(np.ones(case.k)).tolist() if with_init else None
    state, alone = make(inner, case.k), Alone(inner, case.k)
    for t in range(5):
        j = torch.tensor(case.numpy() * (1 + 0.3 * t))
        w_hat = npy(alone(j, generator=gen(t)))
        assume((w_hat >= 0).all() and abs(w_hat.sum() - 1) < 1e-12)  # the premise: ŵ in Δ
        w = npy(gradagg.weights(j, "crmogm", inner=inner, alpha=alpha, init=init, state=state, generator=gen(t)))
        assert (w >= 0).all() and abs(w.sum() - 1) < 1e-12, (t, w)


# --- the inner state -----------------------------------------------------------------------------


@pytest.mark.parametrize("inner", STATEFUL_INNERS, ids=str)
def test_inner_state_advances_exactly_as_alone(inner):
    state, alone = make(inner), Alone(inner)
    name = name_of(inner)
    assert set(state.fields) == {"w_prev", "step"} | {f"inner_{f}" for f in alone.state.fields}
    for t, j in enumerate(jacobians(6, seed=4)):
        gradagg.aggregate(j, "crmogm", inner=inner, alpha=0.8, state=state, generator=gen(t))
        alone(j, generator=gen(t))
        for field in alone.state.fields:
            assert torch.equal(getattr(state, f"inner_{field}"), getattr(alone.state, field)), (t, field)
    assert int(state.step) == 6 and name in repr(state)


def test_state_lifecycle_reset_to_and_dtype():
    state = make("nash_mtl")
    j = jacobians(1)[0]
    first = gradagg.weights(j, "crmogm", inner="nash_mtl", state=state)
    assert int(state.inner_step) == 1 and (state.inner_alpha > 0).all() and torch.equal(state.w_prev, first)
    state.reset()
    assert all(not getattr(state, n).any() for n in state.fields) and state.fields["inner_alpha"]
    assert torch.equal(gradagg.weights(j, "crmogm", inner="nash_mtl", state=state), first)  # restarts at ŵ_1
    state.to(dtype=torch.float32)
    assert state.w_prev.dtype == state.inner_alpha.dtype == torch.float32
    assert state.step.dtype == state.inner_step.dtype == torch.int64
    gradagg.weights(j, "crmogm", inner="nash_mtl", state=state)
    assert state.inner_alpha.dtype == torch.float32 and int(state.inner_step) == 2


@pytest.mark.parametrize("inner", ["upgrad", ("nash_mtl", {"update_every": 2}), "gradvac"], ids=str)
def test_checkpoint_mid_run_resumes_bit_identically(inner):
    jacs = jacobians(6, seed=5)
    straight = make(inner)
    expected = [gradagg.aggregate(j, "crmogm", inner=inner, alpha=0.7, state=straight, generator=gen(t))
                for t, j in enumerate(jacs)]
    interrupted = make(inner)
    for t, j in enumerate(jacs[:3]):
        gradagg.aggregate(j, "crmogm", inner=inner, alpha=0.7, state=interrupted, generator=gen(t))
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = make(inner).load_state_dict(torch.load(buffer))
    for t, j in enumerate(jacs[3:], start=3):
        got = gradagg.aggregate(j, "crmogm", inner=inner, alpha=0.7, state=resumed, generator=gen(t))
        assert torch.equal(got, expected[t]), t
    for name in straight.fields:
        assert torch.equal(getattr(resumed, name), getattr(straight, name)), name
    with pytest.raises(ValueError, match=f"wraps 'mgda'; the state_dict wraps {name_of(inner)!r}"):
        make("mgda").load_state_dict(straight.state_dict())


# --- routes and entry points ---------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["upgrad", ("nash_mtl", {"update_every": 2}), "gradvac"], ids=str)
def test_host_route_equals_the_cpu_route_and_advances_the_same_state(inner):
    states = [make(inner), make(inner), make(inner)]  # CPU route, host route, the two in turn
    for t, j in enumerate(jacobians(4, seed=6)):
        expected = gradagg.aggregate(j, "crmogm", inner=inner, alpha=0.6, state=states[0], generator=gen(t))
        with _device.use_solver("host"):
            assert _device.placement(j) == "host"
            got = gradagg.aggregate(j, "crmogm", inner=inner, alpha=0.6, state=states[1], generator=gen(t))
        with _device.use_solver("host" if t % 2 else None):
            mixed = gradagg.aggregate(j, "crmogm", inner=inner, alpha=0.6, state=states[2], generator=gen(t))
        assert torch.equal(got, expected) and torch.equal(mixed, expected), t
        for name in states[0].fields:
            assert torch.equal(getattr(states[1], name), getattr(states[0], name)), (t, name)
            assert torch.equal(getattr(states[2], name), getattr(states[0], name)), (t, name)
    g = j @ j.T
    expected = gradagg.weights_from_gramian(g, "crmogm", inner=inner, state=states[0], generator=gen())
    with _device.use_solver("host"):
        got = gradagg.weights_from_gramian(g, "crmogm", inner=inner, state=states[1], generator=gen())
    assert torch.equal(got, expected)
    for name in states[0].fields:
        assert torch.equal(getattr(states[1], name), getattr(states[0], name)), name


def test_aggregate_gramian_and_backward_agree_with_weights():
    """aggregate combines the smoothed weights with the current J; weights_from_gramian and backward
    (over parameters) smooth the same way."""
    jacs = jacobians(4, seed=7)
    s_w, s_g, s_a = make("nash_mtl"), make("nash_mtl"), make("nash_mtl")
    for j in jacs:
        w = gradagg.weights(j, "crmogm", inner="nash_mtl", alpha=0.5, state=s_w)
        w_g = gradagg.weights_from_gramian(j @ j.T, "crmogm", inner="nash_mtl", alpha=0.5, state=s_g)
        d = gradagg.aggregate(j, "crmogm", inner="nash_mtl", alpha=0.5, state=s_a)
        torch.testing.assert_close(w_g, w, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(d, j.T @ w, rtol=1e-9, atol=1e-12)

    torch.manual_seed(0)
    model = torch.nn.Linear(5, K, dtype=torch.float64)
    x = torch.randn(16, 5, dtype=torch.float64)
    state, mirror = make("nash_mtl"), make("nash_mtl")
    for _ in range(3):
        model.zero_grad()
        losses = (model(x) - 1.0).square().mean(0)
        jac = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()),
                                                                                   retain_graph=True)])
                           for loss in losses])
        w = gradagg.backward(losses, model, "crmogm", inner="nash_mtl", alpha=0.5, state=state)
        expected = gradagg.weights(jac, "crmogm", inner="nash_mtl", alpha=0.5, state=mirror)
        torch.testing.assert_close(w, expected, rtol=1e-9, atol=1e-12)
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(grad, jac.T @ expected, rtol=1e-8, atol=1e-12)
        with torch.no_grad():
            for p, g in zip(model.parameters(), [p.grad for p in model.parameters()]):
                p -= 0.1 * g


def test_random_inner_draws_from_the_call_generator():
    assert gradagg.methods()["crmogm"].random
    state = make("random")
    for t, j in enumerate(jacobians(3, seed=8)):
        got = gradagg.weights(j, "crmogm", inner="random", alpha=0.0, state=state, generator=gen(t))
        assert torch.equal(got, gradagg.weights(j, "random", generator=gen(t)))


def test_losses_are_passed_to_the_inner_method():
    losses = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    state, alone = make("gradnorm_loss"), Alone("gradnorm_loss")
    for j in jacobians(3, seed=9):
        got = gradagg.weights(j, "crmogm", inner="gradnorm_loss", alpha=0.0, state=state, losses=losses)
        assert torch.equal(got, alone(j, losses=losses))
    with pytest.raises(ValueError, match="'gradnorm_loss' needs the task losses"):
        gradagg.weights(jacobians(1)[0], "crmogm", inner="gradnorm_loss", state=state)
    assert inner_uses_losses("gradnorm_loss") and inner_uses_losses(("gradnorm_loss", {"alpha": 1.0}))
    assert not inner_uses_losses("upgrad") and not inner_uses_losses("no such method")


def test_init_takes_a_method_and_options_pair():
    """The documented form gradagg.init(("crmogm", {"inner": ...}), K) and the one-element chain."""
    pair = gradagg.init(("crmogm", {"inner": "nash_mtl"}), K)
    chain = gradagg.init([("crmogm", {"inner": "nash_mtl"})], K)
    assert pair.state_dict().keys() == chain.state_dict().keys()
    j = jacobians(1)[0]
    assert torch.equal(gradagg.weights(j, "crmogm", inner="nash_mtl", state=pair),
                       gradagg.weights(j, "crmogm", inner="nash_mtl", state=chain))


# --- misuse --------------------------------------------------------------------------------------


def test_errors():
    j = jacobians(1)[0]
    state = make("upgrad")
    with pytest.raises(ValueError, match="requires the option 'inner'"):
        gradagg.weights(j, "crmogm", state=state)
    with pytest.raises(ValueError, match=r"needs the inner method: gradagg.init\(\('crmogm'"):
        gradagg.init("crmogm", K)
    with pytest.raises(ValueError, match=r"unknown method 'upgard'\. Did you mean 'upgrad'"):
        gradagg.weights(j, "crmogm", inner="upgard", state=state)
    with pytest.raises(ValueError, match="cannot wrap itself"):
        gradagg.weights(j, "crmogm", inner="crmogm", state=state)
    for per_coordinate in ("graddrop", "trimmed_mean"):
        with pytest.raises(ValueError, match=f"{per_coordinate!r} acts coordinate by coordinate.*upgrad"):
            make(per_coordinate)
    with pytest.raises(TypeError, match="name or a \\(name, options\\) pair"):
        gradagg.weights(j, "crmogm", inner=42, state=state)
    with pytest.raises(ValueError, match="unknown option 'prefs' for method 'upgrad'"):
        gradagg.weights(j, "crmogm", inner=("upgrad", {"prefs": [1, 1, 1, 1]}), state=state)
    with pytest.raises(ValueError, match="'alpha' must lie in"):
        gradagg.weights(j, "crmogm", inner="upgrad", alpha=1.5, state=state)
    with pytest.raises(ValueError, match="'init' must have length K=4"):
        gradagg.weights(j, "crmogm", inner="upgrad", init=[1.0, 2.0], state=state)
    with pytest.raises(ValueError, match="is stateful"):
        gradagg.weights(j, "crmogm", inner="upgrad")
    with pytest.raises(ValueError, match="made for the inner method 'upgrad', not 'nash_mtl'"):
        gradagg.weights(j, "crmogm", inner="nash_mtl", state=state)
    with pytest.raises(ValueError, match="K cannot change"):
        gradagg.weights(jacobians(1, k=3)[0], "crmogm", inner="upgrad", state=state)
    with pytest.raises(ValueError, match="made for 'crmogm', not 'nash_mtl'"):
        gradagg.weights(j, "nash_mtl", state=state)
    assert int(state.step) == 0 and not state.w_prev.any()  # refused calls leave the state alone


# --- peer ----------------------------------------------------------------------------------------


def test_matches_torchjd_crmogm_over_several_calls():
    """TorchJD 0.18's CRMOGMWeighting around its UPGrad (exact QP: no regularisation), α changed
    between calls with its setter, with and without initial weights. Same semantics as ours."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    linalg = pytest.importorskip("torchjd.linalg")
    pytest.importorskip("quadprog")
    for init in (None, [0.1, 0.2, 0.3, 0.4]):
        upgrad = aggregation.UPGradWeighting(projector=linalg.QuadprogProjector(norm_eps=0.0, reg_eps=0.0))
        peer = aggregation.CRMOGMWeighting(
            upgrad, alpha=0.9, initial_weights=None if init is None else torch.tensor(init, dtype=torch.float64))
        state = make("upgrad")
        for t, (j, alpha) in enumerate(zip(jacobians(5, seed=10), [0.9, 0.9, 0.5, 0.0, 0.8])):
            peer.alpha = alpha
            expected = peer(j @ j.T)
            got = gradagg.weights(j, "crmogm", inner="upgrad", alpha=alpha, init=init, state=state)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"call {t + 1}")


def test_weights_that_diverge_along_a_null_direction_are_not_carried_forward():
    """Opposite gradients: Nash-MTL's weights grow like ε^(-1/2) along the vanishing combination,
    which that call's d drops. Kept in w, they would meet a J that does not cancel them (‖d‖ ~ 1e7);
    crmogm smooths ŵ without them, so the next d is α·J₂ᵀ(P₁ŵ₁) + (1−α)·J₂ᵀŵ₂ with P₁ŵ₁ bounded."""
    j1 = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    j2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    alone = Alone("nash_mtl", 3)
    raw = npy(alone(j1))
    assert np.abs(raw).max() > 1e5  # the premise: the raw weights blow up along (1, 1, 0)
    state = make("nash_mtl", 3)
    gradagg.aggregate(j1, "crmogm", inner="nash_mtl", alpha=0.5, state=state)
    d2 = gradagg.aggregate(j2, "crmogm", inner="nash_mtl", alpha=0.5, state=state)
    w1 = npy(in_range(j1, torch.tensor(raw), "nash_mtl"))
    w2 = npy(alone(j2))
    expected = j2.numpy().T @ (0.5 * w1 + 0.5 * w2)
    np.testing.assert_allclose(d2.numpy(), expected, rtol=1e-9, atol=1e-9)
    assert np.linalg.norm(expected) < 10.0
