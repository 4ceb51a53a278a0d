"""Layouts of the per-task Jacobian: pytrees with 1-D leaves (scalar parameters, [K]), a single
1-D Jacobian [K], mixed dtypes, the small-pytree packing and the leaf-by-leaf path; and
``stack_gradients`` for lists of per-task gradients (a loop over ``torch.autograd.grad``).

Every layout's result is compared with the result on the equivalent single [K, D] tensor built by
hand with torch.cat, and with a float64 numpy Σ_i w_i g_i (weights from ``gradagg.weights``) or a
numpy trimmed mean.
"""

from __future__ import annotations

import contextlib
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils import _pytree as pytree

import gradagg
import gradagg._api as api
from gradagg.solvers import native

K = 4


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def dict_with_scalar(g):
    return {"w": _randn(g, K, 4, 3), "temp": _randn(g, K), "b": _randn(g, K, 2)}


def nested_scalars(g):
    return {"enc": [_randn(g, K, 3, 2), _randn(g, K)], "head": (_randn(g, K), {"scale": _randn(g, K)})}


def only_scalars(g):
    return [_randn(g, K), _randn(g, K), _randn(g, K)]


def single_1d(g):
    return _randn(g, K)  # D = 1


def mixed_dtypes(g):  # packing is skipped: the leaves are combined one by one, in float64
    return {"w": _randn(g, K, 5), "temp": _randn(g, K, dtype=torch.float64), "b": _randn(g, K, 2)}


LAYOUTS = [dict_with_scalar, nested_scalars, only_scalars, single_1d, mixed_dtypes]

PCGRAD_NSGD = ("pcgrad", ("nsgd", {"update_at": 0}))  # NSGD's state takes the norms at the first call
METHODS = [
    ("mean", {}),
    ("mgda", {}),
    ("upgrad", {}),
    ("pcgrad", {}),
    ("graddrop", {}),
    ("trimmed_mean", {"trim": 1}),
    (PCGRAD_NSGD, {}),
    ("upgrad", {"normalize": "sum"}),
    ("graddrop", {"normalize": "sum"}),
]
WEIGHTING = ["mean", "mgda", "upgrad", "pcgrad", PCGRAD_NSGD]


def method_id(m):
    return m if isinstance(m, str) else "pcgrad+nsgd"


def make(layout, seed=0):
    return layout(torch.Generator().manual_seed(seed))


def leaves_of(tree):
    return pytree.tree_leaves(tree)


def by_hand(jac) -> torch.Tensor:
    """The equivalent single [K, D] tensor (float64 where the leaves' dtypes differ)."""
    leaves = leaves_of(jac)
    return torch.cat([leaf.reshape(K, -1) for leaf in leaves], 1)


def split_like(d: torch.Tensor, jac) -> list[torch.Tensor]:
    """A [D] result of the hand-built tensor cut into the leaves' result shapes and dtypes."""
    leaves = leaves_of(jac)
    parts = d.split([leaf[0].numel() for leaf in leaves])
    return [p.reshape(leaf.shape[1:]).to(leaf.dtype) for p, leaf in zip(parts, leaves)]


class Call:
    """One method with fresh, identically seeded generator and state for every call."""

    def __init__(self, method, opts):
        self.method, self.opts = method, opts

    def kwargs(self):
        kw = dict(self.opts)
        kw["generator"] = torch.Generator().manual_seed(7)
        if not isinstance(self.method, str):
            kw["state"] = gradagg.init(self.method, K)
        return kw

    def aggregate(self, jac, kw=None):
        return gradagg.aggregate(jac, self.method, **(kw or self.kwargs()))

    def weights(self, jac):
        return gradagg.weights(jac, self.method, **self.kwargs())


@pytest.fixture(params=["packed", "leafwise"])
def packing(request, monkeypatch):
    """Small pytrees are packed into one [K, D] buffer; above PACK_MAX entries they are processed
    leaf by leaf. A tiny PACK_MAX exercises the second path cheaply."""
    if request.param == "leafwise":
        monkeypatch.setattr(api, "PACK_MAX", 4)
    return request.param


