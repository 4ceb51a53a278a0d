"""PCD: priority-constrained descent. Varam & AlHajri (2026), "Not all objectives are born equal:
priority-constrained descent for hierarchical multi-objective optimization", TMLR, arXiv 2606.29521
(Def. 4.1, Thm 4.2, Def. 4.5, Alg. 1).

Task p (``primary``, default 0) is the primary; the others are secondaries j, each guaranteed a
fraction τ_j of its normalised first-order progress. With an EMA of the squared norms
(t += 1, v ← βv + (1−β) diag G, v̂ = v/(1−βᵗ)) and scales s_i = 1/√(v̂_i + ε) (0 where that is
1/0), the normalised gradients g̃_i = s_i g_i define

    d̃ = argmin_d ½‖d − g̃_p‖²   subject to   g̃_jᵀd ≥ τ_j ‖g̃_j‖²   (j ≠ p),

whose dual is μ = argmin_{μ ≥ 0} ½ μᵀG̃_SS μ − bᵀμ with b_j = τ_j G̃_jj − G̃_jp, so d̃ = Σ ŵ_i g̃_i
with ŵ_p = 1, ŵ_S = μ (Thm 4.2). The result is rescaled to the primary's norm:
w = √G_pp (s ⊙ ŵ)/√(ŵᵀG̃ŵ), so ‖d‖ = ‖g_p‖. w = 0 where g_p = 0 or d̃ = 0 up to G's floor.

The dual is solved exactly by the library's NNQP in unit-diagonal scaling (y_j = μ_j ‖g̃_j‖,
the same solver as UPGrad and DualProj), with the 1e-10 regulariser removed by proximal steps.
The constraints are infeasible exactly when the dual is unbounded: some n ≥ 0, n ≠ 0, has
Σ_j n_j g̃_j = 0 and Σ_j n_j τ_j ‖g̃_j‖² > 0 (Farkas; needs K ≥ 3, Cor. B.3); then ŵ = e_p
(d = g_p). Such an n is looked for directly, by a second NNQP (the probe) whose linear term is 1
on every secondary whose demand τ_j ‖g̃_j‖/‖g̃_p‖ rises above G's floor τ_cut = 2√K δ
(``_numerics``) and 0 elsewhere: it is unbounded exactly when the dual is, and its regularised
solution then grows like n/1e-10 whatever the size of τ. Infeasible means that this solution is
null to the resolution max(τ_cut, 1e-10): ‖Σ n_j û_j‖² ≤ max(τ_cut, 1e-10) ‖n‖². Below τ_cut the
data cannot tell a combination from 0, and below 1e-10 the regularised solver cannot tell a
recession direction from a very large finite μ (its bias there is not removed). A feasible
problem is thus never declared infeasible unless it is within that resolution of infeasibility,
and a τ under the floor counts as 0 (as does a d̃ under it, which gives w = 0).

Follows TorchJD's contract (the reference code enumerates working sets; TorchJD runs
Goldfarb–Idnani on G): τ in [0, 1], 0 ≤ β < 1, and a non-finite G gives NaN weights and leaves
the state untouched. ``primary`` is gradagg's addition, so that J need not be reordered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .._numerics import eigen_cut
from .._registry import Context, Method, Option, integer, real_at_least, real_in, register
from ..solvers import nnqp_op, scaled_gramian
from ..solvers._loop import opaque
from ..solvers.active_set import default_budget
from ..state import Fields, State

EPS = 1e-10
REFINE = 2


class PCDState(State):
    """PCD: the EMA v of the squared gradient norms (zeros) and the call count. v is kept in at
    least float32 (float64 by default)."""

    method: ClassVar[str] = "pcd"
    fields: ClassVar[Fields] = {"v": (("K",), 0.0, False), "step": ((), 0, True)}
    v: torch.Tensor
    step: torch.Tensor

    def __init__(self, num_tasks: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__(num_tasks, device=device, dtype=_wide(dtype))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PCDState:
        super().to(device, None if dtype is None else _wide(dtype))
        return self


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype


def _pcd_impl(g: torch.Tensor, scale: torch.Tensor, tau: torch.Tensor, primary: int, cut: float) -> torch.Tensor:
    """w for the Gramian g, the EMA's scales s_i and τ as a K-vector (0 at the primary). The dual is
    posed on all K variables with the primary's row and column replaced by the identity and q_p = 0,
    so that y_p = 0: the same problem as on the secondaries alone (and the same tile on a GPU)."""
    k = g.shape[-1]
    rho = scale * torch.diagonal(g).clamp_min(0.0).sqrt()  # ‖g̃_i‖
    a, s, reg = scaled_gramian(g, EPS)
    unit = (torch.diagonal(g) > 0).to(g.dtype)
    eye = torch.eye(k, dtype=g.dtype, device=g.device)
    a0 = (a - torch.diag(reg)) * (1.0 - eye) + torch.diag(unit)  # Âᵢⱼ = ûᵢ·ûⱼ, exact unit diagonal
    norms = torch.where(unit > 0, 1.0 / s, 0.0)
    lead = eye[primary]
    sec = 1.0 - lead
    # In the unit scaling, y_j = μ_j ‖g̃_j‖/‖g̃_p‖ and q_j = τ_j ‖g̃_j‖/‖g̃_p‖ − ûⱼ·û_p.
    ratio = torch.where(unit > 0, rho / torch.where(rho[primary] > 0, rho[primary], 1.0), 0.0)
    demand = tau * ratio * sec
    q = demand - a0[primary] * sec
    qscale = unit * sec * (1.0 + demand) + q.abs()  # Âⱼₚ carries G's rounding relative to 1
    a_dec = torch.where((sec.unsqueeze(0) * sec.unsqueeze(1)) > 0, a, eye)
    budget = default_budget(k)
    y, _ = nnqp_op(a_dec, q.unsqueeze(0), reg, budget, REFINE, qscale.unsqueeze(0))
    y = y[0] * sec
    infeasible = torch.zeros((), dtype=torch.bool, device=g.device)
    if k > 2:  # one secondary is always feasible (Cor. B.3)
        # For a null n ≥ 0 (Σ n_j û_j = 0), qᵀn = Σ_j n_j τ_j ‖g̃_j‖/‖g̃_p‖, so the dual is unbounded
        # exactly when the probe min_{n ≥ 0} ½nᵀÂn − cᵀn is, with c_j = 1 on the secondaries whose
        # demand rises above G's rounding (c_j = 0 on the others, which may still take part in n).
        # Its regularised solution then grows like n/reg with cᵀn of order 1, whatever the size
        # of τ, so its Rayleigh quotient falls to the floor; a bounded probe keeps yᵀÂy = cᵀy.
        c = (demand > cut * qscale).to(g.dtype)
        probe, _ = nnqp_op(a_dec, c.unsqueeze(0), reg, budget, 0, c.unsqueeze(0))
        n = probe[0] * sec
        infeasible = (n @ n > 0) & (n @ a0 @ n <= max(cut, EPS) * (n @ n))
    z = torch.where(infeasible, lead, lead + y)
    quad = torch.where(infeasible, 1.0, (z @ a0 @ z).clamp_min(0.0))
    size = (z.abs() * unit).sum() ** 2  # d̃'s terms: G's rounding makes cut·size of ‖d̃‖²
    alive = (quad > cut * size) & (unit[primary] > 0)
    relative = torch.where(lead > 0, 1.0, norms[primary] * s)  # ‖g_p‖/‖g_i‖, exactly 1 at the primary
    return torch.where(alive & (unit > 0), z * relative / torch.where(alive, quad, 1.0).sqrt(), 0.0)


pcd_weights = opaque("pcd", lambda g, scale, tau, primary, cut: g.new_empty(g.shape[-1]))(_pcd_impl)


def _pcd(g: torch.Tensor, ctx: Context, tau: float | torch.Tensor, beta: float, eps: float,
         primary: int) -> torch.Tensor:
    state = ctx.state
    k = g.shape[-1]
    finite = torch.isfinite(g).all()
    sq = torch.diagonal(g).clamp_min(0.0)
    # The EMA advances on every finite call (also when g_p = 0); a non-finite G leaves it as it was.
    # (Written in few ops: on a GPU each is a launch.)
    v_old = state.v.to(g.dtype)
    v = beta * v_old + (1.0 - beta) * sq
    step = state.step + finite
    state.v.copy_(torch.where(finite, v, v_old))
    state.step.copy_(step)
    den = (v / (1.0 - torch.pow(beta, step.to(g.dtype))) + eps).sqrt()
    s = torch.where(den > 0, den, float("inf")).reciprocal()  # 0 where 1/√(v̂ + ε) is 1/0
    if isinstance(tau, torch.Tensor):  # K−1 values: a 0 goes in at the primary
        rest = tau.to(device=g.device, dtype=g.dtype)
        taus = torch.cat([rest[:primary], rest.new_zeros(1), rest[primary:]])
    else:
        taus = torch.full((k,), tau, dtype=g.dtype, device=g.device)
    w = pcd_weights(g, s, taus, primary, eigen_cut(ctx.noise, k))
    return torch.where(finite, w, float("nan"))


def _tau(name: str, value: Any, k: int) -> float | torch.Tensor:
    """τ: a float, or one value per secondary task (K−1, in task order without the primary); in [0, 1]."""
    if isinstance(value, torch.Tensor) or (isinstance(value, Sequence) and not isinstance(value, str)):
        if isinstance(value, torch.Tensor):
            if value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"option {name!r} must be real, got dtype {value.dtype}")
            vec = value.detach() if value.is_floating_point() else value.detach().double()
        else:
            vec = torch.tensor([real_in(0.0, 1.0)(f"{name}[{i}]", x, k) for i, x in enumerate(value)],
                               dtype=torch.float64)
        if vec.dim() != 1 or vec.shape[0] != k - 1:
            raise ValueError(f"option {name!r} must be a float or a vector with one value per secondary task, "
                             f"K−1 = {k - 1}; got shape {tuple(vec.shape)}")
        if vec.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool((torch.isfinite(vec) & (vec >= 0) & (vec <= 1)).all()):
                raise ValueError(f"option {name!r} must lie in [0, 1], got {value!r}")
        return vec
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"option {name!r} must be a float or a sequence/1-D tensor of K−1 = {k - 1} floats, "
                        f"got {type(value).__name__}: {value!r}")
    return real_in(0.0, 1.0)(name, value, k)


def _beta(name: str, value: Any, k: int) -> float:
    x = real_in(0.0, 1.0)(name, value, k)
    if x == 1.0:
        raise ValueError(f"option {name!r} must lie in [0, 1) (β = 1 never updates the average), got {value!r}")
    return x


register(Method(
    "pcd", "Follow the primary task's gradient (task `primary`) as closely as possible while every other task "
    "keeps a fraction τ of its normalised progress; ‖d‖ = ‖g_primary‖.",
    "Varam & AlHajri 2026, 'Not all objectives are born equal: priority-constrained descent for hierarchical "
    "multi-objective optimization', TMLR, arXiv 2606.29521",
    options=(
        Option("tau", 0.02, _tau, "the fraction τ in [0, 1] of normalised progress owed to each secondary task: "
               "a float, or K−1 values in task order without the primary"),
        Option("beta", 0.999, _beta, "decay β in [0, 1) of the EMA of the squared gradient norms"),
        Option("eps", 1e-8, real_at_least(0.0), "ε ≥ 0 in the scales 1/√(v̂ + ε)"),
        Option("primary", 0, integer(lambda k: 0, lambda k: k - 1, "0 ≤ primary < K"),
               "index of the primary task"),
    ),
    weighting=_pcd, state_class=PCDState, project_null=True, kernel=False,
))
