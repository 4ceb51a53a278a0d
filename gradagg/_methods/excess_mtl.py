"""ExcessMTL: robust multi-task learning with excess risks. He et al. (2024), "Robust multi-task
learning with excess risks", ICML (Eq. 6–7: the estimate; Eq. 9: the update; Sec. 3.2: scale
processing; App. C.1: warm-up).

Each task's excess risk is estimated as g_iᵀĤ_i⁻¹g_i with an AdaGrad diagonal Ĥ_i, and the weights
move by exponentiated gradient towards the tasks furthest from their optimum, relative to where
they started. At call t = 1, 2, ...:

    A ← A + J ⊙ J                                        (A = 0 at first, K x D)
    e_i = Σ_j J_ij² / √(A_ij + 1e-7)
    r_i = e_i / (e⁰_i + 1e-7),   w ← softmax(log w + η r)  (= w ⊙ e^{ηr} renormalised onto Δ)
    d = Jᵀw                                              (with the updated w)

The first n = max(``warmup``, 1) calls leave w at its start 1/K and set the baseline e⁰ to the mean
of e over them; w moves from call n + 1 on. So ``warmup=0`` (and 1) is the official code's and
LibMTL's first call, which sets e⁰ = e and leaves w unchanged (there r ≡ 1 and the update would
be a no-op), and ``warmup=W ≥ 1`` is TorchJD's ``n_warmup_steps=W``. This differs deliberately from
TorchJD 0.18's ``n_warmup_steps=0``, which updates w on the first call with the raw, unnormalised e
(≈ ‖g_i‖₁) and keeps softmax(η‖g_i‖₁) where J is constant, whereas here w stays 1/K. Starting
from the official first call also makes w invariant to a per-task rescaling of the gradients
(e_i and e⁰_i both scale with it), up to the 1e-7 terms. From TorchJD come the 1e-7 in r (the
official code and LibMTL divide by e⁰ alone), the log-space update, and w ∈ Δ (LibMTL keeps
Σw = K and weights the losses, which for the shared parameters is K times this d). η = 1.0 as in
TorchJD and the official README (LibMTL's default is 1e-2).

``gradagg.weights`` has no answer for this method (it needs J, not G): the weights of the last
call are ``state.w``, and the result is exactly Jᵀ ``state.w``.

The state holds √A (``root``: one [K, D_l] tensor per leaf of J, in J's accumulation dtype; the
root of A is kept and updated by hypot, so that float32 holds it for any finite J, and
√(A + 1e-7) = hypot(√A, √1e-7)), w, e⁰ (``base``), the warm-up sum of e (``warm``) and t
(``step``); it costs as much memory as J. e is summed over all leaves (and over the ranks of a
sharded call) in float64. Nothing is read back to the host on an accelerator. d is
differentiable in J with w held constant.
"""

from __future__ import annotations

import math
from typing import ClassVar, cast

import torch

from .._registry import Context, Method, Option, nonnegative_int, real_at_least, register
from ..state import Fields, State, WideState
from .moco import group_of, summed

EPS = 1e-7


class ExcessMTLState(WideState):
    """ExcessMTL: √A (``root``: one [K, D_l] tensor per leaf, zero, allocated at the first call),
    the weights w ∈ Δ (``w``, uniform 1/K at first; after a call, the weights of its result), the
    baseline excess risks e⁰ (``base``, set at the end of the warm-up), the warm-up sum of e
    (``warm``) and the call count t (``step``)."""

    method: ClassVar[str] = "excess_mtl"
    fields: ClassVar[Fields] = {"w": (("K",), 0.0, False), "base": (("K",), 0.0, False),
                                "warm": (("K",), 0.0, False), "step": ((), 0, True)}
    wide: ClassVar[tuple[str, ...]] = ("root",)
    w: torch.Tensor
    base: torch.Tensor
    warm: torch.Tensor
    step: torch.Tensor
    root: list[torch.Tensor] | None

    def reset(self) -> State:
        super().reset()
        self.w.fill_(1.0 / self.num_tasks)
        return self


def _excess(rows: list[torch.Tensor], roots: list[torch.Tensor]) -> torch.Tensor:
    """e [K] in float64 after A ← A + J ⊙ J, with A = root²: Σ_j J_ij (J_ij / hypot(root_ij, √1e-7)),
    with one K x D_l temporary per leaf."""
    total: torch.Tensor | None = None
    for r, root in zip(rows, roots):
        torch.hypot(root, r, out=root)
        scratch = torch.hypot(root, root.new_full((), math.sqrt(EPS)))
        part = torch.div(r, scratch, out=scratch).mul_(r).sum(1).to(torch.float64)
        total = part if total is None else total + part
    return cast(torch.Tensor, total)  # (J has at least one leaf)


def _excess_mtl(rows: list[torch.Tensor], ctx: Context, eta: float, warmup: int) -> list[torch.Tensor]:
    state = ctx.state
    state.bind(rows)
    n = max(warmup, 1)
    e = summed(_excess([r.detach() for r in rows], state.root), group_of(ctx))
    state.step.add_(1)
    t = state.step
    warm = state.warm.to(torch.float64) + torch.where(t <= n, e, 0.0)
    base = torch.where(t == n, warm / n, state.base.to(torch.float64))
    w = state.w.to(torch.float64)
    moved = torch.softmax(torch.log(w) + eta * (e / (base + EPS)), 0)
    w = torch.where(t > n, moved, w)
    state.warm.copy_(warm)
    state.base.copy_(base)
    state.w.copy_(w)
    return [w.to(r.dtype) @ r for r in rows]


register(Method(
    "excess_mtl", "Exponentiated gradient on w ∈ Δ by excess risks e_i = Σ_j J_ij²/√(A_ij + 1e-7) (A: AdaGrad "
    "sums), relative to the first calls'; d = Jᵀw.",
    "He et al. 2024, 'Robust multi-task learning with excess risks'",
    options=(
        Option("eta", 1.0, real_at_least(0.0, strict=True), "step size η > 0 of the weights (LibMTL uses 1e-2)"),
        Option("warmup", 0, nonnegative_int, "calls (≥ 0) that keep w = 1/K and average e into the baseline; "
               "0 and 1 both mean the first call only"),
    ),
    combine=_excess_mtl, state_class=ExcessMTLState, uses_gramian=False,
))
