"""The trimmed mean as a Triton kernel: one pass over J, no K x D temporary.

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
from torch.library import triton_op, wrap_triton

from . import padded
from .aot import Kernel


def block(kp: int) -> int:
    """Columns per program: a KP x BLOCK tile of values and one of ranks stay in registers."""
    return 128 if kp <= 32 else 64


@triton.jit
def _trimmed_mean_kernel(r_ptr, out_ptr, k, n, s0, s1, trim, KP: tl.constexpr, BLOCK: tl.constexpr):
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


@triton_op("gradagg::tr_trimmed_mean", mutates_args=())
def trimmed_mean(r: torch.Tensor, trim: int) -> torch.Tensor:
    """The trimmed mean of the rows r [K, n] (float32 or float64), column by column."""
    k, n = r.shape
    out = torch.empty(n, dtype=r.dtype, device=r.device)
    kp = padded(k)
    grid = (triton.cdiv(n, block(kp)),)
    wrap_triton(_trimmed_mean_kernel)[grid](r, out, k, n, r.stride(0), r.stride(1), trim, KP=kp, BLOCK=block(kp))
    return out


AOT = [Kernel(_trimmed_mean_kernel, {"r_ptr": "*fp32", "out_ptr": "*fp32", "k": "i32", "n": "i32", "s0": "i32",
                                     "s1": "i32", "trim": "i32", "KP": "constexpr", "BLOCK": "constexpr"},
              {"BLOCK": block}, warps=lambda kp: 4)]
