"""gradagg.gramian_of and the parameter route of gradagg.backward: the Gramian without the Jacobian.

The oracle throughout is a loop of torch.autograd.grad, one plain backward pass per loss over the
same graph (so dropout masks and batch statistics are the ones gramian_of saw), whose gradients
are stacked into J and multiplied in float64: nothing of gramian_of's hooks, batching or factoring
is in it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradagg

from asserts import DEVICES, STATEFUL, WEIGHTINGS, init_for, options_for


def loop_jacobian(losses, tensors):
    rows = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], tensors, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1).to(torch.float64)
                               for g, t in zip(grads, tensors)]))
    return torch.stack(rows)


def loop_gramian(losses, tensors):
    j = loop_jacobian(losses, tensors)
    return j @ j.T


def assert_gramian(g, ref, dtype):
    """Entry by entry within the rounding of the accumulation, relative to ‖g_i‖ ‖g_j‖."""
    assert g.dtype == torch.float64 and g.shape == ref.shape
    assert g.grad_fn is None
    scale = ref.diagonal().clamp(min=0).sqrt()
    bound = (1e-11 if dtype == torch.float64 else 2e-5) * torch.outer(scale, scale) + 1e-30
    err = (g - ref).abs()
    assert (err <= bound).all(), f"worst relative error {(err / bound).max().item():.3g} x the bound"


# --- models ----------------------------------------------------------------------------------------


class MultiHead(nn.Module):
    """A trunk with K heads, one loss per head (multi-task learning)."""

    def __init__(self, k=5, width=24, inplace=False, bias=True):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(7, width, bias=bias), nn.ReLU(inplace=inplace),
                                   nn.Linear(width, 40, bias=bias), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(40, 3) for _ in range(k)])

    def losses(self, x, y):
        z = self.trunk(x)
        return torch.stack([F.mse_loss(h(z), y[:, i]) for i, h in enumerate(self.heads)])


class SmallCNN(nn.Module):
    def __init__(self, norm=False, dropout=0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6) if norm else nn.Identity(), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(8 * 2 * 2, 12), nn.ReLU(), nn.Linear(12, 4))

    def forward(self, x):
        return self.features(x)


class Recurrent(nn.Module):
    def __init__(self, cell="lstm"):
        super().__init__()
        kind = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.rnn = kind(5, 9, batch_first=True)
        self.out = nn.Linear(9, 3)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


class Tied(nn.Module):
    """One weight used by two modules (an embedding and the output layer) and a block called twice."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.block = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, tokens):
        h = self.embed(tokens).mean(1)
        h = torch.tanh(self.block(torch.tanh(self.block(h)))) * self.scale
        h = h.clone()
        h.mul_(0.5).add_(h)  # in place
        return F.linear(h, self.embed.weight)  # [B, 11]


def cnn_data(dtype, b=6):
    torch.manual_seed(3)
    return torch.randn(b, 3, 8, 8, dtype=dtype), torch.randint(0, 4, (b,))


