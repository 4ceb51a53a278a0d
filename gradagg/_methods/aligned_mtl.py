"""Aligned-MTL. Senushkin et al. (2023), "Independent component alignment for multi-task learning".

With G = V Λ Vᵀ restricted to its range,

    B = σ V Λ^(−1/2) Vᵀ,   w = B p,

where σ = √λ_min (scale_mode="min"), √median λ ("median", the mean of the two middle values for
an even count) or √mean λ ("rmse"). Jᵀ B has orthogonal rows of equal norm σ: the task gradients
aligned into a well-conditioned system. A zero Jacobian gives w = 0.

The range is decided at the Gramian's noise floor on the unit-diagonal scaling A = S G S (an
eigenvalue of A at or below the cut is a null direction, whatever the norms), and the eigenpairs of
G on it come from its graded factor (``solvers.spectral.graded_range``) or, for K ≤ 16 where A is
provably above the cut, from a Jacobi eigendecomposition of G in C: both resolve small eigenvalues
to high relative accuracy, so tasks whose gradients are 10⁶ times smaller keep their share. (An
eigendecomposition of G itself gives them only ε λ_max, and σ = √λ_min would be noise; on the CPU
it is used where its own eigenvalues prove that error below 1e-9 of λ_min, several times faster
for K > 16.)
"""

from __future__ import annotations

import torch

from .._device import on_triton
from .._numerics import eigen_cut
from .._registry import Context, Method, Option, as_vector, choice, k_vector, register
from ..solvers import native
from ..solvers._loop import can_stop_early, opaque
from ..solvers.spectral import RTOL, finite_eigh, graded_range, scaled_spectrum


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
_NAMES = {code: name for name, code in _MODES.items()}
JACOBI_MAX_K = 16


def _plain_eigh(g: torch.Tensor, cut: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The eigendecomposition of G itself, where it provably resolves every eigenvalue to 1e-9
    relative (eigh's error, about K ε λ_max(G), below 1e-9 λ_min(G)) and every eigenvalue of
    A = S G S lies above the cut (λ_min(A) ≥ λ_min(G) / max‖g_i‖²); else None. Reads flags: call
    only where ``can_stop_early``."""
    k = g.shape[-1]
    peak = torch.diagonal(g).amax()
    lam, vec = finite_eigh(g / peak)
    low, high = lam.amin(), lam.amax()
    ok = (low * 1e-9 >= k * torch.finfo(g.dtype).eps * high) & (low > max(cut, RTOL * k))
    return (lam, vec) if bool(ok) else None


def _aligned_impl(g: torch.Tensor, pref: torch.Tensor, mode: int, cut: float) -> torch.Tensor:
    # Up to K = 16 a Jacobi eigendecomposition in C is faster than torch's (O(K³) per sweep, several
    # sweeps), where A is provably well above the cut; the graded factor otherwise.
    if native.usable(g) and g.shape[-1] <= JACOBI_MAX_K and not on_triton(g):
        w = native.aligned_mtl(g, pref, mode, cut)
        if w is not None:
            return w
    plain = _plain_eigh(g, cut) if can_stop_early(g) and not on_triton(g) else None  # (reads a flag)
    if plain is not None:
        lam, vec = plain  # of G / max G_ii: σ and Λ^(−1/2) scale alike, w does not change
        sigma = _sigma(lam, torch.ones_like(lam, dtype=torch.bool), _NAMES[mode]).sqrt()
        return sigma * (vec @ (lam.rsqrt() * (vec.mT @ pref)))
    u, sigma2, valid = graded_range(scaled_spectrum(g, cut))
    safe = torch.where(valid, sigma2, 1.0)
    sigma = torch.where(valid.any(), _sigma(safe, valid, _NAMES[mode]), 0.0).sqrt()
    return sigma * (u @ (torch.where(valid, safe.rsqrt(), 0.0) * (u.mT @ pref)))


_aligned_op = opaque("aligned_mtl", lambda g, pref, mode, cut: g.new_empty(g.shape[-1]))(_aligned_impl)


def _aligned_mtl(g: torch.Tensor, ctx: Context, pref: torch.Tensor | None, scale_mode: str) -> torch.Tensor:
    if on_triton(g):  # the whole K x K stage in one kernel launch
        from ..solvers.gpu import closed

        return closed.aligned_mtl(g, as_vector(pref, g), _MODES[scale_mode], eigen_cut(ctx.noise, g.shape[-1]))
    return _aligned_op(g, as_vector(pref, g), _MODES[scale_mode], eigen_cut(ctx.noise, g.shape[-1]))


register(Method(
    "aligned_mtl", "w = σ V Λ^(-1/2) Vᵀ p from the eigendecomposition of G.",
    "Senushkin et al. 2023, 'Independent component alignment for multi-task learning'",
    options=(
        Option("pref", None, k_vector(nonnegative=True, positive_sum=True),
               "nonnegative preference K-vector p (default: uniform 1/K)"),
        Option("scale_mode", "min", choice("min", "median", "rmse"), "how σ is taken from the eigenvalues"),
    ),
    weighting=_aligned_mtl, project_null=True,
))
