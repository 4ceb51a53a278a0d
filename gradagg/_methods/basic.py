"""Fixed weightings: sum, mean, constant weights, and random loss weighting."""

from __future__ import annotations

import torch

from .._registry import REQUIRED, Context, Method, Option, as_vector, k_vector, register


def _sum(g: torch.Tensor, ctx: Context) -> torch.Tensor:
    return torch.ones(g.shape[-1], dtype=g.dtype, device=g.device)


def _mean(g: torch.Tensor, ctx: Context) -> torch.Tensor:
    return as_vector(None, g)


def _constant(g: torch.Tensor, ctx: Context, weights: torch.Tensor) -> torch.Tensor:
    return as_vector(weights, g)


def _random(g: torch.Tensor, ctx: Context) -> torch.Tensor:
    """RLW: w = softmax(ε), ε ~ N(0, I_K), drawn from ``generator`` on G's device."""
    eps = torch.randn(g.shape[-1], generator=ctx.generator, dtype=g.dtype, device=g.device)
    return torch.softmax(eps, dim=-1)


register(Method("sum", "w = 1: the plain sum of the task gradients.", "-", aliases=("identity",), weighting=_sum,
                uses_gramian=False, fixed=True))
register(Method("mean", "w = 1/K: the mean task gradient.", "-", weighting=_mean, uses_gramian=False,
                fixed=True))
register(Method(
    "constant", "w = weights, a fixed nonnegative K-vector.", "-", weighting=_constant, uses_gramian=False,
    options=(Option("weights", REQUIRED, k_vector(nonnegative=True, positive_sum=False),
                    "a nonnegative K-vector of task weights"),),
))
register(Method(
    "random", "w = softmax(ε), ε ~ N(0, I): random loss weighting.",
    "Lin et al. 2022, 'Reasonable effectiveness of random weighting' (RLW)",
    weighting=_random, random=True, uses_gramian=False,
))
