"""The Triton route as a whole (``GRADAGG_SOLVER=triton``; on CPU tensors through Triton's
interpreter): what a call dispatches, what it reads back, and that it equals the CPU route."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import gradagg
from gradagg import _device
from gradagg._registry import lookup

from asserts import CROSS, init_for, options_for

pytest.importorskip("gradagg.solvers.gpu.nnqp")  # triton, and torch ≥ 2.6 for triton_op
from gradagg.solvers.gpu.census import Census

pytestmark = pytest.mark.skipif(not _device.interpreting() and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU) or CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: The op budget of one call on the accelerator route (issue 12).
MAX_OPS = 60
METHODS = [m for m in sorted(gradagg.methods()) if m not in CROSS]  # cross=: tests/test_cross.py
#: Methods whose K x K stage has no Triton kernel: on CUDA they take the host route (one round trip).
HOSTED = [m for m in METHODS if not lookup(m).kernel]
#: Per-coordinate methods with a K x D state (excess_mtl, moco, db_mtl): torch operations over J on
#: its device, without iterations; their op count follows J's layout and rows, not a K x K stage.
WIDE = [m for m in METHODS if lookup(m).combine is not None and lookup(m).stateful]


def jacobian(k: int, d: int = 48, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Rows with the hard features: a conflict, a duplicate, a zero row and spread norms."""
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, d, generator=gen, dtype=torch.float64)
    if k >= 3:
        j[1] = -0.5 * j[0]
        j[2] = j[0] * 1e-3
    if k >= 5:
        j[3] = 0.0
        j[4] *= 1e3
    return j.to(device=DEVICE, dtype=dtype)


def arguments(method: str, k: int, device) -> dict:
    """Valid options and the state, losses or generator that ``method`` needs, for K tasks."""
    info = gradagg.methods()[method]
    extra = dict(options_for(method, k) or {})
    if info.stateful:
        extra["state"] = init_for(method, k)
    if info.uses_losses:
        extra["losses"] = torch.linspace(1.0, 2.0, k, device=device)
    if info.random:
        extra["generator"] = torch.Generator(device=device).manual_seed(1)
    return extra


def call(method: str, j: torch.Tensor, **kwargs):
    return gradagg.aggregate(j, method, **arguments(method, j.shape[0], j.device), **kwargs)


def census(method: str, k: int, **kwargs) -> Census:
    j = jacobian(k)
    with _device.use_solver("triton"):
        call(method, j, **kwargs)  # a first call fills the caches of plans and fixed weights
        with Census() as counted:
            call(method, j, **kwargs)
    return counted


@pytest.mark.parametrize("method", HOSTED)
def test_methods_without_a_kernel_take_the_host_route(method, monkeypatch):
    from gradagg import _api

    staged = []
    original = _api._host_stage
    monkeypatch.setattr(_api, "_host_stage", lambda *a, **kw: (staged.append(1), original(*a, **kw))[1])
    j = jacobian(4)
    with _device.use_solver("triton"):
        call(method, j)
    assert staged == [1]


@pytest.mark.parametrize("method", WIDE)
def test_wide_methods_read_nothing(method):
    counted = census(method, 5)
    assert not counted.reads and not counted.opaque, (counted.reads, counted.opaque)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in HOSTED + WIDE])
def test_ops_per_call_are_few_constant_and_read_nothing(method):
    small, large = census(method, 3), census(method, 9)
    assert small.total <= MAX_OPS, dict(small.ops)
    assert small.total == large.total, (dict(small.ops), dict(large.ops))
    assert small.launches == large.launches
    if method != "constant":  # (its option, a user's list, is validated in host memory before any work)
        assert not small.reads and not large.reads, (small.reads, large.reads)
    assert not small.opaque, small.opaque  # no host-side operator is reached


@pytest.mark.parametrize("method", ["mgda", "upgrad", "nash_mtl", "mean"])
def test_check_finite_false_reads_nothing_and_true_reads_one_flag(method):
    assert not census(method, 6, check_finite=False).reads
    assert len(census(method, 6, check_finite=True).reads) == 1


