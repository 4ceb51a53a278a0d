"""Mixed precision (``scaler=`` and ``gradagg.amp``): with a GradScaler every method's weights and
states are those of the unscaled Jacobian, and a step the scaler skips leaves every state as it was.

GradScaler's scales are powers of two, so dividing them out is exact: the checks compare with the
unscaled call bit for bit. The unscaled call is an independent computation here: it never sees s.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import gradagg
from gradagg import _device, amp
from gradagg._registry import lookup

from asserts import CROSS, DEVICES, OpLog, options_for

K, D = 3, 40
S = 2.0**16
METHODS = sorted(gradagg.methods())
STATEFUL = sorted(m for m, info in gradagg.methods().items() if info.stateful)
WEIGHTINGS = sorted(m for m, info in gradagg.methods().items() if info.weighting)
#: Stateful weightings that ``backward`` over parameters takes (it forms no J: no K x D states, no cross=).
BACKWARD_STATEFUL = [m for m in STATEFUL if m in WEIGHTINGS and m not in CROSS]


def jacobians(seed: int, steps: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Rows of different scales and some conflict: the weights of most methods then depend on the scale of J.
    return [torch.randn(K, D, generator=g, dtype=dtype) * torch.tensor([[1.0], [3.0], [0.2]], dtype=dtype)
            for _ in range(steps)]


class Caller:
    """One method's calls: its options, state, generator, losses and cross-Jacobians (all seeded)."""

    def __init__(self, method: str, inner: str | None = None) -> None:
        self.method = method
        info = gradagg.methods()[method]
        self.options = dict(options_for(method, K) or {})
        if inner is not None:
            self.options["inner"] = inner
        spec = (method, self.options) if self.options else method
        self.state = gradagg.init([spec] if self.options else spec, K) if info.stateful else None
        self.generator = torch.Generator().manual_seed(7)
        self.losses = torch.tensor([0.7, 1.3, 0.4]) if info.uses_losses else None
        self.cross = info.uses_cross

    def kwargs(self, jac: torch.Tensor, scale: float = 1.0) -> dict:
        kw = dict(self.options, state=self.state, generator=self.generator)
        if self.losses is not None:
            kw["losses"] = self.losses.to(jac.device)
        if self.cross:  # two other batches' Jacobians, scaled as the step's is
            kw["cross"] = (jac.flip(1) * scale, jac.roll(3, 1) * scale)
        return kw

    def aggregate(self, jac: torch.Tensor, scaler=None, scale: float = 1.0) -> torch.Tensor:
        extra = {} if scaler is None else {"scaler": scaler}
        return gradagg.aggregate(jac * scale, self.method, **self.kwargs(jac, scale), **extra)

    def weights(self, jac: torch.Tensor, scaler=None, scale: float = 1.0) -> torch.Tensor:
        extra = {} if scaler is None else {"scaler": scaler}
        return gradagg.weights(jac * scale, self.method, **self.kwargs(jac, scale), **extra)


def snapshot(state) -> dict:
    return {} if state is None else copy.deepcopy(state.state_dict())


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        other = b[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), key
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            assert len(value) == len(other) and all(torch.equal(x, y) for x, y in zip(value, other)), key
        else:
            assert value == other, key


def scaler(scale: float = S) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=scale)


# --- the weights with a scaler are the unscaled ones --------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_aggregate_with_a_scaler_equals_the_unscaled_call(method, device):
    """Over 3 calls (states advancing): aggregate(s J, scaler) = s aggregate(J), bit for bit, and the
    states end equal."""
    plain, scaled = Caller(method), Caller(method)
    if device != "cpu":
        plain.generator = torch.Generator(device).manual_seed(7)
        scaled.generator = torch.Generator(device).manual_seed(7)
    grad_scaler = torch.amp.GradScaler(device, init_scale=S)
    for jac in jacobians(1, 3):
        jac = jac.to(device)
        d = plain.aggregate(jac)
        d_scaled = scaled.aggregate(jac, grad_scaler, S)
        assert d_scaled.dtype == jac.dtype
        assert torch.equal(d_scaled / S, d), method
    assert_same_state(snapshot(plain.state), snapshot(scaled.state))