@pytest.mark.parametrize("layout", [dict_with_scalar, nested_scalars, only_scalars], ids=lambda f: f.__name__)
def test_each_path_is_taken(layout, packing):
    leaves = leaves_of(make(layout))
    packed = api._pack(leaves, K)
    assert (packed is None) == (packing == "leafwise")
    if packed is not None:
        assert torch.equal(packed, by_hand(make(layout)))


def test_the_reported_case():
    out = gradagg.aggregate({"w": torch.randn(3, 5), "temp": torch.randn(3)}, "mgda")
    assert out["w"].shape == (5,) and out["temp"].shape == ()


# --- values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("method,opts", METHODS, ids=[f"{method_id(m)}{'-sum' if o.get('normalize') else ''}"
                                                      for m, o in METHODS])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__)
def test_layout_equals_the_hand_built_tensor(layout, method, opts, use_native, packing):
    jac = make(layout)
    call = Call(method, opts)
    with contextlib.nullcontext() if use_native else native.disabled():
        out = call.aggregate(jac)
        flat = by_hand(jac)
        reference = call.aggregate(flat)
    # Structure, shapes (() for a 1-D leaf) and dtypes.
    got, spec = pytree.tree_flatten(out)
    assert spec == pytree.tree_flatten(jac)[1]
    leaves = leaves_of(jac)
    for o, leaf in zip(got, leaves):
        assert isinstance(o, torch.Tensor) and o.shape == leaf.shape[1:] and o.dtype == leaf.dtype
    # The same numbers as the hand-built [K, D] tensor.
    for o, r in zip(got, split_like(reference, jac)):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    # And as a float64 numpy computation.
    d = torch.cat([o.reshape(-1).double() for o in got]).numpy()
    j = flat.double().numpy()
    if method in WEIGHTING:
        w = call.weights(flat).numpy()
        expected = w @ j  # w includes normalize="sum"'s scale
        if opts.get("normalize") == "sum":
            # Rescaling a direction that is 0 up to rounding (UPGrad of [K] scalars of both signs)
            # only scales the rounding: the norm is then not checked, nor the values.
            with contextlib.nullcontext() if use_native else native.disabled():
                plain = gradagg.aggregate(flat, method, generator=torch.Generator().manual_seed(7))
            if float(plain.norm()) < 1e-5 * np.abs(j).max():
                return
            assert np.linalg.norm(d) == pytest.approx(np.linalg.norm(j.sum(0)), rel=1e-5)
    elif method == "trimmed_mean":
        expected = np.sort(j, axis=0)[1:-1].mean(0)
    else:  # graddrop: random per coordinate; with normalize="sum", its norm is ‖Σ_i g_i‖
        if opts.get("normalize") == "sum":
            assert np.linalg.norm(d) == pytest.approx(np.linalg.norm(j.sum(0)), rel=1e-5)
        return
    np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-5 * np.abs(j).max())


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__)
def test_stateful_chain_over_two_steps(layout, packing):
    """The chain's state advances alike on the layout and on the hand-built tensor."""
    jacs = [make(layout, seed) for seed in (1, 2)]
    states = [gradagg.init(PCGRAD_NSGD, K) for _ in range(2)]
    for jac in jacs:
        gen = [torch.Generator().manual_seed(3) for _ in range(2)]
        out = gradagg.aggregate(jac, PCGRAD_NSGD, state=states[0], generator=gen[0])
        reference = gradagg.aggregate(by_hand(jac), PCGRAD_NSGD, state=states[1], generator=gen[1])
        for o, r in zip(leaves_of(out), split_like(reference, jac)):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    assert int(states[0].step) == int(states[1].step) == 2
    torch.testing.assert_close(states[0].ref, states[1].ref)
    assert not torch.equal(states[0].ref, torch.ones(K, dtype=states[0].ref.dtype))


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_graddrop_keeps_scalar_leaves_whose_tasks_agree(packing, use_native):
    """Where every task's gradient has one sign, GradDrop keeps them all: d = Σ_i g_i."""
    g = torch.Generator().manual_seed(0)
    jac = {"w": _randn(g, K, 3), "up": _randn(g, K).abs() + 0.1, "down": -_randn(g, K).abs() - 0.1,
           "mixed": torch.tensor([1.0, -2.0, 3.0, -4.0])}
    with contextlib.nullcontext() if use_native else native.disabled():
        out = gradagg.aggregate(jac, "graddrop", generator=torch.Generator().manual_seed(1))
    for name in ("up", "down"):
        assert out[name].shape == ()
        torch.testing.assert_close(out[name], jac[name].sum())
    assert out["mixed"].item() in (4.0, -6.0)  # the positive or the negative gradients


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", ["upgrad", "trimmed_mean"])
def test_scalar_leaves_in_other_dtypes(dtype, method, packing):
    g = torch.Generator().manual_seed(0)
    jac = {"w": _randn(g, K, 3, dtype=dtype), "temp": _randn(g, K, dtype=dtype)}
    opts = {"trim": 1} if method == "trimmed_mean" else {}
    out = gradagg.aggregate(jac, method, **opts)
    assert out["temp"].shape == () and out["temp"].dtype == dtype and out["w"].dtype == dtype
    reference = gradagg.aggregate(by_hand(jac).double(), method, **opts)
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(out["temp"].double(), reference[3], rtol=tol, atol=tol)


