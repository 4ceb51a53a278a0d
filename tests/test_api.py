"""The public API: structure, validation with actionable messages, Gramians, finiteness, gradients."""

import numpy as np
import pytest
import torch

import gradagg

from asserts import ALL, DEVICES, RANDOM, WEIGHTINGS, options_for


def jac(k=3, d=5, device="cpu", dtype=torch.float64, seed=0):
    return torch.tensor(np.random.default_rng(seed).standard_normal((k, d)), dtype=dtype, device=device)


# --- methods() -----------------------------------------------------------------------------------


def test_methods_lists_every_method_with_its_facts():
    info = gradagg.methods()
    expected = {"sum", "mean", "constant", "random", "mgda", "pcgrad", "cagrad", "imtl_g", "upgrad", "dualproj",
                "aligned_mtl", "config", "graddrop", "krum", "trimmed_mean", "fairgrad"}
    assert expected <= set(info)
    assert info["sum"].aliases == ("identity",) and info["mgda"].aliases == ("mgda_ub",)
    assert info["imtl_g"].aliases == ("imtlg",)
    assert info["cagrad"].options == {"c": 0.5, "rescale": 0}
    assert info["upgrad"].options == {"pref": None} and info["aligned_mtl"].options["scale_mode"] == "min"
    assert info["fairgrad"].options == {"alpha": 1.0} and info["krum"].options["m"] == 1
    assert not info["graddrop"].weighting and not info["trimmed_mean"].weighting and info["mgda"].weighting
    assert info["random"].random and info["pcgrad"].random and info["graddrop"].random and not info["mgda"].random
    assert all(not m.stateful for m in info.values() if m.name in expected)


@pytest.mark.parametrize("alias,name", [("identity", "sum"), ("mgda_ub", "mgda"), ("imtlg", "imtl_g"),
                                        ("UPGrad", "upgrad")])
def test_aliases_are_the_same_method(alias, name):
    j = jac()
    torch.testing.assert_close(gradagg.aggregate(j, alias), gradagg.aggregate(j, name))


