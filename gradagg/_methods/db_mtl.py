"""DB-MTL: dual-balancing multi-task learning. Lin et al. (2023), "Dual-balancing for multi-task
learning", arXiv 2308.12029 (later in Neural Networks); the authors' code is LibMTL's DB_MTL.

Loss scales are balanced by taking each task's gradient of log L_i, gradient magnitudes by
rescaling every task's term of d to the largest norm. At call t = 1, 2, ...:

    ĝ_i = g_i / (L_i + 1e-8)                   (= ∇ log(L_i + 1e-8))
    β_t = β / t^σ
    B ← ĝ + β_t (B − ĝ)                         (an EMA of ĝ, B = 0 at first, no bias correction)
    α_i = max_j ‖B_j‖ / (‖B_i‖ + 1e-8)
    d = Σ_i α_i B_i = Bᵀα

so every term α_i B_i has the norm max_j ‖B_j‖ (up to the 1e-8). Without bias correction the
first step is shrunk: d_1 = (1 − β)·d(β = 0), and constant inputs give d_t = (1 − β^t)·d(β = 0).
In LibMTL the task heads are trained on log L_i as well; gradagg combines the given Jacobian only.

With β = 0 (then β_t = 0 always) B = ĝ and no K x D buffer is allocated or kept: d is then
Σ_i M g_i / (‖g_i‖ + 1e-8 (L_i + 1e-8)) with M = max_j ‖g_j‖/(L_j + 1e-8), a function of the norms
and L alone. A state whose buffer was allocated keeps it updated at β = 0 too; one first used
with β = 0 starts its buffer from 0 at the first call with β > 0.

``losses=`` is required (a Tensor [K]). The state holds B (``buffer``: one [K, D_l] tensor per leaf
of J, in J's accumulation dtype) and t; it costs as much memory as J. The norms are reduced over
all leaves (and over the ranks of a sharded call) in float64, rescued exactly from float32
overflow and underflow. Nothing is read back to the host on an accelerator. Only the step's own
term (1 − β_t) Σ_i α_i ĝ_i of d is differentiable in J, with α held constant. A non-finite J
makes B non-finite for good (the state must then be reset).
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch

from .._registry import Context, Method, Option, real_at_least, real_in, register
from ..state import Fields, WideState
from .moco import blend_into, differentiable, group_of, sq_norms

EPS = 1e-8


class DBMTLState(WideState):
    """DB-MTL: the EMA buffer B of the log-loss gradients (``buffer``: one [K, D_l] tensor per leaf,
    zero, allocated at the first call with β > 0) and the call count t (``step``)."""

    method: ClassVar[str] = "db_mtl"
    fields: ClassVar[Fields] = {"step": ((), 0, True)}
    wide: ClassVar[tuple[str, ...]] = ("buffer",)
    step: torch.Tensor
    buffer: list[torch.Tensor] | None


def _db_mtl(rows: list[torch.Tensor], ctx: Context, beta: float, beta_sigma: float) -> list[torch.Tensor]:
    state = ctx.state
    keep = beta > 0 or state.widths is not None
    if keep:
        state.bind(rows)
    data = [r.detach() for r in rows]
    state.step.add_(1)
    beta_t = beta * state.step.to(torch.float64).pow(-beta_sigma)
    losses = cast(torch.Tensor, ctx.losses)  # (uses_losses: present, checked by the caller)
    scale = 1.0 / (losses.to(torch.float64) + EPS)  # ĝ_i = scale_i g_i
    if keep:  # B ← (1 − β_t) ĝ + β_t B, in place
        step = (1.0 - beta_t) * scale
        blend_into(state.buffer, data, beta_t, step)
        norms = sq_norms(state.buffer, group_of(ctx)).sqrt()
        alpha = norms.max() / (norms + EPS)
        out = [alpha.to(b.dtype) @ b for b in state.buffer]
    else:  # B = ĝ: α_i ĝ_i = M g_i/(‖g_i‖ + 1e-8(L_i + 1e-8)), from J's norms
        norms = sq_norms(data, group_of(ctx)).sqrt()
        step = scale
        alpha = (norms * scale).max() / (norms * scale + EPS)
        out = [(alpha * scale).to(r.dtype) @ r for r in data]
    return differentiable(out, alpha * step, rows)




register(Method(
    "db_mtl", "B ← EMA of ∇log L_i rows (rate β_t); d = Σ_i α_i B_i with α_i = max_j ‖B_j‖ / ‖B_i‖.",
    "Lin et al. 2023, 'Dual-balancing for multi-task learning'",
    options=(
        Option("beta", 0.9, real_in(0.0, 1.0, open_high=True),
               "EMA weight β in [0, 1) of the past (0: no K x D buffer)"),
        Option("beta_sigma", 0.0, real_at_least(0.0), "decay exponent σ ≥ 0: β_t = β / t^σ"),
    ),
    combine=_db_mtl, state_class=DBMTLState, uses_gramian=False, uses_losses=True,
))
