"""GradNorm. Chen et al. (2018), "GradNorm: gradient normalization for adaptive loss balancing in
deep multitask networks"; the gradient-norm variant from impartial-vaes.

    w = K softmax(θ),  d = Jᵀw  (the weights from before this call's update of θ),

then one gradient step of size ``lr`` on θ against  L = Σ_i |w_i n_i − mean_j(w_j n_j) ρ_i^α|,
with the mean held constant, n_i = ‖g_i‖ and ρ_i = q_i / mean(q). The training rates are
q_i = n_i / n_i(t0) for ``gradnorm`` and q_i = L_i / L_i(t0) for ``gradnorm_loss``, which reads the
task losses from ``losses=``. The reference values are 1 until the call with index ``update_at``
(0 = the first call), where they are recorded. The step on θ is computed in closed form:
∂L/∂θ_k = w_k (s_k n_k − Σ_i s_i n_i w_i / K), with s_i the sign of the i-th term. The weights
stay positive and sum to K.
"""

from __future__ import annotations

from typing import cast

import torch

from .._device import on_triton
from .._registry import Context, Method, Option, nonnegative_int, real_at_least, register
from ..state import GradNormLossState, GradNormState


def _step(g: torch.Tensor, ctx: Context, alpha: float, lr: float, update_at: int, current: torch.Tensor
          ) -> torch.Tensor:
    state = ctx.state
    k = g.shape[-1]
    w = k * torch.softmax(state.theta.to(g.dtype), -1)
    n = torch.diagonal(g).clamp_min(0).sqrt()
    ref = torch.where(state.step == update_at, current.to(state.dtype), state.ref)
    r = ref.to(g.dtype)
    q = torch.where(r > 0, current / torch.where(r > 0, r, 1.0), 0.0)
    mean_q = q.mean()
    rho = torch.where(mean_q > 0, q / torch.where(mean_q > 0, mean_q, 1.0), 1.0)
    wn = w * n
    sign = torch.sign(wn - wn.mean() * rho**alpha)
    grad_w = sign * n
    grad_theta = w * (grad_w - (w * grad_w).sum() / k)
    state.theta.copy_(state.theta - lr * grad_theta.to(state.dtype))
    state.ref.copy_(ref)
    state.step.add_(1)
    return w


def _on_device(g: torch.Tensor, ctx: Context, alpha: float, lr: float, update_at: int,
               losses: torch.Tensor | None) -> torch.Tensor:
    """The same step as one Triton kernel (the Triton route): a constant number of launches."""
    from ..solvers.gpu import weightings

    state = ctx.state
    return weightings.gradnorm(g, losses, state.theta, state.ref, state.step, alpha, lr, update_at)


def _gradnorm(g: torch.Tensor, ctx: Context, alpha: float, lr: float, update_at: int) -> torch.Tensor:
    if on_triton(g):
        return _on_device(g, ctx, alpha, lr, update_at, None)
    return _step(g, ctx, alpha, lr, update_at, torch.diagonal(g).clamp_min(0).sqrt())


def _gradnorm_loss(g: torch.Tensor, ctx: Context, alpha: float, lr: float, update_at: int) -> torch.Tensor:
    losses = cast(torch.Tensor, ctx.losses).to(device=g.device, dtype=g.dtype)  # (uses_losses: present)
    if on_triton(g):
        return _on_device(g, ctx, alpha, lr, update_at, losses)
    return _step(g, ctx, alpha, lr, update_at, losses)


_OPTIONS = (
    Option("alpha", 1.5, real_at_least(0.0), "the asymmetry α ≥ 0 of the target rates"),
    Option("lr", 0.025, real_at_least(0.0, strict=True), "the step size of θ, > 0"),
    Option("update_at", 0, nonnegative_int, "the call index (0-based) at which the references are recorded"),
)
_SOURCE = "Chen et al. 2018, 'GradNorm: gradient normalization for adaptive loss balancing in deep multitask networks'"
register(Method(
    "gradnorm", "w = K softmax(θ), θ stepped to equalise w_i‖g_i‖ against gradient-norm training rates.",
    _SOURCE + "; gradient-norm rates from impartial-vaes", options=_OPTIONS, weighting=_gradnorm,
    state_class=GradNormState,
))
register(Method(
    "gradnorm_loss", "As gradnorm, with training rates L_i(t)/L_i(t0) from losses=.", _SOURCE, options=_OPTIONS,
    weighting=_gradnorm_loss, state_class=GradNormLossState, uses_losses=True,
))
