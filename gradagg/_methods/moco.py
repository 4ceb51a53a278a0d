"""MoCo: stochastic multi-objective gradient correction. Fernando et al. (2023), "Mitigating
gradient bias in multi-objective learning: a provably convergent approach", ICLR.

MoCo tracks the Jacobian with a K x D state Y and steps along a combination of the tracked rows,
not of the current J. With LibMTL's semantics (the default), at call t = 1, 2, ...:

    ĝ_i = L_i g_i / (‖g_i‖ + 1e-8)                       (track="loss_unit"; "raw": ĝ_i = g_i)
    β_t = β / t^σ_β,   γ_t = γ / t^σ_γ
    Y ← Y − β_t (Y − Ĵ)
    λ ← softmax(λ − γ_t (YYᵀ + ρI) λ)                     (simplex="project": Π_Δ in place of softmax)
    d = Yᵀλ

with Y = 0 and λ = 1/K at first. The paper's Alg. 1 (as the authors' Trade-Off-MOL code has it)
is ``simplex="project", track="raw"`` with constant schedules (σ = 0); its projection of Y onto a
bounded set is omitted by every implementation, and here too. The softmax map is applied to λ
itself, not to log λ: it is not exponentiated gradient, and λ stays near uniform unless
γ_t‖YYᵀλ‖ is large. The authors' ICLR code scales d by K; gradagg does not.

``losses=`` is required (a Tensor [K]); ``track="raw"`` does not read it. The state holds Y (one
[K, D_l] tensor per leaf of J, in J's accumulation dtype), λ and t; it costs as much memory as J.
The norms and YYᵀ are reduced over all leaves (and over the ranks of a sharded call) in float64:
a float32 J is accumulated in float32 and, where its squares overflow or underflow, taken again
exactly with power-of-two scaling (the norms everywhere, YYᵀ on the CPU; on an accelerator an
overflowing YYᵀ gives NaN, as the library's Gramian does there). Nothing is read back to the host
on an accelerator. Only the step's own term Σ_i β_t λ_i c_i g_i of d (c_i = L_i/(‖g_i‖ + 1e-8),
or 1 for "raw") is differentiable in J, with the coefficients held constant. A non-finite J makes
Y non-finite for good (the state must then be reset).
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch

from .. import distributed
from .._gramian import _TINY, fast, needs_rescale, rescaled
from .._registry import Context, Method, Option, choice, real_at_least, real_in, register
from ..solvers._loop import can_stop_early
from ..state import Fields, State, WideState
from .cross import project_simplex

EPS = 1e-8


# --- reductions over D, shared with db_mtl and excess_mtl ----------------------------------------
#
# With parameter sharding (``group``: the process group of ``aggregate(..., group=)``, read from the
# context where the library passes it) each rank holds some columns of J and of the K x D state;
# the K-sized and K x K reductions are summed over the group, so every rank takes the same
# decisions and keeps the same K-sized state.


def group_of(ctx: Context) -> Any:
    return getattr(ctx, "group", None)


def summed(t: torch.Tensor, group: Any) -> torch.Tensor:
    return t if group is None else distributed.all_reduce_sum(t, group)


def sq_norms(rows: list[torch.Tensor], group: Any = None) -> torch.Tensor:
    """‖r_i‖² over all leaves (and ranks), float64 [K]. Each leaf's norms are accumulated in its
    dtype; rows whose squares overflowed or underflowed it are taken again exactly, scaled by a
    power of two per row (on the CPU only where a flag says so; elsewhere always, selected without
    a host read)."""
    quick = summed(torch.stack([torch.linalg.vector_norm(r, dim=1).to(torch.float64) for r in rows])
                   .square().sum(0), group)
    suspect = ~torch.isfinite(quick) | (quick < _TINY[rows[0].dtype])
    if can_stop_early(quick) and not bool(suspect.any()):
        return quick
    return torch.where(suspect, summed(_scaled_sq_norms(rows), group), quick)


def _scaled_sq_norms(rows: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(rows[0].shape[0], dtype=torch.float64, device=rows[0].device)
    rows = [r for r in rows if r.shape[1] > 0]  # (a max over no columns has no value)
    if not rows:  # (a rank holding no columns)
        return total
    peak = torch.stack([torch.linalg.vector_norm(r, ord=float("inf"), dim=1) for r in rows]).amax(0)
    peak = peak.to(torch.float64)
    # Any power of two near the peak scales exactly (not frexp: inductor mis-vectorises its int output).
    exponent = torch.where(peak > 0, torch.floor(torch.log2(torch.where(peak > 0, peak, 1.0))) + 1.0, 0.0)
    # 2^-e need not be representable in float32 (e down to -149); its two halves are.
    half = torch.exp2(-torch.floor(exponent / 2))
    rest = torch.exp2(-exponent) / half
    for r in rows:
        scaled = (r * half.to(r.dtype).unsqueeze(1)).mul_(rest.to(r.dtype).unsqueeze(1))
        total = total + torch.linalg.vector_norm(scaled, dim=1).to(torch.float64).square()
    return total * torch.exp2(2.0 * exponent)


def wide_gramian(rows: list[torch.Tensor], group: Any = None) -> torch.Tensor:
    """Σ_leaves R_l R_lᵀ (over all ranks) in float64 [K, K], by the library's Gramian products
    (exact float64 sums of float32 chunks). On the CPU an overflow or underflow is rescued by exact
    rescaling; elsewhere an overflow gives non-finite entries (as the library's Gramian does on the
    device without ``check_finite``)."""
    dtype = rows[0].dtype
    g = summed(fast(rows, dtype).to(torch.float64), group)
    if can_stop_early(g) and bool(needs_rescale(g, dtype)):
        g = summed(rescaled(rows, dtype), group)
    return g


def blend_into(buffers: list[torch.Tensor], rows: list[torch.Tensor], keep: torch.Tensor, coef: torch.Tensor) -> None:
    """B_l ← keep · B_l + diag(coef) R_l for every leaf l, in place, without a K x D temporary (the
    EMAs of MoCo's Y and DB-MTL's buffer)."""
    for b, r in zip(buffers, rows):
        b.mul_(keep.to(b.dtype)).addcmul_(r, coef.to(b.dtype).unsqueeze(1))


def differentiable(out: list[torch.Tensor], coef: torch.Tensor, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """``out`` with the derivative of Σ_i coef_i r_i in J (coef held constant), where J is recorded."""
    if not (torch.is_grad_enabled() and any(r.requires_grad for r in rows)):
        return out
    terms = [coef.to(r.dtype) @ r for r in rows]
    return [o + (t - t.detach()) for o, t in zip(out, terms)]


# --- MoCo -----------------------------------------------------------------------------------------


class MoCoState(WideState):
    """MoCo: the tracked Jacobian Y (``y``: one [K, D_l] tensor per leaf, zero, allocated at the
    first call), the weights λ ∈ Δ (``lam``, uniform 1/K at first) and the call count t (``step``)."""

    method: ClassVar[str] = "moco"
    fields: ClassVar[Fields] = {"lam": (("K",), 0.0, False), "step": ((), 0, True)}
    wide: ClassVar[tuple[str, ...]] = ("y",)
    lam: torch.Tensor
    step: torch.Tensor
    y: list[torch.Tensor] | None

    def reset(self) -> State:
        super().reset()
        self.lam.fill_(1.0 / self.num_tasks)
        return self


def _moco(rows: list[torch.Tensor], ctx: Context, beta: float, beta_sigma: float, gamma: float,
          gamma_sigma: float, rho: float, simplex: str, track: str) -> list[torch.Tensor]:
    state, group = ctx.state, group_of(ctx)
    state.bind(rows)
    data = [r.detach() for r in rows]
    k = data[0].shape[0]
    state.step.add_(1)
    t = state.step.to(torch.float64)
    beta_t = beta * t.pow(-beta_sigma)
    gamma_t = gamma * t.pow(-gamma_sigma)
    if track == "loss_unit":
        coef = cast(torch.Tensor, ctx.losses).to(torch.float64) / (sq_norms(data, group).sqrt() + EPS)  # (present)
    else:
        coef = torch.ones(k, dtype=torch.float64, device=data[0].device)
    step = beta_t * coef
    blend_into(state.y, data, 1.0 - beta_t, step)  # Y ← (1 − β_t) Y + β_t diag(c) J
    lam = state.lam.to(torch.float64)
    m = wide_gramian(state.y, group)
    if rho:
        m = m + rho * torch.eye(k, dtype=m.dtype, device=m.device)
    v = lam - gamma_t * (m @ lam)
    lam = torch.softmax(v, 0) if simplex == "softmax" else project_simplex(v)
    state.lam.copy_(lam)
    out = [lam.to(y.dtype) @ y for y in state.y]
    return differentiable(out, lam * step, rows)




register(Method(
    "moco", "Track J in Y ← Y − β_t(Y − Ĵ), Ĵ_i = L_i u_i; λ ← softmax(λ − γ_t(YYᵀ + ρI)λ); d = Yᵀλ.",
    "Fernando et al. 2023, 'Mitigating gradient bias in multi-objective learning: a provably convergent approach'",
    options=(
        Option("beta", 0.5, real_in(0.0, 1.0, open_low=True),
               "tracking rate β in (0, 1]; β_t = β / t^beta_sigma"),
        Option("beta_sigma", 0.5, real_at_least(0.0), "decay exponent σ_β ≥ 0 of β_t (0: constant)"),
        Option("gamma", 0.1, real_at_least(0.0), "step size γ ≥ 0 of λ; γ_t = γ / t^gamma_sigma"),
        Option("gamma_sigma", 0.5, real_at_least(0.0), "decay exponent σ_γ ≥ 0 of γ_t (0: constant)"),
        Option("rho", 0.0, real_at_least(0.0), "ℓ2 regularisation ρ ≥ 0 of the λ step"),
        Option("simplex", "softmax", choice("softmax", "project"),
               "map onto Δ: 'softmax' (LibMTL) or 'project' (Π_Δ, the paper)"),
        Option("track", "loss_unit", choice("loss_unit", "raw"),
               "what Y tracks: 'loss_unit' L_i g_i/(‖g_i‖ + 1e-8) (LibMTL) or 'raw' g_i (the paper)"),
    ),
    combine=_moco, state_class=MoCoState, uses_gramian=False, uses_losses=True,
))
