"""Where the K x K stage of a call runs: ``GRADAGG_SOLVER`` and ``gradagg.set_solver``.

- ``"cpu"``: CPU tensors; C (``gradagg._kkt``), or the torch reference without the extension.
- ``"triton"``: CUDA tensors with K ≤ 64 and the setting ``"triton"``; Triton kernels on the
  device, no host sync.
- ``"host"``: every other accelerator call (K > 64, setting ``"host"``, other accelerators, and
  the automatic choice for now): G is copied to the host once, the C solvers run, w comes back.

The setting is ``"triton"``, ``"host"`` or None (automatic), read from the environment variable
``GRADAGG_SOLVER`` at import and changed with ``set_solver``. The automatic choice on CUDA is the
host path until the Triton kernels have passed the CUDA half of the test suite on a real GPU
(``TRITON_VERIFIED``). With the setting ``"triton"`` and ``TRITON_INTERPRET=1``, CPU tensors take
the accelerator path through Triton's interpreter: that is how the kernels are tested without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Literal

import torch

Placement = Literal["cpu", "host", "triton"]
SETTINGS = ("triton", "host")
#: The largest K solved in one Triton program (padded to a power of two).
MAX_K = 64
#: Whether the Triton kernels have passed the CUDA half of the suite on a real GPU; until then the
#: automatic choice on CUDA is the host path.
TRITON_VERIFIED = False


def _parse(value: str | None, source: str) -> str | None:
    if value is None or value in ("", "auto"):
        return None
    if value not in SETTINGS:
        raise ValueError(f"{source} must be 'triton', 'host' or unset/'auto' (automatic); got {value!r}")
    return value


_setting = _parse(os.environ.get("GRADAGG_SOLVER"), "GRADAGG_SOLVER")


def set_solver(name: str | None) -> None:
    """Chooses where the K x K solvers run for accelerator tensors: ``"triton"`` (kernels on the
    device, K ≤ 64), ``"host"`` (one round trip to the C solvers) or None (automatic). CPU tensors
    always use the C solvers, except with ``"triton"`` under ``TRITON_INTERPRET=1`` (testing)."""
    global _setting
    _setting = _parse(name, "the solver setting")


def get_solver() -> str | None:
    """The current setting: ``"triton"``, ``"host"`` or None (automatic)."""
    return _setting


@contextlib.contextmanager
def use_solver(name: str | None) -> Iterator[None]:
    """Runs the block with ``set_solver(name)``, restoring the previous setting after it."""
    global _setting
    before = _setting
    set_solver(name)
    try:
        yield
    finally:
        _setting = before


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (``TRITON_INTERPRET=1``), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (it comes with torch's CUDA wheels; CPU installs need not have it) and
    torch registers Triton operators (``torch.library.triton_op``, torch ≥ 2.6)."""
    try:
        import triton  # noqa: F401
        from torch.library import triton_op, wrap_triton  # noqa: F401
    except ImportError:
        return False
    return True


def placement(t: torch.Tensor) -> Placement:
    """Where the K x K stage for the K x K (or K-row) tensor ``t`` runs."""
    k = t.shape[0] if t.dim() else 1  # (a 0-dim flag: placed as a K = 1 stage)
    if t.device.type == "cpu":  # (the host route runs there too when asked for: its copies are no-ops)
        if _setting == "host":
            return "host"
        return "triton" if _setting == "triton" and k <= MAX_K and interpreting() and triton_available() else "cpu"
    if _setting == "host" or k > MAX_K or t.device.type != "cuda":
        return "host"
    if _setting == "triton" or TRITON_VERIFIED:
        if not triton_available():
            if _setting == "triton":
                raise RuntimeError("GRADAGG_SOLVER=triton, but triton does not import or this torch has no "
                                   "torch.library.triton_op (torch ≥ 2.6); install the triton that your torch build "
                                   "requires, or use GRADAGG_SOLVER=host")
            return "host"
        return "triton"
    return "host"


def on_triton(t: torch.Tensor) -> bool:
    """Whether the K x K problem in ``t`` is solved by the Triton kernels."""
    return placement(t) == "triton"
