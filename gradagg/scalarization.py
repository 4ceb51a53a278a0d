"""Loss weightings (scalarisations): a differentiable scalar S(L) of the K task losses.

    loss = gradagg.scalarize(losses, "dwa", state=st)   # losses: Tensor [K] with a graph
    loss.backward()

For parameters θ that the tasks share, ∇_θ S = Jᵀ(∂S/∂L), with J the K x D Jacobian of the losses.
So every loss weighting is also a weighting w = ∂S/∂L of the task gradients; ``weights_of`` gives
that w in closed form (detached), for inspection, logging and tests.

With ``reduction="none"``, the methods whose S is a sum of per-task terms (``sum``, ``mean``,
``constant``, ``random``, ``uw``, ``imtl_l``, ``dwa``) return the K terms instead of their sum, so
that a loss weighting can feed a gradient weighting. LibMTL's (hybrid) IMTL, for instance, is

    terms = gradagg.scalarize(losses, "imtl_l", state=st, reduction="none")
    gradagg.backward(terms, model, "imtl_g")

There, the trainable s receive the gradient of Σ_i w_i·term_i with imtl_g's weights w (LibMTL
back-propagates each term separately, so its s receive the gradient of Σ_i term_i; both vanish at
the same s = −log L).

Stateful methods take a state from ``init_state`` (``gradagg.init``), owned by the user and updated
in place. What the user calls, and when:

- ``uw``, ``imtl_l``: put ``state.parameters()`` in the optimiser, next to the model's parameters.
- ``dwa``: call ``scalarize`` on every batch (it adds L to the epoch's running sum), and
  ``state.end_epoch()`` once at the end of every epoch.
- ``famo``: each step, ``scalarize`` (it records L), ``backward()``, ``optimizer.step()``; then
  recompute the losses on the *same batch* without gradients and call ``state.update(new_losses)``.
- ``stch`` with ``log_nadir=True`` (LibMTL's recipe): call ``state.end_epoch()`` once per epoch.

Every state is an ``nn.Module``: ``state_dict()``/``load_state_dict()`` (which also restore the
state's options and check its method and K), ``.to(device)``, ``reset()``. A state created without
``device=`` moves to the device of the first losses it is used with and stays there.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, TypedDict, cast

import torch
from torch import nn

from ._registry import REQUIRED, Option, k_vector, optional_positive_real, real_at_least, unknown

__all__ = [
    "DWAState",
    "FAMOState",
    "IMTLLState",
    "STCHState",
    "ScalarizationInfo",
    "ScalarizationState",
    "UWState",
    "init_state",
    "scalarizations",
    "scalarize",
    "weights_of",
]

#: FAMO's ε inside the logarithm (as in the paper's code, LibMTL and TorchJD).
FAMO_EPS = 1e-8
#: The shift inside the logarithms of STCH's LibMTL recipe (LibMTL and the official STCH_MTL code).
STCH_LOG_EPS = 1e-20
#: Added under PBI's square root, so that d₂ is differentiable where L − z is parallel to w.
PBI_EPS = 1e-12


# --- option checks ---------------------------------------------------------------------------------


def _flag(name: str, value: Any, k: int) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"option {name!r} must be True or False, got {type(value).__name__}: {value!r}")
    return value


def _betas(name: str, value: Any, k: int) -> tuple[float, float]:
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"option {name!r} must be a pair (β₁, β₂), got {value!r}")
    out = []
    for i, b in enumerate(value):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"option {name}[{i}] must be a real number in [0, 1), got {b!r}")
        out.append(float(b))
    return out[0], out[1]


def _real(name: str, value: Any, k: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"option {name!r} must be a finite real number, got {value!r}")
    return float(value)


def _warmup(name: str, value: Any, k: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"option {name!r} must be an int ≥ 0, got {value!r}")
    return value


def _resolve(method: str, options: tuple[Option, ...], given: dict[str, Any], k: int,
             elsewhere: dict[str, str]) -> dict[str, Any]:
    """Checks the names in ``given`` (``elsewhere`` maps names that belong to the other call to a
    hint), fills the defaults and validates the values for K tasks."""
    known = {opt.name: opt for opt in options}
    for name in given:
        if name in known:
            continue
        if name in elsewhere:
            raise ValueError(elsewhere[name])
        valid = ", ".join(sorted(known)) or "none"
        close = difflib.get_close_matches(name, [*known, *elsewhere], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown option {name!r} for the loss weighting {method!r}.{hint} Valid options: {valid}.")
    resolved = {}
    for opt in options:
        value = given.get(opt.name, opt.default)
        if value is REQUIRED:
            raise ValueError(f"the loss weighting {method!r} requires the option {opt.name!r}: {opt.doc}")
        resolved[opt.name] = opt.check(opt.name, value, k)
    return resolved


def _check_num_tasks(num_tasks: Any) -> None:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")


def _state_options(cls: type[ScalarizationState], given: dict[str, Any], k: int) -> dict[str, Any]:
    hints = {name: f"{name!r} is an option of gradagg.scalarize(losses, {cls.method!r}), not of its state"
             for name in _call_option_names(cls.method)}
    return _resolve(cls.method, cls.state_options, given, k, hints)


# --- states ----------------------------------------------------------------------------------------


class _Place(TypedDict):
    """Where a state's tensors are created: device and floating-point dtype."""

    device: torch.device
    dtype: torch.dtype


