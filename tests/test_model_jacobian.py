"""model_jacobian on models whose forward updates buffers (batch norm in train mode and others): J
and the buffers must be what one ordinary forward gives, checked against a per-task autograd loop on
an ordinary forward of a deep copy of the model."""

import copy

import pytest
import torch

import gradagg

from asserts import DEVICES

K = 3


def per_task_losses(out, y):
    return ((out - y) ** 2).mean(0)


def reference(model, x, y, seed):
    """(J, losses, copy): a deep copy of ``model`` after one ordinary forward (RNG seeded with
    ``seed``), and J from one torch.autograd.grad call per task on that forward."""
    twin = copy.deepcopy(model)
    torch.manual_seed(seed)
    losses = per_task_losses(twin(x), y)
    named = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
    rows = [torch.autograd.grad(losses[i], [p for _, p in named], retain_graph=True, allow_unused=True)
            for i in range(K)]
    jac = {n: torch.stack([torch.zeros_like(p) if row[j] is None else row[j] for row in rows])
           for j, (n, p) in enumerate(named)}
    return jac, losses.detach(), twin


def model_jacobian(model, x, y, seed, chunk_size=None):
    torch.manual_seed(seed)
    return gradagg.model_jacobian(model, x, lambda out: per_task_losses(out, y), chunk_size=chunk_size)


def snapshot(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def assert_same_jacobian(jac, ref):
    assert set(jac) == set(ref)
    for name in ref:
        torch.testing.assert_close(jac[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)


def assert_same_buffers(model, twin):
    mine, theirs = dict(model.named_buffers()), dict(twin.named_buffers())
    assert set(mine) == set(theirs)
    for name, b in theirs.items():
        if b.is_floating_point():
            torch.testing.assert_close(mine[name], b, rtol=1e-12, atol=1e-14, msg=name)
        else:
            assert torch.equal(mine[name], b), (name, mine[name], b)


def cnn(device, dropout):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Dropout(dropout),
        torch.nn.Conv2d(4, 5, 3, stride=2), torch.nn.BatchNorm2d(5, momentum=0.3), torch.nn.Tanh(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, K),
    ).to(device, torch.float64)
    x = torch.randn(8, 2, 6, 6, device=device, dtype=torch.float64)
    y = torch.randn(8, K, device=device, dtype=torch.float64)
    return model, x, y


def mlp(**bn):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7, **bn), torch.nn.ReLU(),
                                torch.nn.Linear(7, K)).double()
    x = torch.randn(10, 5, dtype=torch.float64)
    y = torch.randn(10, K, dtype=torch.float64)
    return model, x, y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_train_mode_batch_norm_cnn(device, dropout, chunk_size):
    model, x, y = cnn(device, dropout)
    before = snapshot(model)
    ref, ref_losses, twin = reference(model, x, y, seed=5)
    jac, losses = model_jacobian(model, x, y, seed=5, chunk_size=chunk_size)
    assert_same_jacobian(jac, ref)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-12, atol=1e-14)
    assert_same_buffers(model, twin)
    assert int(model[1].num_batches_tracked) == 1 and int(model[5].num_batches_tracked) == 1
    assert not torch.allclose(model[1].running_mean, before["1.running_mean"])
    assert not torch.allclose(model[5].running_var, before["5.running_var"])
    # normalised with the batch statistics: J differs from the eval-mode (running statistics) one
    eval_ref, _, _ = reference(copy.deepcopy(model).eval(), x, y, seed=5)
    assert not torch.allclose(jac["0.weight"], eval_ref["0.weight"])


def test_dropout_mask_is_shared_by_all_tasks():
    model, x, y = cnn("cpu", 0.5)
    model[1].eval()
    model[5].eval()
    jac, _ = model_jacobian(model, x, y, seed=11, chunk_size=1)
    same, _, _ = reference(model, x, y, seed=11)
    other, _, _ = reference(model, x, y, seed=12)
    assert_same_jacobian(jac, same)
    assert not torch.allclose(jac["0.weight"], other["0.weight"])


