"""Krum. Blanchard et al. (2017), "Machine learning with adversaries: Byzantine tolerant gradient
descent".

Each row scores the sum of its K − f − 2 smallest squared distances to the other rows, with
‖g_i − g_j‖² = G_ii + G_jj − 2G_ij; the m lowest-scoring rows are averaged. Scores that agree to
36 significant bits (about 1e-11 relative) are ties, which go to the lower index.
"""

from __future__ import annotations

import torch

from .._device import on_triton
from .._registry import REQUIRED, Context, Method, Option, integer, register
from ..solvers import native
from ..solvers._loop import opaque


def _krum_impl(g: torch.Tensor, f: int, m: int) -> torch.Tensor:
    """Krum's weights from G (in C on the CPU). An operator, not traced: inductor's CPU code
    generation fails on the vectorised frexp of the tie quantisation (torch 2.13, K = 32)."""
    if native.usable(g):
        return native.krum(g, f, m)
    k = g.shape[-1]
    diag = torch.diagonal(g)
    dist = (diag.unsqueeze(0) + diag.unsqueeze(1) - 2.0 * g).clamp_min(0)
    dist = dist + torch.diag(torch.full_like(diag, float("inf")))
    scores = dist.sort(-1).values[:, : k - f - 2].sum(-1)
    # Scores equal up to rounding (e.g. the two rows of a mutual nearest pair) count as ties, broken
    # by the lower index, so that the choice does not depend on the rounding of G.
    mantissa, exponent = torch.frexp(scores)
    quantised = torch.ldexp(torch.round(mantissa * 2.0**36) / 2.0**36, exponent)  # 36 significant bits
    chosen = torch.sort(quantised, stable=True).indices[:m]
    return torch.zeros_like(diag).scatter(0, chosen, 1.0 / m)


krum_op = opaque("krum", lambda g, f, m: g.new_empty(g.shape[-1]))(_krum_impl)


def _krum(g: torch.Tensor, ctx: Context, f: int, m: int) -> torch.Tensor:
    if on_triton(g):
        from ..solvers.gpu import surgery

        return surgery.krum(g, f, m)
    return krum_op(g, f, m)


register(Method(
    "krum", "Average the m rows closest to their K − f − 2 nearest neighbours.",
    "Blanchard et al. 2017, 'Machine learning with adversaries: Byzantine tolerant gradient descent'",
    options=(
        Option("f", REQUIRED, integer(lambda k: 0, lambda k: k - 3, "0 ≤ f ≤ K − 3"),
               "the number of faulty rows tolerated, 0 ≤ f ≤ K − 3"),
        Option("m", 1, integer(lambda k: 1, lambda k: k, "1 ≤ m ≤ K"), "how many rows to average"),
    ),
    weighting=_krum,
))
