"""The two methods that are not weightings: they act coordinate by coordinate on J.

GradDrop: Chen et al. (2020), "Just pick a sign: optimizing deep multitask models with gradient
sign dropout". Per coordinate, P = ½(1 + Σ_i g_i / Σ_i |g_i|) ∈ [0, 1] (½ where every g_i is 0),
U ~ Uniform(0, 1) shared by the tasks, M_i = [P > U][g_i > 0] + [P < U][g_i < 0], and
d = Σ_i (ℓ_i + (1 − ℓ_i) M_i) g_i. A coordinate on which every task agrees in sign has P = 1 (or 0)
and is always kept.

Trimmed mean: Yin et al. (2018), "Byzantine-robust distributed learning: towards optimal
statistical rates". Per coordinate, the ``trim`` largest and ``trim`` smallest values are dropped
and the rest averaged.
"""

from __future__ import annotations

import torch

from .._registry import REQUIRED, Context, Method, Option, integer, k_vector, register


def _leakage(name, value, k):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * k
    vec = k_vector(nonnegative=True, positive_sum=False)(name, value, k)
    if vec is not None and not torch.compiler.is_compiling() and vec.device.type == "cpu" and (vec > 1).any():
        raise ValueError(f"option {name!r} must lie in [0, 1], got {value!r}")
    return vec


def _graddrop(rows: list[torch.Tensor], ctx: Context, leakage: torch.Tensor | None) -> list[torch.Tensor]:
    like = rows[0]
    ell = torch.zeros(like.shape[0], dtype=like.dtype, device=like.device) if leakage is None else leakage
    ell = ell.to(device=like.device, dtype=like.dtype).unsqueeze(1)
    out = []
    for r in rows:
        total, mag = r.sum(0), r.abs().sum(0)
        p = 0.5 * (1.0 + torch.where(mag > 0, total / torch.where(mag > 0, mag, 1.0), 0.0))
        u = torch.rand(r.shape[1], generator=ctx.generator, dtype=r.dtype, device=r.device)
        keep = ((p > u) & (r > 0)) | ((p < u) & (r < 0))
        out.append(((ell + (1.0 - ell) * keep) * r).sum(0))
    return out


def _trimmed_mean(rows: list[torch.Tensor], ctx: Context, trim: int) -> list[torch.Tensor]:
    k = rows[0].shape[0]
    out = []
    for r in rows:
        ordered = r.sort(0).values
        # Sorting moves NaN and ±Inf to the ends, where trimming would hide them: they are put
        # back (0·NaN = 0·Inf = NaN) so that non-finite input never gives a finite coordinate.
        out.append(ordered[trim : k - trim].mean(0) + 0.0 * (ordered[0] + ordered[-1]))
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
