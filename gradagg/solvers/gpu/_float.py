"""Float64 helpers for the kernels (generic: any kernel may use them).

``recip`` and ``rsqrt`` exist for ptxas: a float64 division, ``rcp.rn`` or ``sqrt.rn`` compiles to
a fast path plus a call to a slow-path subroutine, and ptxas stores registers that are live across
such calls to the stack, which ``aot`` reports as spills. The kernels use these two instead: only
multiply-adds and a float32 seed (``div.full.f32``, ``rsqrt.approx.f32``: no calls), refined by
Newton steps to within about an ulp of the correctly rounded result.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Bit patterns: a NaN or infinite constexpr would fail Triton's check that globals keep their value.
NAN_BITS = tl.constexpr(0x7FF8000000000000)
INF_BITS = tl.constexpr(0x7FF0000000000000)
MANTISSA = tl.constexpr(0x000FFFFFFFFFFFFF)
#: Below this, operands are scaled by 2^100 first (subnormals have no implicit leading bit).
TINY = tl.constexpr(2.0**-1000)
UP = tl.constexpr(2.0**100)


@triton.jit
def nan() -> tl.tensor:
    """A float64 NaN."""
    return tl.full([], NAN_BITS, tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def inf() -> tl.tensor:
    return tl.full([], INF_BITS, tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def finite(x: tl.tensor) -> tl.tensor:
    """Whether x is finite (x − x is 0 exactly for finite x, NaN otherwise)."""
    return (x - x) == 0


@triton.jit
def _pow2(n: tl.tensor) -> tl.tensor:
    """2^n for an integer tensor n in [−1022, 1023]."""
    return ((n + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)


@triton.jit
def recip(y: tl.tensor) -> tl.tensor:
    """1/y within about an ulp, for float64 y: ±0 → ±inf, ±inf → ±0, NaN → NaN.

    With |y| = m·2^n, m ∈ [1, 2): a float32 quotient 1/m (22 bits), two Newton steps
    r ← r + r(1 − m r), each of which squares the relative error, then the exact scaling by 2^−n
    (as 2^(1−n) · ½, so that n = 1023 rounds once into the subnormal range)."""
    a = tl.abs(y)
    zero = a == 0
    small = (a < TINY) & ~zero
    a = tl.where(small, a * UP, tl.where(zero, 1.0, a))
    bits = a.to(tl.int64, bitcast=True)
    n = ((bits >> 52) & 0x7FF) - 1023
    m = ((bits & MANTISSA) | (1023 << 52)).to(tl.float64, bitcast=True)
    r = (1.0 / m.to(tl.float32)).to(tl.float64)
    r = r + r * (1.0 - m * r)
    r = r + r * (1.0 - m * r)
    r = r * _pow2(tl.minimum(1 - n, 1023)) * 0.5
    r = tl.where(small, r * UP, r)
    r = tl.where(zero, inf(), tl.where(finite(a), r, 0.0))
    return tl.where(y != y, y, tl.where(y.to(tl.int64, bitcast=True) < 0, -r, r))


@triton.jit
def rsqrt(x: tl.tensor) -> tl.tensor:
    """1/√x within about an ulp, for float64 x: 0 → inf, inf → 0, x < 0 or NaN → NaN.

    With x = m·4^q, m ∈ [1, 4): a float32 1/√m, two Newton steps y ← y + ½ y(1 − m y²), then the
    exact scaling by 2^−q."""
    small = x < TINY
    a = tl.where(small, x * UP, x)
    bits = a.to(tl.int64, bitcast=True)
    n = ((bits >> 52) & 0x7FF) - 1023
    q = n >> 1  # floor(n / 2)
    m = ((bits & MANTISSA) | ((n - 2 * q + 1023) << 52)).to(tl.float64, bitcast=True)
    y = tl.math.rsqrt(m.to(tl.float32)).to(tl.float64)
    y = y + 0.5 * y * (1.0 - m * y * y)
    y = y + 0.5 * y * (1.0 - m * y * y)
    y = y * _pow2(-q)
    y = tl.where(small, y * 2.0**50, y)
    return tl.where(x > 0, tl.where(finite(x), y, 0.0), tl.where(x == 0, inf(), nan()))


@triton.jit
def sqrt(x: tl.tensor) -> tl.tensor:
    """√x within about an ulp, as x · rsqrt(x): 0 → 0, inf → inf, x < 0 or NaN → NaN."""
    ok = (x > 0) & finite(x)
    safe = tl.where(ok, x, 1.0)
    return tl.where(ok, safe * rsqrt(safe), tl.where(x < 0, nan(), x))


@triton.jit
def f64(value: tl.tensor) -> tl.tensor:
    """The float64 scalar ``value``, exact: a float argument is a Python float in the interpreter,
    and a float literal in tl.where, tl.maximum or tl.minimum is rounded to float32."""
    return tl.full([], value, tl.float64)


@triton.jit
def div(x: tl.tensor, y: tl.tensor) -> tl.tensor:
    """x / y without a float64 division: q = x · recip(y), then one correction by the exact residual
    x − yq where y and q are finite (x / ±∞ = 0 stays 0), which leaves q correctly rounded but in
    rare cases."""
    r = recip(y)
    q = x * r
    return tl.where(finite(y), tl.where(finite(q), tl.fma(tl.fma(-y, q, x), r, q), q), q)