@pytest.mark.parametrize("method", METHODS)
def test_equals_the_cpu_route(method):
    """Every method, GradDrop included (the kernel hashes the same uniforms from the same seed)."""
    if DEVICE != "cpu":
        pytest.skip("the CPU route is compared on CPU tensors")
    for k in (2, 5):
        if options_for(method, k) is None:
            continue
        j = jacobian(k, dtype=torch.float64)
        expected = call(method, j)
        with _device.use_solver("triton"):
            got = call(method, j)
        scale = j.norm(dim=1).max() * max(1.0, float(expected.abs().max() / j.abs().max()))
        assert torch.allclose(got, expected, rtol=1e-7, atol=1e-9 * float(scale)), (method, k, got, expected)


@pytest.mark.parametrize("method", [m for m in METHODS if gradagg.methods()[m].stateful])
def test_states_advance_as_on_the_cpu_route(method):
    if DEVICE != "cpu":
        pytest.skip("the CPU route is compared on CPU tensors")
    k = 5
    states = [init_for(method, k), init_for(method, k)]
    options = {"update_every": 2} if method == "nash_mtl" else {"update_at": 1} if "gradnorm" in method else {}
    options = {**options_for(method, k), **options}
    for step in range(3):
        # Full rank: GradVac's target cosines of rows that a projection nearly cancels are noise.
        j = torch.randn(k, 48, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        j[1] -= 0.8 * j[0]  # conflicts all the same
        uses = gradagg.methods()[method].uses_losses
        extra = {"losses": torch.linspace(1.0, 2.0, k) * (step + 1)} if uses else {}
        gens = [torch.Generator().manual_seed(step) for _ in range(2)]
        expected = gradagg.aggregate(j, method, state=states[0], generator=gens[0], **options, **extra)
        with _device.use_solver("triton"):
            got = gradagg.aggregate(j, method, state=states[1], generator=gens[1], **options, **extra)
        assert torch.allclose(got, expected, rtol=1e-7, atol=1e-9 * float(j.norm(dim=1).max())), (step, got, expected)
        for name in states[0].fields:
            a, b = getattr(states[0], name), getattr(states[1], name)
            assert torch.allclose(b.double(), a.double(), rtol=1e-7, atol=1e-9), (step, name, a, b)


def test_gramian_and_weights_from_gramian_equal_the_cpu_route():
    if DEVICE != "cpu":
        pytest.skip("the CPU route is compared on CPU tensors")
    j = jacobian(6, dtype=torch.float64)
    g = j @ j.T
    def run():
        gen = torch.Generator().manual_seed(0)
        return [gradagg.gramian(j)] + [gradagg.weights_from_gramian(g, m, generator=gen)
                                       for m in ("mgda", "imtl_g", "pcgrad")]

    expected = run()
    with _device.use_solver("triton"):
        got = run()
    scale = float(torch.diagonal(g).max())
    assert torch.allclose(got[0], expected[0], rtol=0, atol=1e-14 * scale)
    for m, a, b in zip(("mgda", "imtl_g", "pcgrad"), got[1:], expected[1:]):
        # G is singular here (duplicate, opposite and zero rows): compare the directions Jᵀw.
        assert torch.allclose(a @ j, b @ j, rtol=1e-7, atol=1e-9 * float(j.norm(dim=1).max())), m


def test_non_finite_input_gives_nan_or_raises_when_asked():
    j = jacobian(5)
    j[2, 3] = float("inf")
    with _device.use_solver("triton"):
        assert torch.isnan(gradagg.aggregate(j, "upgrad")).all()
        assert not torch.isfinite(gradagg.aggregate(j, "mean")).all()
        with pytest.raises(gradagg.NonFiniteError, match=r"tasks \[2\]"):
            gradagg.aggregate(j, "upgrad", check_finite=True)


def test_overflow_gives_nan_by_default_and_is_rescued_when_checked():
    """Float32 entries whose squares overflow the accumulation: NaN, never a wrong number, unless
    check_finite=True reads the flag and forms G again with exact rescaling."""
    j = jacobian(5, dtype=torch.float32) * 3e19
    expected = gradagg.aggregate(j.cpu().double(), "upgrad")  # (J's null space leaves w undetermined: compare d)
    with _device.use_solver("triton"):
        assert torch.isnan(gradagg.aggregate(j, "upgrad")).all()
        rescued = gradagg.aggregate(j, "upgrad", check_finite=True)
    assert torch.isfinite(rescued).all()
    assert (rescued.cpu().double() - expected).norm() <= 1e-4 * expected.norm()


@pytest.mark.skipif(sys.platform != "linux", reason="triton's bundled ptxas is for Linux")
def test_kernels_compile_ahead_of_time_without_spills():
    """triton.compile for sm_80 and sm_90 (no GPU needed) rejects what the interpreter accepts
    (``break``, early ``return`` in loops); ptxas -v reports spills, which must be none at K ≤ 32."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "gradagg.solvers.gpu.aot", "--sizes", "2,4,8,16,32,64"], env=env,
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    from gradagg.solvers.gpu import aot

    assert out.stdout.count("ok ") == 2 * 6 * len(list(aot.kernels())), out.stdout  # targets x sizes x kernels


@pytest.mark.parametrize("method", ["mgda", "upgrad", "cagrad", "nash_mtl", "pcgrad", "imtl_g", "trimmed_mean"])
def test_compiled_fullgraph_traces_through_the_kernels(method):
    """The Triton operators are traceable (``torch.library.triton_op``): a fullgraph compile of the
    call equals the eager call. (On CPU tensors the graph runs with the eager backend: the
    interpreter cannot run on aot_autograd's functional tensors, and inductor makes no CPU code for
    Triton kernels.)"""
    j = jacobian(5)
    backend = "inductor" if DEVICE == "cuda" else "eager"
    with _device.use_solver("triton"):
        kwargs = arguments(method, 5, j.device)
        kwargs.pop("generator", None)  # dynamo does not trace generators: pcgrad uses the default one
        torch.manual_seed(7)
        expected = gradagg.aggregate(j, method, **kwargs)
        torch._dynamo.reset()
        compiled = torch.compile(lambda x: gradagg.aggregate(x, method, **kwargs), fullgraph=True, backend=backend)
        torch.manual_seed(7)
        got = compiled(j)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * float(j.norm(dim=1).max()))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@pytest.mark.parametrize("method", [m for m in METHODS if gradagg.methods()[m].weighting])
def test_no_host_sync_on_cuda(method):
    """CUDA's own sync detector: any synchronising call inside aggregate raises."""
    j = jacobian(6)
    with _device.use_solver("triton"):
        call(method, j)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call(method, j)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.parametrize("method", ["mgda", "upgrad", "cagrad", "nash_mtl", "pcgrad", "imtl_g", "fairgrad"])
def test_a_training_step_compiled_with_cuda_graphs_captures_the_kernels(method):
    """A whole step (losses, vmap(grad) Jacobian, aggregation, optimizer) compiled with
    mode="reduce-overhead": the kernels are captured in the CUDA graph and the step equals eager."""
    from torch._dynamo.utils import counters
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).cuda()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, y = torch.randn(64, 16, device="cuda"), torch.randn(64, 4, device="cuda")
    state = gradagg.init(method, 4, device="cuda") if gradagg.methods()[method].stateful else None

    def task_loss(p, i):
        out = functional_call(model, p, (x,))
        return ((out - y) ** 2).mean(0)[i]

    def step(p):
        jac = vmap(grad(task_loss), in_dims=(None, 0))(p, torch.arange(4, device="cuda"))
        d = gradagg.aggregate(jac, method, state=state)
        return {name: p[name] - 0.1 * d[name] for name in p}

    with _device.use_solver("triton"):
        expected = step(params)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):
            got = compiled(params)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    for name in params:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-6), name
