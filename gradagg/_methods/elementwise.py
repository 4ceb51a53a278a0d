"""The two methods that are not weightings: they act coordinate by coordinate on J.

GradDrop: Chen et al. (2020), "Just pick a sign: optimizing deep multitask models with gradient
sign dropout". Per coordinate, P = ½(1 + Σ_i g_i / Σ_i |g_i|) ∈ [0, 1] (½ where every g_i is 0),
U ~ Uniform(0, 1) shared by the tasks, M_i = [P > U][g_i > 0] + [P < U][g_i < 0], and
d = Σ_i (ℓ_i + (1 − ℓ_i) M_i) g_i. A coordinate on which every task agrees in sign has P = 1 (or 0)
and is always kept. On CPU in eager mode U is a 24-bit uniform from an integer hash of the
coordinate's index, seeded by one draw from ``generator`` (in C, or in torch where the result must
be differentiable in J, with the same numbers); elsewhere torch draws it.

Trimmed mean: Yin et al. (2018), "Byzantine-robust distributed learning: towards optimal
statistical rates". Per coordinate, the ``trim`` largest and ``trim`` smallest values are dropped
and the rest averaged.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from .._device import on_triton
from .._registry import REQUIRED, Context, Method, Option, integer, k_vector, register
from ..solvers import native


def _leakage(name: str, value: Any, k: int) -> torch.Tensor | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * k
    vec = k_vector(nonnegative=True, positive_sum=False)(name, value, k)
    if vec is not None and not torch.compiler.is_compiling() and vec.device.type == "cpu" and (vec > 1).any():
        raise ValueError(f"option {name!r} must lie in [0, 1], got {value!r}")
    return vec


# Reductions over the task dimension (dim 0 of [K, n] rows) run row by row or as a matrix-vector
# product: torch's dim-0 reductions of such shapes (sum(0), vector_norm(dim=0), topk(dim=0)) are
# several times slower, and nothing here materialises a K x n temporary.


def _abs_sums(r: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_i |g_i|, Σ_i weights_i |g_i|) per coordinate."""
    plain = r[0].abs()
    # (weighted is a tensor exactly when weights is one)
    weighted = None if weights is None else plain * weights[0]
    for i in range(1, r.shape[0]):
        row = r[i].abs()
        plain = plain + row
        weighted = None if weights is None else cast(torch.Tensor, weighted) + weights[i] * row
    return plain, plain if weights is None else cast(torch.Tensor, weighted)


