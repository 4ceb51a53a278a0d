"""The Gramian G = Σ_leaves J_l J_lᵀ, formed without concatenating leaves and without overflow, and
cleaned of what its rounding leaves undetermined.

The fast path multiplies each leaf as it comes, accumulating in float32 (float64 for float64
leaves) over chunks of at most ``CHUNK`` columns whose partial Gramians are added in float64, so
that the rounding does not grow with D (see ``_numerics``). Squares of entries above ~1e19 overflow
float32 and squares below ~1e-19 lose precision as subnormals; when the diagonal shows either (a
non-finite, tiny or zero G_ii), the Gramian is formed again from the leaves divided by a power of
two near their largest magnitude, which is exact, and the scale is put back in float64. The result
is always float64: it holds the squares of any float32 Jacobian, and every K x K method works in
float64.

Cleaning: G is symmetrised, and the eigenvalues of A = S G S at or below its noise floor's cut τ
(``_numerics``) are set to 0 (``spectral.denoise``), which also repairs a G that rounding left a
hair indefinite. With it comes the projector onto the range of G that the weights are reduced by.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from ._device import on_triton, placement
from ._numerics import CHUNK, FOLD, eigen_cut, full_precision_matmul, gramian_noise
from .solvers import native
from .solvers._loop import can_stop_early, opaque
from .solvers.spectral import denoise, well_above

# Positive diagonal entries below these are suspected of underflow in the accumulation dtype.
_TINY = {torch.float32: 2.0**-60, torch.float64: 2.0**-500}


class Gram(NamedTuple):
    """A clean Gramian (float64) with what the weights need to know of its rounding.

    ``noise`` is δ of ``_numerics``; ``proj`` the projector (K x K, acting on weights) onto the
    range of G where cleaning removed a null space, else None; ``finite`` whether G is finite where
    that came for free, else None."""

    g: torch.Tensor
    noise: float
    proj: torch.Tensor | None = None
    finite: bool | None = None


def accumulation_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """float64 if any leaf is float64, else float32 (bfloat16 and float16 are widened)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def noise_of(leaves: list[torch.Tensor], sharded: bool = False) -> float:
    """δ for the Gramian of these leaves (``_numerics.gramian_noise``). For a Gramian summed over the
    shards of a process group (``sharded``), that of the longest sums any rank makes (2 CHUNK
    columns), so that every rank takes the same rank decisions whatever its shard's width."""
    if len(leaves) == 1:  # the common case, without the lists
        leaf = leaves[0]
        width = 2 * CHUNK if sharded else leaf.numel() // max(leaf.shape[0], 1)
        return _noise(leaf.dtype, width)
    dtypes = list({leaf.dtype for leaf in leaves})
    k = max(leaves[0].shape[0], 1)
    width = 2 * CHUNK if sharded else 0
    for leaf in leaves:  # δ only grows with D up to 2 CHUNK columns
        if width >= 2 * CHUNK:
            break
        width += leaf.numel() // k
    return gramian_noise(accumulation_dtype(dtypes), dtypes, width)


@functools.lru_cache(maxsize=256)
def _noise(dtype: torch.dtype, width: int) -> float:
    return gramian_noise(accumulation_dtype([dtype]), [dtype], width)