# --- the Gramian -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_multi_task_mlp(dtype, inplace, bias):
    torch.manual_seed(0)
    model = MultiHead(inplace=inplace, bias=bias).to(dtype)
    x, y = torch.randn(9, 7, dtype=dtype), torch.randn(9, 5, 3, dtype=dtype)
    losses = model.losses(x, y)
    g = gradagg.gramian_of(losses, model, retain_graph=True)
    assert_gramian(g, loop_gramian(losses, list(model.parameters())), dtype)
    # and the same as gradagg.gramian of the explicit Jacobian
    explicit = gradagg.gramian(gradagg.autograd_jacobian(losses, model, retain_graph=True))
    assert_gramian(g, explicit, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_dim", [None, 0])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_per_example_cnn(dtype, batch_dim, dropout):
    model = SmallCNN(dropout=dropout).to(dtype)
    x, y = cnn_data(dtype)
    losses = F.cross_entropy(model(x), y, reduction="none")
    g = gradagg.gramian_of(losses, model, batch_dim=batch_dim, retain_graph=True)
    assert_gramian(g, loop_gramian(losses, list(model.parameters())), dtype)


def test_per_example_routes_agree_and_leave_no_graph_behind():
    model = SmallCNN().double()
    x, y = cnn_data(torch.float64)
    losses = F.cross_entropy(model(x), y, reduction="none")
    a = gradagg.gramian_of(losses, model, batch_dim=0, retain_graph=True)
    b = gradagg.gramian_of(losses, model, retain_graph=True)
    torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)
    gradagg.gramian_of(losses, model)  # frees the graph
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        losses.sum().backward()


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "encoder"])
def test_per_example_route_without_retain_graph(model_name):
    """batch_dim=0 with the default retain_graph=False: the folds read what the factored nodes
    (Linear, convolution, layer norm) saved before the pass frees it, and G is exact."""
    torch.manual_seed(5)
    if model_name == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    elif model_name == "cnn":
        model = SmallCNN().double()
        x, y = cnn_data(torch.float64)
    else:
        model = TinyEncoder().double()
        x, y = torch.randint(0, 20, (5, 4)), torch.randint(0, 3, (5,))

    def losses():
        return F.cross_entropy(model(x), y, reduction="none")

    expected = loop_gramian(losses(), list(model.parameters()))
    assert_gramian(gradagg.gramian_of(losses(), model, batch_dim=0), expected, torch.float64)
    freed = losses()
    gradagg.gramian_of(freed, model, batch_dim=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        freed.sum().backward()


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_batch_norm_in_train_mode_and_dropout(dropout):
    torch.manual_seed(1)
    model = SmallCNN(norm=True, dropout=dropout).double().train()
    x, y = cnn_data(torch.float64)
    losses = F.cross_entropy(model(x), y, reduction="none")
    g = gradagg.gramian_of(losses, model, retain_graph=True)  # exact: the batch statistics mix examples
    assert_gramian(g, loop_gramian(losses, list(model.parameters())), torch.float64)
    with pytest.raises(ValueError, match=r"batch normalisation in train mode.*'features\.1'.*batch_dim=None"):
        gradagg.gramian_of(losses, model, batch_dim=0)
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"features\.1\.weight"):
        gradagg.gramian_of(losses, params, batch_dim=0)


