"""The Gramian G = Σ_leaves J_l J_lᵀ, formed without concatenating leaves and without overflow.

The fast path multiplies each leaf as it comes, accumulating in float32 (float64 for float64
leaves). Squares of entries above ~1e19 overflow float32 and squares below ~1e-19 lose precision as
subnormals; when the diagonal shows either (a non-finite, tiny or zero G_ii), the Gramian is formed
again from the leaves divided by a power of two near their largest magnitude, which is exact, and the
scale is put back in float64. The result is always float64: it holds the squares of any float32
Jacobian, and every K x K method works in float64.
"""

from __future__ import annotations

import torch

from .solvers import native
from .solvers._loop import opaque
from .solvers.spectral import nearest_psd

# Positive diagonal entries below these are suspected of underflow in the accumulation dtype.
_TINY = {torch.float32: 2.0**-60, torch.float64: 2.0**-500}


def accumulation_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """float64 if any leaf is float64, else float32 (bfloat16 and float16 are widened)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _as_rows(leaf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows = leaf.reshape(leaf.shape[0], -1)
    return rows if rows.dtype == dtype else rows.to(dtype)


def fast(leaves: list[torch.Tensor], dtype: torch.dtype, factors: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """Σ_l J_l J_lᵀ accumulated leaf by leaf, each leaf first multiplied by the ``factors`` in turn."""
    g = None
    for leaf in leaves:
        rows = _as_rows(leaf, dtype)
        for factor in factors:
            rows = rows * factor
        g = rows @ rows.T if g is None else g.addmm_(rows, rows.T)
    return g


def rescaled(leaves: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    peaks = [leaf.detach().abs().amax().to(torch.float64) for leaf in leaves if leaf.numel() > 0]
    peak = torch.stack(peaks).amax() if peaks else torch.zeros((), dtype=torch.float64, device=leaves[0].device)
    exponent = torch.where(peak > 0, torch.frexp(peak)[1], 0).to(torch.float64)
    # 2^-e may not be representable in float32 (e down to -149), its two halves are.
    half = torch.exp2(-torch.floor(exponent / 2)).to(dtype)
    rest = torch.exp2(-exponent + torch.floor(exponent / 2)).to(dtype)
    return fast(leaves, dtype, (half, rest)).to(torch.float64) * torch.exp2(2.0 * exponent)


def needs_rescale(g: torch.Tensor) -> torch.Tensor:
    """Whether the fast Gramian overflowed or may have underflowed (a 0-dim bool tensor).

    A zero G_ii is suspect too: a row of entries below ~1e-23 squares to exact zeros in float32.
    (A truly zero gradient then costs one extra pass; the rescaled Gramian keeps it zero.)
    """
    diag = torch.diagonal(g)
    return ~torch.isfinite(diag).all() | (diag < _TINY[g.dtype]).any()


def gramian_of_leaves(leaves: list[torch.Tensor], rescue: bool) -> torch.Tensor:
    """float64 K x K Gramian. With ``rescue``, reads one flag and recomputes when it overflowed."""
    dtype = accumulation_dtype([leaf.dtype for leaf in leaves])
    g = fast(leaves, dtype)
    if rescue and bool(needs_rescale(g)):
        return rescaled(leaves, dtype)
    return g.to(torch.float64)


def clean(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """G symmetrised, and for float32 accumulation projected back to PSD where rounding left it a
    hair indefinite. (BLAS may sum G_ij and G_ji in different orders: in float32 they differ in
    the 7th digit, and the solvers read one triangle in one place and the other in another.)"""
    g = 0.5 * (g + g.T)
    return g if dtype == torch.float64 else nearest_psd(g)


def host_gramian(leaves: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, bool | None]:
    """The clean Gramian of CPU leaves, with one call into C to symmetrise, convert and test it
    (finite, overflow, PSD); returns (G, whether G is finite, or None where a rescue recomputed it)."""
    g, flags = native.prepare(fast(leaves, dtype), dtype != torch.float64)
    if flags & native.RESCUE:
        return clean(rescaled(leaves, dtype), dtype), None
    return (nearest_psd(g) if flags & native.INDEFINITE else g), not flags & native.NONFINITE


def _clean_gramian_impl(leaves: list[torch.Tensor], rescue: bool) -> torch.Tensor:
    """The clean float64 Gramian as one operator, so that the overflow rescue and the PSD test stay
    out of compiled graphs."""
    dtype = accumulation_dtype([leaf.dtype for leaf in leaves])
    if native.on_host(leaves[0]):
        return host_gramian(leaves, dtype)[0]
    return clean(gramian_of_leaves(leaves, rescue), dtype)


def _gramian_fake(leaves, rescue):
    k = leaves[0].shape[0]
    return leaves[0].new_empty((k, k), dtype=torch.float64)


clean_gramian_op = opaque("gramian", _gramian_fake)(_clean_gramian_impl)
