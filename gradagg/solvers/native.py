"""The C solvers of ``gradagg._kkt`` for host memory, behind the same interface as the torch ones.

On CPU a torch operation on a K x K matrix costs a few microseconds of dispatch whatever K is, and
an active-set or Newton solve makes hundreds of them: the C versions of the same algorithms run in
microseconds. They are used for float64 CPU tensors whenever the extension is built (``pip install``
compiles it; without a compiler it is skipped). Everything else, CUDA included, uses the torch
solvers, which stay the reference and are tested against the same oracles.

``GRADAGG_NATIVE=0`` in the environment, or ``with native.disabled():``, selects the torch solvers
on CPU too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ._loop import SolverError

try:
    from .. import _kkt
except ImportError:  # built without a C compiler: the torch solvers serve everywhere
    # Typed as the module: every call into it is behind ``_enabled`` (or ``available()``), False here.
    _kkt = None  # type: ignore[assignment]

_OK, _NONFINITE, _UNCONVERGED, _NOMEM, _FALLBACK = 0, 1, 2, 3, 4
_HOST_DTYPES = (torch.float32, torch.float64)
_enabled = _kkt is not None and os.environ.get("GRADAGG_NATIVE", "1") != "0"


def available() -> bool:
    """Whether the C extension was built and imported."""
    return _kkt is not None


def enabled() -> bool:
    """Whether CPU solves currently go to the C extension."""
    return _enabled


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Runs the block with the torch solvers on CPU as well (to test or compare them)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def usable(t: torch.Tensor) -> bool:
    """Whether the K x K problem held in ``t`` goes to the C solvers."""
    return _enabled and t.device.type == "cpu" and t.dtype == torch.float64 and not torch.compiler.is_compiling()


def on_host(t: torch.Tensor) -> bool:
    """Whether work on ``t`` (any dtype) may use the C extension: CPU, eager."""
    return _enabled and t.device.type == "cpu" and not torch.compiler.is_compiling()


class Unconverged(SolverError):
    """A C solver ran out of its budget. Its callers then run the torch reference, which raises
    ``SolverError`` itself if it fails too. (The C Cholesky factorisation can break down on a
    nearly singular working set where LAPACK's partial factor still leads to a certified answer.)"""


def _check(status: int, what: str) -> None:
    if status == _UNCONVERGED:
        raise Unconverged(f"{what} did not converge within its iteration budget; please report this input")
    if status == _NOMEM:
        raise MemoryError(f"{what}: out of memory for its work space")


def cagrad(g: torch.Tensor, c: float, max_outer: int, divisor: float) -> torch.Tensor:
    """CAGrad's weights, those of ``_methods.cagrad._cagrad_impl`` (degenerate case included)
    divided by ``divisor``."""
    g = g.contiguous()
    k = g.shape[-1]
    w = torch.empty(k, dtype=torch.float64)
    _check(_kkt.cagrad_weights(g.data_ptr(), w.data_ptr(), k, k, float(c), max_outer, float(divisor)),
           "CAGrad's search for the multiplier")
    return w


def mgda(g: torch.Tensor) -> torch.Tensor:
    """``_methods.mgda.mgda_weights``."""
    g = g.contiguous()
    k = g.shape[-1]
    w = torch.empty(k, dtype=torch.float64)
    _check(_kkt.mgda(g.data_ptr(), w.data_ptr(), k, k), "the nonnegative QP solver")
    return w


def dual_cone(g: torch.Tensor, lower: torch.Tensor, sum_rows: bool) -> torch.Tensor:
    """``_methods.dual_cone.project_dual_cone`` ([B, K]), or the sum of its rows ([K])."""
    g, lower = g.contiguous(), lower.contiguous()
    b, k = lower.shape
    out = torch.empty(k if sum_rows else (b, k), dtype=torch.float64)
    _check(_kkt.dual_cone(g.data_ptr(), lower.data_ptr(), out.data_ptr(), k, out.numel(), b, int(sum_rows)),
           "the nonnegative QP solver")
    return out


def fairgrad(g: torch.Tensor, beta: float, max_iter: int) -> torch.Tensor:
    """``_methods.fairgrad.solve_power_equation`` from its default start."""
    g = g.contiguous()
    k = g.shape[-1]
    w = torch.empty(k, dtype=torch.float64)
    _check(_kkt.fairgrad(g.data_ptr(), w.data_ptr(), k, k, float(beta), max_iter),
           "the Newton solver of A u = c u^(-beta)")
    return w


def nash(g: torch.Tensor, previous: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Nash-MTL's α for G, warm-started from ``previous`` (``_methods.nash_mtl._nash_impl``)."""
    g, previous = g.contiguous(), previous.contiguous()
    k = g.shape[-1]
    alpha = torch.empty(k, dtype=torch.float64)
    _check(_kkt.nash(g.data_ptr(), previous.data_ptr(), alpha.data_ptr(), k, k, max_iter), "Nash-MTL's Newton solver")
    return alpha


def aligned_mtl(g: torch.Tensor, pref: torch.Tensor, mode: int, cut: float) -> torch.Tensor | None:
    """Aligned-MTL's weights (``_methods.aligned_mtl``) from a Jacobi eigendecomposition where
    S G S is provably above ``cut``, or None (the caller then uses the graded factor)."""
    g, pref = g.contiguous(), pref.contiguous()
    k = g.shape[-1]
    w = torch.empty(k, dtype=torch.float64)
    status = _kkt.aligned_mtl(g.data_ptr(), pref.data_ptr(), w.data_ptr(), k, k, mode, float(cut))
    if status == _FALLBACK:
        return None
    _check(status, "Aligned-MTL")
    return w


def krum(g: torch.Tensor, f: int, m: int) -> torch.Tensor:
    """``_methods.krum._krum``."""
    g = g.contiguous()
    k = g.shape[-1]
    w = torch.empty(k, dtype=torch.float64)
    _check(_kkt.krum(g.data_ptr(), w.data_ptr(), k, k, f, m), "Krum")
    return w


#: Flags of ``prepare``.
RESCUE, NONFINITE, INDEFINITE = 1, 2, 4


def prepare(raw: torch.Tensor, shift: float, tiny: float) -> tuple[torch.Tensor, int]:
    """(½(G + Gᵀ) in float64, flags) from the accumulated float32 or float64 Gramian: RESCUE where its
    diagonal shows overflow or underflow (an entry below ``tiny``), NONFINITE, and (for ``shift`` ≥ 0)
    INDEFINITE where some eigenvalue of A = S G S is at or below ``shift`` (``spectral.well_above``
    fails)."""
    raw = raw.contiguous()
    k = raw.shape[-1]
    g = torch.empty((k, k), dtype=torch.float64)
    flags = _kkt.prepare(raw.data_ptr(), int(raw.dtype == torch.float32), k, g.data_ptr(), float(shift), float(tiny))
    return g, flags


def pcgrad(g: torch.Tensor, keys: torch.Tensor, weights: bool) -> torch.Tensor:
    """PCGrad's coefficient matrix C, or its column sums 1ᵀC (``weights``), for the projection
    orders given by sorting each row of ``keys`` [K, K] (the task itself last)."""
    g, keys = g.contiguous(), keys.contiguous()
    k = g.shape[-1]
    out = torch.empty(k if weights else (k, k), dtype=torch.float64)
    _kkt.pcgrad(g.data_ptr(), keys.data_ptr(), 0 if weights else out.data_ptr(), out.data_ptr() if weights else 0, k)
    return out


def pinv_weighting(name: str, g: torch.Tensor, cut: float) -> torch.Tensor | None:
    """The weights of IMTL-G or ConFIG (``name``) where S G S is provably invertible above ``cut`` on
    its nonzero rows (then A⁺1 is a Cholesky solve), else None: the caller uses the spectrum."""
    g = g.contiguous()
    k = g.shape[-1]
    w = torch.empty(k, dtype=torch.float64)
    status = getattr(_kkt, name)(g.data_ptr(), w.data_ptr(), k, k, float(cut))
    if status == _FALLBACK:
        return None
    _check(status, name)
    return w


def rows_ok(rows: list[torch.Tensor]) -> bool:
    """Whether the per-coordinate methods may run in C on these rows [K, n] (eager, CPU, float32/64,
    and no gradient to record: the C pass is invisible to autograd)."""
    if torch.is_grad_enabled() and any(r.requires_grad for r in rows):
        return False
    return _enabled and not torch.compiler.is_compiling() and all(
        r.device.type == "cpu" and r.dtype in (torch.float32, torch.float64) for r in rows)


def graddrop(r: torch.Tensor, leakage: torch.Tensor | None, seed: torch.Tensor, offset: int) -> torch.Tensor:
    """GradDrop of the rows r [K, n], with U for column c hashed from (seed, offset + c); seed is a
    0-dim int64 CPU tensor, read by the C code itself."""
    out = torch.empty(r.shape[1], dtype=r.dtype)
    leak = None if leakage is None else leakage.to(dtype=torch.float64, device="cpu").contiguous()
    _kkt.graddrop(r.data_ptr(), int(r.dtype == torch.float32), r.shape[0], r.shape[1], r.stride(0), r.stride(1),
                  0 if leak is None else leak.data_ptr(), seed.data_ptr(), offset, out.data_ptr())
    return out


def trimmed_mean(r: torch.Tensor, trim: int) -> torch.Tensor:
    """The trimmed mean of the rows r [K, n], column by column."""
    out = torch.empty(r.shape[1], dtype=r.dtype)
    _kkt.trimmed_mean(r.data_ptr(), int(r.dtype == torch.float32), r.shape[0], r.shape[1], r.stride(0), r.stride(1),
                      trim, out.data_ptr())
    return out


#: Up to this many entries of J, d = wᵀJ is formed in C, which also reports whether Σd is finite:
#: below it one BLAS call and one reduction cost more in dispatch than the arithmetic; above it
#: BLAS (multi-threaded) is faster and the extra reduction is small beside the product.
COMBINE_MAX = 1 << 18


def combine_ok(w: torch.Tensor, leaves: list[torch.Tensor], dtype: torch.dtype) -> bool:
    """Whether ``combine`` applies: eager CPU, float32/float64 leaves of the compute dtype, small J."""
    if (not _enabled or w.device.type != "cpu" or w.dtype != torch.float64 or dtype not in _HOST_DTYPES
            or torch.compiler.is_compiling()):
        return False
    if len(leaves) == 1:
        return leaves[0].dtype == dtype and leaves[0].numel() <= COMBINE_MAX
    return sum(leaf.numel() for leaf in leaves) <= COMBINE_MAX and all(leaf.dtype == dtype for leaf in leaves)


def combine(w: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(wᵀr for the rows r [K, n] in r's dtype, whether its sum is finite); w float64 [K], contiguous."""
    k, n = r.shape
    s0, s1 = r.stride()
    out = torch.empty(n, dtype=r.dtype)
    finite = _kkt.combine(r.data_ptr(), r.dtype == torch.float32, k, n, s0, s1, w.data_ptr(), out.data_ptr())
    return out, finite