@pytest.mark.parametrize("bn", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
                         ids=["momentum", "cumulative", "no-affine", "untracked"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_train_mode_batch_norm_mlp(bn, chunk_size):
    model, x, y = mlp(**bn)
    ref, _, twin = reference(model, x, y, seed=0)
    jac, _ = model_jacobian(model, x, y, seed=0, chunk_size=chunk_size)
    assert_same_jacobian(jac, ref)
    assert_same_buffers(model, twin)
    # a second call is a second step, as a second ordinary forward is
    ref, _, _ = reference(model, x, y, seed=0)
    _ = twin(x)
    jac, _ = model_jacobian(model, x, y, seed=0, chunk_size=chunk_size)
    assert_same_jacobian(jac, ref)
    assert_same_buffers(model, twin)
    if bn.get("track_running_stats", True):
        assert int(model[1].num_batches_tracked) == 2


def test_eval_mode_batch_norm_leaves_buffers_untouched():
    model, x, y = cnn("cpu", 0.3)
    model[1].running_mean.uniform_(-1, 1)
    model[5].running_var.uniform_(0.5, 2)
    model.eval()
    buffers = dict(model.named_buffers())
    before = {n: (b.clone(), b._version) for n, b in buffers.items()}
    pending = model(x).sum()  # an ordinary graph that saved the running statistics
    ref, _, _ = reference(model, x, y, seed=0)
    jac, _ = model_jacobian(model, x, y, seed=0, chunk_size=2)
    assert_same_jacobian(jac, ref)
    for name, b in model.named_buffers():
        assert b is buffers[name] and torch.equal(b, before[name][0]) and b._version == before[name][1], name
    pending.backward()  # not invalidated by a write into the buffers


class InPlaceEma(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)
        self.register_buffer("ema", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        out = self.lin(x)
        if self.training:
            with torch.no_grad():
                self.ema.mul_(0.9).add_(0.1 * out.mean(0))
            self.steps += 1
        return out + 0.5 * self.ema


class ReassignedEma(InPlaceEma):
    def forward(self, x):
        out = self.lin(x)
        if self.training:
            self.ema = 0.8 * self.ema + 0.2 * out.detach().mean(0)
            self.steps = self.steps + 1
        return torch.tanh(out) * self.ema.exp()


class TwiceBatchNorm(torch.nn.Module):
    """One BatchNorm1d applied twice in a forward: an ordinary forward updates it twice."""

    def __init__(self, width):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)
        self.bn = torch.nn.BatchNorm1d(width)

    def forward(self, x):
        return self.bn(torch.relu(self.lin(self.bn(x))))


@pytest.mark.parametrize("make", [
    InPlaceEma, ReassignedEma, TwiceBatchNorm,
    lambda w: torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(w, w)),
], ids=["in-place", "reassigned", "bn-twice", "spectral-norm"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_other_buffer_updates_happen_once(make, chunk_size):
    torch.manual_seed(2)
    model = torch.nn.Sequential(make(4).double(), torch.nn.Linear(4, K).double())
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(6, K, dtype=torch.float64)
    before = snapshot(model)
    for step in range(2):
        ref, _, twin = reference(model, x, y, seed=step)
        jac, _ = model_jacobian(model, x, y, seed=step, chunk_size=chunk_size)
        assert_same_jacobian(jac, ref)
        assert_same_buffers(model, twin)
    after = snapshot(model)
    assert any(not torch.equal(after[n], before[n]) for n in before)


class CountsInAnAttribute(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.calls = torch.zeros(())  # a plain attribute, not a buffer

    def forward(self, x):
        self.calls.add_(1)
        return self.lin(x)


def test_mutating_a_non_buffer_tensor_names_the_module():
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4),
        torch.nn.Sequential(torch.nn.Tanh(), CountsInAnAttribute()), torch.nn.Linear(4, K))
    x, y = torch.randn(6, 4), torch.randn(6, K)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"module '2\.1' \(CountsInAnAttribute\)") as info:
        gradagg.model_jacobian(model, x, lambda out: per_task_losses(out, y))
    message = str(info.value)
    assert "register_buffer" in message and "model.eval()" in message and "autograd_jacobian" in message
    for name, b in model.named_buffers():  # the batch norm before it is left as it was
        assert torch.equal(b, before[name]), name
    model.eval()  # the message's advice is no help here, as the module mutates in eval mode too,
    model[2][1] = torch.nn.Identity()  # but without the module it works
    model_jacobian(model, x, y, seed=0)


def test_failure_after_the_forward_leaves_buffers_untouched():
    model, x, y = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="1-D Tensor"):
        gradagg.model_jacobian(model, x, lambda out: per_task_losses(out, y).sum())
    with pytest.raises(ValueError, match="chunk_size"):
        gradagg.model_jacobian(model, x, lambda out: per_task_losses(out, y), chunk_size=0)
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
