"""The noise floor of a Gramian: how much of G its rounding leaves undetermined.

Every rank decision in gradagg (the pseudo-inverse cuts of IMTL-G, ConFIG and Aligned-MTL, the
PSD repair, the null space removed from singular Gramians, the tests for rows that a transform
cancelled, and the tests for "no direction exists") is taken against this floor, never against a
float64 constant. The rule, stated once:

* G is formed as Σ_l J_l J_lᵀ in the accumulation dtype (float32 unless a leaf is float64), by
  products over less than 2 ``CHUNK`` columns, at most ``FOLD`` columns of which (32 products or
  fewer, whose additions round independently: a few u in all) are added in that dtype before going
  into a float64 total. Each entry then carries an
  error of at most ``δ ‖g_i‖ ‖g_j‖``, with

      δ = u_acc (8 + √L / 2) + 2 u_in²,     L = min(D, 2 CHUNK),

  where u_acc is the unit roundoff of the accumulation (2⁻²⁴ for float32, 2⁻⁵³ for float64), L
  the longest product made in it (the additions of products fit in the constant), and u_in
  that of a narrower input dtype (2⁻⁸ for bfloat16, 2⁻¹¹ for float16; the term is the square of the
  input's own rounding, the size of the null-space eigenvalues that rounding a low-rank Jacobian
  to that dtype creates). The constants bound what
  BLAS's blocked sums make on this range of L with a margin (measured on MKL, the largest entry
  error over K = 2..64: 9 u_acc for L ≤ 10³, 12 u_acc for L = 10⁴, 4 u_acc over contiguous chunks
  of 2¹⁴ and 50 u_acc over transposed or expanded ones; a single product over D = 10⁶ columns made
  up to 1066 u_acc, over 4·10⁶ up to 7513 u_acc).
* In the unit-diagonal scaling A = S G S (S = diag(1/‖g_i‖)), every entry of A is then known to δ,
  so its eigenvalues are known to ``τ = 2 √K δ`` (the spectral norm of a symmetric K x K error
  with entries of size δ is about 2√K δ when they are independent, and the bound's margin covers
  correlated ones). An eigenvalue of A at or below τ is indistinguishable from 0: its direction is
  noise, and every method treats it as a null direction of G.

A float64 Gramian's floor (τ ≈ 1e-14) lies below the methods' own float64 tolerances (1e-12 λ_max for
the pseudo-inverses, 1e-10 for the QP regularisation), which remain as lower bounds; its null space
is still removed, so that float64 and float32 reach the same answer on the same singular G.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch

#: Columns per float32 product: a leaf's whole chunks are one batched product whose partials are
#: added in float64; smaller leaves and remainders (< 2 CHUNK columns each) are added in float32
#: until FOLD columns, then into the float64 total (see ``gramian_noise``).
CHUNK = 1 << 14
FOLD = 32 * CHUNK

_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def gramian_noise(accumulation: torch.dtype, inputs: Sequence[torch.dtype], length: int) -> float:
    """δ: the error of each entry of G relative to ‖g_i‖ ‖g_j‖ (see the module docstring), for a
    Gramian accumulated in ``accumulation`` over ``length`` = D columns of leaves of ``inputs`` dtypes."""
    u = _ROUNDOFF[accumulation]
    summed = min(max(int(length), 1), 2 * CHUNK)
    delta = u * (8.0 + math.sqrt(summed) / 2.0)
    narrow = [_ROUNDOFF[d] for d in inputs if d in (torch.bfloat16, torch.float16)]
    if narrow:
        delta += 2.0 * max(narrow) ** 2
    return delta


def default_noise(dtype: torch.dtype) -> float:
    """δ for a Gramian given without its history (``weights_from_gramian``): formed in ``dtype``
    over 2 CHUNK columns, the longest product that gradagg's own accumulation makes."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return gramian_noise(acc, [dtype], 2 * CHUNK)


#: δ of a float64 Gramian: the default where nothing else is known.
FLOAT64_NOISE = default_noise(torch.float64)


def eigen_cut(noise: float, k: int) -> float:
    """τ: eigenvalues of the unit-diagonal A = S G S at or below this are noise."""
    return 2.0 * math.sqrt(k) * noise


@contextlib.contextmanager
def full_precision_matmul() -> Iterator[None]:
    """float32 products in full IEEE precision inside the block: a user's TF32 (CUDA) or bfloat16
    (oneDNN) setting for float32 matmuls would otherwise raise G's rounding by three orders. The
    setting is restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
