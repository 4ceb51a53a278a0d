"""Pseudo-inverse and unit-diagonal scaling of small symmetric PSD matrices, via eigh."""

from __future__ import annotations

import torch

from ._loop import can_stop_early

#: Eigenvalues below RTOL times the largest are treated as zero.
RTOL = 1e-12


def unit_scaling(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, s): A = S G S with s_i = 1/‖g_i‖, and s_i = 0 for zero rows (which drop out)."""
    diag = torch.diagonal(g)
    pos = diag > 0
    s = torch.where(pos, torch.rsqrt(torch.where(pos, diag, 1.0)), 0.0)
    return g * s.unsqueeze(-1) * s.unsqueeze(-2), s


def finite_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of A with non-finite entries zeroed, so that unchecked NaN input cannot make LAPACK
    raise; the callers' results are turned into NaN from G itself (see ``_api._weights``)."""
    return torch.linalg.eigh(torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0))


def pinv_solve(a: torch.Tensor, rhs: torch.Tensor, rtol: float = RTOL) -> torch.Tensor:
    """A⁺ rhs for symmetric PSD A, with eigenvalues below rtol · λ_max dropped."""
    lam, vec = finite_eigh(a)
    keep = lam > rtol * lam.amax().clamp_min(0)
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
    return vec @ (inv * (vec.mT @ rhs))


def nearest_psd(g: torch.Tensor) -> torch.Tensor:
    """G with its negative eigenvalues, in unit-diagonal scaling, set to zero.

    A Gramian accumulated in float32 can come out slightly indefinite (|cos| a hair above 1 for
    nearly colinear gradients), which no exact Gramian is. Clipping in the scaling S G S keeps the
    correction relative to each task's own scale, so tasks of very different norms are not lost.
    """
    diag = torch.diagonal(g)
    pos = diag > 0
    s = torch.where(pos, torch.rsqrt(torch.where(pos, diag, 1.0)), 1.0)
    unit = g * s.unsqueeze(-1) * s.unsqueeze(-2)
    if can_stop_early(g):
        # Usually G is fine: a Cholesky factorisation (far cheaper than eigh) proves it.
        _, info = torch.linalg.cholesky_ex(unit + 1e-14 * torch.eye(g.shape[-1], dtype=g.dtype, device=g.device))
        if not bool(info):
            return g
    lam, vec = finite_eigh(unit)
    keep = pos.to(g.dtype)
    a = (vec * lam.clamp_min(0.0)) @ vec.mT * (keep.unsqueeze(-1) * keep.unsqueeze(-2))  # zero rows stay 0
    return a / (s.unsqueeze(-1) * s.unsqueeze(-2)) + 0.0 * g  # (0·G keeps NaN input visible)
