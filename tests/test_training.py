"""Hook-free training helpers: Jacobians three ways, set_grad, representation-level backward, and
end-to-end training through each path."""

import pytest
import torch

import gradagg

from asserts import DEVICES


def make_problem(device, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)
    x = torch.randn(64, 6, device=device)
    y = torch.stack([x[:, 0] - x[:, 1], x[:, 2] * 0.5 + x[:, 3], -x[:, 0] + x[:, 4]], 1)
    return model, x, y


def per_task_losses(out, y):
    return ((out - y) ** 2).mean(0)


def reference_jacobian(model, x, y):
    losses = per_task_losses(model(x), y)
    rows = [torch.autograd.grad(losses[i], list(model.parameters()), retain_graph=True) for i in range(3)]
    return {name: torch.stack([row[j] for row in rows]) for j, (name, _) in enumerate(model.named_parameters())}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_three_jacobian_paths_agree(device, chunk_size):
    model, x, y = make_problem(device)
    ref = reference_jacobian(model, x, y)
    jac_m, losses = gradagg.model_jacobian(model, x, lambda out: per_task_losses(out, y), chunk_size=chunk_size)
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac_f, _ = gradagg.task_jacobian(
        lambda p, xb: per_task_losses(torch.func.functional_call(model, p, (xb,)), y), params, x,
        chunk_size=chunk_size)
    jac_a = gradagg.autograd_jacobian(per_task_losses(model(x), y), model, chunk_size=chunk_size)
    for name in ref:
        torch.testing.assert_close(jac_m[name], ref[name])
        torch.testing.assert_close(jac_f[name], ref[name])
        torch.testing.assert_close(jac_a[name], ref[name])
    torch.testing.assert_close(losses, per_task_losses(model(x), y).detach())


def test_autograd_jacobian_structures_and_unused_parameters():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    unused = torch.randn(4, requires_grad=True)
    losses = torch.stack([(a**2).sum(), (a * b[0]).sum(), b.sum()])
    as_list = gradagg.autograd_jacobian(losses, [a, b, unused], retain_graph=True)
    as_tuple = gradagg.autograd_jacobian(losses, (a, b), retain_graph=True)
    as_dict = gradagg.autograd_jacobian(losses, {"a": a, "b": b})
    assert isinstance(as_list, list) and isinstance(as_tuple, tuple) and set(as_dict) == {"a", "b"}
    torch.testing.assert_close(as_list[0][0], 2 * a.detach())
    torch.testing.assert_close(as_list[1][2], torch.ones(2))
    assert torch.equal(as_list[2], torch.zeros(3, 4))
    with pytest.raises(ValueError, match="1-D Tensor"):
        gradagg.autograd_jacobian(losses.sum(), [a])


def test_set_grad():
    model = torch.nn.Linear(3, 2)
    g = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    gradagg.set_grad(model, g)
    gradagg.set_grad(model, g, accumulate=True)
    assert torch.equal(model.weight.grad, torch.full((2, 3), 2.0))
    gradagg.set_grad(list(model.parameters()), [torch.zeros(2, 3), torch.zeros(2)])
    assert torch.equal(model.bias.grad, torch.zeros(2))
    with pytest.raises(ValueError, match="unknown parameters"):
        gradagg.set_grad(model, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        gradagg.set_grad(model, {"bias": torch.zeros(3)})


def shared_features_problem(seed=0):
    torch.manual_seed(seed)
    encoder = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh())
    heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in range(3)])
    x, y = torch.randn(40, 5), torch.randn(40, 3)

    def losses_of(z):
        return torch.stack([((h(z).squeeze(1) - y[:, i]) ** 2).mean() for i, h in enumerate(heads)])

    return encoder, heads, x, losses_of


@pytest.mark.parametrize("method", ["mgda", "upgrad", "graddrop"])
def test_representation_level_backward(method):
    """The encoder receives the aggregated ∂/∂z; each head its own task's gradient."""
    encoder, heads, x, losses_of = shared_features_problem()
    z = encoder(x)
    losses = losses_of(z)
    jz = gradagg.autograd_jacobian(losses, [z], retain_graph=True)[0]
    head_grads = [torch.autograd.grad(losses[i], list(heads[i].parameters()), retain_graph=True) for i in range(3)]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    d = gradagg.aggregate(jz, method, generator=gen())
    expected = torch.autograd.grad(z, list(encoder.parameters()), grad_outputs=d, retain_graph=True)
    gradagg.backward(losses, z, method, generator=gen())
    for p, e in zip(encoder.parameters(), expected):
        torch.testing.assert_close(p.grad, e)
    for head, grads in zip(heads, head_grads):
        for p, e in zip(head.parameters(), grads):
            torch.testing.assert_close(p.grad, e)


def test_weighted_loss_form_gives_the_same_encoder_gradient():
    grads = []
    for weighted in (False, True):
        encoder, heads, x, losses_of = shared_features_problem()
        z = encoder(x)
        w = gradagg.backward(losses_of(z), z, "mgda", weighted_loss=weighted)
        grads.append([p.grad.clone() for p in encoder.parameters()])
        head_grad = heads[1].weight.grad.clone()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert w.shape == (3,) and head_grad.abs().sum() > 0
    with pytest.raises(ValueError, match="per coordinate"):
        encoder, heads, x, losses_of = shared_features_problem()
        z = encoder(x)
        gradagg.backward(losses_of(z), z, "graddrop", weighted_loss=True)


# --- end to end ----------------------------------------------------------------------------------


def train(path, steps=60, device="cpu"):
    model, x, y = make_problem(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        if path == "model_jacobian":
            jac, losses = gradagg.model_jacobian(model, x, lambda out: per_task_losses(out, y))
        elif path == "task_jacobian":
            params = {n: p.detach() for n, p in model.named_parameters()}
            jac, losses = gradagg.task_jacobian(
                lambda p: per_task_losses(torch.func.functional_call(model, p, (x,)), y), params, chunk_size=2)
        else:
            losses = per_task_losses(model(x), y)
            jac = gradagg.autograd_jacobian(losses, model)
            losses = losses.detach()
        gradagg.set_grad(model, gradagg.aggregate(jac, "upgrad"))
        optimizer.step()
        history.append(losses.sum().item())
    return history


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["model_jacobian", "task_jacobian", "autograd_jacobian"])
def test_training_through_each_path_lowers_the_losses(device, path):
    history = train(path, device=device)
    assert history[-1] < 0.5 * history[0]


def test_training_at_the_representation_lowers_the_losses():
    encoder, heads, x, losses_of = shared_features_problem()
    optimizer = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=0.02)
    history = []
    for _ in range(60):
        optimizer.zero_grad()
        z = encoder(x)
        losses = losses_of(z)
        gradagg.backward(losses, z, "mgda")
        optimizer.step()
        history.append(float(losses.detach().sum()))
    assert history[-1] < 0.8 * history[0]
