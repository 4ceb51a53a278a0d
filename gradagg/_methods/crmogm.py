"""CR-MOGM: weights smoothed across calls. Zhou et al. (2022), "On the convergence of stochastic
multi-objective gradient manipulation and beyond" (NeurIPS).

A modifier on the weights of any weighting method (the ``inner`` one, stateful or not): with ŵ_k
the inner method's weights at call k,

    w_k = α_k w_{k−1} + (1 − α_k) ŵ_k,      w_0 = ``init`` if given, else ŵ_1,

so that without ``init`` the first call returns ŵ_1, and w_k = α^k w_0 + (1−α) Σ_{j≤k} α^{k−j} ŵ_j
for a constant α. α = 0 returns the inner weights, α = 1 keeps w_0. The combined gradient is
d = Jᵀw_k with the current J: the weights are smoothed, not the gradients. α may change from call
to call; Corollary 1 of the paper takes α_k ↑ 1 as the learning rate decays (TorchJD's example:
α_k = 1 − lr_k/lr_0). ``init`` is read only on the first call of a state.

The state holds w_{k−1}, a call counter and, for a stateful inner method, that method's state
tensors (under the names ``inner_<field>``), which advance exactly as they would without the
wrapper. The inner state object is built from those tensors on every call, never kept, so that a
copy of this state (the host route copies its tensors) carries the inner state with it.

Method flags, which cannot depend on ``inner``: ``random`` is set, so that a random inner method
(pcgrad, gradvac, random) draws alike on every rank of a process group and from a seed of the
call's generator on the host route. ``project_null`` is set: w_k holds ŵ_k, which for the solver
methods may carry components along G's noise-level null space, and the projection changes d only
within the Gramian's noise floor for the others. ``uses_losses`` is not set: losses are optional
and passed on to the inner method, which raises where it needs them and has none.

Where the Gramian was singular (cleaning removed a null space) and the inner method's weights may
grow without bound along it (``unbounded_null``: Nash-MTL, FairGrad), ŵ_k is smoothed without its
components along that null space:
they change nothing in that call's d, but Nash-MTL and FairGrad make them huge when a nonnegative
combination of the gradients vanishes (about 3e6 for two opposite gradients), and kept in w_k they
would reach the next calls' d, whose J no longer cancels them (‖d‖ about 1.5e7 where Nash-MTL alone
gives weights of about 0.3). On a nonsingular G this is the contract's ŵ_k exactly; on a singular
one, ŵ_k differs from ``gradagg.weights`` of the inner method by a vector that J maps to 0. (TorchJD
smooths the raw weights.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, cast

import torch

from .._registry import REQUIRED, Context, Method, Option, k_vector, lookup, real_in, register, resolve_options
from ..state import Fields, State, WideState

NAME = "crmogm"
#: Prefix of the inner method's state tensors in this state.
PREFIX = "inner_"


class Inner(NamedTuple):
    """The inner weighting and its resolved options (the normalised value of ``inner``)."""

    method: Method
    options: dict[str, Any]

    def __repr__(self) -> str:
        return f"Inner({self.method.name!r}, {self.options!r})"


def _usage(name: str = "upgrad") -> str:
    return f"inner={name!r} or inner=({name!r}, {{...options}})"


def check_inner(name: str, value: Any, k: int) -> Inner:
    """Option check: a weighting's name, or a (name, options) pair, resolved for K tasks."""
    if isinstance(value, str):
        method_name, given = value, {}
    elif (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str)
          and isinstance(value[1], dict)):
        method_name, given = value[0], dict(value[1])
    else:
        raise TypeError(f"option {name!r} must be a weighting method's name or a (name, options) pair, as in "
                        f"{_usage()}; got {value!r}")
    method = lookup(method_name)
    why = ("crmogm cannot wrap itself (smoothing twice is smoothing once with another α schedule)"
           if method.name == NAME else
           f"{method.name!r} acts coordinate by coordinate and has no weights to smooth"
           if not method.is_weighting else
           f"{method.name!r} weights a cross-Gramian of two batches, not G" if method.uses_cross else
           f"the state of {method.name!r} is not a fixed set of K-sized tensors, which crmogm cannot hold"
           if not _simple_state(method) else None)
    if why is not None:
        raise ValueError(f"option {name!r}: {why}; valid inner methods: {', '.join(sorted(_inner_candidates()))}")
    return Inner(method, resolve_options(method, given, k))


def inner_uses_losses(value: Any) -> bool:
    """Whether the ``inner`` option names a method that reads the losses (for callers that supply
    them only where a method needs them, as ``gradagg.backward`` does). False for a malformed value:
    the option check then raises."""
    name = value if isinstance(value, str) else value[0] if isinstance(value, (tuple, list)) and value else None
    try:
        return isinstance(name, str) and lookup(name).uses_losses
    except ValueError:
        return False


def _simple_state(method: Method) -> bool:
    cls = method.state_class
    return cls is None or (issubclass(cls, State) and not issubclass(cls, WideState)
                           and not hasattr(cls, "from_options") and cls.reset is State.reset)


def _inner_candidates() -> dict[str, Method]:
    from .._registry import all_methods

    return {n: m for n, m in all_methods().items()
            if n != NAME and m.is_weighting and not m.uses_cross and _simple_state(m)}