def test_a_list_of_equal_1d_tensors_is_a_pytree():
    """The ambiguous form is read as what it is, a pytree: K' = D tasks, one scalar per leaf."""
    g = torch.Generator().manual_seed(0)
    rows = [_randn(g, 5) for _ in range(3)]
    out = gradagg.aggregate(rows, "upgrad")
    assert isinstance(out, list) and [o.shape for o in out] == [()] * 3
    torch.testing.assert_close(torch.stack(out), gradagg.aggregate(torch.stack(rows, 1), "upgrad"))


# --- weights, Gramian, gradients ------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__)
def test_weights_and_gramian(layout, packing):
    jac = make(layout)
    flat = by_hand(jac)
    j = flat.double().numpy()
    np.testing.assert_allclose(gradagg.gramian(jac).numpy(), j @ j.T, rtol=1e-6, atol=1e-6)
    for method in ("mgda", "upgrad", PCGRAD_NSGD):
        call = Call(method, {})
        torch.testing.assert_close(call.weights(jac), call.weights(flat), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method,opts", METHODS[:7], ids=[method_id(m) for m, _ in METHODS[:7]])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__)
def test_gradients_through_aggregate(layout, method, opts, packing):
    """Differentiable in jac, with the weights held constant: ∂<c, d>/∂g_i = w_i c."""
    call = Call(method, opts)
    jac = pytree.tree_map(lambda t: t.clone().requires_grad_(), make(layout))
    twin = pytree.tree_map(lambda t: t.detach().clone().requires_grad_(), jac)
    g = torch.Generator().manual_seed(5)
    cotangents = [_randn(g, *leaf.shape[1:], dtype=leaf.dtype) for leaf in leaves_of(jac)]

    # The per-coordinate methods run on the torch path here: see the test after this one.
    with native.disabled() if method in ("graddrop", "trimmed_mean") else contextlib.nullcontext():
        out = leaves_of(call.aggregate(jac))
        reference = call.aggregate(by_hand(twin))
    assert all(o.requires_grad and o.shape == c.shape for o, c in zip(out, cotangents))
    grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(out, cotangents)), leaves_of(jac))

    flat_c = torch.cat([c.reshape(-1) for c in cotangents])
    expected = torch.autograd.grad((reference * flat_c.to(reference.dtype)).sum(), leaves_of(twin))
    for got, want, leaf in zip(grads, expected, leaves_of(jac)):
        assert got.shape == leaf.shape and got.dtype == leaf.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if method in WEIGHTING:
        w = call.weights(by_hand(pytree.tree_map(torch.Tensor.detach, jac))).numpy()
        for got, c in zip(grads, cotangents):
            np.testing.assert_allclose(got.double().numpy(), np.multiply.outer(w, c.double().numpy()),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,opts", [("graddrop", {}), ("trimmed_mean", {"trim": 1})])
def test_per_coordinate_methods_are_differentiable(method, opts):
    """With requires_grad the result is differentiable and the same number as without: on the CPU
    GradDrop's torch path hashes the same uniforms as the C pass."""
    j = torch.randn(K, 300, dtype=torch.float64, requires_grad=True)
    out = gradagg.aggregate(j, method, generator=torch.Generator().manual_seed(3), **opts)
    plain = gradagg.aggregate(j.detach(), method, generator=torch.Generator().manual_seed(3), **opts)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), plain, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(out.sum(), j)
    if method == "graddrop":  # ∂d/∂g_i is the keep mask M_i (leakage 0): 0 or 1, and d = Σ_i M_i g_i
        assert set(grad.unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close((grad * j.detach()).sum(0), plain, rtol=1e-12, atol=1e-12)


# --- stack_gradients ------------------------------------------------------------------------------


class Net(torch.nn.Module):
    """Two layers, a learnable temperature (a scalar parameter) and two task heads."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(3, 4)
        self.temperature = torch.nn.Parameter(torch.tensor(1.5))
        self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 1), torch.nn.Linear(4, 2)])

    def forward(self, x):
        z = torch.tanh(self.body(x)) / self.temperature
        return [head(z) for head in self.heads]


def net_losses(seed=0):
    torch.manual_seed(seed)
    net = Net()
    x = torch.randn(16, 3)
    a, b = net(x)
    # A list, not a stacked tensor: through a stack every task would reach every head (with zeros).
    return net, [a.pow(2).mean(), b[:, 0].pow(2).mean(), (b[:, 1] - 1).pow(2).mean()]


def ordered(net):
    """body.weight [4, 3], body.bias [4], temperature [], then the heads' parameters."""
    return [net.body.weight, net.body.bias, net.temperature, *net.heads.parameters()]


def test_stack_gradients_of_an_autograd_loop():
    net, losses = net_losses()
    params = list(net.parameters())  # (the temperature comes first: a Module's own parameters do)
    # Task 0 does not reach heads[1], tasks 1 and 2 do not reach heads[0]: None gradients.
    grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
    assert sum(g is None for per_task in grads for g in per_task) == 6
    jac = gradagg.stack_gradients(grads)
    assert isinstance(jac, tuple) and len(jac) == len(params)
    assert [t.shape for t in jac] == [(3, *p.shape) for p in params]
    temp = next(i for i, p in enumerate(params) if p is net.temperature)
    assert jac[temp].shape == (3,)
    for i, per_task in enumerate(grads):
        for t, g, p in zip(jac, per_task, params):
            torch.testing.assert_close(t[i], torch.zeros_like(p) if g is None else g, rtol=0, atol=0)
    # The same J as batched autograd (zeros where a loss does not reach a parameter).
    reference = gradagg.autograd_jacobian(torch.stack(losses), params, retain_graph=True)
    for t, r in zip(jac, reference):
        torch.testing.assert_close(t, r)
    # And aggregate takes it: one result per parameter, 0-dim for the temperature.
    update = gradagg.aggregate(jac, "upgrad")
    assert [u.shape for u in update] == [p.shape for p in params] and update[temp].shape == ()
    for u, r in zip(update, gradagg.aggregate(tuple(reference), "upgrad")):
        torch.testing.assert_close(u, r)
    gradagg.set_grad(params, update)
    assert net.temperature.grad.shape == ()


def test_aggregate_explains_a_list_of_per_task_gradients():
    net, losses = net_losses()
    params = ordered(net)
    grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
    no_temp = [g[:2] + g[3:] for g in grads]  # None for the head a task does not reach
    with pytest.raises(TypeError, match=r"(?s)leaf 4 is NoneType.*list of 3 entries with shapes "
                                        r"\[\(\(4, 3\), \(4,\), \(1, 4\), \(1,\), None, None\), .*stack_gradients"):
        gradagg.aggregate(no_temp, "upgrad")
    with_temp = [g[:3] for g in grads]  # weight [4, 3], bias [4] and the temperature, 0-dim
    with pytest.raises(ValueError, match=r"(?s)leaf 2 of jac is 0-dimensional.*list of 3 entries with shapes "
                                         r"\[\(\(4, 3\), \(4,\), \(\)\), .*expects a Tensor \[K, \.\.\.\]"
                                         r".*gradagg\.stack_gradients"):
        gradagg.aggregate(with_temp, "upgrad")
    two_layers = [g[:2] + g[5:] for g in grads[1:]]  # [4, 3], [4], [2, 4], [2]: the leading dims differ
    with pytest.raises(ValueError, match=r"(?s)leaf 2 has 2.*list of 2 entries with shapes "
                                         r"\[\(\(4, 3\), \(4,\), \(2, 4\), \(2,\)\), .*stack_gradients"):
        gradagg.aggregate(two_layers, "upgrad")
    tensors = [torch.randn(4, 3), torch.randn(2), torch.randn(4, 3)]
    with pytest.raises(ValueError, match=r"(?s)leaf 1 has 2.*list of 3 entries with shapes "
                                         r"\[\(4, 3\), \(2,\), \(4, 3\)\].*stack_gradients"):
        gradagg.aggregate(tensors, "mean")
    with pytest.raises(ValueError, match=r"(?s)0-dimensional.*tuple of 2 entries.*stack_gradients"):
        gradagg.aggregate((torch.tensor(1.0), torch.tensor(2.0)), "mean")
    # A plain bad Jacobian gets no such hint.
    with pytest.raises(ValueError, match="0-dimensional") as info:
        gradagg.aggregate(torch.tensor(1.0), "mean")
    assert "stack_gradients" not in str(info.value)
    with pytest.raises(ValueError, match="leaf 1 has 4") as info:
        gradagg.aggregate({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)}, "mean")
    assert "stack_gradients" not in str(info.value)
    # Stacked, they are fine.
    for per_task, shapes in [(no_temp, [(4, 3), (4,), (1, 4), (1,), (2, 4), (2,)]),
                             (with_temp, [(4, 3), (4,), ()]), (two_layers, [(4, 3), (4,), (2, 4), (2,)])]:
        assert [t.shape for t in gradagg.aggregate(gradagg.stack_gradients(per_task), "upgrad")] == shapes
    # Not guessed around: per-task gradients whose leaves happen to share their leading dimension
    # (weight [4, 3] and bias [4]) form a valid pytree with K' = 4, and are read as one.
    body = [g[:2] for g in grads]
    out = gradagg.aggregate(body, "mean")
    assert [[t.shape for t in entry] for entry in out] == [[(3,), ()]] * 3
    torch.testing.assert_close(out[0][1], torch.stack([g[1] for g in body]).mean(1)[0])