@pytest.mark.parametrize("method", WEIGHTINGS)
def test_weights_with_a_scaler_equal_the_unscaled_weights(method):
    plain, scaled = Caller(method), Caller(method)
    grad_scaler = scaler(2.0**24)
    for jac in jacobians(2, 3):
        assert torch.equal(scaled.weights(jac, grad_scaler, 2.0**24), plain.weights(jac)), method
    assert_same_state(snapshot(plain.state), snapshot(scaled.state))


@pytest.mark.parametrize("method", ["nash_mtl", "gradvac", "pcd", "nsgd", "gradnorm"])
def test_crmogm_over_a_stateful_inner_method(method):
    plain, scaled = Caller("crmogm", inner=method), Caller("crmogm", inner=method)
    for jac in jacobians(3, 3):
        assert torch.equal(scaled.aggregate(jac, scaler(), S) / S, plain.aggregate(jac))
    assert_same_state(snapshot(plain.state), snapshot(scaled.state))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "sdmgrad"])
def test_a_scale_that_is_not_a_power_of_two(method):
    """A plain number as the scale: equal up to the rounding of J·s/s (float64 J). sdmgrad is left
    out: its 20 projected steps at lr 10 amplify rounding without bound (METHODS.md C17)."""
    plain, scaled = Caller(method), Caller(method)
    for jac in jacobians(4, 2, torch.float64):
        d, d_scaled = plain.aggregate(jac), scaled.aggregate(jac, 1000.0, 1000.0)
        assert torch.allclose(d_scaled / 1000.0, d, rtol=1e-9, atol=1e-12 * float(jac.abs().max())), method


def test_without_the_scaler_the_scale_changes_the_weights():
    """Why scaler= exists: Nash-MTL's weights solve G w = 1/w, so w(sJ) = w(J)/s, and FairGrad with
    α ≠ 1 is not scale-invariant either."""
    jac = jacobians(5, 1, torch.float64)[0]
    w = gradagg.weights(jac, "nash_mtl", state=gradagg.init("nash_mtl", K))
    w_scaled = gradagg.weights(jac * S, "nash_mtl", state=gradagg.init("nash_mtl", K))
    assert torch.allclose(w_scaled * S, w, rtol=1e-9)
    fair = gradagg.weights(jac, "fairgrad", alpha=2.0)
    assert not torch.allclose(gradagg.weights(jac * S, "fairgrad", alpha=2.0), fair)
    assert torch.equal(gradagg.weights(jac * S, "fairgrad", alpha=2.0, scaler=S), fair)


def test_weights_from_gramian_divides_by_the_square_of_the_scale():
    jac = jacobians(6, 1, torch.float64)[0]
    g = jac @ jac.T
    w = gradagg.weights_from_gramian(g, "nash_mtl", state=gradagg.init("nash_mtl", K))
    w_scaled = gradagg.weights_from_gramian(g * S**2, "nash_mtl", state=gradagg.init("nash_mtl", K), scaler=scaler())
    assert torch.equal(w_scaled, w)


def test_a_pytree_and_half_precision_leaves():
    """A dict of leaves keeps its structure and dtypes; float16 leaves are unscaled in float32 (in
    float16, J/s would underflow)."""
    jac = jacobians(7, 1)[0]
    tree = {"a": jac[:, :10].reshape(K, 2, 5), "b": jac[:, 10:]}
    d = gradagg.aggregate(tree, "nash_mtl", state=gradagg.init("nash_mtl", K))
    d_scaled = gradagg.aggregate({k: v * S for k, v in tree.items()}, "nash_mtl", state=gradagg.init("nash_mtl", K),
                                 scaler=scaler())
    assert d_scaled.keys() == d.keys() and all(torch.equal(d_scaled[k] / S, d[k]) for k in d)
    half = (jac * 1e-4).half()  # tiny gradients: s makes them representable in float16
    d_half = gradagg.aggregate(half * 1024.0, "upgrad", scaler=1024.0)
    assert d_half.dtype == torch.float16
    assert torch.allclose(d_half.float() / 1024.0, gradagg.aggregate(half.float(), "upgrad"), rtol=2e-3, atol=1e-8)


