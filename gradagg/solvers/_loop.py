"""Iteration control shared by the K x K solvers.

The solvers run a fixed, documented iteration budget in which every update is masked, so a problem
that has converged is left unchanged by later iterations. That keeps them free of data-dependent
control flow. When the iterates live in host memory (CPU tensors) reading the "all converged" flag
costs nothing and is not a device synchronisation, so there the loop also stops early; the answer is
bit-identical to running the whole budget.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

from .._device import placement

try:
    from torch.library import infer_schema
except ImportError:  # torch < 2.5
    from torch._library.infer_schema import infer_schema

#: A solver body that ``opaque`` registers: the operator it returns has the same signature.
F = TypeVar("F", bound=Callable[..., Any])


def can_stop_early(t: torch.Tensor) -> bool:
    """True where reading a flag from ``t``'s device is free: host memory, and not while
    ``torch.compile`` traces (the bodies of the opaque operators run eagerly, so there it holds), nor
    on the Triton route, whose CPU tensors (in the interpreter) stand for the device."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and placement(t) != "triton"


def all_done(done: torch.Tensor) -> bool:
    """Reads a CPU flag tensor; only call when ``can_stop_early`` is true."""
    return bool(done.all())


class SolverError(RuntimeError):
    """A K x K solver ran out of its iteration budget without meeting its optimality conditions."""


def guard(result: torch.Tensor, converged: torch.Tensor, what: str, problem: torch.Tensor) -> torch.Tensor:
    """Never returns an unconverged answer as a number: raises where the flag is free to read
    (CPU), and turns the affected rows into NaN elsewhere. A non-finite ``problem`` (unchecked NaN
    input) is no solver failure: it just gives NaN."""
    finite = torch.isfinite(problem).all()
    converged = converged & finite
    if can_stop_early(converged) and not all_done(converged) and bool(finite):
        raise SolverError(f"{what} did not converge within its iteration budget; please report this input")
    ok = converged.reshape(converged.shape + (1,) * (result.dim() - converged.dim()))
    return torch.where(ok, result, float("nan"))


_LIB = torch.library.Library("gradagg", "DEF")


def _first_tensor(args: tuple[Any, ...]) -> torch.Tensor:
    """The first tensor among the arguments (or in a list argument: the leaves of a Jacobian)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    raise TypeError("a gradagg operator needs a tensor argument")


def _hosted(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run on the host when its tensors are on an accelerator whose K x K stage takes the
    host route (``gradagg._device``): compiled graphs reach the operators with device tensors,
    which eager calls on that route have already brought to the host once for the whole stage."""

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        first = _first_tensor(args)
        if first.device.type == "cpu" or placement(first) != "host" or any(isinstance(a, list) for a in args):
            return fn(*args)
        out = fn(*(a.to("cpu") if isinstance(a, torch.Tensor) else a for a in args))
        if isinstance(out, tuple):
            return tuple(o.to(first.device) for o in out)
        return out.to(first.device)

    return run


def opaque(name: str, fake: Callable[..., Any]) -> Callable[[F], F]:
    """Registers the decorated function as the operator ``gradagg::name``.

    Under ``torch.compile`` the operator is one opaque node (its eager body then runs inside, with
    the early exits above and the C solvers on CPU), so the solver loops are neither traced nor
    unrolled; on the Triton route, whose bodies hold no such loops, the body is traced instead. It
    is registered with the low-level ``torch.library.Library`` API, whose dispatch
    costs a few microseconds per call in a compiled graph (``custom_op`` adds Python layers that
    cost several times that). Eager calls run the function directly.
    """

    def wrap(fn: F) -> F:
        _LIB.define(name + infer_schema(fn, mutates_args=()))
        _LIB.impl(name, _hosted(fn), "CompositeExplicitAutograd")
        torch.library.register_fake(f"gradagg::{name}", fake, lib=_LIB)
        op = getattr(torch.ops.gradagg, name).default

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            # On the Triton route the body is traceable (torch ops and Triton operators): it is
            # traced, so that compiled graphs and CUDA graphs see the kernels themselves.
            if torch.compiler.is_compiling() and placement(_first_tensor(args)) != "triton":
                return op(*args)
            return fn(*args)

        call.op = op  # type: ignore[attr-defined]
        return cast(F, call)  # fn's signature (its callers pass arguments by position)

    return wrap