def test_stack_gradients_layouts():
    g = torch.Generator().manual_seed(0)
    # Tensors, 0-dim tensors, dicts, nested structures.
    rows = [_randn(g, 2, 3) for _ in range(3)]
    assert torch.equal(gradagg.stack_gradients(rows), torch.stack(rows))
    scalars = [torch.tensor(float(i)) for i in range(3)]
    assert torch.equal(gradagg.stack_gradients(scalars), torch.tensor([0.0, 1.0, 2.0]))
    tasks = [{"w": _randn(g, 3), "inner": (_randn(g, 2, 2), torch.tensor(float(i)))} for i in range(2)]
    jac = gradagg.stack_gradients(tuple(tasks))
    assert jac["w"].shape == (2, 3) and jac["inner"][0].shape == (2, 2, 2)
    assert torch.equal(jac["inner"][1], torch.tensor([0.0, 1.0]))
    # A whole task None (a loss that reaches nothing) and None leaves become zeros.
    jac = gradagg.stack_gradients([(rows[0], None), None, (None, rows[1][0])])
    assert torch.equal(jac[0], torch.stack([rows[0], torch.zeros(2, 3), torch.zeros(2, 3)]))
    assert torch.equal(jac[1], torch.stack([torch.zeros(3), torch.zeros(3), rows[1][0]]))
    # A generator of gradients is a sequence too.
    assert gradagg.stack_gradients(r for r in rows).shape == (3, 2, 3)