class CRMOGMState(State):
    """CR-MOGM: the previous weights w_{k−1}, the call count, and the inner method's state tensors
    (``inner_<field>``). ``fields`` depends on the inner method, so it is set per instance."""

    method: ClassVar[str] = NAME
    # Set per instance: the layout depends on the inner method. (A class variable in State, which
    # the checker does not let an instance override.)
    fields: Fields  # type: ignore[misc]
    w_prev: torch.Tensor
    step: torch.Tensor

    def __init__(self, num_tasks: int, inner: Any, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        self.fields = {"w_prev": (("K",), 0.0, False), "step": ((), 0, True)}
        self._inner_class: type[State] | None = None
        super().__init__(num_tasks, device=device, dtype=dtype)  # validates num_tasks and dtype
        spec = check_inner("inner", inner, num_tasks)
        self.inner = spec.method.name
        self._inner_class = spec.method.state_class
        if self._inner_class is not None:
            self.fields = {**self.fields, **{PREFIX + n: f for n, f in self._inner_class.fields.items()}}
        self.reset()

    @classmethod
    def from_options(cls, options: dict[str, Any], num_tasks: int, *, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float64) -> CRMOGMState:
        """The state for ``gradagg.init(("crmogm", {"inner": ...}), K)``: its layout depends on ``inner``."""
        if "inner" not in options:
            raise ValueError(f"crmogm's state holds its inner method's state, so gradagg.init needs the inner "
                             f"method: gradagg.init(({NAME!r}, {{'inner': 'nash_mtl'}}), num_tasks={num_tasks})")
        return cls(num_tasks, options["inner"], device=device, dtype=dtype)

    def inner_state(self) -> State | None:
        """A state object of the inner method over this state's ``inner_*`` tensors (shared, not
        copied; built on every call from the current attributes), or None for a stateless one."""
        cls = self._inner_class
        if cls is None:
            return None
        st = cls.__new__(cls)
        st.num_tasks, st.dtype, st.bound, st._device = self.num_tasks, self.dtype, self.bound, self._device
        for name in cls.fields:
            setattr(st, name, getattr(self, PREFIX + name))
        return st

    def absorb(self, st: State | None) -> None:
        """Writes back any tensor the inner method replaced instead of updating it in place."""
        if st is None:
            return
        for name in type(st).fields:
            mine, value = getattr(self, PREFIX + name), getattr(st, name)
            if value is not mine:
                mine.copy_(value)

    def matches(self, inner: Inner) -> None:
        if inner.method.name != self.inner:
            raise ValueError(f"this crmogm state was made for the inner method {self.inner!r}, not "
                             f"{inner.method.name!r}; create one with gradagg.init(({NAME!r}, {{'inner': "
                             f"{inner.method.name!r}}}), num_tasks={self.num_tasks})")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "inner": self.inner}

    def load_state_dict(self, state_dict: dict[str, Any]) -> State:
        if state_dict.get("method") == NAME and state_dict.get("inner") != self.inner:
            raise ValueError(f"this crmogm state wraps {self.inner!r}; the state_dict wraps "
                             f"{state_dict.get('inner')!r}")
        return super().load_state_dict(state_dict)

    def __repr__(self) -> str:
        body = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.fields)
        return f"{type(self).__name__}(K={self.num_tasks}, inner={self.inner!r}, {body})"


def _crmogm(g: torch.Tensor, ctx: Context, inner: Inner, alpha: float, init: torch.Tensor | None) -> torch.Tensor:
    state: CRMOGMState = ctx.state
    state.matches(inner)
    if inner.method.uses_losses and ctx.losses is None:
        raise ValueError(f"crmogm's inner method {inner.method.name!r} needs the task losses: pass losses=, a "
                         f"Tensor [K={g.shape[-1]}]")
    inner_state = state.inner_state()
    # The call's context (generator, losses, noise, ...) with the inner method's state in place of ours.
    weighting = cast("Callable[..., torch.Tensor]", inner.method.weighting)  # (check_inner: a weighting)
    w_hat = weighting(g, ctx._replace(state=inner_state), **inner.options)
    state.absorb(inner_state)
    w_hat = w_hat.to(g.dtype)
    if ctx.proj is not None and inner.method.unbounded_null:
        # The components of ŵ along G's unresolved null space change nothing in this call's d (which
        # drops them) but would reach the next calls' d through w_k: smooth ŵ without them.
        w_hat = ctx.proj.to(g.dtype) @ w_hat
    started = state.step > 0
    if init is None:  # w_0 = ŵ_1: the first call returns ŵ_1 itself, not α ŵ_1 + (1−α) ŵ_1 rounded
        w = torch.where(started, alpha * state.w_prev.to(g.dtype) + (1.0 - alpha) * w_hat, w_hat)
    else:
        previous = torch.where(started, state.w_prev.to(g.dtype), init.to(device=g.device, dtype=g.dtype))
        w = alpha * previous + (1.0 - alpha) * w_hat
    state.w_prev.copy_(w.to(state.dtype))
    state.step.add_(1)
    return w


register(Method(
    NAME, "w_k = α w_{k−1} + (1−α) ŵ_k: the weights of any inner weighting, smoothed across calls (EMA).",
    "Zhou et al. 2022, 'On the convergence of stochastic multi-objective gradient manipulation and beyond'",
    options=(
        Option("inner", REQUIRED, check_inner,
               f"the weighting whose weights are smoothed (any but graddrop, trimmed_mean and crmogm): "
               f"{_usage()}"),
        Option("alpha", 0.9, real_in(0.0, 1.0), "α, the weight of the previous weights, in [0, 1]; may change "
               "between calls"),
        Option("init", None, k_vector(nonnegative=False, positive_sum=False),
               "w_0, a K-vector, or None for the first call's inner weights"),
    ),
    weighting=_crmogm, state_class=CRMOGMState, random=True, project_null=True,
))
