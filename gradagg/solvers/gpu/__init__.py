"""The K x K solvers as Triton kernels, for CUDA tensors (and, under ``TRITON_INTERPRET=1``, CPU ones).

Each solver runs as one Triton program (grid (1,), or one program per row of a batch) that holds the
padded K x K problem in registers as float64 tiles and iterates inside the kernel until its
optimality conditions hold, like the C solvers of ``gradagg._kkt`` whose algorithms they follow
(same tolerances, same budgets). Nothing is read back to the host: a problem that runs out of its
budget gives NaN. Each launcher is a ``torch.library.triton_op``, so ``torch.compile`` traces it
and CUDA graphs capture it.

triton is imported only when a module here is (``gradagg._device`` decides when), so that CPU-only
installs never need it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ParamSpec, TypeVar, cast

import torch
import triton

P = ParamSpec("P")
R = TypeVar("R")


def triton_op(name: str, *, mutates_args: str | Iterable[str]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """``torch.library.triton_op`` with a precise type (torch annotates its result as a bare
    ``Callable``): the operator is called with the arguments of the launcher it registers and
    returns what the launcher returns."""
    return cast("Callable[[Callable[P, R]], Callable[P, R]]",
                torch.library.triton_op(name, mutates_args=mutates_args))


def padded(k: int) -> int:
    """K padded to the power of two (at least 2) that a program's tiles hold."""
    power: int = triton.next_power_of_2(k)
    return max(2, power)


def warps(k: int) -> int:
    """Warps per program: a 64 x 64 float64 tile needs 8 to stay in registers."""
    return 8 if k > 32 else 4