class ScalarizationState(nn.Module):
    """The state of a stateful loss weighting: an ``nn.Module`` whose tensors are buffers (and, for
    uw and imtl_l, the trainable Parameter ``s``), plus its method, K and options, which
    ``state_dict()`` carries as the module's extra state.

    ``load_state_dict`` refuses a state_dict of another method or K, and restores the options
    saved with it (as ``torch.optim`` restores its hyper-parameters). Created without ``device``,
    the state moves to the device of the first losses it is used with; after that, or after an
    explicit move (``to``, ``cuda`` and ``cpu`` all go through ``to``), it stays where it is and a
    call with losses elsewhere is refused.
    """

    method: ClassVar[str] = ""
    #: The options the state holds (validated at construction, saved in ``state_dict``).
    state_options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, num_tasks: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64, **options: Any) -> None:
        super().__init__()
        _check_num_tasks(num_tasks)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"a state's dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.num_tasks = num_tasks
        self._bound = device is not None
        self._place: _Place = {"device": torch.device("cpu" if device is None else device), "dtype": dtype}
        self.options = _state_options(type(self), options, num_tasks)

    def _new(self, fill: float, counter: bool = False, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        shape = (self.num_tasks,) if shape is None else shape
        return torch.full(shape, fill, dtype=torch.int64 if counter else self._place["dtype"],
                          device=self._place["device"])

    # -- serialisation ------------------------------------------------------------------------------

    def _extra(self) -> dict[str, Any]:
        return {}

    def _set_extra(self, extra: dict[str, Any]) -> None:
        pass

    def get_extra_state(self) -> dict[str, Any]:
        return {"method": self.method, "num_tasks": self.num_tasks, "options": dict(self.options), **self._extra()}

    def _check_extra(self, extra: Any) -> None:
        got = (extra.get("method"), extra.get("num_tasks")) if isinstance(extra, dict) else (None, None)
        if got != (self.method, self.num_tasks):
            raise ValueError(f"this state is for {self.method!r} with K={self.num_tasks}; the state_dict is for "
                             f"{got[0]!r} with K={got[1]}")

    def set_extra_state(self, state: Any) -> None:
        self._check_extra(state)
        self.options = _resolve(self.method, self.state_options, dict(state.get("options", {})), self.num_tasks, {})
        self._set_extra(state)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """As ``nn.Module.load_state_dict``, after checking the method and K (nothing is copied
        when they differ). The tensors are copied onto this state's device and dtype."""
        if not isinstance(state_dict, dict) or "_extra_state" not in state_dict:
            raise ValueError(f"not the state_dict of a gradagg loss-weighting state (no '_extra_state' entry); "
                             f"expected one from a {type(self).__name__}")
        self._check_extra(state_dict["_extra_state"])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- placement ----------------------------------------------------------------------------------

    def to(self, *args: Any, **kwargs: Any) -> ScalarizationState:
        """As ``nn.Module.to``; naming a device also fixes the state there."""
        device, dtype = torch._C._nn._parse_to(*args, **kwargs)[:2]
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"a state's dtype must be floating point, got {dtype}")
        if device is not None:
            self._bound = True
        super().to(*args, **kwargs)
        return self

    def cuda(self, device: Any = None) -> ScalarizationState:
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

    def cpu(self) -> ScalarizationState:
        return self.to("cpu")

    @property
    def device(self) -> torch.device:
        return next(itertools.chain(self.parameters(), self.buffers())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(t.dtype for t in itertools.chain(self.parameters(), self.buffers()) if t.is_floating_point())

    def _check_use(self, method: str, k: int, device: torch.device) -> None:
        """Raises unless this state fits a call of ``method`` on K losses on ``device``; an unplaced
        state moves to ``device``."""
        if self.method != method:
            raise ValueError(f"the state was made for {self.method!r}, not {method!r}; create one with "
                             f"gradagg.init({method!r}, num_tasks={k})")
        if self.num_tasks != k:
            raise ValueError(f"the state was made for K={self.num_tasks} tasks but the losses have K={k}; K cannot "
                             f"change during a run: create a new state with gradagg.init({method!r}, num_tasks={k})")
        here = self.device
        if here.type == device.type and (device.index is None or here.index in (None, device.index)):
            return
        if not self._bound:
            self.to(device)
            return
        raise ValueError(f"the state is on {here} but the losses are on {device}; move it with "
                         f"state.to({str(device)!r})")

    def _losses(self, losses: Any, check_finite: bool | None) -> tuple[torch.Tensor, bool]:
        """Validated, detached losses for a state method (``update``), and whether to check values."""
        values = _checked_losses(losses)
        self._check_use(self.method, values.shape[0], values.device)
        return values.detach(), _checks_on(check_finite, values)

    def reset(self) -> ScalarizationState:
        """Back to the initial values, in place (keeping device, dtype and options)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        options = "".join(f", {name}={value!r}" for name, value in self.options.items())
        return f"K={self.num_tasks}{options}"


class _LogScale(ScalarizationState):
    """A trainable s [K] (uw, imtl_l), initialised to ``init``."""

    state_options: ClassVar[tuple[Option, ...]] = (
        Option("init", 0.0, _real, "the initial value of every s_i"),
    )

    def __init__(self, num_tasks: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64, init: float = 0.0) -> None:
        super().__init__(num_tasks, device=device, dtype=dtype, init=init)
        self.s = nn.Parameter(self._new(self.options["init"]))

    def reset(self) -> ScalarizationState:
        with torch.no_grad():
            self.s.fill_(self.options["init"])
        return self


class UWState(_LogScale):
    """uw: the log-variances s = log σ² [K], an ``nn.Parameter`` to put in the optimiser
    (``init``: 0.0; LibMTL and mtan start at −0.5)."""

    method: ClassVar[str] = "uw"


class IMTLLState(_LogScale):
    """imtl_l: the log-scales s [K], an ``nn.Parameter`` to put in the optimiser (``init``: 0.0)."""

    method: ClassVar[str] = "imtl_l"


class DWAState(ScalarizationState):
    """dwa: the running sum of this epoch's losses and its batch count, the mean losses of the two
    previous epochs L̄(e−1), L̄(e−2), and the number of completed epochs.

    Call ``gradagg.scalarize(losses, "dwa", state=st)`` on every batch and ``st.end_epoch()`` once
    at the end of every epoch.
    """

    method: ClassVar[str] = "dwa"

    # (buffers, registered in __init__)
    running_sum: torch.Tensor
    count: torch.Tensor
    previous: torch.Tensor
    before_previous: torch.Tensor
    epochs: torch.Tensor

    def __init__(self, num_tasks: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__(num_tasks, device=device, dtype=dtype)
        self.register_buffer("running_sum", self._new(0.0))
        self.register_buffer("count", self._new(0, counter=True, shape=()))
        self.register_buffer("previous", self._new(1.0))  # L̄(e−1)
        self.register_buffer("before_previous", self._new(1.0))  # L̄(e−2)
        self.register_buffer("epochs", self._new(0, counter=True, shape=()))

    def reset(self) -> ScalarizationState:
        for name, fill in (("running_sum", 0.0), ("count", 0), ("previous", 1.0), ("before_previous", 1.0),
                           ("epochs", 0)):
            getattr(self, name).fill_(fill)
        return self

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Closes the epoch: its mean loss becomes L̄(e−1) and the old L̄(e−1) becomes L̄(e−2).
        The weights change here and only here. Raises if no batch was recorded since the last call,
        or if the epoch's mean losses are not finite and positive (the rates divide by them)."""
        count = int(self.count)
        if count == 0:
            raise ValueError("dwa: end_epoch() was called with no scalarize(losses, 'dwa', state=...) call since "
                             "the previous end_epoch(); call end_epoch() once at the end of each epoch")
        mean = self.running_sum / count
        if not bool(torch.isfinite(mean).all()) or not bool((mean > 0).all()):
            raise ValueError(f"dwa: the epoch's mean losses must be finite and positive (the rates "
                             f"L̄(e−1)/L̄(e−2) divide by them), got {mean}")
        self.before_previous.copy_(self.previous)
        self.previous.copy_(mean)
        self.running_sum.zero_()
        self.count.zero_()
        self.epochs.add_(1)


class FAMOState(ScalarizationState):
    """famo: the logits ξ [K] (z = softmax ξ), Adam's moments m, v [K] and step count, the lower
    bounds b = ``min_losses`` [K], and L_prev [K], the losses of the last ``scalarize`` call.

    Options (fixed at construction, saved in ``state_dict``): ``lr`` (0.025), ``weight_decay`` γ
    (1e-3, coupled: Adam's gradient is g + γξ), ``min_losses`` (zeros), ``betas`` (0.9, 0.999) and
    ``eps`` (1e-8) of Adam.

    Each step, in this order::

        loss = gradagg.scalarize(losses, "famo", state=st)   # records L_prev = L
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        with torch.no_grad():
            st.update(compute_losses(model, batch))   # the same batch, after the step
    """

    method: ClassVar[str] = "famo"
    state_options: ClassVar[tuple[Option, ...]] = (
        Option("lr", 0.025, real_at_least(0.0), "the step size of the logits' Adam, ≥ 0"),
        Option("weight_decay", 1e-3, real_at_least(0.0), "the coupled L2 coefficient γ ≥ 0 on the logits"),
        Option("min_losses", None, k_vector(nonnegative=False, positive_sum=False),
               "the lower bounds b of the losses, a K-vector (zeros)"),
        Option("betas", (0.9, 0.999), _betas, "Adam's (β₁, β₂), each in [0, 1)"),
        Option("eps", 1e-8, real_at_least(0.0, strict=True), "Adam's ε > 0"),
    )
    # (buffers, registered in __init__)
    min_losses: torch.Tensor
    xi: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    step: torch.Tensor
    prev_losses: torch.Tensor

    def __init__(self, num_tasks: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64, lr: float = 0.025, weight_decay: float = 1e-3,
                 min_losses: Any = None, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(num_tasks, device=device, dtype=dtype, lr=lr, weight_decay=weight_decay,
                         min_losses=min_losses, betas=betas, eps=eps)
        bounds = self.options.pop("min_losses")
        self.register_buffer("min_losses", self._new(0.0))
        if bounds is not None:
            self.min_losses.copy_(bounds.detach())
        self.register_buffer("xi", self._new(0.0))
        self.register_buffer("m", self._new(0.0))
        self.register_buffer("v", self._new(0.0))
        self.register_buffer("step", self._new(0, counter=True, shape=()))
        self.register_buffer("prev_losses", self._new(0.0))
        self.pending = False  # whether prev_losses holds a scalarize call's losses not yet used by update

    def _extra(self) -> dict[str, Any]:
        return {"pending": self.pending}

    def _set_extra(self, extra: dict[str, Any]) -> None:
        self.options.pop("min_losses", None)  # a buffer, loaded with the tensors
        self.pending = bool(extra.get("pending", False))

    def reset(self) -> ScalarizationState:
        for name in ("xi", "m", "v", "step", "prev_losses"):
            getattr(self, name).zero_()
        self.pending = False
        return self

    @torch.no_grad()
    def update(self, losses: torch.Tensor, *, check_finite: bool | None = None) -> None:
        """One Adam step on ξ from L′, the losses recomputed on the same batch after the model's step:

            δ = log(L_prev − b + ε) − log(L′ − b + ε),  g = z ⊙ (δ − (zᵀδ)1)  (= (∂z/∂ξ)ᵀδ),

        then Adam (as ``torch.optim.Adam``, coupled L2) on ξ with gradient g + γξ. Tasks whose
        log-loss fell more than the z-weighted average lose weight. ``check_finite`` as in
        ``scalarize``: L′ must be finite and above b."""
        new, check = self._losses(losses, check_finite)
        if not self.pending:
            raise ValueError("famo: update() needs the losses of a scalarize(losses, 'famo', state=...) call made "
                             "since the previous update(): call scalarize, backward and optimizer.step() first")
        b = self.min_losses
        after = new.to(b.dtype) - b
        if check and not (bool(torch.isfinite(after).all()) and bool((after > 0).all())):
            raise ValueError(f"famo: the losses must be finite and above min_losses (their logarithm is taken), "
                             f"got {new} with min_losses {b}")
        delta = torch.log(self.prev_losses - b + FAMO_EPS) - torch.log(after + FAMO_EPS)
        z = torch.softmax(self.xi, 0)
        grad = z * (delta - (z * delta).sum()) + self.options["weight_decay"] * self.xi
        beta1, beta2 = self.options["betas"]
        self.step.add_(1)
        self.m.lerp_(grad, 1 - beta1)
        self.v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        t = self.step.to(self.xi.dtype)
        correction1 = 1 - beta1**t
        correction2 = 1 - beta2**t
        denom = self.v.sqrt() / correction2.sqrt() + self.options["eps"]
        self.xi.sub_(self.options["lr"] / correction1 * self.m / denom)
        self.pending = False

    @property
    def z(self) -> torch.Tensor:
        """softmax(ξ), the task weights inside S."""
        return torch.softmax(self.xi, 0)


class STCHState(ScalarizationState):
    """stch with ``log_nadir=True`` (LibMTL's recipe): the epoch index, the running sum and count of
    the losses in epoch ``warmup_epochs`` (4), and the nadir point z^nad, their mean.

    Call ``st.end_epoch()`` once at the end of every epoch. Epochs 0 … warmup−1 train on
    Σ log(L_i + 1e-20); epoch ``warmup_epochs`` too, while it records the nadir; later epochs on the
    smooth Tchebycheff scalarisation of log(L / z^nad)."""

    method: ClassVar[str] = "stch"
    state_options: ClassVar[tuple[Option, ...]] = (
        Option("warmup_epochs", 4, _warmup, "the number W ≥ 0 of warm-up epochs; epoch W records the nadir"),
    )
    # (buffers, registered in __init__)
    epoch: torch.Tensor
    nadir_sum: torch.Tensor
    count: torch.Tensor
    nadir: torch.Tensor

    def __init__(self, num_tasks: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64, warmup_epochs: int = 4) -> None:
        super().__init__(num_tasks, device=device, dtype=dtype, warmup_epochs=warmup_epochs)
        self.register_buffer("epoch", self._new(0, counter=True, shape=()))
        self.register_buffer("nadir_sum", self._new(0.0))
        self.register_buffer("count", self._new(0, counter=True, shape=()))
        self.register_buffer("nadir", self._new(1.0))

    def reset(self) -> ScalarizationState:
        for name, fill in (("epoch", 0), ("nadir_sum", 0.0), ("count", 0), ("nadir", 1.0)):
            getattr(self, name).fill_(fill)
        return self

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Closes the epoch; at the end of epoch ``warmup_epochs``, the nadir becomes the mean of the
        losses recorded in it (raises if there were none)."""
        if int(self.epoch) == self.options["warmup_epochs"]:
            count = int(self.count)
            if count == 0:
                raise ValueError(f"stch: no scalarize(losses, 'stch', state=..., log_nadir=True) call in epoch "
                                 f"{int(self.epoch)}, which records the nadir point; call end_epoch() once per epoch")
            self.nadir.copy_(self.nadir_sum / count)
        self.epoch.add_(1)


# --- the methods -----------------------------------------------------------------------------------


class _Ctx(NamedTuple):
    state: Any
    generator: torch.Generator | None
    k: int


def _cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=like.dtype)


def _vector(vec: torch.Tensor | None, like: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.full_like(like, fill) if vec is None else _cast(vec.detach(), like)


# sum, mean, constant, random: S = Σ w_i L_i with w independent of L.

def _sum_w(losses: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """w = 1."""
    return torch.ones_like(losses)


def _mean_w(losses: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """w = 1/K."""
    return torch.full_like(losses, 1.0 / ctx.k)


def _constant_w(losses: torch.Tensor, ctx: _Ctx, weights: torch.Tensor) -> torch.Tensor:
    """w = ``weights``."""
    return _cast(weights.detach(), losses)


def _random_w(losses: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """w = softmax(ε), ε ~ N(0, I_K) drawn in float64 from ``generator`` on the losses' device: the
    draw of ``gradagg.weights(j, "random", generator=...)`` with a generator in the same state."""
    eps = torch.randn(ctx.k, generator=ctx.generator, dtype=torch.float64, device=losses.device)
    return torch.softmax(eps, 0).to(losses.dtype)


# uw, imtl_l: per-task terms with a trainable s.

def _uw_terms(losses: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """½ e^{−s_i} L_i + ½ s_i (Kendall et al.'s regression form, for every task)."""
    state: UWState = ctx.state
    s = state.s.to(losses.dtype)
    return 0.5 * torch.exp(-s) * losses + 0.5 * s


def _uw_w(losses: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """w = ½ e^{−s}."""
    state: UWState = ctx.state
    return 0.5 * torch.exp(-state.s.detach().to(losses.dtype))


def _imtl_l_terms(losses: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """e^{s_i} L_i − s_i."""
    state: IMTLLState = ctx.state
    s = state.s.to(losses.dtype)
    return torch.exp(s) * losses - s


def _imtl_l_w(losses: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """w = e^{s}."""
    state: IMTLLState = ctx.state
    return torch.exp(state.s.detach().to(losses.dtype))


# dwa

def _dwa_w(losses: torch.Tensor, ctx: _Ctx, T: float) -> torch.Tensor:
    """w = K softmax(r/T) with r = L̄(e−1)/L̄(e−2) once two epochs are complete; w = 1 before."""
    st = ctx.state
    rates = st.previous / st.before_previous
    w = torch.where(st.epochs >= 2, ctx.k * torch.softmax(rates / T, 0), 1.0)
    return _cast(w, losses)


def _dwa_record(losses: torch.Tensor, ctx: _Ctx, T: float) -> None:
    ctx.state.running_sum.add_(losses.to(ctx.state.running_sum.dtype))
    ctx.state.count.add_(1)


# famo

def _famo_parts(losses: torch.Tensor, ctx: _Ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, L − b + ε) in the losses' dtype."""
    st = ctx.state
    return _cast(torch.softmax(st.xi, 0), losses), losses - _cast(st.min_losses, losses) + FAMO_EPS


def _famo_value(losses: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """S = c Σ_i z_i log(L_i − b_i + ε), z = softmax ξ and c = (Σ_i z_i/(L_i − b_i + ε))⁻¹ detached."""
    z, shifted = _famo_parts(losses, ctx)
    c = 1.0 / (z / shifted.detach()).sum()
    return c * (z * torch.log(shifted)).sum()


def _famo_w(losses: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """w = c z_i/(L_i − b_i + ε), which sums to 1."""
    z, shifted = _famo_parts(losses, ctx)
    w = z / shifted
    return w / w.sum()


def _famo_record(losses: torch.Tensor, ctx: _Ctx) -> None:
    ctx.state.prev_losses.copy_(losses)
    ctx.state.pending = True


def _famo_check(losses: torch.Tensor, ctx: _Ctx) -> None:
    shifted = losses - _cast(ctx.state.min_losses, losses)
    if not bool((shifted > 0).all()):
        raise ValueError(f"famo: the losses must be above min_losses (their logarithm is taken), got {losses} "
                         f"with min_losses {ctx.state.min_losses}")


# geometric_mean

def _gm_value(losses: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """S = (Π L_i)^{1/K}, computed as exp(mean log L) (no overflow or underflow at large K)."""
    return torch.exp(torch.log(losses).mean())


def _gm_w(losses: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """w = GM/(K L_i)."""
    return _gm_value(losses, ctx) / (ctx.k * losses)


def _positive(name: str) -> Callable[..., None]:
    def check(losses: torch.Tensor, ctx: _Ctx, **opts: Any) -> None:
        if not bool((losses > 0).all()):
            raise ValueError(f"{name}: the losses must be positive (their logarithm is taken), got {losses}")

    return check


# stch

def _stch_plain(losses: torch.Tensor, mu: float, pref: torch.Tensor | None, ref: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    lam = _vector(pref, losses, 1.0 / losses.shape[0])
    y = lam * (losses - _vector(ref, losses, 0.0))
    return lam, y


def _stch_log(losses: torch.Tensor, ctx: _Ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """(warm, f): whether the state is in its warm-up (epoch ≤ W), and f = log(L/z^nad + 1e-20)."""
    st = ctx.state
    warm = st.epoch <= st.options["warmup_epochs"]
    return warm, torch.log(losses / _cast(st.nadir, losses) + STCH_LOG_EPS)


def _stch_value(losses: torch.Tensor, ctx: _Ctx, mu: float, pref: torch.Tensor | None,
                ref: torch.Tensor | None, log_nadir: bool) -> torch.Tensor:
    """Plain: S = μ log Σ_i exp(y_i/μ), y = λ ⊙ (L − z), computed as m + μ logsumexp((y − m)/μ)
    with m = max y. LibMTL recipe: Σ log(L_i + 1e-20) in the warm-up; afterwards
    K μ logsumexp((f − max f)/μ) with f = log(L/z^nad + 1e-20) (the max is not added back, as in
    LibMTL: the value is shifted, the gradient is the same)."""
    if not log_nadir:
        _, y = _stch_plain(losses, mu, pref, ref)
        top = y.detach().max()
        return top + mu * torch.logsumexp((y - top) / mu, 0)
    warm, f = _stch_log(losses, ctx)
    warmup_value = torch.log(losses + STCH_LOG_EPS).sum()
    value = ctx.k * mu * torch.logsumexp((f - f.detach().max()) / mu, 0)
    return torch.where(warm, warmup_value, value)


def _stch_w(losses: torch.Tensor, ctx: _Ctx, mu: float, pref: torch.Tensor | None, ref: torch.Tensor | None,
            log_nadir: bool) -> torch.Tensor:
    """Plain: w = λ ⊙ softmax(y/μ). LibMTL recipe: 1/(L_i + 1e-20) in the warm-up, afterwards
    K softmax_i(f/μ)/(L_i + 1e-20 z^nad_i)."""
    if not log_nadir:
        lam, y = _stch_plain(losses, mu, pref, ref)
        return lam * torch.softmax(y / mu, 0)
    warm, f = _stch_log(losses, ctx)
    after = ctx.k * torch.softmax(f / mu, 0) / (losses + STCH_LOG_EPS * _cast(ctx.state.nadir, losses))
    return torch.where(warm, 1.0 / (losses + STCH_LOG_EPS), after)


def _stch_record(losses: torch.Tensor, ctx: _Ctx, mu: float, pref: Any, ref: Any, log_nadir: bool) -> None:
    if log_nadir:
        st = ctx.state
        recording = st.epoch == st.options["warmup_epochs"]
        st.nadir_sum.add_(torch.where(recording, losses.to(st.nadir_sum.dtype), 0.0))
        st.count.add_(recording.to(st.count.dtype))


def _stch_check(losses: torch.Tensor, ctx: _Ctx, mu: float, pref: Any, ref: Any, log_nadir: bool) -> None:
    if log_nadir:
        _positive("stch (log_nadir=True)")(losses, ctx)


def _stch_options(opts: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    if opts["log_nadir"]:
        extra = [name for name in ("pref", "ref") if given.get(name) is not None]
        if extra:
            raise ValueError(f"stch: {' and '.join(extra)} apply to the plain scalarisation; the LibMTL recipe "
                             f"(log_nadir=True) uses λ = 1 and the nadir point recorded in its state")
        if opts["mu"] is None:
            opts["mu"] = 1.0
    elif opts["mu"] is None:
        raise ValueError("the loss weighting 'stch' requires the option 'mu' (the smoothing μ > 0; LibMTL uses 1.0), "
                         "or log_nadir=True for LibMTL's recipe, where it defaults to 1.0")
    return opts


# pbi

def _pbi_parts(losses: torch.Tensor, theta: float, pref: torch.Tensor, ref: torch.Tensor | None
               ) -> tuple[torch.Tensor, ...]:
    direction = _cast(pref.detach(), losses)
    direction = direction / torch.linalg.vector_norm(direction)
    shifted = losses - _vector(ref, losses, 0.0)
    d1 = (shifted * direction).sum()
    p = shifted - d1 * direction
    d2 = torch.sqrt((p * p).sum() + PBI_EPS)
    return direction, d1, p, d2


def _pbi_value(losses: torch.Tensor, ctx: _Ctx, theta: float, pref: torch.Tensor,
               ref: torch.Tensor | None) -> torch.Tensor:
    """S = d₁ + θ d₂: d₁ = (L − z)·ŵ, p = (L − z) − d₁ŵ, d₂ = sqrt(‖p‖² + 1e-12), ŵ = w/‖w‖."""
    _, d1, _, d2 = _pbi_parts(losses, theta, pref, ref)
    return d1 + theta * d2


def _pbi_w(losses: torch.Tensor, ctx: _Ctx, theta: float, pref: torch.Tensor,
           ref: torch.Tensor | None) -> torch.Tensor:
    """w = ŵ + θ p/d₂."""
    direction, _, p, d2 = _pbi_parts(losses, theta, pref, ref)
    return direction + theta * p / d2


# cosmos

def _cosmos_parts(losses: torch.Tensor, pref: torch.Tensor) -> tuple[torch.Tensor, ...]:
    r = _cast(pref.detach(), losses)
    return r, (r * losses).sum(), torch.linalg.vector_norm(r), torch.linalg.vector_norm(losses)


def _cosmos_value(losses: torch.Tensor, ctx: _Ctx, lambda_: float, pref: torch.Tensor) -> torch.Tensor:
    """S = rᵀL − λ cos(r, L)."""
    _, rl, nr, nl = _cosmos_parts(losses, pref)
    return rl - lambda_ * rl / (nr * nl)


def _cosmos_w(losses: torch.Tensor, ctx: _Ctx, lambda_: float, pref: torch.Tensor) -> torch.Tensor:
    """w = r − λ (r/(‖r‖‖L‖) − (rᵀL) L/(‖r‖‖L‖³))."""
    r, rl, nr, nl = _cosmos_parts(losses, pref)
    return r - lambda_ * (r / (nr * nl) - rl * losses / (nr * nl**3))


def _cosmos_check(losses: torch.Tensor, ctx: _Ctx, lambda_: float, pref: Any) -> None:
    if not bool((losses != 0).any()):
        raise ValueError("cosmos: the losses must not all be zero (cos(r, L) divides by ‖L‖)")


# --- the registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scalarization:
    """A loss weighting. ``weights(L, ctx, **opts)`` gives ∂S/∂L; ``terms`` the per-task terms whose
    sum is S (where S has them), else ``value`` gives S; ``record`` advances the state after a
    ``scalarize`` call; ``check`` validates the losses' values (beyond finiteness)."""

    name: str
    summary: str
    source: str
    weights: Callable[..., torch.Tensor]
    terms: Callable[..., torch.Tensor] | None = None
    value: Callable[..., torch.Tensor] | None = None
    options: tuple[Option, ...] = ()
    aliases: tuple[str, ...] = ()
    state_class: type[ScalarizationState] | None = None
    random: bool = False
    record: Callable[..., None] | None = None
    check: Callable[..., None] | None = None
    #: ``finish(resolved, given)``: cross-option rules and defaults that depend on other options.
    finish: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    #: ``needs_state(resolved)``: whether this call takes a state (default: whether it has a class).
    needs_state: Callable[[dict[str, Any]], bool] | None = None

    @property
    def stateful(self) -> bool:
        return self.state_class is not None

    @property
    def trainable(self) -> bool:
        return self.state_class is not None and issubclass(self.state_class, _LogScale)


@dataclass(frozen=True)
class ScalarizationInfo:
    """What ``scalarizations()`` reports about a loss weighting. ``options``: those of
    ``scalarize`` with their defaults; ``state_options``: those of ``init_state``. ``stateful``:
    it takes a state (stch only with ``log_nadir=True``); ``trainable``: the state holds parameters
    for the optimiser; ``terms``: ``reduction="none"`` is available."""

    name: str
    aliases: tuple[str, ...]
    stateful: bool
    trainable: bool
    random: bool
    options: dict[str, Any]
    state_options: dict[str, Any]
    terms: bool
    summary: str
    source: str = field(repr=False)


_SCALARIZATIONS: dict[str, Scalarization] = {}
_NAMES: dict[str, str] = {}


def _linear(weights: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The terms w_i L_i of a weighting whose w does not depend on L (w detached)."""

    def terms(losses: torch.Tensor, ctx: _Ctx, **opts: Any) -> torch.Tensor:
        return weights(losses.detach(), ctx, **opts) * losses

    return terms


def _register(spec: Scalarization) -> None:
    _SCALARIZATIONS[spec.name] = spec
    for name in (spec.name, *spec.aliases):
        _NAMES[name] = spec.name


_register(Scalarization("sum", "S = Σ_i L_i.", "-", _sum_w, terms=_linear(_sum_w)))
_register(Scalarization("mean", "S = (1/K) Σ_i L_i.", "-", _mean_w, terms=_linear(_mean_w)))
_register(Scalarization(
    "constant", "S = Σ_i w_i L_i with fixed weights w.", "-", _constant_w, terms=_linear(_constant_w),
    options=(Option("weights", REQUIRED, k_vector(nonnegative=True, positive_sum=False),
                    "a nonnegative K-vector of task weights"),),
))
_register(Scalarization(
    "random", "S = Σ_i w_i L_i, w = softmax(ε), ε ~ N(0, I) drawn at every call (from generator=).",
    "Lin, Ye, Zhang & Tsang 2022, 'Reasonable effectiveness of random weighting: a litmus test for multi-task "
    "learning', TMLR (Alg. 2)", _random_w, terms=_linear(_random_w), aliases=("rlw",), random=True,
))
_register(Scalarization(
    "uw", "S = Σ_i (½ e^{−s_i} L_i + ½ s_i), s = log σ² trainable (uncertainty weighting).",
    "Kendall, Gal & Cipolla 2018, 'Multi-task learning using uncertainty to weigh losses for scene geometry and "
    "semantics', CVPR (regression form for every task, as LibMTL and TorchJD)",
    _uw_w, terms=_uw_terms, state_class=UWState,
))
_register(Scalarization(
    "imtl_l", "S = Σ_i (e^{s_i} L_i − s_i), s trainable (IMTL-L; IMTLL(s) = 2·UW(−s)).",
    "Liu et al. 2021, 'Towards impartial multi-task learning', ICLR", _imtl_l_w, terms=_imtl_l_terms,
    aliases=("imtll",), state_class=IMTLLState,
))
_register(Scalarization(
    "dwa", "S = Σ_i w_i L_i, w = K softmax(r/T), r_i = L̄_i(e−1)/L̄_i(e−2) from epoch means; w = 1 in epochs 0, 1.",
    "Liu, Johns & Davison 2019, 'End-to-end multi-task learning with attention', CVPR", _dwa_w,
    terms=_linear(_dwa_w), state_class=DWAState, record=_dwa_record,
    options=(Option("T", 2.0, real_at_least(0.0, strict=True), "the temperature T > 0"),),
))
_register(Scalarization(
    "famo", "S = c Σ_i z_i log(L_i − b_i + ε), z = softmax ξ with ξ learned by state.update() (FAMO).",
    "Liu, Feng, Stone & Liu 2023, 'FAMO: fast adaptive multitask optimization', NeurIPS", _famo_w,
    value=_famo_value, state_class=FAMOState, record=_famo_record, check=_famo_check,
))
_register(Scalarization(
    "geometric_mean", "S = (Π_i L_i)^{1/K} (geometric loss strategy).",
    "Chennupati et al. 2019, 'MultiNet++: multi-stream feature aggregation and geometric loss strategy for "
    "multi-task learning', CVPRW", _gm_w, value=_gm_value, aliases=("gls",), check=_positive("geometric_mean"),
))
_register(Scalarization(
    "stch", "S = μ log Σ_i exp(λ_i(L_i − z_i)/μ) (smooth Tchebycheff); log_nadir=True: LibMTL's recipe.",
    "Lin, Zhang, Yang, Liu, Wang & Zhang 2024, 'Smooth Tchebycheff scalarization for multi-objective "
    "optimization', ICML", _stch_w, value=_stch_value, state_class=STCHState, record=_stch_record,
    check=_stch_check, finish=_stch_options, needs_state=lambda opts: opts["log_nadir"],
    options=(
        Option("mu", None, optional_positive_real,
               "the smoothing μ > 0 (required unless log_nadir=True, where it defaults to 1.0)"),
        Option("pref", None, k_vector(nonnegative=True, positive_sum=True), "the preference λ (1/K), nonnegative"),
        Option("ref", None, k_vector(nonnegative=False, positive_sum=False), "the ideal point z (0)"),
        Option("log_nadir", False, _flag, "LibMTL's recipe: warm-up on Σ log L, then STCH of log(L/z^nad)"),
    ),
))
_register(Scalarization(
    "pbi", "S = d₁ + θ d₂: the distance along the preference w and θ times the distance to it (PBI).",
    "Zhang & Li 2007, 'MOEA/D: a multiobjective evolutionary algorithm based on decomposition', IEEE TEVC",
    _pbi_w, value=_pbi_value,
    options=(
        Option("theta", REQUIRED, real_at_least(0.0), "the penalty θ ≥ 0 (the paper uses 5)"),
        Option("pref", REQUIRED, k_vector(nonnegative=True, positive_sum=True),
               "the preference direction w, nonnegative and nonzero"),
        Option("ref", None, k_vector(nonnegative=False, positive_sum=False), "the ideal point z (0)"),
    ),
))
_register(Scalarization(
    "cosmos", "S = rᵀL − λ cos(r, L) (resample r ~ Dir(α) and condition the model on it at every step).",
    "Ruchte & Grabocka 2021, 'Scalable Pareto front approximation for deep multi-objective learning', ICDM",
    _cosmos_w, value=_cosmos_value, check=_cosmos_check,
    options=(
        Option("lambda_", REQUIRED, real_at_least(0.0), "the cosine penalty λ ≥ 0 (the official default is 2)"),
        Option("pref", REQUIRED, k_vector(nonnegative=True, positive_sum=True),
               "the preference r, nonnegative and nonzero"),
    ),
))


def _call_option_names(method: str) -> tuple[str, ...]:
    spec = _SCALARIZATIONS.get(method)
    return () if spec is None else tuple(opt.name for opt in spec.options)


# --- validation ------------------------------------------------------------------------------------


def _lookup(method: object) -> Scalarization:
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}: {method!r}")
    key = method.lower()
    if key not in _NAMES:
        raise unknown("loss weighting", method, list(_NAMES))
    return _SCALARIZATIONS[_NAMES[key]]


def _checked_losses(losses: Any) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor):
        hint = "; stack a list of scalar losses with torch.stack(losses)" if isinstance(losses, (list, tuple)) else ""
        raise TypeError(f"losses must be a 1-D Tensor [K] (one loss per task), got {type(losses).__name__}{hint}")
    if losses.dim() != 1 or losses.shape[0] == 0:
        raise ValueError(f"losses must be a 1-D Tensor [K] with K ≥ 1 (one loss per task), got shape "
                         f"{tuple(losses.shape)}")
    if losses.is_complex() or not losses.is_floating_point():
        raise TypeError(f"losses must be real floating point, got dtype {losses.dtype}")
    return losses


def _checks_on(check_finite: bool | None, losses: torch.Tensor) -> bool:
    """Whether to read the losses' values: always with True, never with False or while compiling;
    with None (the default) for CPU tensors only (elsewhere reading them would synchronise)."""
    if check_finite is not None and not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be True, False or None, got {check_finite!r}")
    if check_finite is False or torch.compiler.is_compiling():
        return False
    return check_finite is True or losses.device.type == "cpu"


def _bind_state(spec: Scalarization, state: Any, opts: dict[str, Any], k: int, device: torch.device) -> Any:
    needs = spec.needs_state(opts) if spec.needs_state is not None else spec.stateful
    if not needs:
        if state is not None:
            if spec.stateful:  # stch without log_nadir
                raise ValueError(f"the plain {spec.name!r} is stateless; its state is for LibMTL's recipe: pass "
                                 f"log_nadir=True, or no state")
            raise ValueError(f"the loss weighting {spec.name!r} is stateless and takes no state; got "
                             f"{type(state).__name__}")
        return None
    if state is None:
        how = " with log_nadir=True" if spec.needs_state is not None else ""
        raise ValueError(f"the loss weighting {spec.name!r}{how} is stateful: create the state with "
                         f"gradagg.init({spec.name!r}, num_tasks={k}) and pass it as state=")
    if not isinstance(state, ScalarizationState):
        owner = getattr(state, "method", None)
        what = f" (the state of the gradient weighting {owner!r})" if isinstance(owner, str) else ""
        raise TypeError(f"state for the loss weighting {spec.name!r} must be the object returned by "
                        f"gradagg.init({spec.name!r}, num_tasks={k}), got {type(state).__name__}{what}")
    state._check_use(spec.name, k, device)
    return state


def _check_generator(generator: Any, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the losses are on {device}; create it with "
                         f"torch.Generator(device={str(device)!r})")


def _prepare(losses: Any, method: Any, state: Any, generator: Any, check_finite: bool | None,
             options: dict[str, Any]) -> tuple[Scalarization, torch.Tensor, _Ctx, dict[str, Any]]:
    spec = _lookup(method)
    losses = _checked_losses(losses)
    k = losses.shape[0]
    state_names = () if spec.state_class is None else tuple(opt.name for opt in spec.state_class.state_options)
    elsewhere = {name: f"{name!r} is an option of the state of {spec.name!r}: pass it to "
                       f"gradagg.init({spec.name!r}, num_tasks={k}, {name}=...)" for name in state_names}
    opts = _resolve(spec.name, spec.options, options, k, elsewhere)
    if spec.finish is not None:
        opts = spec.finish(opts, options)
    _check_generator(generator, losses.device)
    ctx = _Ctx(_bind_state(spec, state, opts, k, losses.device), generator, k)
    if _checks_on(check_finite, losses):
        values = losses.detach()
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{spec.name}: the losses must be finite, got {values}; pass check_finite=False to "
                             f"skip the checks")
        if spec.check is not None:
            spec.check(values, ctx, **opts)
    return spec, losses, ctx, opts


# --- the public functions --------------------------------------------------------------------------


def scalarize(losses: torch.Tensor, method: str, *, state: ScalarizationState | None = None,
              generator: torch.Generator | None = None, reduction: str = "sum", check_finite: bool | None = None,
              **options: Any) -> torch.Tensor:
    """S(L), the loss weighting ``method`` of the K task losses, a 0-dim Tensor to back-propagate.

    ``losses``: a Tensor [K] (with its graph); S is computed in its dtype and on its device.
    ``state``: the method's state (``init_state``/``gradagg.init``) for the stateful methods; the
    call advances it where the method records losses (dwa, famo, stch's nadir epoch).
    ``generator``: for ``random``. ``reduction="none"``: the K terms whose sum is S, for
    sum, mean, constant, random, uw, imtl_l and dwa (for uw and imtl_l they include the s terms).
    ``check_finite``: whether to check that the losses are finite and, where the method takes their
    logarithm or divides by them, positive (None: on CPU tensors only, where it costs no
    synchronisation). The options of each method, with their defaults, are in ``scalarizations()``.

    The gradient with respect to the losses is ``weights_of(losses, method, ...)``, computed
    before this call advances the state.
    """
    spec, losses, ctx, opts = _prepare(losses, method, state, generator, check_finite, options)
    if reduction == "none":
        if spec.terms is None:
            with_terms = ", ".join(name for name, s in _SCALARIZATIONS.items() if s.terms is not None)
            raise ValueError(f"reduction='none' needs S = Σ_i (term_i), which {spec.name!r} does not have; it is "
                             f"available for: {with_terms}")
        out = spec.terms(losses, ctx, **opts)
    elif reduction == "sum":
        # (a scalarization without terms has a value)
        out = (spec.terms(losses, ctx, **opts).sum() if spec.terms is not None
               else cast("Callable[..., torch.Tensor]", spec.value)(losses, ctx, **opts))
    else:
        raise ValueError(f"reduction must be 'sum' (S) or 'none' (the per-task terms), got {reduction!r}")
    if spec.record is not None:
        with torch.no_grad():
            spec.record(losses.detach(), ctx, **opts)
    return out


def weights_of(losses: torch.Tensor, method: str, *, state: ScalarizationState | None = None,
               generator: torch.Generator | None = None, check_finite: bool | None = None,
               **options: Any) -> torch.Tensor:
    """w = ∂S/∂L [K], in closed form and detached, for ``scalarize(losses, method, ...)`` with the
    same state, generator state and options. It reads the state but never advances it (for
    ``random`` it draws from ``generator``). For shared parameters θ, ∇_θ S = Jᵀw."""
    spec, losses, ctx, opts = _prepare(losses, method, state, generator, check_finite, options)
    with torch.no_grad():
        return spec.weights(losses.detach(), ctx, **opts)


def init_state(method: str, num_tasks: int, *, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float64, **options: Any) -> ScalarizationState:
    """A fresh state for the stateful loss weighting ``method`` and K = ``num_tasks`` tasks.

    ``options`` are the state's own (``scalarizations()[method].state_options``): ``init`` for uw
    and imtl_l; ``lr``, ``weight_decay``, ``min_losses``, ``betas``, ``eps`` for famo;
    ``warmup_epochs`` for stch (whose state serves its ``log_nadir=True`` recipe). Without
    ``device``, the state moves to the device of the first losses it is used with.
    """
    spec = _lookup(method)
    if spec.state_class is None:
        stateful = ", ".join(name for name, s in sorted(_SCALARIZATIONS.items()) if s.stateful)
        raise ValueError(f"the loss weighting {spec.name!r} is stateless and needs no state; stateful loss "
                         f"weightings: {stateful}")
    _check_num_tasks(num_tasks)
    _state_options(spec.state_class, options, num_tasks)  # unknown or invalid options: a clear error first
    return spec.state_class(num_tasks, device=device, dtype=dtype, **options)


def scalarizations() -> dict[str, ScalarizationInfo]:
    """Every loss weighting by name: aliases, whether it is stateful, trainable or random, its
    options (of ``scalarize``) and state options (of ``init_state``) with their defaults."""
    out = {}
    for name, spec in sorted(_SCALARIZATIONS.items()):
        state_options = () if spec.state_class is None else spec.state_class.state_options
        out[name] = ScalarizationInfo(
            name=name, aliases=spec.aliases, stateful=spec.stateful, trainable=spec.trainable, random=spec.random,
            options={opt.name: opt.default for opt in spec.options},
            state_options={opt.name: opt.default for opt in state_options}, terms=spec.terms is not None,
            summary=spec.summary, source=spec.source,
        )
    return out


def known_names() -> set[str]:
    """Every loss weighting's name and alias (lower case)."""
    return set(_NAMES)
