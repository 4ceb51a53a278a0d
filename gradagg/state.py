"""Explicit state for the stateful methods: plain tensors, owned by the user, updated in place.

A state is created by ``gradagg.init(method, num_tasks)`` and passed to ``aggregate`` or
``weights`` as ``state=``; each call advances it in place. Its tensors live on the Jacobian's
device: created without ``device=``, a state is placed on the device of the first Jacobian it sees
and stays there (``.to()`` moves it). Step counters are tensors too, so that a compiled step that
advances them is compiled once, not once per value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch

#: A state's tensor fields: name -> (shape with "K" for the task count, initial value, is a counter).
Fields = dict[str, tuple[tuple[str, ...], float, bool]]


class State:
    """Base class: a named set of tensors with ``state_dict``, ``load_state_dict``, ``reset``, ``to``."""

    method: ClassVar[str] = ""
    fields: ClassVar[Fields] = {}

    def __init__(self, num_tasks: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"a state's dtype must be floating point, got {dtype}")
        self.num_tasks = num_tasks
        self.dtype = dtype
        self.bound = device is not None
        self._device = torch.device("cpu" if device is None else device)
        self.reset()

    # -- construction ------------------------------------------------------------------------------

    def _initial(self, name: str) -> torch.Tensor:
        shape, fill, counter = self.fields[name]
        dims = tuple(self.num_tasks if d == "K" else int(d) for d in shape)
        dtype = torch.int64 if counter else self.dtype
        return torch.full(dims, fill, dtype=dtype, device=self._device)

    def reset(self) -> State:
        """Back to the initial values (in place of the tensors, keeping device and dtype)."""
        for name in self.fields:
            setattr(self, name, self._initial(name))
        return self

    # -- serialisation -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The tensors (cloned) plus what identifies the state: method and K."""
        out: dict[str, Any] = {"method": self.method, "num_tasks": self.num_tasks}
        out.update({name: getattr(self, name).detach().clone() for name in self.fields})
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> State:
        """Copies the values in place, onto this state's device and dtype."""
        if state_dict.get("method") != self.method or state_dict.get("num_tasks") != self.num_tasks:
            raise ValueError(f"this state is for {self.method!r} with K={self.num_tasks}; the state_dict is for "
                             f"{state_dict.get('method')!r} with K={state_dict.get('num_tasks')}")
        for name in self.fields:
            if name not in state_dict:
                raise ValueError(f"state_dict lacks {name!r}; expected keys {sorted(self.fields)}")
            value = torch.as_tensor(state_dict[name])
            current = getattr(self, name)
            if value.shape != current.shape:
                raise ValueError(f"state_dict[{name!r}] has shape {tuple(value.shape)}, "
                                 f"expected {tuple(current.shape)}")
            current.copy_(value.to(device=current.device, dtype=current.dtype))
        return self

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> State:
        """Moves the tensors (in place on this object; returns it). Counters stay int64."""
        if device is not None:
            self._device = torch.device(device)
            self.bound = True
        if dtype is not None:
            if not dtype.is_floating_point:
                raise TypeError(f"a state's dtype must be floating point, got {dtype}")
            self.dtype = dtype
        for name, (_, _, counter) in self.fields.items():
            value = getattr(self, name)
            setattr(self, name, value.to(device=self._device, dtype=torch.int64 if counter else self.dtype))
        return self

    @property
    def device(self) -> torch.device:
        return self._device

    # -- use -----------------------------------------------------------------------------------------

    def check(self, method: str, k: int, device: torch.device) -> None:
        """Raises unless this state fits the call; binds an unplaced state to ``device``."""
        if self.method != method:
            raise ValueError(f"the state was made for {self.method!r}, not {method!r}; "
                             f"create one with gradagg.init({method!r}, num_tasks={k})")
        if self.num_tasks != k:
            raise ValueError(f"the state was made for K={self.num_tasks} tasks but the Jacobian has K={k}; "
                             f"K cannot change during a run: create a new state with gradagg.init")
        if not self.bound:
            self.to(device)
        elif self._device.type != device.type or (
                device.index is not None and self._device.index not in (None, device.index)):
            raise ValueError(f"the state is on {self._device} but the Jacobian is on {device}; "
                             f"move it with state.to({str(device)!r})")

    def __repr__(self) -> str:
        body = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.fields)
        return f"{type(self).__name__}(K={self.num_tasks}, {body})"