def test_batch_norm_in_eval_mode_takes_the_per_example_route():
    model = SmallCNN(norm=True).double()
    model(torch.randn(16, 3, 8, 8, dtype=torch.float64))  # some running statistics
    model.eval()
    x, y = cnn_data(torch.float64)
    losses = F.cross_entropy(model(x), y, reduction="none")
    g = gradagg.gramian_of(losses, model, batch_dim=0, retain_graph=True)
    assert_gramian(g, loop_gramian(losses, list(model.parameters())), torch.float64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("batch_dim", [None, 0])
def test_recurrent(cell, batch_dim):
    torch.manual_seed(2)
    model = Recurrent(cell).double()
    x, y = torch.randn(4, 6, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    losses = F.cross_entropy(model(x), y, reduction="none")
    g = gradagg.gramian_of(losses, model, batch_dim=batch_dim, retain_graph=True)
    assert_gramian(g, loop_gramian(losses, list(model.parameters())), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_dim", [None, 0])
def test_shared_parameters_and_in_place(dtype, batch_dim):
    torch.manual_seed(4)
    model = Tied().to(dtype)
    tokens, y = torch.randint(0, 11, (5, 3)), torch.randint(0, 11, (5,))
    losses = F.cross_entropy(model(tokens), y, reduction="none")
    g = gradagg.gramian_of(losses, model, batch_dim=batch_dim, retain_graph=True)
    assert_gramian(g, loop_gramian(losses, list(model.parameters())), dtype)


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_sequences_through_a_linear_layer(batch_dim):
    """A Linear on [B, T, D]: the product's rows are B·T, an example's gradient sums its T rows."""
    torch.manual_seed(5)
    lin, out = nn.Linear(6, 8).double(), nn.Linear(8, 1).double()
    x = torch.randn(4, 7, 6, dtype=torch.float64)
    losses = out(torch.tanh(lin(x))).squeeze(-1).pow(2).mean(1)  # [B]
    params = [*lin.parameters(), *out.parameters()]
    g = gradagg.gramian_of(losses, params, batch_dim=batch_dim, retain_graph=True)
    assert_gramian(g, loop_gramian(losses, params), torch.float64)


def test_weight_without_transpose_wide_and_tall_inputs():
    """x @ W (no transpose) and both branches of the product's factorisation (rows < in, rows > in)."""
    torch.manual_seed(6)
    w1 = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)  # in = 30 > rows = 4: R of Xᵀ
    w2 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 30, dtype=torch.float64)
    losses = (torch.tanh(x @ w1) @ w2).pow(2).mean(0) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    g = gradagg.gramian_of(losses, [w1, w2], retain_graph=True)
    assert_gramian(g, loop_gramian(losses, [w1, w2]), torch.float64)
    xs = torch.randn(50, 30, dtype=torch.float64)  # rows = 50 > in = 30: the K gradients themselves
    losses = (torch.tanh(xs @ w1) @ w2).pow(2).mean(0)
    assert_gramian(gradagg.gramian_of(losses, [w1, w2], retain_graph=True), loop_gramian(losses, [w1, w2]),
                   torch.float64)


def test_intermediate_features():
    torch.manual_seed(7)
    model = MultiHead().double()
    x, y = torch.randn(9, 7, dtype=torch.float64), torch.randn(9, 5, 3, dtype=torch.float64)
    z = model.trunk(x)
    losses = torch.stack([F.mse_loss(h(z), y[:, i]) for i, h in enumerate(model.heads)])
    g = gradagg.gramian_of(losses, z, retain_graph=True)
    assert_gramian(g, loop_gramian(losses, [z]), torch.float64)
    both = gradagg.gramian_of(losses, {"z": z, "w": model.trunk[0].weight}, retain_graph=True)
    assert_gramian(both, loop_gramian(losses, [z, model.trunk[0].weight]), torch.float64)


def test_autocast_bfloat16():
    torch.manual_seed(8)
    model = MultiHead()
    x, y = torch.randn(9, 7), torch.randn(9, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.losses(x, y).float()
    g = gradagg.gramian_of(losses, model, retain_graph=True)
    ref = loop_gramian(losses, list(model.parameters()))
    scale = ref.diagonal().sqrt()
    assert ((g - ref).abs() <= 1e-2 * torch.outer(scale, scale)).all()  # bfloat16 products in the graph


def test_unused_and_partly_used_inputs():
    torch.manual_seed(9)
    used, unused = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    losses = used(torch.randn(5, 4, dtype=torch.float64)).pow(2).mean(0)
    g = gradagg.gramian_of(losses, [*used.parameters(), *unused.parameters()], retain_graph=True)
    assert_gramian(g, loop_gramian(losses, list(used.parameters())), torch.float64)


def test_hooks_are_removed_and_user_gradients_untouched():
    torch.manual_seed(10)
    model = MultiHead().double()
    x, y = torch.randn(9, 7, dtype=torch.float64), torch.randn(9, 5, 3, dtype=torch.float64)
    gradagg.gramian_of(model.losses(x, y), model)
    assert all(p.grad is None for p in model.parameters())
    twin = copy.deepcopy(model)
    model.losses(x, y).sum().backward()
    twin.losses(x, y).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_errors():
    model = MultiHead().double()
    x, y = torch.randn(9, 7, dtype=torch.float64), torch.randn(9, 5, 3, dtype=torch.float64)
    losses = model.losses(x, y)
    with pytest.raises(ValueError, match="1-D Tensor"):
        gradagg.gramian_of(losses.sum(), model)
    with pytest.raises(ValueError, match="no autograd graph"):
        gradagg.gramian_of(losses.detach(), model)
    with pytest.raises(ValueError, match="does not require grad"):
        gradagg.gramian_of(losses, [torch.ones(3)])
    w = model.trunk[0].weight
    with pytest.raises(ValueError, match="same tensor"):
        gradagg.gramian_of(losses, [w, w])
    with pytest.raises(ValueError, match="batch_dim"):
        gradagg.gramian_of(losses, model, batch_dim=1)
    with pytest.raises(TypeError, match="inputs must be"):
        gradagg.gramian_of(losses, 3)
    with pytest.raises(ValueError, match="nothing to differentiate"):
        gradagg.gramian_of(losses, [])


def test_per_example_losses_that_are_not_the_batch_take_the_exact_route():
    """Fewer losses than examples: no product or convolution has one row per loss, so nothing is
    factored per example and the batched pass gives the exact Gramian."""
    cnn = SmallCNN().double()
    xb, yb = cnn_data(torch.float64)
    losses = F.cross_entropy(cnn(xb), yb, reduction="none")[:4]
    g = gradagg.gramian_of(losses, cnn, batch_dim=0, retain_graph=True)
    assert_gramian(g, loop_gramian(losses, list(cnn.parameters())), torch.float64)


# --- backward over parameters ----------------------------------------------------------------------


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", WEIGHTINGS + STATEFUL)
def test_backward_equals_aggregate_of_the_jacobian(method):
    """Every weighting: .grad after gradagg.backward equals aggregate(J) of the explicit J, over
    three steps for the stateful ones (their states advanced once per step on each side)."""
    info = gradagg.methods()[method]
    if not info.weighting:
        pytest.skip(f"{method} acts per coordinate (tested below)")
    k = 5
    options = options_for(method, k)
    if options is None:
        pytest.skip("not valid at this K")
    torch.manual_seed(11)
    model = MultiHead(k=k).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(9, 7, dtype=torch.float64), torch.randn(9, 5, 3, dtype=torch.float64)
    states = [init_for(method, k), init_for(method, k)] if info.stateful else [None, None]
    for step in range(3 if info.stateful else 1):
        model.zero_grad(set_to_none=True)
        extra = {"generator": torch.Generator().manual_seed(step)} if info.random else {}
        losses = model.losses(x * (1 + step), y)
        w = gradagg.backward(losses, model, method, state=states[0], **extra, **options)
        twin_losses = twin.losses(x * (1 + step), y)
        jac = gradagg.autograd_jacobian(twin_losses, twin)
        extra = {"generator": torch.Generator().manual_seed(step)} if info.random else {}
        if info.uses_losses:
            extra["losses"] = twin_losses.detach()
        d = gradagg.aggregate(jac, method, state=states[1], **extra, **options)
        assert w.shape == (k,) and w.dtype == torch.float64
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, d[name], rtol=1e-7, atol=1e-10 * (1 + d[name].abs().max().item()))


def test_backward_per_example_and_float32():
    model = SmallCNN()
    twin = copy.deepcopy(model)
    x, y = cnn_data(torch.float32)
    w = gradagg.backward(F.cross_entropy(model(x), y, reduction="none"), model, "upgrad", batch_dim=0)
    jac = gradagg.autograd_jacobian(F.cross_entropy(twin(x), y, reduction="none"), twin)
    ref = gradagg.weights(jac, "upgrad")
    torch.testing.assert_close(w, ref, rtol=1e-4, atol=1e-6)
    d = gradagg.aggregate(jac, "upgrad")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, d[name], rtol=1e-4, atol=1e-5 * d[name].abs().max().item())


