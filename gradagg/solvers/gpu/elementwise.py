"""GradDrop and the trimmed mean as Triton kernels: one pass over J each, no K x D temporary.

GradDrop (Chen et al. 2020) keeps, per coordinate, the positive or the negative parts of the task
gradients: with P = ½(1 + Σ_i g_i / Σ_i |g_i|) and U uniform, the positive parts where P > U, the
negative ones where P < U (leakage ℓ_i lets ℓ_i g_i through always). U is the C pass's counter-based
hash of (seed, column index) (``gradagg._kkt``, ``uniform24``), so that the Triton route draws the
same numbers as the CPU for the same seed.

For each column c of the rows r [K, n], with the values x_i = r[i, c] ranked within their column
(ties broken by row index, so every rank 0 … K−1 is taken once), the result is

    (1 / (K − 2t)) Σ_{i : t ≤ rank_i < K − t} x_i,

the mean after dropping the t largest and t smallest values (Yin et al. 2018). Only the kept
values are summed, so large extremes cannot cancel the middle ones (the C pass of ``gradagg._kkt``
gets the same from its insertion networks). A NaN or ±Inf anywhere in a column makes its result
non-finite, as on the other routes. Each program ranks a KP x BLOCK tile by K comparisons.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import padded, triton_op
from .aot import Kernel


def block(kp: int) -> int:
    """Columns per program: a KP x BLOCK tile of values and one of ranks stay in registers."""
    return 128 if kp <= 32 else 64


@triton.jit
def _trimmed_mean_kernel(r_ptr: tl.tensor, out_ptr: tl.tensor, k: tl.tensor, n: tl.tensor, s0: tl.tensor, s1: tl.tensor,
                         trim: tl.tensor, KP: tl.constexpr, BLOCK: tl.constexpr) -> None:
    rows = tl.arange(0, KP)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = (rows[:, None] < k) & (cols[None, :] < n)
    x = tl.load(r_ptr + rows[:, None] * s0 + cols[None, :] * s1, mask=inside, other=0.0)
    acc = x.to(tl.float64) if x.dtype == tl.float64 else x.to(tl.float32)
    rank = tl.zeros((KP, BLOCK), dtype=tl.int32)
    for j in range(0, k):
        xj = tl.load(r_ptr + j * s0 + cols * s1, mask=cols < n, other=0.0).to(acc.dtype)
        below = (xj[None, :] < acc) | ((xj[None, :] == acc) & (j < rows[:, None]))
        rank += below.to(tl.int32)
    kept = inside & (rank >= trim) & (rank < k - trim)
    total = tl.sum(tl.where(inside, acc, 0.0), 0)
    middle = tl.sum(tl.where(kept, acc, 0.0), 0) + 0.0 * total  # a non-finite value anywhere shows
    tl.store(out_ptr + cols, (middle / (k - 2 * trim)).to(out_ptr.dtype.element_ty), mask=cols < n)


@triton.jit
def _lowbias32(x: tl.tensor) -> tl.tensor:
    """The "lowbias32" integer hash on uint32 (wrapping products), as in the C pass."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _graddrop_kernel(r_ptr: tl.tensor, leak_ptr: tl.tensor, seed_ptr: tl.tensor, out_ptr: tl.tensor, k: tl.tensor,
                     n: tl.tensor, s0: tl.tensor, s1: tl.tensor, offset: tl.tensor, LEAK: tl.constexpr,
                     KP: tl.constexpr, BLOCK: tl.constexpr) -> None:
    rows = tl.arange(0, KP)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = (rows[:, None] < k) & (cols[None, :] < n)
    x = tl.load(r_ptr + rows[:, None] * s0 + cols[None, :] * s1, mask=inside, other=0.0)
    ax = tl.abs(x)
    total = tl.sum(x, 0)
    mag = tl.sum(ax, 0)
    if LEAK:
        ell = tl.load(leak_ptr + rows, mask=rows < k, other=0.0).to(x.dtype)
        keep = 1.0 - ell
        absolute = tl.sum(keep[:, None] * ax, 0)
        signed = tl.sum(keep[:, None] * x, 0)
        leaked = tl.sum(ell[:, None] * x, 0)
    else:
        absolute = mag
        signed = total
        leaked = tl.zeros_like(total)
    nonzero = mag > 0
    p = 0.5 * (1.0 + tl.where(nonzero, total / tl.where(nonzero, mag, 1.0), 0.0))
    seed = tl.load(seed_ptr)
    low = (seed & 0xFFFFFFFF).to(tl.uint32)
    high = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    index = ((offset + cols.to(tl.int64)) & 0xFFFFFFFF).to(tl.uint32)
    bits = _lowbias32(_lowbias32(index + low) ^ high)
    u = ((bits >> 8).to(tl.float32) * 5.9604644775390625e-08).to(x.dtype)  # 2^-24
    out = leaked + tl.where(p > u, 0.5 * (signed + absolute), 0.0) + tl.where(p < u, 0.5 * (signed - absolute), 0.0)
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=cols < n)


@triton_op("gradagg::tr_graddrop", mutates_args=())
def graddrop(r: torch.Tensor, leakage: torch.Tensor | None, seed: torch.Tensor, offset: int) -> torch.Tensor:
    """GradDrop of the rows r [K, n] (float32 or float64) for columns offset … offset + n − 1, with U
    hashed from the 0-dim int64 ``seed`` (on r's device) as the C pass hashes it."""
    k, n = r.shape
    out = torch.empty(n, dtype=r.dtype, device=r.device)
    kp = padded(k)
    leak = seed if leakage is None else leakage  # (an unused pointer without leakage)
    grid = (triton.cdiv(n, block(kp)),)
    wrap_triton(_graddrop_kernel)[grid](r, leak, seed, out, k, n, r.stride(0), r.stride(1), offset,
                                        LEAK=leakage is not None, KP=kp, BLOCK=block(kp))
    return out


@triton_op("gradagg::tr_trimmed_mean", mutates_args=())
def trimmed_mean(r: torch.Tensor, trim: int) -> torch.Tensor:
    """The trimmed mean of the rows r [K, n] (float32 or float64), column by column."""
    k, n = r.shape
    out = torch.empty(n, dtype=r.dtype, device=r.device)
    kp = padded(k)
    grid = (triton.cdiv(n, block(kp)),)
    wrap_triton(_trimmed_mean_kernel)[grid](r, out, k, n, r.stride(0), r.stride(1), trim, KP=kp, BLOCK=block(kp))
    return out


AOT = [Kernel(_graddrop_kernel, {"r_ptr": "*fp32", "leak_ptr": "*fp64", "seed_ptr": "*i64", "out_ptr": "*fp32",
                                 "k": "i32", "n": "i32", "s0": "i32", "s1": "i32", "offset": "i64", "LEAK": "constexpr",
                                 "KP": "constexpr", "BLOCK": "constexpr"}, {"BLOCK": block, "LEAK": True},
              warps=lambda kp: 4),
       Kernel(_trimmed_mean_kernel, {"r_ptr": "*fp32", "out_ptr": "*fp32", "k": "i32", "n": "i32", "s0": "i32",
                                     "s1": "i32", "trim": "i32", "KP": "constexpr", "BLOCK": "constexpr"},
              {"BLOCK": block}, warps=lambda kp: 4)]