def test_stack_gradients_is_differentiable():
    x = torch.randn(3, requires_grad=True)
    per_task = [(x * (i + 1), (x ** 2).sum() * i) for i in range(2)]
    jac = gradagg.stack_gradients(per_task)
    assert jac[1].shape == (2,) and jac[1].requires_grad
    (grad,) = torch.autograd.grad(jac[0].sum() + jac[1].sum(), x)
    torch.testing.assert_close(grad, torch.full((3,), 3.0) + 2 * x.detach())


def test_stack_gradients_errors():
    a, b = torch.ones(2, 3), torch.ones(3)
    with pytest.raises(ValueError, match="empty"):
        gradagg.stack_gradients([])
    with pytest.raises(ValueError, match=r"per_task\[1\] has a different structure.*2 leaves where per_task\[0\] "
                                         r"has 3"):
        gradagg.stack_gradients([(a, b, b), (a, b)])
    with pytest.raises(ValueError, match=r"per_task\[1\] has a different structure.*leaf \['v'\] where "
                                         r"per_task\[0\] has leaf \['w'\]"):
        gradagg.stack_gradients([{"w": a}, {"v": a}])
    with pytest.raises(ValueError, match=r"per_task\[1\] has a different structure.*other containers"):
        gradagg.stack_gradients([(a, b), [a, b]])
    with pytest.raises(ValueError, match=r"per_task\[2\]: leaf \[1\] has shape \(4,\) but per_task\[0\] has \(3,\)"):
        gradagg.stack_gradients([(a, b), (a, b), (a, torch.ones(4))])
    with pytest.raises(ValueError, match=r"per_task\[1\]: the gradient has shape \(\) but per_task\[0\] has \(3,\)"):
        gradagg.stack_gradients([b, torch.tensor(1.0)])
    with pytest.raises(ValueError, match=r"per_task\[1\]: leaf \['w'\] has dtype torch.float64"):
        gradagg.stack_gradients([{"w": b}, {"w": b.double()}])
    with pytest.raises(ValueError, match=r"leaf \[1\] is None for every task"):
        gradagg.stack_gradients([(a, None), (a, None)])
    with pytest.raises(ValueError, match="all 2 entries of per_task are None"):
        gradagg.stack_gradients([None, None])
    with pytest.raises(TypeError, match=r"per_task\[0\]: leaf \[1\] is a float"):
        gradagg.stack_gradients([(a, 1.0)])
    with pytest.raises(TypeError, match="already stacked"):
        gradagg.stack_gradients(a)
    with pytest.raises(TypeError, match="sequence of per-task gradients"):
        gradagg.stack_gradients({"w": a})