def test_backward_with_a_subset_and_the_representation_route_unchanged():
    torch.manual_seed(12)
    model = MultiHead().double()
    x, y = torch.randn(9, 7, dtype=torch.float64), torch.randn(9, 5, 3, dtype=torch.float64)
    losses = model.losses(x, y)
    trunk = list(model.trunk.parameters())
    w = gradagg.backward(losses, trunk, "mgda")  # weights from the trunk's Gramian
    jac = loop_jacobian(model.losses(x, y), trunk)
    torch.testing.assert_close(w, gradagg.weights(jac, "mgda"), rtol=1e-9, atol=1e-12)
    # every parameter of the graph gets ∇(Σ w_i L_i), the heads included
    model2 = copy.deepcopy(model)
    model2.zero_grad(set_to_none=True)
    (w * model2.losses(x, y)).sum().backward()
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    # a plain Tensor is still the shared representation of the representation-level route
    model.zero_grad(set_to_none=True)
    z = model.trunk(x)
    losses = torch.stack([F.mse_loss(h(z), y[:, i]) for i, h in enumerate(model.heads)])
    gradagg.backward(losses, z, "mgda")
    head = model.heads[0].weight.grad
    own = torch.autograd.grad(model.losses(x, y)[0], model.heads[0].weight)[0]
    torch.testing.assert_close(head, own)  # each head its own task's gradient, unweighted


def test_backward_refuses_per_coordinate_methods():
    model = MultiHead().double()
    losses = model.losses(torch.randn(9, 7, dtype=torch.float64), torch.randn(9, 5, 3, dtype=torch.float64))
    for method in ("graddrop", "trimmed_mean", ("pcgrad", "graddrop"), "excess_mtl", "moco"):
        with pytest.raises(ValueError, match=r"gradagg\.aggregate"):
            gradagg.backward(losses, model, method)
    with pytest.raises(ValueError, match="batch_dim applies when inputs are parameters"):
        gradagg.backward(losses, model.trunk(torch.randn(9, 7, dtype=torch.float64)), "mgda", batch_dim=0)