# --- a skipped step leaves every state untouched -------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("method", STATEFUL)
def test_an_overflowed_step_leaves_the_state_as_it_was(method, bad, device):
    """Two good steps, a step whose J overflowed (returned as NaN, nothing raised, state bit for bit
    unchanged), then a good step that equals the one of a run that never saw the bad step."""
    run, reference = Caller(method), Caller(method)
    grad_scaler = torch.amp.GradScaler(device, init_scale=S)
    good = [jac.to(device) for jac in jacobians(8, 3)]
    for jac in good[:2]:
        run.aggregate(jac, grad_scaler, S)
        reference.aggregate(jac)
    before = snapshot(run.state)
    broken = good[2].clone()
    broken[1, 5] = bad
    out = run.aggregate(broken, grad_scaler, S)
    assert out.isnan().all(), method
    assert_same_state(before, snapshot(run.state))
    for caller in (run, reference):  # the generator's draws are not state: a skipped step still used them
        caller.generator = torch.Generator(device).manual_seed(99)
    assert torch.equal(run.aggregate(good[2], grad_scaler, S) / S, reference.aggregate(good[2])), method
    if method in WEIGHTINGS:
        before = snapshot(run.state)
        assert run.weights(broken, grad_scaler, S).isnan().all()
        assert_same_state(before, snapshot(run.state))


def test_the_first_call_overflowing_leaves_a_fresh_state():
    """moco's K x D tensors are allocated by its first call: an overflowed first call leaves them 0
    and the step counters at their start, so the next call is a first call."""
    run, reference = Caller("moco"), Caller("moco")
    broken = jacobians(9, 1)[0].clone()
    broken[0, 0] = float("inf")
    run.aggregate(broken, scaler(), S)
    assert all((t == 0).all() for t in run.state.y)
    jac = jacobians(10, 1)[0]
    assert torch.equal(run.aggregate(jac, scaler(), S) / S, reference.aggregate(jac))


def test_an_overflowed_cross_gramian_leaves_the_state_as_it_was():
    run = Caller("modo")
    grad_scaler = scaler()
    jac = jacobians(11, 1)[0]
    run.aggregate(jac, grad_scaler, S)
    before = snapshot(run.state)
    a = gradagg.cross_gramian(jac * S, jac.flip(1) * S)
    a[0, 1] = float("inf")
    w = gradagg.weights(jac * S, "modo", state=run.state, cross=a, scaler=grad_scaler)
    assert w.isnan().all()
    assert_same_state(before, snapshot(run.state))


# --- backward(..., scaler=) and a training loop --------------------------------------------------------


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList(torch.nn.Linear(12, 1) for _ in range(K))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return torch.stack([((head(z).squeeze(1) - y[:, i]) ** 2).mean() for i, head in enumerate(self.heads)])


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 6, generator=g), torch.randn(16, K, generator=g) * torch.tensor([1.0, 4.0, 0.3])


@pytest.mark.parametrize("method", BACKWARD_STATEFUL)
def test_backward_with_a_scaler_that_overflows_leaves_the_state_alone(method):
    """A real overflow: at a scale of 2^126 the float32 gradients are Inf. backward raises nothing,
    the scaler skips the step (parameters unchanged, scale halved), and the state is untouched."""
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    spec = (method, options_for(method, K)) if options_for(method, K) else method
    state = gradagg.init([spec] if options_for(method, K) else spec, K)
    options = dict(options_for(method, K) or {})
    good = torch.amp.GradScaler("cpu", init_scale=S)
    gradagg.backward(model.losses(x, y), model.trunk, method, state=state, scaler=good, **options)
    opt.zero_grad()
    before, params = snapshot(state), [p.detach().clone() for p in model.parameters()]
    huge = torch.amp.GradScaler("cpu", init_scale=2.0**126)
    w = gradagg.backward(model.losses(x, y), model.trunk, method, state=state, scaler=huge, **options)
    assert w.isnan().all()
    assert_same_state(before, snapshot(state))
    huge.step(opt)
    huge.update()
    assert huge.get_scale() == 2.0**125
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_backward_with_a_scaler_at_the_representation():
    """The representation route scales the losses itself; the weights are the unscaled ones."""
    model = TwoHeads()
    x, y = batch()

    def at(z):
        return torch.stack([((h(z).squeeze(1) - y[:, i]) ** 2).mean() for i, h in enumerate(model.heads)])

    z = model.trunk(x)
    w = gradagg.backward(at(z), z, "nash_mtl", state=gradagg.init("nash_mtl", K), scaler=scaler())
    z = model.trunk(x)
    jac = gradagg.autograd_jacobian(at(z), [z])[0]
    assert torch.equal(w, gradagg.weights(jac, "nash_mtl", state=gradagg.init("nash_mtl", K)))


