"""Shared checks of a low-precision answer against the float64 answer on the same Jacobian.

The Jacobian J64 is built in float64 with an exact structure; the low-precision call gets
J64.to(dtype), the reference is the same call on J64. The error is

    ‖d_x − d_64‖ / max(‖d_64‖, 1e-5 max_i ‖g_i‖),

and its bound depends on the dtype (``BOUND``). Where a method's answer is a discontinuous function of
J (Krum's selection, GradDrop's per-coordinate draws) the check is against an independent numpy
oracle that accepts every answer consistent with the input's rounding.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import nnls

import gradagg

from asserts import init_for, options_for

UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
#: float32: the issue's target. bfloat16 and float16: 16 units of their own rounding, which alone
#: moves d by a few units (the mean of K gradients already shows 1.3 u).
BOUND = {torch.float32: 1e-4, torch.bfloat16: 16 * UNIT[torch.bfloat16], torch.float16: 16 * UNIT[torch.float16]}
#: Nash-MTL and FairGrad (α = 1) where a nonnegative combination of gradients vanishes: their d is
#: scale-free (‖d‖² = K where a solution exists), and the regularised answer (ε = 1e-15) is known
#: there only to the Newton solve's backward error (1e-14) times the diverging weights (ε^(−1/2) ≈
#: 3e7), about 3e-7 per task (see the README's "Numerics"): ‖Δd‖ ≤ DEGENERATE_ABS √K.
DEGENERATE_ABS = {torch.float32: 1e-6, torch.bfloat16: 1e-4, torch.float16: 1e-5}


def error(d: torch.Tensor, ref: torch.Tensor, j64: np.ndarray) -> float:
    scale = max(float(ref.double().norm()), 1e-5 * float(np.linalg.norm(j64, axis=1).max()))
    return float((d.double() - ref.double()).norm()) / max(scale, 1e-300)


def run(method, jac: torch.Tensor, seed: int = 0) -> torch.Tensor | None:
    """One call with a fresh state, a seeded generator and fixed losses (None if K is too small)."""
    k = jac.shape[0]
    opts = options_for(method, k) if isinstance(method, str) else {}
    if opts is None:
        return None
    try:
        state = init_for(method, k)
    except ValueError:  # stateless
        state = None
    uses_losses = isinstance(method, str) and gradagg.methods()[method].uses_losses
    losses = torch.linspace(0.5, 2.0, k, dtype=torch.float64) if uses_losses else None
    return gradagg.aggregate(jac, method, state=state, losses=losses,
                             generator=torch.Generator().manual_seed(seed), **opts)


def degenerate_tasks(j64: np.ndarray) -> np.ndarray:
    """Task i is degenerate when some y ≥ 0 with y_i = 1 has Jᵀy = 0 (a nonnegative combination of
    gradients vanishes with it), by scipy's NNLS: min ‖Σ_{j≠i} y_j g_j + g_i‖ over y ≥ 0."""
    norms = np.linalg.norm(j64, axis=1)
    out = np.zeros(len(j64), dtype=bool)
    for i in range(len(j64)):
        if norms[i] == 0 or len(j64) == 1:
            continue
        others = np.delete(j64, i, 0) / norms[i]
        _, residual = nnls(others.T, -j64[i] / norms[i], maxiter=50 * len(j64))
        out[i] = residual <= 1e-7
    return out


