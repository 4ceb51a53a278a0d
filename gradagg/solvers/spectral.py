"""Spectral tools for small symmetric PSD Gramians, in the unit-diagonal scaling.

Every decision about G's rank is taken on A = S G S (S = diag(1/‖g_i‖), 0 for zero rows), whose
entries are all known to the same relative accuracy δ whatever the norms of the gradients, so that
one cut τ (``_numerics.eigen_cut``) separates noise from signal for tasks of every scale.

Quantities that depend on G's own eigenvalues (G⁺ for IMTL-G, G^(−1/2) for Aligned-MTL) are not
taken from an eigendecomposition of G, which resolves its eigenvalues only to ε λ_max(G) and loses
the tasks with small gradients when norms are spread. They come from the graded factor
F = N V_r Λ_r^(1/2) (N = diag ‖g_i‖, V_r Λ_r Vᵀ_r the kept part of A), G = F Fᵀ on its range:
Householder QR of F with its rows sorted by decreasing norm, then the SVD of the small triangular
factor, which resolve the singular values of such row-graded matrices to high relative accuracy
(Cox & Higham 1998, "Stability of Householder QR factorization for weighted least squares
problems"; Demmel & Veselić 1992, "Jacobi's method is more accurate than QR").
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._device import on_triton

#: Eigenvalues of A below RTOL times the largest are always treated as zero (a float64 bound
#: kept below the noise floor's cut, which usually decides).
RTOL = 1e-12


class Spectrum(NamedTuple):
    """The eigendecomposition of A = S G S with the eigenvalues that the cut keeps."""

    n: torch.Tensor  #: ‖g_i‖ (0 for zero rows)
    s: torch.Tensor  #: 1/‖g_i‖ (0 for zero rows)
    lam: torch.Tensor  #: eigenvalues of A, ascending
    vec: torch.Tensor  #: eigenvectors of A (columns)
    keep: torch.Tensor  #: eigenvalues above the cut
    low: torch.Tensor  #: the smallest kept eigenvalue (inf if none is kept)


def finite_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of A with non-finite entries zeroed, so that unchecked NaN input cannot make LAPACK
    raise; the callers' results are turned into NaN from G itself (see ``_api._weights``). On the
    Triton route, Jacobi's method in one kernel (no host check; NaN for non-finite A)."""
    if on_triton(a):  # Triton route: the kernel, imported only here
        from .gpu import spectral as gpu_spectral

        return gpu_spectral.eigh(a)
    pair: tuple[torch.Tensor, torch.Tensor] = torch.linalg.eigh(torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0))
    return pair


def norms(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, s, nonzero): ‖g_i‖, 1/‖g_i‖ and G_ii > 0, with n = s = 0 for zero rows."""
    diag = torch.diagonal(g)
    pos = diag > 0
    n = torch.where(pos, diag, 0.0).sqrt()
    return n, torch.where(pos, 1.0 / torch.where(pos, n, 1.0), 0.0), pos


def scaled_spectrum(g: torch.Tensor, cut: float) -> Spectrum:
    """The eigendecomposition of A = S G S, keeping eigenvalues above max(cut, RTOL λ_max)."""
    n, s, _ = norms(g)
    lam, vec = finite_eigh(g * s.unsqueeze(-1) * s.unsqueeze(-2))
    keep = lam > torch.clamp_min(RTOL * lam.amax(), cut)
    low = torch.where(keep, lam, float("inf")).amin()
    return Spectrum(n, s, lam, vec, keep, low)


def graded_range(sp: Spectrum) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, σ², valid): the nonzero eigenpairs of G_c = N V_r Λ_r V_rᵀ N, to high relative accuracy.

    U has orthonormal columns (K x K; the columns beyond the rank r are not eigenvectors and are
    marked False in ``valid``), σ² the eigenvalues, descending. On the Triton route, a one-sided
    Jacobi SVD of the same factor in one kernel (``gpu.spectral.graded_range``).
    """
    if on_triton(sp.vec):  # Triton route: the kernel, imported only here
        from .gpu import spectral as gpu_spectral

        return gpu_spectral.graded_range(sp.n, sp.vec, sp.lam, sp.keep)
    k = sp.n.shape[-1]
    factor = sp.n.unsqueeze(-1) * sp.vec * torch.where(sp.keep, sp.lam, 0.0).clamp_min(0).sqrt()
    order = torch.argsort(sp.n, descending=True)
    q, r = torch.linalg.qr(factor[order])
    u_r, sigma, _ = torch.linalg.svd(r)
    u = torch.empty_like(q).index_copy_(0, order, q @ u_r)
    valid = torch.arange(k, device=sp.n.device) < sp.keep.sum()
    return u, torch.where(valid, sigma * sigma, 0.0), valid