def test_training_with_skipped_steps_matches_training_without_them():
    """SGD on one batch with Nash-MTL, a GradScaler whose first scales overflow (skipped steps,
    scale halving), and the guard: the result equals, bit for bit, an unscaled run with only the
    steps that were taken."""
    x, y = batch()
    y = 30 * y  # gradients above 2: at a scale of 2^127 they overflow float32

    def step(model, opt, state, grad_scaler=None):
        params = list(model.trunk.parameters())
        losses = model.losses(x, y)
        if grad_scaler is not None:
            losses = grad_scaler.scale(losses)
        jac = gradagg.autograd_jacobian(losses, params, retain_graph=True)
        d = gradagg.aggregate(jac, "nash_mtl", state=state, scaler=grad_scaler)
        heads = [p for p in model.parameters() if all(p is not q for q in params)]
        head_grads = torch.autograd.grad(losses.sum(), heads)
        opt.zero_grad()
        gradagg.set_grad(params, d)
        for p, g in zip(heads, head_grads):
            p.grad = g
        if grad_scaler is None:
            opt.step()
        else:
            grad_scaler.step(opt)
            grad_scaler.update()

    model, state = TwoHeads(), gradagg.init("nash_mtl", K)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    scales = []
    for _ in range(12):
        with amp.guard(grad_scaler, state):
            step(model, opt, state, grad_scaler)
        scales.append(grad_scaler.get_scale())
    skipped = sum(1 for a, b in zip([2.0**127, *scales], scales) if b < a)
    assert 3 <= skipped <= 9, skipped
    reference, ref_state = TwoHeads(), gradagg.init("nash_mtl", K)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for _ in range(12 - skipped):
        step(reference, ref_opt, ref_state)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert_same_state(snapshot(state), snapshot(ref_state))


def test_guard_restores_a_step_skipped_for_an_overflow_outside_the_jacobian():
    """The heads overflowed, not J: aggregate advanced the state, the scaler skipped the step, and
    the guard puts the state back; a step the scaler takes keeps the advanced state."""
    jac = jacobians(12, 1)[0] * S
    head = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([head], lr=0.1)
    for overflow in (True, False):
        state, grad_scaler = gradagg.init("gradvac", K), scaler()
        gradagg.aggregate(jac, "gradvac", state=state, scaler=grad_scaler)
        before = snapshot(state)
        with amp.guard(grad_scaler, state):
            gradagg.aggregate(jac * 0.5, "gradvac", state=state, scaler=grad_scaler)
            advanced = snapshot(state)
            head.grad = torch.tensor([float("inf") if overflow else 1.0, 0.0])
            grad_scaler.step(opt)
            grad_scaler.update()
        assert advanced["step"] == before["step"] + 1
        assert_same_state(before if overflow else advanced, snapshot(state))


def test_guard_covers_a_loss_weighting_state():
    """FAMO's state (an nn.Module) updated inside a skipped step is restored."""
    state = gradagg.init("famo", K)
    losses = torch.tensor([1.0, 2.0, 3.0])
    gradagg.scalarize(losses, "famo", state=state)
    before = copy.deepcopy(state.state_dict())
    grad_scaler, p = scaler(), torch.nn.Parameter(torch.zeros(1))
    with amp.guard(grad_scaler, state):
        state.update(torch.tensor([0.5, 1.5, 2.0]))
        assert any(not torch.equal(v, before[k]) for k, v in state.state_dict().items())
        p.grad = torch.tensor([float("nan")])
        grad_scaler.step(torch.optim.SGD([p], lr=1.0))
        grad_scaler.update()
    tensors = {k: v for k, v in state.state_dict().items() if isinstance(v, torch.Tensor)}
    assert tensors and all(torch.equal(v, before[k]) for k, v in tensors.items())