def _middle_sum(r: torch.Tensor, t: int) -> torch.Tensor:
    """Per coordinate, the sum of the values left after dropping the t largest and t smallest: each
    row goes through an insertion network of the t largest so far, what falls out of it through one
    of the t smallest, and what falls out of that is a middle value (4·K·t element-wise max/min ops).
    Summing the middle values themselves, rather than subtracting the extremes from the total, keeps
    them from cancelling against large extremes. NaN propagates through max/min."""
    top: list[torch.Tensor] = []
    bottom: list[torch.Tensor] = []
    middle: torch.Tensor | None = None
    for row in range(r.shape[0]):
        x = r[row]
        for i in range(len(top)):
            top[i], x = torch.maximum(top[i], x), torch.minimum(top[i], x)
        if len(top) < t:
            top.append(x)
            continue
        for i in range(len(bottom)):
            bottom[i], x = torch.minimum(bottom[i], x), torch.maximum(bottom[i], x)
        if len(bottom) < t:
            bottom.append(x)
            continue
        middle = x if middle is None else middle + x
    return cast(torch.Tensor, middle)  # 2t < K: some row is a middle value


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash of the C kernel, on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def hashed_uniforms(seed: torch.Tensor, offset: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The C kernel's U for columns offset .. offset + n − 1: 24-bit uniforms hashed from the
    column index and the 64-bit seed (the same numbers, so that both paths agree)."""
    index = torch.arange(offset, offset + n, dtype=torch.int64)
    bits = _hash32(_hash32((index + (seed & 0xFFFFFFFF)) & 0xFFFFFFFF) ^ ((seed >> 32) & 0xFFFFFFFF))
    return ((bits >> 8).to(torch.float32) * 2.0**-24).to(dtype)


def _graddrop(rows: list[torch.Tensor], ctx: Context, leakage: torch.Tensor | None) -> list[torch.Tensor]:
    hashed = rows[0].device.type == "cpu" and not torch.compiler.is_compiling() and not on_triton(rows[0])
    # On the CPU, U comes from a hash of a per-coordinate counter, seeded by one draw from the
    # generator (drawing D uniforms from torch's CPU generator alone costs ~4x the floor at K = 2).
    seed = torch.randint(0, 2**62, (), generator=ctx.generator) if hashed else None  # int64, read in C
    recorded = torch.is_grad_enabled() and any(r.requires_grad for r in rows)
    if on_triton(rows[0]) and not recorded:  # one pass over J per leaf on the device, same hash
        from ..solvers.gpu import elementwise

        seed = torch.randint(0, 2**62, (), generator=ctx.generator, device=rows[0].device)
        device_leak = None if leakage is None else leakage.to(device=rows[0].device, dtype=torch.float64)
        out, offset = [], 0
        for r in rows:
            out.append(elementwise.graddrop(r, device_leak, seed, offset))
            offset += r.shape[1]
        return out
    if hashed and native.rows_ok(rows):  # one pass over J in C
        out, offset = [], 0
        for r in rows:
            out.append(native.graddrop(r, leakage, cast(torch.Tensor, seed), offset))  # (drawn when hashed)
            offset += r.shape[1]
        return out
    # Per coordinate only a few sums over the tasks are needed, never a K x n mask: with
    # m = 1 − ℓ, Σ_i (1 − ℓ_i) M_i g_i = [P > U] Σ_i m_i g_i⁺ + [P < U] Σ_i m_i g_i⁻ and
    # Σ_i m_i g_i^± = ½ (mᵀJ ± mᵀ|J|).
    leak: torch.Tensor | float
    out, offset = [], 0
    for r in rows:
        ones = torch.ones(r.shape[0], dtype=r.dtype, device=r.device)
        total = ones @ r
        if leakage is None:  # ℓ = 0
            mag, absolute = _abs_sums(r, None)
            signed, leak = total, 0.0
        else:
            ell = leakage.to(device=r.device, dtype=r.dtype)
            mag, absolute = _abs_sums(r, 1.0 - ell)
            signed, leak = (1.0 - ell) @ r, ell @ r
        p = 0.5 * (1.0 + torch.where(mag > 0, total / torch.where(mag > 0, mag, 1.0), 0.0))
        if hashed:
            u = hashed_uniforms(cast(torch.Tensor, seed), offset, r.shape[1], r.dtype)  # (drawn when hashed)
            offset += r.shape[1]
        else:
            u = torch.rand(r.shape[1], generator=ctx.generator, dtype=r.dtype, device=r.device)
        positive, negative = 0.5 * (signed + absolute), 0.5 * (signed - absolute)
        out.append(leak + (p > u).to(r.dtype) * positive + (p < u).to(r.dtype) * negative)
    return out


def _trimmed_mean(rows: list[torch.Tensor], ctx: Context, trim: int) -> list[torch.Tensor]:
    # The sum of the values left after dropping the trim largest and smallest. NaN or ±Inf anywhere
    # in a column makes the result non-finite.
    k = rows[0].shape[0]
    recorded = torch.is_grad_enabled() and any(r.requires_grad for r in rows)
    if trim > 0 and on_triton(rows[0]) and not recorded:
        from ..solvers.gpu import elementwise  # one pass over J on the device, never O(K) torch ops

        return [elementwise.trimmed_mean(r, trim) for r in rows]
    if trim > 0 and native.rows_ok(rows):  # (trim = 0 is the mean: a BLAS product is faster)
        return [native.trimmed_mean(r, trim) for r in rows]
    out = []
    for r in rows:
        total = torch.ones(k, dtype=r.dtype, device=r.device) @ r
        if trim > 0:  # the total only makes NaN or ±Inf anywhere in a column show in the result
            total = _middle_sum(r, trim).add_(total, alpha=0.0)
        out.append(total.div_(k - 2 * trim))  # in place: no second output-sized buffer
    return out


register(Method(
    "graddrop", "Per coordinate, keep the gradients of one sign with probability P from sign purity.",
    "Chen et al. 2020, 'Just pick a sign: optimizing deep multitask models with gradient sign dropout'",
    options=(Option("leakage", None, _leakage, "leakage ℓ in [0, 1], a float or a K-vector (default 0)"),),
    combine=_graddrop, random=True, uses_gramian=False,
))
register(Method(
    "trimmed_mean", "Per coordinate, drop the trim largest and smallest values and average the rest.",
    "Yin et al. 2018, 'Byzantine-robust distributed learning: towards optimal statistical rates'",
    options=(Option("trim", REQUIRED, integer(lambda k: 0, lambda k: (k - 1) // 2, "0 ≤ 2·trim < K"),
                    "how many values to drop at each end, with 2·trim < K"),),
    combine=_trimmed_mean, uses_gramian=False,
))