def krum_scores(j64: np.ndarray, f: int) -> np.ndarray:
    """Krum's scores in float64 from J itself: the sum of each row's K − f − 2 smallest squared
    distances to the other rows."""
    k = len(j64)
    dist = ((j64[:, None, :] - j64[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    return np.sort(dist, 1)[:, : k - f - 2].sum(1)


def krum_admissible(chosen: np.ndarray, j64: np.ndarray, f: int, m: int, rel: float) -> bool:
    """Whether the m rows ``chosen`` are among those Krum may pick at this precision: none scores
    above the m-th smallest score (float64) by more than ``rel`` of the largest score."""
    scores = krum_scores(j64, f)
    limit = np.sort(scores)[m - 1] + rel * scores.max()
    return len(chosen) == m and bool((scores[chosen] <= limit).all())


def _lowbias32(x: np.ndarray) -> np.ndarray:
    x = x & np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & np.uint64(0xFFFFFFFF)
    return x ^ (x >> np.uint64(16))


def graddrop_oracle(j64: np.ndarray, seed: int, margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, the other choice, ambiguous) per coordinate for GradDrop without leakage on the CPU: U
    hashed as documented from the generator's first draw, P from J64; a coordinate is ambiguous
    where |P − U| ≤ margin (the input's rounding may put P on either side of U)."""
    draw = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(seed)))
    index = np.arange(j64.shape[1], dtype=np.uint64)
    low, high = np.uint64(draw & 0xFFFFFFFF), np.uint64((draw >> 32) & 0xFFFFFFFF)
    bits = _lowbias32(_lowbias32(index + low) ^ high)
    u = (bits >> np.uint64(8)).astype(np.float64) * 2.0**-24
    total, mag = j64.sum(0), np.abs(j64).sum(0)
    p = 0.5 * (1 + np.where(mag > 0, total / np.where(mag > 0, mag, 1), 0))
    positive, negative = np.clip(j64, 0, None).sum(0), np.clip(j64, None, 0).sum(0)
    chosen = np.where(p > u, positive, np.where(p < u, negative, 0.0))
    other = np.where(p > u, negative, positive)
    return chosen, other, np.abs(p - u) <= margin


def check_against_float64(method, out: torch.Tensor, ref: torch.Tensor, j64: np.ndarray, jx: torch.Tensor,
                          seed: int = 0) -> float:
    """Asserts that ``out`` (the call on jx, J64 rounded to a narrower dtype) agrees with ``ref`` (the
    call on J64) to what that dtype allows; returns the error by the measure above."""
    dtype = jx.dtype
    k = len(j64)
    norms = np.linalg.norm(j64, axis=1)
    err = error(out, ref, j64)
    if method == "krum":
        opts = options_for("krum", k)
        w = gradagg.weights(jx, "krum", **opts).numpy()
        chosen = np.flatnonzero(w > 0)
        noise = gradagg.gramian_noise(jx)
        assert krum_admissible(chosen, j64, opts["f"], opts["m"], 32 * (UNIT[dtype] + noise)), (
            f"Krum chose rows {chosen}, not among the lowest scores {krum_scores(j64, opts['f'])}")
        mean = jx.double()[chosen].mean(0)
        assert error(out, mean, j64) <= 4 * UNIT[dtype], "Krum's result is not the mean of its chosen rows"
        return err
    if method == "graddrop":
        chosen, other, ambiguous = graddrop_oracle(j64, seed, 16 * max(UNIT[dtype], UNIT[torch.float32]))
        got = out.double().numpy()
        tol = 8 * UNIT[dtype] * np.abs(j64).sum(0) + 1e-300
        right = np.abs(got - chosen) <= tol
        ok = right | (ambiguous & (np.abs(got - other) <= tol))
        assert ok.all(), f"GradDrop disagrees with its oracle at coordinates {np.flatnonzero(~ok)[:10]}"
        return float(np.abs(got - chosen)[~ambiguous].max(initial=0.0) / max(np.abs(chosen).max(), 1e-300))
    bound = BOUND[dtype]
    if method == "imtl_g":
        # The normalisation Σw = 1 divides by Σ G⁺√diag G: where that sum cancels, its rounding is
        # amplified by Σ|w| (measured: error ≈ 10 u Σ|w| in float32).
        bound += 16 * UNIT[dtype] * float(gradagg.weights(torch.tensor(j64), "imtl_g").abs().sum())
    if method in ("nash_mtl", "fairgrad") and degenerate_tasks(j64).any():
        allowed = max(bound * max(float(ref.double().norm()), 1e-5 * norms.max()), DEGENERATE_ABS[dtype] * np.sqrt(k))
        assert float((out.double() - ref.double()).norm()) <= allowed, (
            f"{method} on a degenerate Jacobian: ‖Δd‖ = {float((out.double() - ref.double()).norm()):.3e} "
            f"> {allowed:.3e}")
        return err
    assert err <= bound, f"{method} in {dtype}: error {err:.3e} > {bound:.3e}"
    return err