def test_stack_gradients_is_exported_and_documented():
    assert "stack_gradients" in gradagg.__all__ and gradagg.stack_gradients.__doc__
    assert "torch.autograd.grad" in gradagg.stack_gradients.__doc__


# --- parameter shards (group=) ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        jac = make(dict_with_scalar)
        full = by_hand(jac)
        # Rank 0 holds w, rank 1 the scalar temp and b: each rank has a 1-D leaf.
        local = {"w": jac["w"]} if rank == 0 else {"temp": jac["temp"], "b": jac["b"]}
        for method, opts in [("upgrad", {}), ("mgda", {"normalize": "sum"}), ("trimmed_mean", {"trim": 1}),
                             (PCGRAD_NSGD, {})]:
            call = Call(method, opts)
            out = call.aggregate(local, {**call.kwargs(), "group": dist.group.WORLD})
            reference = dict(zip(("w", "temp", "b"), split_like(call.aggregate(full), jac)))
            for name, o in out.items():
                assert o.shape == jac[name].shape[1:]
                torch.testing.assert_close(o, reference[name], rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or os.name == "nt", reason="needs torch.distributed with gloo")
def test_sharded_scalar_leaves():
    mp.spawn(_shard_worker, args=(2, _free_port()), nprocs=2, join=True)