def _as_rows(leaf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows = leaf.reshape(leaf.shape[0], -1)
    return rows if rows.dtype == dtype else rows.to(dtype)


def _fold(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part.to(torch.float64) if total is None else total.add_(part)


def fast(leaves: list[torch.Tensor], dtype: torch.dtype, factors: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """Σ_l J_l J_lᵀ accumulated in ``dtype`` by products over less than 2 ``CHUNK`` columns, at most
    ``FOLD`` columns of which are added in ``dtype`` before the partial goes into a float64 total,
    each leaf first multiplied by the ``factors`` in turn. A leaf's whole chunks are one batched
    product (a strided view, no copy): faster than one long product (MKL's skinny products sum
    nearly sequentially) and far more exact. Returns float64, or, where everything fitted in one
    partial, that partial in ``dtype`` (the caller converts it). A traced call (the Triton route
    under ``torch.compile``) cannot change the float32 matmul precision: it runs with the user's."""
    if not torch.compiler.is_compiling() and torch.get_float32_matmul_precision() != "highest":
        with full_precision_matmul():
            return fast(leaves, dtype, factors)
    total, part, width = None, None, 0
    for leaf in leaves:
        rows = _as_rows(leaf, dtype)
        for factor in factors:
            rows = rows * factor
        n = rows.shape[1]
        whole = n // CHUNK if n >= 2 * CHUNK and dtype != torch.float64 else 0
        if whole:
            k, (s0, s1) = rows.shape[0], rows.stride()
            blocks = rows.as_strided((whole, k, CHUNK), (CHUNK * s1, s0, s1))
            total = _fold(total, torch.bmm(blocks, blocks.transpose(1, 2)).sum(0, dtype=torch.float64))
            rows = rows[:, whole * CHUNK:]
            n = rows.shape[1]
        if n == 0:
            continue
        part = rows @ rows.T if part is None else part.addmm_(rows, rows.T)
        width += n
        if width >= FOLD and dtype != torch.float64:  # (a few products summed in float32, then float64)
            total, part, width = _fold(total, part), None, 0
    if total is None:
        if part is not None:
            return part
        k = leaves[0].shape[0]  # no columns at all
        return torch.zeros(k, k, dtype=torch.float64, device=leaves[0].device)
    return total if part is None else _fold(total, part)


def rescaled(leaves: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    peaks = [leaf.detach().abs().amax().to(torch.float64) for leaf in leaves if leaf.numel() > 0]
    peak = torch.stack(peaks).amax() if peaks else torch.zeros((), dtype=torch.float64, device=leaves[0].device)
    exponent = torch.where(peak > 0, torch.frexp(peak)[1], 0).to(torch.float64)
    # 2^-e may not be representable in float32 (e down to -149), its two halves are.
    half = torch.exp2(-torch.floor(exponent / 2)).to(dtype)
    rest = torch.exp2(-exponent + torch.floor(exponent / 2)).to(dtype)
    return fast(leaves, dtype, (half, rest)).to(torch.float64) * torch.exp2(2.0 * exponent)


def needs_rescale(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whether the fast Gramian (accumulated in ``dtype``) overflowed or may have underflowed (a
    0-dim bool tensor).

    A zero G_ii is suspect too: a row of entries below ~1e-23 squares to exact zeros in float32.
    (A truly zero gradient then costs one extra pass; the rescaled Gramian keeps it zero.)
    """
    diag = torch.diagonal(g)
    return ~torch.isfinite(diag).all() | (diag < _TINY[dtype]).any()


def gramian_of_leaves(leaves: list[torch.Tensor], rescue: bool) -> torch.Tensor:
    """float64 K x K Gramian. With ``rescue``, reads one flag and recomputes when it overflowed."""
    dtype = accumulation_dtype([leaf.dtype for leaf in leaves])
    g = fast(leaves, dtype).to(torch.float64)
    if rescue and bool(needs_rescale(g, dtype)):
        return rescaled(leaves, dtype)
    return g


def clean(g: torch.Tensor, noise: float, checked: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(G symmetrised and denoised, the range projector or None). Where a Cholesky factorisation
    proves λ_min(A) > τ (far cheaper than an eigendecomposition; ``checked`` says it failed already)
    G stays as it is. On the Triton route, one kernel does it all without reading anything back
    (a non-finite G gives NaN)."""
    if on_triton(g):
        from .solvers.gpu import spectral as gpu

        g, proj, _ = gpu.clean(g, eigen_cut(noise, g.shape[-1]), 0.0)
        return g, proj
    g = 0.5 * (g + g.T)
    cut = eigen_cut(noise, g.shape[-1])
    if can_stop_early(g) and not checked and well_above(g, cut):
        return g, None
    return denoise(g, cut)


def triton_gramian(leaves: list[torch.Tensor], dtype: torch.dtype, noise: float, check: bool) -> Gram:
    """The clean Gramian on the Triton route: the fast products, then one kernel that symmetrises,
    flags overflow and non-finite entries, and denoises. Nothing is read back unless ``check``:
    a Gramian that overflowed or underflowed the accumulation, or holds NaN or Inf, then gives NaN
    weights. With ``check`` (``check_finite=True``) one flag is read, an overflow is rescued by
    the exact rescaling, and ``finite`` is known."""
    from .solvers.gpu import spectral as gpu

    k = leaves[0].shape[0]
    cut = eigen_cut(noise, k)
    g, proj, status = gpu.clean(fast(leaves, dtype).to(torch.float64), cut, _TINY[dtype])
    if not check:
        return Gram(g, noise, proj, None)
    flags = int(status)
    if flags & native.RESCUE:
        g, proj, status = gpu.clean(rescaled(leaves, dtype), cut, 0.0)
        flags = int(status)
    return Gram(g, noise, proj, not flags & native.NONFINITE)


def host_gramian(leaves: list[torch.Tensor], dtype: torch.dtype, noise: float) -> Gram:
    """The clean Gramian of CPU leaves, with one call into C to symmetrise and test it (finite,
    overflow, λ_min(A) above the cut)."""
    return prepared(fast(leaves, dtype), dtype, noise, lambda: rescaled(leaves, dtype))


def prepared(raw: torch.Tensor, dtype: torch.dtype, noise: float, rescue: Callable[[], torch.Tensor] | None) -> Gram:
    """The clean Gramian from ``raw`` (a CPU Gramian accumulated in ``dtype``), ``rescue()`` giving
    the exactly rescaled one (on the CPU) where the diagonal shows overflow or underflow."""
    k = raw.shape[-1]
    if not native.enabled():  # the torch reference
        g = raw.to(torch.float64)
        if rescue is not None and bool(needs_rescale(g, dtype)):
            g = rescue()
        g, proj = clean(g, noise)
        return Gram(g, noise, proj, bool(torch.isfinite(g).all()))
    g, flags = native.prepare(raw, eigen_cut(noise, k), _TINY[dtype] if rescue is not None else 0.0)
    if flags & native.RESCUE and rescue is not None:
        g, proj = clean(rescue(), noise)
        return Gram(g, noise, proj, None)
    if flags & native.INDEFINITE:
        g, proj = clean(g, noise, checked=True)
        return Gram(g, noise, proj, not flags & native.NONFINITE)
    return Gram(g, noise, None, not flags & native.NONFINITE)


def _clean_gramian_impl(leaves: list[torch.Tensor], rescue: bool, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean G, range projector) as one operator, so that the overflow rescue and the cleaning
    stay out of compiled graphs. The projector is the identity where nothing was removed."""
    g, proj = clean_gramian(leaves, rescue, noise)
    if proj is None:
        proj = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    return g, proj


def clean_gramian(leaves: list[torch.Tensor], rescue: bool, noise: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The clean float64 Gramian and its range projector (None where nothing was removed)."""
    dtype = accumulation_dtype([leaf.dtype for leaf in leaves])
    if native.on_host(leaves[0]):
        gram = host_gramian(leaves, dtype, noise)
        return gram.g, gram.proj
    if placement(leaves[0]) == "host":  # (compiled; an eager call brings the whole stage to the host)
        device = leaves[0].device
        gram = prepared(fast(leaves, dtype).to("cpu"), dtype, noise, lambda: rescaled(leaves, dtype).to("cpu"))
        return gram.g.to(device), None if gram.proj is None else gram.proj.to(device)
    return clean(gramian_of_leaves(leaves, rescue), noise)


def _gramian_fake(leaves: list[torch.Tensor], rescue: bool, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    k = leaves[0].shape[0]
    return leaves[0].new_empty((k, k), dtype=torch.float64), leaves[0].new_empty((k, k), dtype=torch.float64)


clean_gramian_op = opaque("gramian", _gramian_fake)(_clean_gramian_impl)
