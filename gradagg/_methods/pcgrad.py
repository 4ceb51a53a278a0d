"""PCGrad: gradient surgery. Yu et al. (2020), "Gradient surgery for multi-task learning".

For each task i, g_i' starts at g_i; for each other task j, in an order drawn at random for i,
if g_i'·g_j < 0 then g_i' −= (g_i'·g_j / ‖g_j‖²) g_j. The result is d = Σ_i g_i'.

Every g_i' is a combination of the original rows, g_i' = Σ_j C_ij g_j, and g_i'·g_j = (C G)_ij,
so the whole surgery runs on the K x K coefficient matrix C: K − 1 steps, all tasks at once.
The weights are w = 1ᵀC. Tasks with a zero gradient project nothing away.
"""

from __future__ import annotations

import torch

from .._device import on_triton
from .._registry import Context, Method, register
from ..solvers import native
from ..solvers._loop import opaque


def _keys(k: int, g: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform random keys [K, K]: row i projects on the other tasks in the order of its keys."""
    return torch.rand(k, k, generator=generator, dtype=g.dtype, device=g.device)


def _orders(keys: torch.Tensor) -> torch.Tensor:
    k = keys.shape[-1]
    keys = keys + 2.0 * torch.eye(k, dtype=keys.dtype, device=keys.device)  # i itself sorts last
    return keys.argsort(-1)[:, : k - 1]


def random_orders(k: int, g: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Row i: the K − 1 other tasks in a uniformly random order ([K, K−1])."""
    return _orders(_keys(k, g, generator))


def _pcgrad_impl(g: torch.Tensor, keys: torch.Tensor, weights: bool) -> torch.Tensor:
    """The coefficient matrix C with rows g_i' = Σ_j C_ij g_j, or its column sums 1ᵀC (``weights``);
    in C on the CPU."""
    if native.usable(g):
        return native.pcgrad(g, keys, weights)
    k = g.shape[-1]
    diag = torch.diagonal(g)
    safe = torch.where(diag > 0, diag, 1.0)
    order = _orders(keys)
    c = torch.eye(k, dtype=g.dtype, device=g.device)
    for t in range(k - 1):
        j = order[:, t]
        dot = (c @ g).gather(1, j.unsqueeze(1)).squeeze(1)  # g_i'·g_j
        coef = torch.where((dot < 0) & (diag[j] > 0), dot / safe[j], 0.0)
        c = c - coef.unsqueeze(1) * torch.nn.functional.one_hot(j, k).to(g.dtype)
    return c.sum(0) if weights else c


def _pcgrad_fake(g: torch.Tensor, keys: torch.Tensor, weights: bool) -> torch.Tensor:
    k = g.shape[-1]
    return g.new_empty(k) if weights else g.new_empty((k, k))


pcgrad_op = opaque("pcgrad", _pcgrad_fake)(_pcgrad_impl)


def pcgrad_matrix(g: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The coefficient matrix C of the surgery, with orders drawn from ``generator``."""
    keys = _keys(g.shape[-1], g, generator)
    if on_triton(g):
        from ..solvers.gpu import surgery

        return surgery.pcgrad(g, keys, False)
    return pcgrad_op(g, keys, False)


def _transform(g: torch.Tensor, ctx: Context) -> torch.Tensor:
    return pcgrad_matrix(g, ctx.generator)


def _pcgrad(g: torch.Tensor, ctx: Context) -> torch.Tensor:
    keys = _keys(g.shape[-1], g, ctx.generator)
    if on_triton(g):
        from ..solvers.gpu import surgery

        return surgery.pcgrad(g, keys, True)
    return pcgrad_op(g, keys, True)


register(Method(
    "pcgrad", "Project each gradient off the others it conflicts with (random order), then sum.",
    "Yu et al. 2020, 'Gradient surgery for multi-task learning'",
    weighting=_pcgrad, transform=_transform, random=True, project_null=True,
))
