"""The host route (``GRADAGG_SOLVER=host``): the K x K stage of a call runs in C after one copy of
G (with the losses, the states and a seed) to the host. On CPU tensors the copies are no-ops, so
the route's logic is tested here against the default CPU route, which it must equal bit for bit
wherever no random draw is involved."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import gradagg
from gradagg import _device

from asserts import STATEFUL, WEIGHTINGS, init_for, options_for

K, D = 5, 40


def jacobian(seed: int = 0, k: int = K, d: int = D, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, d, generator=gen, dtype=torch.float64)
    j[1] = -0.7 * j[0]  # a conflict, so that the solvers' active sets are nontrivial
    return j.to(dtype)


def test_setting_is_validated_and_restored():
    before = gradagg.get_solver()
    with _device.use_solver(None):
        assert gradagg.get_solver() is None
        assert _device.placement(torch.zeros(3, 3)) == "cpu"
        with _device.use_solver("host"):
            assert _device.placement(torch.zeros(3, 3)) == "host"
            assert _device.placement(torch.zeros(65, 65)) == "host"
        assert _device.placement(torch.zeros(3, 3)) == "cpu"
    assert gradagg.get_solver() == before
    with pytest.raises(ValueError, match="'triton', 'host'"):
        gradagg.set_solver("gpu")
    with pytest.raises(ValueError, match="GRADAGG_SOLVER"):
        _device._parse("cuda", "GRADAGG_SOLVER")


@pytest.mark.parametrize("method", [m for m in WEIGHTINGS if not gradagg.methods()[m].random])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weightings_equal_the_cpu_route(method, dtype):
    j = jacobian(dtype=dtype)
    options = options_for(method, K)
    expected = gradagg.aggregate(j, method, **options)
    expected_w = gradagg.weights(j, method, **options)
    with _device.use_solver("host"):
        got = gradagg.aggregate(j, method, **options)
        got_w = gradagg.weights(j, method, **options)
    assert torch.equal(got, expected)
    assert torch.equal(got_w, expected_w)


@pytest.mark.parametrize("method", STATEFUL)
def test_states_advance_as_on_the_cpu_route(method):
    options = {**options_for(method, K), **({"update_every": 2} if method == "nash_mtl" else {})}
    losses = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    kwargs = {"losses": losses} if gradagg.methods()[method].uses_losses else {}
    states = [init_for(method, K), init_for(method, K)]
    for step in range(4):
        j = jacobian(step)
        gen = [torch.Generator().manual_seed(step) for _ in range(2)]
        expected = gradagg.aggregate(j, method, state=states[0], generator=gen[0], **options, **kwargs)
        with _device.use_solver("host"):
            got = gradagg.aggregate(j, method, state=states[1], generator=gen[1], **options, **kwargs)
        assert torch.equal(got, expected), step
        for name in states[0].fields:
            assert torch.equal(getattr(states[0], name), getattr(states[1], name)), (step, name)
            assert getattr(states[1], name).device.type == "cpu"


@pytest.mark.parametrize("method", ["pcgrad", "random", ("gradvac", "pcgrad")])
def test_random_methods_are_reproducible(method):
    """With a CPU generator the draws are the call's own (equal to the CPU route); without one a
    seed from the default generator seeds the host's draws, so a manual_seed reproduces them."""
    j = jacobian()
    state = {"state": gradagg.init(method, K)} if isinstance(method, tuple) else {}
    expected = gradagg.aggregate(j, method, generator=torch.Generator().manual_seed(3), **state)
    state = {"state": gradagg.init(method, K)} if isinstance(method, tuple) else {}
    with _device.use_solver("host"):
        got = gradagg.aggregate(j, method, generator=torch.Generator().manual_seed(3), **state)
        torch.manual_seed(11)
        first = gradagg.weights(j, "random")
        torch.manual_seed(11)
        again = gradagg.weights(j, "random")
    assert torch.equal(got, expected)
    assert torch.equal(first, again)
    assert torch.allclose(first.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_chains_tails_gramian_and_precomputed_gramian():
    j = jacobian()
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    expected = [
        gradagg.aggregate(j, ("pcgrad", "nsgd", "graddrop"), generator=gen(), state=gradagg.init("nsgd", K)),
        gradagg.aggregate(j, ("pcgrad", ("trimmed_mean", {"trim": 1})), generator=gen()),
        gradagg.gramian(j),
        gradagg.weights_from_gramian(j @ j.T, "mgda"),
        gradagg.weights(j, "upgrad", grad_normalizer="loss+", losses=torch.arange(1.0, K + 1)),
    ]
    with _device.use_solver("host"):
        got = [
            gradagg.aggregate(j, ("pcgrad", "nsgd", "graddrop"), generator=gen(), state=gradagg.init("nsgd", K)),
            gradagg.aggregate(j, ("pcgrad", ("trimmed_mean", {"trim": 1})), generator=gen()),
            gradagg.gramian(j),
            gradagg.weights_from_gramian(j @ j.T, "mgda"),
            gradagg.weights(j, "upgrad", grad_normalizer="loss+", losses=torch.arange(1.0, K + 1)),
        ]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_non_finite_input_raises_or_gives_nan():
    j = jacobian()
    j[2, 7] = float("nan")
    with _device.use_solver("host"):
        with pytest.raises(gradagg.NonFiniteError, match=r"tasks \[2\]"):
            gradagg.aggregate(j, "mgda")
        with pytest.raises(gradagg.NonFiniteError, match="Gramian"):
            gradagg.weights_from_gramian(j @ j.T, "upgrad")
        assert torch.isnan(gradagg.aggregate(j, "mgda", check_finite=False)).all()


def test_overflowing_float32_gramian_is_rescued():
    """Entries whose squares overflow float32: the Gramian is formed again, exactly rescaled."""
    j = jacobian(dtype=torch.float32) * 3e19
    expected = gradagg.weights(j, "upgrad")
    with _device.use_solver("host"):
        got = gradagg.weights(j, "upgrad")
    assert torch.isfinite(got).all()
    assert torch.equal(got, expected)


def test_cpu_and_host_routes_never_import_triton():
    """triton is imported lazily, only on the Triton route: CPU-only installs never need it."""
    code = ("import sys, torch, gradagg\n"
            "j = torch.randn(4, 10)\n"
            "for m in ('mgda', 'upgrad', 'imtl_g', 'pcgrad', 'graddrop'):\n"
            "    gradagg.aggregate(j, m)\n"
            "with gradagg.use_solver('host'):\n"
            "    gradagg.aggregate(j, 'cagrad')\n"
            "print('triton' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GRADAGG_SOLVER")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
