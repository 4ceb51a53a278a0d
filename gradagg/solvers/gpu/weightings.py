"""GradNorm's step as one Triton kernel (``_methods.gradnorm``): K-vector arithmetic that as torch ops
would cost some 40 launches per call.

    w = K softmax(θ),   n_i = ‖g_i‖,   q_i = c_i / c_i(t0),   ρ = q / mean q,
    θ ← θ − lr · w ⊙ (s ⊙ n − Σ_i s_i n_i w_i / K),   s = sign(w ⊙ n − mean(w ⊙ n) ρ^α),

with c the gradient norms (``gradnorm``) or the losses (``gradnorm_loss``); the references c(t0)
are recorded at the call with index ``update_at``. θ, the references and the step counter are
updated in place; w is the weight vector from before the update.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import padded, triton_op
from .aot import Kernel


@triton.jit
def _gradnorm_kernel(g_ptr: tl.tensor, current_ptr: tl.tensor, theta_ptr: tl.tensor, ref_ptr: tl.tensor,
                     step_ptr: tl.tensor, w_ptr: tl.tensor, k: tl.tensor, alpha: tl.tensor, lr: tl.tensor,
                     update_at: tl.tensor, NORMS: tl.constexpr, KP: tl.constexpr) -> None:
    r = tl.arange(0, KP)
    inside = r < k
    alpha = tl.zeros([], tl.float64) + alpha  # (the interpreter keeps Python floats as float32)
    lr = tl.zeros([], tl.float64) + lr
    n = tl.sqrt(tl.maximum(tl.load(g_ptr + r * (k + 1), mask=inside, other=0.0).to(tl.float64), 0.0))  # ‖g_i‖
    if NORMS:
        current = n
    else:
        current = tl.load(current_ptr + r, mask=inside, other=0.0).to(tl.float64)
    theta = tl.load(theta_ptr + r, mask=inside, other=0.0).to(tl.float64)
    ref = tl.load(ref_ptr + r, mask=inside, other=1.0).to(tl.float64)
    step = tl.load(step_ptr)
    e = tl.where(inside, tl.exp(theta - tl.max(tl.where(inside, theta, -float("inf")), 0)), 0.0)
    w = k * e / tl.sum(e, 0)
    ref = tl.where(step == update_at, current, ref)
    ref_stored = ref.to(ref_ptr.dtype.element_ty)
    ref = ref_stored.to(tl.float64)  # the reference in the state's dtype, as the torch path reads it
    q = tl.where(inside & (ref > 0), current / tl.where(ref > 0, ref, 1.0), 0.0)
    mean_q = tl.sum(q, 0) / k
    rho = tl.where(mean_q > 0, q / tl.where(mean_q > 0, mean_q, 1.0), 1.0)
    powered = tl.where(rho > 0, tl.exp(alpha * tl.log(tl.where(rho > 0, rho, 1.0))), tl.where(alpha == 0, 1.0, 0.0))
    wn = w * n
    diff = wn - tl.sum(wn, 0) / k * powered
    sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    grad_w = sign * n
    grad_theta = w * (grad_w - tl.sum(tl.where(inside, w * grad_w, 0.0), 0) / k)
    new_theta = theta - (lr * grad_theta).to(theta_ptr.dtype.element_ty).to(tl.float64)
    tl.store(theta_ptr + r, new_theta.to(theta_ptr.dtype.element_ty), mask=inside)
    tl.store(ref_ptr + r, ref_stored, mask=inside)
    tl.store(step_ptr, step + 1)
    tl.store(w_ptr + r, w, mask=inside)


@triton_op("gradagg::tr_gradnorm", mutates_args=("theta", "ref", "step"))
def gradnorm(g: torch.Tensor, losses: torch.Tensor | None, theta: torch.Tensor, ref: torch.Tensor,
             step: torch.Tensor, alpha: float, lr: float, update_at: int) -> torch.Tensor:
    """GradNorm's w for the Gramian g, the state (θ, references, step) advanced in place; with
    ``losses`` (float64 [K]) the training rates are the loss ratios (``gradnorm_loss``)."""
    k = g.shape[-1]
    w = torch.empty(k, dtype=torch.float64, device=g.device)
    current = g if losses is None else losses
    wrap_triton(_gradnorm_kernel)[(1,)](g, current, theta, ref, step, w, k, alpha, lr, update_at,
                                        NORMS=losses is None, KP=padded(k), num_warps=1)
    return w


AOT = [Kernel(_gradnorm_kernel, {"g_ptr": "*fp64", "current_ptr": "*fp64", "theta_ptr": "*fp64", "ref_ptr": "*fp64",
                                 "step_ptr": "*i64", "w_ptr": "*fp64", "k": "i32", "alpha": "fp64", "lr": "fp64",
                                 "update_at": "i64", "NORMS": "constexpr", "KP": "constexpr"},
              {"NORMS": False}, warps=lambda kp: 1)]
