"""Register-tile helpers for the kernels: a padded KP x KP float64 tile ``a`` and KP-vectors.

Triton has no indexing of register tensors: an entry, row or column is read with a masked
reduction, and a rank-one update replaces an assignment. Padding rows and columns (index ≥ k) hold
0 off the diagonal and 1 on it, so that solves on the padded tile leave them decoupled.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_square(ptr: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """The k x k row-major matrix at ``ptr`` as a KP x KP float64 tile, padded with the identity."""
    r = tl.arange(0, KP)
    inside = (r[:, None] < k) & (r[None, :] < k)
    a = tl.load(ptr + r[:, None] * k + r[None, :], mask=inside, other=0.0).to(tl.float64)
    return tl.where(inside, a, tl.where(r[:, None] == r[None, :], 1.0, 0.0))


@triton.jit
def store_square(ptr: tl.tensor, a: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> None:
    r = tl.arange(0, KP)
    tl.store(ptr + r[:, None] * k + r[None, :], a, mask=(r[:, None] < k) & (r[None, :] < k))


@triton.jit
def load_vector(ptr: tl.tensor, k: tl.tensor, KP: tl.constexpr, fill: tl.constexpr) -> tl.tensor:
    r = tl.arange(0, KP)
    return tl.load(ptr + r, mask=r < k, other=fill).to(tl.float64)


@triton.jit
def store_vector(ptr: tl.tensor, v: tl.tensor, k: tl.tensor, KP: tl.constexpr) -> None:
    r = tl.arange(0, KP)
    tl.store(ptr + r, v, mask=r < k)


@triton.jit
def entry(v: tl.tensor, i: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """v[i] of a KP-vector."""
    r = tl.arange(0, KP)
    return tl.sum(tl.where(r == i, v, 0.0), 0)


@triton.jit
def row(a: tl.tensor, i: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """Row i of the tile, as a KP-vector."""
    r = tl.arange(0, KP)
    return tl.sum(tl.where(r[:, None] == i, a, 0.0), 0)


@triton.jit
def col(a: tl.tensor, j: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """Column j of the tile, as a KP-vector."""
    r = tl.arange(0, KP)
    return tl.sum(tl.where(r[None, :] == j, a, 0.0), 1)


@triton.jit
def diagonal(a: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    r = tl.arange(0, KP)
    return tl.sum(tl.where(r[:, None] == r[None, :], a, 0.0), 1)


@triton.jit
def matvec(a: tl.tensor, x: tl.tensor) -> tl.tensor:
    """A x."""
    return tl.sum(a * x[None, :], 1)


@triton.jit
def vecmat(x: tl.tensor, a: tl.tensor) -> tl.tensor:
    """xᵀ A (equal to A x for symmetric A, with the result laid out along the columns)."""
    return tl.sum(x[:, None] * a, 0)


@triton.jit
def masked_solve(a: tl.tensor, q: tl.tensor, free: tl.tensor, KP: tl.constexpr) -> tl.tensor:
    """z with A_FF z_F = q_F and z = 0 off F, for the free set F (a KP-vector of 0/1 as float64).

    Gauss–Jordan elimination without pivoting on A_FF padded with the identity: for A symmetric
    positive definite on F it is as stable as a Cholesky solve (the pivots are those of LDLᵀ)."""
    r = tl.arange(0, KP)
    m = a * (free[:, None] * free[None, :]) + tl.where(r[:, None] == r[None, :], 1.0 - free[:, None], 0.0)
    z = q * free
    for p in range(KP):
        prow = row(m, p, KP)
        pivot = entry(prow, p, KP)
        zp = entry(z, p, KP) / pivot
        pcol = tl.where(r == p, 0.0, col(m, p, KP))
        prow = prow / pivot
        m = tl.where(r[:, None] == p, prow[None, :], m - pcol[:, None] * prow[None, :])
        z = tl.where(r == p, zp, z - pcol * zp)
    return z