def test_backward_with_a_grad_scaler():
    """G is divided by the scale's square: nash_mtl (not scale-invariant) gets the unscaled weights,
    and .grad holds the scaled d for scaler.step."""
    torch.manual_seed(13)
    model = MultiHead(k=3)
    twin = copy.deepcopy(model)
    x, y = torch.randn(9, 7), torch.randn(9, 3, 3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    w = gradagg.backward(model.losses(x, y), model, "nash_mtl", scaler=scaler, state=gradagg.init("nash_mtl", 3))
    ref = gradagg.backward(twin.losses(x, y), twin, "nash_mtl", state=gradagg.init("nash_mtl", 3))
    torch.testing.assert_close(w, ref, rtol=1e-4, atol=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, 1024.0 * q.grad, rtol=1e-4, atol=1e-4 * q.grad.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_devices(device):
    torch.manual_seed(14)
    model = MultiHead().to(device)
    x, y = torch.randn(9, 7, device=device), torch.randn(9, 5, 3, device=device)
    losses = model.losses(x, y)
    g = gradagg.gramian_of(losses, model, retain_graph=True)
    assert g.device.type == device
    assert_gramian(g.cpu(), loop_gramian(losses, list(model.parameters())).cpu(), torch.float32)


def test_compiled_forward():
    """A forward compiled with aot_eager runs its backward batched; inductor's compiled backward
    cannot, and the error says what to do instead."""
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    x, y = torch.randn(9, 7, dtype=torch.float64), torch.randint(0, 4, (9,))
    ref = loop_gramian(F.cross_entropy(model(x), y, reduction="none"), list(model.parameters()))
    torch._dynamo.reset()
    losses = F.cross_entropy(torch.compile(model, backend="aot_eager")(x), y, reduction="none")
    for batch_dim in (None, 0):
        assert_gramian(gradagg.gramian_of(losses, model, batch_dim=batch_dim, retain_graph=True), ref, torch.float64)
    torch._dynamo.reset()
    losses = F.cross_entropy(torch.compile(model)(x), y, reduction="none")
    with pytest.raises(RuntimeError, match="backend='aot_eager'"):
        gradagg.gramian_of(losses, model)
    torch._dynamo.reset()


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
@pytest.mark.parametrize("batch_dim", [None, 0])
def test_embedding_tables(padding_idx, scale_grad_by_freq, batch_dim):
    """An embedding's task gradients live on the looked-up rows only; repeated indices, the
    padding index and the frequency scaling as torch's own embedding backward has them."""
    torch.manual_seed(16)
    embed = nn.Embedding(50, 6, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq).double()
    head = nn.Linear(6, 3).double()
    tokens = torch.tensor([[1, 2, 2, 0], [0, 3, 1, 1], [4, 4, 4, 2]])
    out = head(torch.tanh(embed(tokens)).mean(1)).pow(2)  # [B, 3]
    losses = out.mean(0) if batch_dim is None else out.mean(1)  # per task, or per example
    params = [embed.weight, *head.parameters()]
    g = gradagg.gramian_of(losses, params, batch_dim=batch_dim, retain_graph=True)
    assert_gramian(g, loop_gramian(losses, params), torch.float64)


class TinyEncoder(nn.Module):
    """Tokens → embedding → layer norm → a Linear per token (a [B, T, D] input) → mean over tokens."""

    def __init__(self, time_major=False):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)
        self.time_major = time_major

    def forward(self, tokens):
        h = self.norm(self.embed(tokens))
        if self.time_major:  # [T, B, D]: the rows of the product are not grouped by example
            h = torch.tanh(self.mix(h.transpose(0, 1).contiguous())).transpose(0, 1)
        else:
            h = torch.tanh(self.mix(h))
        return self.out(h.mean(1))


@pytest.mark.parametrize("time_major", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_example_sequences(time_major, dtype, monkeypatch):
    """Per example, a Linear over a sequence's tokens and a layer norm are folded from the plain
    pass; a product whose rows are time-major is not (the graph does not say whose rows they are)
    and takes the batched pass, exact either way."""
    torch.manual_seed(17)
    model = TinyEncoder(time_major).to(dtype)
    tokens, y = torch.randint(0, 20, (5, 4)), torch.randint(0, 3, (5,))
    losses = F.cross_entropy(model(tokens), y, reduction="none")
    batched = []
    original = gradagg._jacfree._batched_pass
    monkeypatch.setattr(gradagg._jacfree, "_batched_pass",
                        lambda losses, items, *a: (batched.extend(n for n, _ in items), original(losses, items, *a))[1])
    g = gradagg.gramian_of(losses, model, batch_dim=0, retain_graph=True)
    assert_gramian(g, loop_gramian(losses, list(model.parameters())), dtype)
    expected = {"embed.weight"} | ({"mix.weight", "mix.bias"} if time_major else set())
    assert set(batched) == expected
