"""SDMGrad and MoDo: weightings of a cross-Gramian A = J_a J_bᵀ of two independent mini-batches.

A_ij = <g_i(batch a), g_j(batch b)> is an unbiased estimate of <∇L_i, ∇L_j>, which the Gramian of
one batch is not. A is neither symmetric nor positive semidefinite and is used as it is. Both
methods take a projected-gradient step on the simplex Δ per call, warm-started from the weights
kept in the state, and the step combines a third Jacobian with the result:

    gradagg.aggregate(jac_step, "sdmgrad", cross=(jac_a, jac_b), state=state)

where ``jac_step`` is the Jacobian of a third independent batch (SDMGrad's ζ; MoDo as in LibMTL
and the authors' code with ``three_grads``), or, for MoDo's two-batch variant (Eq. 2.9b), the
mean ½(J_a + J_b) of the two batches.

Π_Δ is the exact Euclidean projection onto the simplex (``project_simplex``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .._registry import Context, Method, Option, as_vector, k_vector, positive_int, real_at_least, real_in, register
from ..state import Fields, State


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Π_Δ(v) = argmin_{w ∈ Δ} ‖w − v‖ = max(v − θ, 0), exactly, for v [K].

    With u = v sorted in decreasing order and f(j) = (Σ_{i≤j} u_i − 1)/j, the threshold is
    θ = max_j f(j): f(j+1) is a weighted mean of f(j) and u_{j+1}, so f rises exactly while
    u_{j+1} > f(j) (the usual support condition) and falls after, and the usual θ = f(ρ) at the
    last j with u_j > f(j) is its maximum. v is first shifted by its maximum (Π_Δ(v + c1) = Π_Δ(v)),
    so that θ ∈ [−1, 0) and the result sums to 1 to rounding however large v is (a cross-Gramian
    with a vanishing diagonal makes the inner steps huge). No data-dependent branch; NaN gives NaN.
    """
    v = v - v.max()
    u = torch.sort(v, descending=True).values
    j = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    theta = ((torch.cumsum(u, -1) - 1.0) / j).max()
    return (v - theta).clamp_min(0.0)


class _SimplexState(State):
    """A state whose K-vector field starts at the uniform point 1/K of the simplex."""

    def reset(self) -> State:
        super().reset()
        for name in self.fields:
            getattr(self, name).fill_(1.0 / self.num_tasks)
        return self


class SDMGradState(_SimplexState):
    """SDMGrad: the inner solver's weights w ∈ Δ (uniform 1/K at first), the warm start of each call."""

    method: ClassVar[str] = "sdmgrad"
    fields: ClassVar[Fields] = {"w": (("K",), 0.0, False)}
    w: torch.Tensor


class MoDoState(_SimplexState):
    """MoDo: the weights λ ∈ Δ (uniform 1/K at first), updated by one projected step per call."""

    method: ClassVar[str] = "modo"
    fields: ClassVar[Fields] = {"lam": (("K",), 0.0, False)}
    lam: torch.Tensor