# --- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_grad_dict_round_trip(device):
    """The documented path: vmap(grad) over task indices gives a dict [K, *shape]; the result is a
    dict of *shape that can be subtracted from the parameters."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(device).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(16, 4, device=device, dtype=torch.float64), torch.randn(16, 3, device=device,
                                                                                 dtype=torch.float64)

    def task_loss(p, i):
        out = torch.func.functional_call(model, p, (x,))
        losses = ((out - y) ** 2).mean(0)
        return losses.gather(0, i.reshape(1)).squeeze(0)  # vmap cannot index with a batched i

    j = torch.func.vmap(torch.func.grad(task_loss), in_dims=(None, 0))(params, torch.arange(3, device=device))
    g = gradagg.aggregate(j, "upgrad")
    assert set(g) == set(params) and all(g[k].shape == params[k].shape for k in params)
    flat = torch.cat([j[k].reshape(3, -1) for k in params], 1)
    w = gradagg.weights(j, "upgrad")
    torch.testing.assert_close(torch.cat([g[k].reshape(-1) for k in params]), w @ flat)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", [m for m in WEIGHTINGS])
def test_weights_reproduce_aggregate(device, method):
    j = jac(4, 6, device)
    opts = options_for(method, 4)
    gen = (lambda: torch.Generator(device=device).manual_seed(3)) if method in RANDOM else (lambda: None)
    w = gradagg.weights(j, method, generator=gen(), **opts)
    assert w.shape == (4,) and w.dtype == torch.float64 and not w.requires_grad
    torch.testing.assert_close(gradagg.aggregate(j, method, generator=gen(), **opts), w @ j)
    g = gradagg.gramian(j)
    torch.testing.assert_close(gradagg.weights_from_gramian(g, method, generator=gen(), **opts), w)


@pytest.mark.parametrize("device", DEVICES)
def test_gramian_is_accumulated_per_leaf_in_float64(device):
    j = jac(3, 10, device, dtype=torch.float32)
    tree = [j[:, :4].reshape(3, 2, 2), {"x": j[:, 4:]}]
    g = gradagg.gramian(tree)
    assert g.dtype == torch.float64 and g.shape == (3, 3)
    ref = j.double() @ j.double().T
    torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("power", [-25, -20, 20, 25])
def test_gramian_survives_float32_overflow_and_underflow(device, power):
    j = jac(3, 100, device, dtype=torch.float32) * 10.0**power
    g = gradagg.gramian(j)
    ref = j.double() @ j.double().T
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g / ref.abs().max(), ref / ref.abs().max(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ALL)
def test_normalize_sum_rescales_to_the_plain_sum(device, method):
    j = jac(4, 6, device)
    opts = options_for(method, 4)
    gen = torch.Generator(device=device).manual_seed(0) if method in RANDOM else None
    d = gradagg.aggregate(j, method, normalize="sum", generator=gen, **opts)
    assert float(d.norm()) == pytest.approx(float(j.sum(0).norm()), rel=1e-9)
    d0 = gradagg.aggregate(j, method, generator=torch.Generator(device=device).manual_seed(0) if gen else None,
                           **opts)
    assert float(d @ d0) / float(d.norm() * d0.norm()) == pytest.approx(1.0, abs=1e-12)


# --- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_result_is_differentiable_with_weights_held_constant(device):
    j = jac(3, 4, device).requires_grad_(True)
    d = gradagg.aggregate(j, "mgda")
    assert d.requires_grad
    w = gradagg.weights(j, "mgda")
    (d * torch.arange(4.0, device=device, dtype=torch.float64)).sum().backward()
    expected = w.unsqueeze(1) * torch.arange(4.0, device=device, dtype=torch.float64)
    torch.testing.assert_close(j.grad, expected)


# --- non-finite input ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_the_tasks(device, method, bad):
    j = jac(5, 6, device)
    j[1, 2] = bad
    j[3, 0] = -bad
    with pytest.raises(gradagg.NonFiniteError, match=r"tasks \[1, 3\]"):
        gradagg.aggregate(j, method, **options_for(method, 5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ALL)
def test_unchecked_non_finite_input_is_never_a_finite_answer(device, method):
    j = jac(5, 6, device)
    j[2, :] = float("nan")
    d = gradagg.aggregate(j, method, check_finite=False, **options_for(method, 5))
    assert not torch.isfinite(d).all()


# --- validation ----------------------------------------------------------------------------------


def test_unknown_method_lists_choices_and_closest():
    with pytest.raises(ValueError, match=r"unknown method 'upgard'.*Did you mean 'upgrad'.*Valid methods: .*mgda"):
        gradagg.aggregate(jac(), "upgard")
    with pytest.raises(TypeError, match="method must be a string"):
        gradagg.aggregate(jac(), 3)


@pytest.mark.parametrize("method,opts,pattern", [
    ("cagrad", {"cc": 1.0}, r"unknown option 'cc' for method 'cagrad'.*Did you mean 'c'"),
    ("cagrad", {"c": -1.0}, r"'c' must be ≥ 0"),
    ("cagrad", {"rescale": 3}, r"'rescale' must be one of 0, 1, 2"),
    ("mgda", {"c": 1.0}, r"Valid options: none"),
    ("fairgrad", {"alpha": 0.0}, r"'alpha' must be > 0"),
    ("constant", {}, r"requires the option 'weights'"),
    ("constant", {"weights": [1.0, 2.0]}, r"length K=3"),
    ("constant", {"weights": [1.0, -2.0, 1.0]}, r"nonnegative"),
    ("upgrad", {"pref": [0.5, 0.5]}, r"length K=3"),
    ("upgrad", {"pref": [0.5, -0.5, 1.0]}, r"nonnegative"),
    ("upgrad", {"pref": [0.0, 0.0, 0.0]}, r"positive sum"),
    ("dualproj", {"pref": [1.0, float("nan"), 1.0]}, r"finite"),
    ("aligned_mtl", {"scale_mode": "max"}, r"one of 'min', 'median', 'rmse'"),
    ("krum", {"f": 1}, r"'f' must satisfy 0 ≤ f ≤ K − 3 \(here K=3\)"),
    ("krum", {"f": 0, "m": 4}, r"'m' must satisfy 1 ≤ m ≤ K"),
    ("trimmed_mean", {"trim": 2}, r"0 ≤ 2·trim < K"),
    ("graddrop", {"leakage": 1.5}, r"\[0, 1\]"),
])
def test_bad_options(method, opts, pattern):
    with pytest.raises(ValueError, match=pattern):
        gradagg.aggregate(jac(), method, **opts)


@pytest.mark.parametrize("bad,exc,pattern", [
    ({}, ValueError, "jac is empty"),
    (torch.zeros(0, 3), ValueError, "K = 0"),
    (torch.tensor(1.0), ValueError, "0-dimensional"),
    ([torch.zeros(3, 2), torch.zeros(4, 2)], ValueError, "leaf 1 has 4"),
    (torch.zeros(3, 2, dtype=torch.int64), TypeError, "real floating point"),
    (torch.zeros(3, 2, dtype=torch.complex64), TypeError, "real floating point"),
    ([torch.zeros(3, 2), "x"], TypeError, "leaf 1 is str"),
])
def test_bad_jacobians(bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        gradagg.aggregate(bad, "mean")


def test_bad_call_arguments():
    with pytest.raises(ValueError, match="normalize must be None or 'sum'"):
        gradagg.aggregate(jac(), "mgda", normalize="l2")
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        gradagg.aggregate(jac(), "random", generator=0)
    with pytest.raises(ValueError, match="stateless and takes no state"):
        gradagg.aggregate(jac(), "mgda", state=object())
    with pytest.raises(ValueError, match="square K x K"):
        gradagg.weights_from_gramian(torch.zeros(2, 3), "mgda")
    with pytest.raises(gradagg.NonFiniteError):
        gradagg.weights_from_gramian(torch.full((2, 2), float("nan")), "mgda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_devices_are_refused():
    with pytest.raises(ValueError, match="one device"):
        gradagg.aggregate([torch.zeros(2, 3), torch.zeros(2, 3, device="cuda")], "mean")


def test_same_generator_seed_same_result():
    j = jac(4, 50)
    for method in RANDOM:
        a = gradagg.aggregate(j, method, generator=torch.Generator().manual_seed(5))
        b = gradagg.aggregate(j, method, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b)


def test_mixed_devices_are_refused_without_a_gpu_too():
    """The meta device stands in for a second device on a CPU-only machine."""
    with pytest.raises(ValueError, match="one device"):
        gradagg.aggregate([torch.zeros(2, 3), torch.zeros(2, 3, device="meta")], "mean")
    state = gradagg.init("nsgd", 2)
    gradagg.aggregate(torch.ones(2, 3), "nsgd", state=state)
    state.to("meta")
    assert state.ref.device.type == "meta" and state.step.device.type == "meta"
    with pytest.raises(ValueError, match=r"state is on meta but the Jacobian is on cpu"):
        gradagg.aggregate(torch.ones(2, 3), "nsgd", state=state)