# --- the scale and misuse ----------------------------------------------------------------------------------


def test_loss_scale_values():
    assert amp.loss_scale(scaler(2.0**10), "cpu").item() == 2.0**10
    assert amp.loss_scale(torch.amp.GradScaler("cpu", enabled=False), "cpu").item() == 1.0
    assert amp.loss_scale(torch.tensor([8.0], dtype=torch.float64), "cpu").item() == 8.0
    assert amp.loss_scale(3, "cpu").item() == 3.0


@pytest.mark.parametrize(("value", "error", "match"), [
    (0.0, ValueError, "positive and finite"), (float("inf"), ValueError, "positive and finite"),
    (-2.0, ValueError, "positive and finite"), (True, TypeError, "bool"), ("2", TypeError, "GradScaler"),
    (torch.ones(2), ValueError, "one floating-point value"),
])
def test_bad_scales_are_refused(value, error, match):
    with pytest.raises(error, match=match):
        gradagg.aggregate(torch.ones(2, 3), "upgrad", scaler=value)


def test_check_finite_true_contradicts_a_scaler():
    with pytest.raises(ValueError, match="contradicts scaler="):
        gradagg.aggregate(torch.ones(2, 3), "upgrad", scaler=2.0, check_finite=True)


def test_guard_needs_a_grad_scaler():
    with pytest.raises(TypeError, match="GradScaler"), amp.guard(2.0, gradagg.init("nsgd", K)):
        pass


def test_a_compiled_step_with_a_grad_scaler():
    """torch.compile(fullgraph=True) traces scaler=: the scale is read from the scaler's tensor, the
    weights are the unscaled ones, and an overflowed step leaves the state as it was."""
    grad_scaler = scaler()
    grad_scaler.scale(torch.ones(()))  # a GradScaler creates its scale tensor at its first use
    state, reference = gradagg.init("nash_mtl", K), gradagg.init("nash_mtl", K)
    step = torch.compile(lambda j: gradagg.aggregate(j, "nash_mtl", state=state, scaler=grad_scaler), fullgraph=True)
    jacs = jacobians(13, 2)
    for jac in jacs:
        assert torch.allclose(step(jac * S) / S, gradagg.aggregate(jac, "nash_mtl", state=reference), rtol=1e-6)
    before = snapshot(state)
    broken = jacs[0] * S
    broken[2, 2] = float("inf")
    assert step(broken).isnan().all()
    assert_same_state(before, snapshot(state))


@pytest.mark.parametrize("route", ["host", "triton"])
@pytest.mark.parametrize("method", [*STATEFUL, "upgrad", "mgda", "cagrad", "fairgrad"])
def test_the_scale_on_the_host_and_triton_routes(method, route):
    """The host route carries s to the host with G (one transfer) and divides there; the Triton route
    divides on the device. Both equal the unscaled call of the same route, and an overflowed step
    leaves the state as it was. (CPU tensors here: the routes are forced; Triton runs in its
    interpreter.)"""
    if route == "triton" and not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()):
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU) or CUDA")
    plain, scaled = Caller(method), Caller(method)
    with _device.use_solver(route):
        for jac in jacobians(14, 2):
            d = plain.aggregate(jac)
            with OpLog() as log:
                d_scaled = scaled.aggregate(jac, scaler(), S)
            assert torch.equal(d_scaled / S, d)
            if route == "triton" and lookup(method).kernel and method not in CROSS:
                # the scale, the division and the restore read nothing on the host (methods without a
                # kernel, and the cross-Gramian ones, take the host route by design)
                assert log.banned() == [], log.banned()
        before = snapshot(scaled.state)
        broken = jacobians(15, 1)[0] * S
        broken[0, 3] = float("inf")
        kwargs = scaled.kwargs(broken)
        assert gradagg.aggregate(broken, method, scaler=scaler(), **kwargs).isnan().all()
        assert_same_state(before, snapshot(scaled.state))