def perpendicular_tol(sp: Spectrum, cut: float) -> torch.Tensor:
    """How far from orthogonal to the kept range a vector may look and still be orthogonal to the
    true range, relative to its norm: the kept eigenvectors are known to an angle of about
    cut / λ_r (a perturbation of norm ≤ cut, gap λ_r), capped at ½ and at least 1e-12."""
    return torch.clamp(cut / sp.low, min=1e-12, max=0.5)


def well_above(g: torch.Tensor, cut: float) -> bool:
    """Whether every eigenvalue of A = S G S on the nonzero rows exceeds ``cut`` (a Cholesky
    factorisation of A − cut·I exists). Reads a flag: call only where ``can_stop_early``."""
    diag = torch.diagonal(g)
    pos = diag > 0
    s = torch.where(pos, torch.rsqrt(torch.where(pos, diag, 1.0)), 1.0)
    shift = torch.where(pos, -cut, 1.0)  # zero rows are exact and decoupled: give them a unit pivot
    _, info = torch.linalg.cholesky_ex(g * s.unsqueeze(-1) * s.unsqueeze(-2) + torch.diag(shift))
    return not bool(info)


def denoise(g: torch.Tensor, cut: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(G_c, P): G with the eigenvalues of A = S G S at or below ``cut`` set to 0, and the projector
    that reduces weights to the range of G_c.

    With A = V Λ Vᵀ, A_c = A − Σ_{λ ≤ cut} λ v vᵀ (the eigenpairs above the cut are kept) and
    G_c = N A_c N (N = diag ‖g_i‖). A is denoised rather than G so that the cut is relative to each
    task's own scale: tasks whose norms differ by 10¹² keep their directions. This also makes G_c
    positive semidefinite.

    The directions removed are combinations v of the gradients with ‖Jᵀv‖² below the floor: in
    exact arithmetic they add nothing to d = Jᵀw, but a weight vector with large components along
    them (the singular Nash-MTL and FairGrad equations, MGDA's minimum at d = 0) would turn the
    Gramian's noise into a wrong d. P = I − S V_0 V_0ᵀ S⁻¹ (V_0: the dropped eigenvectors, which
    on the nonzero rows complete the kept ones) drops those components; zero rows keep their
    weights, which multiply a zero gradient.
    """
    n, s, pos = norms(g)
    lam, vec = finite_eigh(g * s.unsqueeze(-1) * s.unsqueeze(-2))
    drop = (lam <= cut).to(g.dtype)
    # A_c = A − Σ_dropped λ v vᵀ: G changes by no more than the floor, and keeps its exact relations
    # elsewhere (rebuilding it from the kept eigenpairs would round every entry).
    removed = (vec * (lam * drop)) @ vec.mT
    dropped = vec * drop
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    proj = eye - s.unsqueeze(-1) * (dropped @ dropped.mT) * n.unsqueeze(-2)
    proj = torch.where(pos.unsqueeze(-1) & pos.unsqueeze(-2), proj, torch.diag((~pos).to(g.dtype)))
    return g - removed * n.unsqueeze(-1) * n.unsqueeze(-2), proj
