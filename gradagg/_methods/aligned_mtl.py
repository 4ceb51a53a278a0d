"""Aligned-MTL. Senushkin et al. (2023), "Independent component alignment for multi-task learning".

With G = V Λ Vᵀ and the eigenvalues above RTOL · λ_max kept,

    B = σ V Λ^(−1/2) Vᵀ,   w = B p,

where σ = √λ_min (scale_mode="min"), √median λ ("median", the mean of the two middle values for
an even count) or √mean λ ("rmse"). Jᵀ B has orthogonal rows of equal norm σ: the task gradients
aligned into a well-conditioned system. A zero Jacobian gives w = 0.
"""

from __future__ import annotations

import torch

from .._registry import Context, Method, Option, as_vector, choice, k_vector, register
from ..solvers import native
from ..solvers.spectral import RTOL, finite_eigh


def _sigma(lam: torch.Tensor, keep: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "min":
        return torch.where(keep, lam, float("inf")).amin()
    if mode == "rmse":
        return (lam * keep).sum() / keep.sum().clamp_min(1)
    ordered = torch.where(keep, lam, float("inf")).sort().values
    r = keep.sum()
    low = ordered.gather(0, ((r - 1) // 2).clamp_min(0).unsqueeze(0))
    high = ordered.gather(0, (r // 2).clamp_max(lam.shape[0] - 1).unsqueeze(0))
    return (0.5 * (low + high)).squeeze(0)


_MODES = {"min": 0, "median": 1, "rmse": 2}
JACOBI_MAX_K = 16


def _aligned_mtl(g: torch.Tensor, ctx: Context, pref: torch.Tensor | None, scale_mode: str) -> torch.Tensor:
    # Up to K = 16 a Jacobi eigendecomposition in C is faster than torch's eigh (O(K³) per sweep,
    # several sweeps: from K ≈ 16 on LAPACK's is); torch's eigh too if Jacobi does not converge.
    if native.usable(g) and g.shape[-1] <= JACOBI_MAX_K:
        w = native.aligned_mtl(g, as_vector(pref, g), _MODES[scale_mode])
        if w is not None:
            return w
    gn = g / torch.diagonal(g).amax().clamp_min(torch.finfo(g.dtype).tiny)
    lam, vec = finite_eigh(gn)
    keep = lam > RTOL * lam.amax().clamp_min(0)
    safe = torch.where(keep, lam, 1.0)
    sigma = torch.where(keep.any(), _sigma(safe, keep, scale_mode), 0.0).sqrt()
    inv_sqrt = torch.where(keep, safe.rsqrt(), 0.0)
    return sigma * (vec @ (inv_sqrt * (vec.mT @ as_vector(pref, g))))


register(Method(
    "aligned_mtl", "w = σ V Λ^(-1/2) Vᵀ p from the eigendecomposition of G.",
    "Senushkin et al. 2023, 'Independent component alignment for multi-task learning'",
    options=(
        Option("pref", None, k_vector(nonnegative=True, positive_sum=True),
               "nonnegative preference K-vector p (default: uniform 1/K)"),
        Option("scale_mode", "min", choice("min", "median", "rmse"), "how σ is taken from the eigenvalues"),
    ),
    weighting=_aligned_mtl,
))