def _keep_finite(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new``, or ``old`` where ``new`` is not finite, so that one non-finite A (with
    check_finite=False) does not leave NaN in the state for every later call; the call itself
    still returns NaN."""
    return torch.where(torch.isfinite(new).all(), new, old)


def _sdmgrad(a: torch.Tensor, ctx: Context, lambda_: float, n_iter: int, lr: float, momentum: float,
             pref: torch.Tensor | None) -> torch.Tensor:
    """SDMGrad. Xiao, Ban & Ji (2023), "Direction-oriented multi-objective learning: simple and
    provable stochastic algorithms", NeurIPS.

    With Â = A / (mean_i sqrt(max(A_ii, 0))² + 1e-8) (the scale normalisation of Sec. 6.1, as in
    LibMTL and TorchJD), w warm-started from the state and w̃ = ``pref``, ``n_iter`` steps of
    projected SGD with momentum on ½(w + λw̃)ᵀÂ(w + λw̃):

        q = Â(w + λw̃),  v = q (first step) or m·v + q,  w ← Π_Δ(w − lr·v).

    The velocity starts afresh each call. The state keeps w; the result is (w + λw̃)/(1 + λ) ∈ Δ,
    the weights of the step's Jacobian (the paper's direction d = J_ζᵀ(w + λw̃)/(1 + λ)). Where the
    diagonal's scale is under about 1e-4 the 1e-8 dominates and Â is no longer scale-free.
    Defaults are TorchJD's; LibMTL uses lr = 5, and the official code also multiplies d by K.
    """
    state: SDMGradState = ctx.state
    target = as_vector(pref, a)
    scale = torch.diagonal(a).clamp_min(0.0).sqrt().mean()
    a_hat = a / (scale * scale + 1e-8)
    start = state.w.to(a.dtype)
    w, velocity = start, None
    for _ in range(n_iter):
        q = a_hat @ (w + lambda_ * target)
        velocity = q if velocity is None else momentum * velocity + q
        w = project_simplex(w - lr * velocity)
    state.w.copy_(_keep_finite(w, start).to(state.dtype))
    return (w + lambda_ * target) / (1.0 + lambda_)


def _modo(a: torch.Tensor, ctx: Context, gamma: float, rho: float) -> torch.Tensor:
    """MoDo. Chen, Fernando, Ying & Chen, "Three-way trade-off in multi-objective learning:
    optimization, generalization and conflict-avoidance", NeurIPS 2023 / JMLR 25 (2024).

    One projected gradient step on ½λᵀ(A + ρI)λ from the λ kept in the state:

        λ ← Π_Δ(λ − γ(Aλ + ρλ)),

    and the updated λ is returned (and kept). There is no scale normalisation, so γ is tied to
    the gradients' size: modo(cA; γ, ρ) = modo(A; cγ, ρ/c). The default γ = 0.1 is TorchJD's and
    the authors'; LibMTL uses γ = 1e-3 (pass gamma=1e-3 for parity with its benchmarks).
    """
    state = ctx.state
    lam = state.lam.to(a.dtype)
    new = project_simplex(lam - gamma * (a @ lam + rho * lam))
    state.lam.copy_(_keep_finite(new, lam).to(state.dtype))
    return new


def _simplex_vector(name: str, value: Any, k: int) -> torch.Tensor | None:
    """A K-vector on the simplex (nonnegative, summing to 1 within 1e-6), or None (uniform)."""
    vec = k_vector(nonnegative=True, positive_sum=True)(name, value, k)
    if vec is not None and not torch.compiler.is_compiling() and vec.device.type == "cpu":
        total = float(vec.detach().to(torch.float64).sum())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"option {name!r} must lie on the simplex (nonnegative, summing to 1), but it sums to "
                             f"{total!r}: divide it by its sum")
    return vec




register(Method(
    "sdmgrad", "Projected SGD with momentum on the simplex for (w + λw̃)ᵀÂ(w + λw̃), Â a normalised cross-Gramian; "
    "w = (w + λw̃)/(1 + λ).",
    "Xiao, Ban & Ji 2023, 'Direction-oriented multi-objective learning: simple and provable stochastic algorithms'",
    options=(
        Option("lambda_", 0.3, real_at_least(0.0), "pull λ ≥ 0 towards the preference direction w̃"),
        Option("n_iter", 20, positive_int, "inner projected-SGD steps per call (≥ 1)"),
        Option("lr", 10.0, real_at_least(0.0, strict=True), "inner SGD learning rate (> 0; LibMTL uses 5)"),
        Option("momentum", 0.5, real_in(0.0, 1.0, open_high=True), "inner SGD momentum, in [0, 1)"),
        Option("pref", None, _simplex_vector, "the preference w̃ ∈ Δ, a K-vector (default: uniform 1/K)"),
    ),
    weighting=_sdmgrad, state_class=SDMGradState, uses_cross=True,
))
register(Method(
    "modo", "λ ← Π_Δ(λ − γ(A + ρI)λ) for a cross-Gramian A: one projected step per call; w = λ.",
    "Chen, Fernando, Ying & Chen 2023, 'Three-way trade-off in multi-objective learning: optimization, "
    "generalization and conflict-avoidance'",
    options=(
        Option("gamma", 0.1, real_at_least(0.0, strict=True), "step size γ > 0 (LibMTL uses 1e-3)"),
        Option("rho", 0.1, real_at_least(0.0), "ℓ2 regularisation ρ ≥ 0"),
    ),
    weighting=_modo, state_class=MoDoState, uses_cross=True,
))