class NSGDState(State):
    """NSGD: the reference norms r (ones until the call with index ``update_at``) and the call count."""

    method: ClassVar[str] = "nsgd"
    fields: ClassVar[Fields] = {"ref": (("K",), 1.0, False), "step": ((), 0, True)}
    ref: torch.Tensor
    step: torch.Tensor


class GradNormState(State):
    """GradNorm: the logits θ (w = K softmax θ), the reference values of the training rates, the call count."""

    method: ClassVar[str] = "gradnorm"
    fields: ClassVar[Fields] = {"theta": (("K",), 0.0, False), "ref": (("K",), 1.0, False), "step": ((), 0, True)}
    theta: torch.Tensor
    ref: torch.Tensor
    step: torch.Tensor


class GradNormLossState(GradNormState):
    """GradNorm on loss ratios: as GradNormState."""

    method: ClassVar[str] = "gradnorm_loss"


class GradVacState(State):
    """GradVac: the K x K target cosines φ̂ (0 at first) and the call count."""

    method: ClassVar[str] = "gradvac"
    fields: ClassVar[Fields] = {"target": (("K", "K"), 0.0, False), "step": ((), 0, True)}
    target: torch.Tensor
    step: torch.Tensor


class NashMTLState(State):
    """Nash-MTL: the previous solution α (the warm start; 0 = none yet) and the call count."""

    method: ClassVar[str] = "nash_mtl"
    fields: ClassVar[Fields] = {"alpha": (("K",), 0.0, False), "step": ((), 0, True)}
    alpha: torch.Tensor
    step: torch.Tensor


class WideState(State):
    """A state that also holds K x D tensors (``wide`` fields): one [K, D_l] tensor per leaf of the
    Jacobian, as large as J. They are allocated at the first call, zero, in the dtype and on the
    device of J's rows. A later call with another total width D is refused (D cannot change during
    a run); one with the same columns split into other leaves (a small pytree is packed into one
    buffer in eager calls, not in compiled ones) re-splits them. ``state_dict`` holds them as
    lists, so a checkpoint resumes exactly."""

    wide: ClassVar[tuple[str, ...]] = ()

    def reset(self) -> State:
        super().reset()
        self.widths: tuple[int, ...] | None = None
        for name in self.wide:
            setattr(self, name, None)
        return self

    def bind(self, rows: list[torch.Tensor]) -> None:
        """Allocates the wide fields for J's rows [K, D_l], or checks that they fit them."""
        widths = tuple(int(r.shape[1]) for r in rows)
        if self.widths is None:
            self.widths = widths
            for name in self.wide:
                setattr(self, name, [torch.zeros(self.num_tasks, w, dtype=r.dtype, device=r.device)
                                     for w, r in zip(widths, rows)])
        elif widths != self.widths:
            if sum(widths) != sum(self.widths):
                raise ValueError(f"this {self.method!r} state holds K x D tensors for leaves of widths "
                                 f"{list(self.widths)}, but this Jacobian's leaves have widths {list(widths)}; "
                                 f"D cannot change during a run: create a new state with gradagg.init")
            # The same columns split otherwise: eager ``aggregate`` packs a small pytree into one [K, D]
            # buffer and a compiled one does not. The columns keep their order, so re-split them.
            self.widths = widths
            for name in self.wide:
                whole = torch.cat(getattr(self, name), 1)
                setattr(self, name, [part.clone() for part in whole.split(widths, 1)])

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["widths"] = self.widths
        for name in self.wide:
            value = getattr(self, name)
            out[name] = None if value is None else [t.detach().clone() for t in value]
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> State:
        super().load_state_dict(state_dict)
        widths = state_dict.get("widths")
        self.widths = None if widths is None else tuple(widths)
        for name in self.wide:
            value = state_dict.get(name)
            # (where value is not None, widths is not None either, or the first test held)
            if (value is None) != (widths is None) or (
                    value is not None and len(value) != len(cast("Sequence[int]", widths))):
                raise ValueError(f"state_dict[{name!r}] does not match its widths {widths}")
            setattr(self, name, None if value is None else
                    [torch.as_tensor(t).to(self._device).clone() for t in value])
        return self

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> State:
        super().to(device, dtype)
        for name in self.wide:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, [t.to(self._device) for t in value])
        return self
