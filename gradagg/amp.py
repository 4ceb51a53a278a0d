"""Mixed precision: the loss scale of ``torch.amp.GradScaler``, and states that a skipped step leaves alone.

With a GradScaler the losses are multiplied by the loss scale s before the backward passes, so the
Jacobian arrives as s J. Methods whose weights are invariant to the scale of J (MGDA, UPGrad, PCGrad,
...) hide this, but many are not: Nash-MTL solves G w = 1/w (w scales as 1/s), FairGrad with α ≠ 1,
CAGrad's radius against ‖g₀‖, GradVac's and NSGD's states, ``normalize=`` and the K x D states of
MoCo and DB-MTL all read the magnitude of J. Passing ``scaler=`` to ``gradagg.aggregate``,
``gradagg.weights``, ``gradagg.weights_from_gramian`` or ``gradagg.backward`` divides s out before
weighting, so every method's weights are those of the unscaled J (exactly: GradScaler's scales are
powers of two), and returns the combined gradient in the scaled units of the other gradients, for
``scaler.step`` to unscale with them. Weightings divide their Gramian by s² (no copy of J);
graddrop and trimmed_mean, positively homogeneous, run on s J itself; the methods with K x D states
or a cross-Gramian get J / s, a temporary of J's size.

A step whose Jacobian overflowed (NaN or Inf) is one the scaler skips. With ``scaler=`` such a call
raises nothing, returns NaN where it would have returned a finite answer (so that the scaler sees
the overflow and skips), and leaves every state it was given exactly as it was before the call. A
step can also be skipped because some other gradient overflowed (a head's, say); for that,
``guard(scaler, *states)`` restores the states whenever the scaler skipped the step taken in its
block. Neither reads a value on the host: the decisions are ``torch.where`` on the device.

Example (a CUDA step; on the CPU use ``torch.amp.GradScaler("cpu")`` and ``device_type="cpu"``)::

    scaler = torch.amp.GradScaler()
    state = gradagg.init("nash_mtl", K)
    with gradagg.amp.guard(scaler, state):
        with torch.autocast("cuda", dtype=torch.float16):
            jac = torch.func.vmap(torch.func.grad(scaled_loss), ...)   # of scaler.scale(loss_i)
        d = gradagg.aggregate(jac, "nash_mtl", state=state, scaler=scaler)
        gradagg.set_grad(params, d)
        scaler.step(optimizer)
        scaler.update()
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["guard", "loss_scale"]

#: What ``scaler=`` accepts: a GradScaler (or any object with ``scale(tensor)``), a number or a 0-dim tensor.
Scaler = Any


def loss_scale(scaler: Scaler, device: torch.device | str) -> torch.Tensor:
    """The current loss scale s, a 0-dim float32 tensor on ``device``.

    From a ``torch.amp.GradScaler`` it is ``scaler.scale(1)``, computed on the device (the scaler's
    own scale tensor is never read on the host); a disabled scaler gives 1. A positive finite number
    or a one-element tensor is taken as the scale itself.
    """
    device = torch.device(device)
    if isinstance(scaler, torch.Tensor):
        if scaler.numel() != 1 or not scaler.is_floating_point():
            raise ValueError(f"a loss scale given as a Tensor must hold one floating-point value, got shape "
                             f"{tuple(scaler.shape)} and dtype {scaler.dtype}")
        return scaler.detach().reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(scaler, bool):
        raise TypeError("scaler must be a torch.amp.GradScaler, a positive number or a Tensor, got a bool")
    if isinstance(scaler, (int, float)):
        if not (math.isfinite(scaler) and scaler > 0):
            raise ValueError(f"a loss scale must be positive and finite, got {scaler!r}")
        return torch.tensor(float(scaler), dtype=torch.float32, device=device)
    if isinstance(scaler, torch.amp.GradScaler):
        # GradScaler.scale(t) is t times its ``_scale`` tensor; torch.compile does not trace into
        # torch.amp's methods, so the tensor is read directly (a disabled scaler scales by 1).
        if not scaler._enabled:
            return torch.ones((), dtype=torch.float32, device=device)
        if scaler._scale is not None:
            # A copy: the scaler updates its tensor in place, and ``guard`` compares the values before and after.
            return scaler._scale.detach().reshape(()).to(device=device, dtype=torch.float32, copy=True)
        if torch.compiler.is_compiling():
            raise ValueError("this GradScaler has no scale yet: call scaler.scale(loss) before the compiled step "
                             "that passes it as scaler=")
    scale = getattr(scaler, "scale", None)
    if not callable(scale):
        raise TypeError(f"scaler must be a torch.amp.GradScaler (or an object with scale(tensor)), a positive "
                        f"number or a Tensor, got {type(scaler).__name__}")
    value: torch.Tensor = scale(torch.ones((), dtype=torch.float32, device=device))
    return value.detach().reshape(()).to(torch.float32)


# --- snapshots of states ---------------------------------------------------------------------------------


def _states(state: Any) -> list[Any]:
    """The state objects in ``state``: one, a sequence of them (a chain's), or None."""
    if state is None:
        return []
    if isinstance(state, (tuple, list)):
        return [s for item in state for s in _states(item)]
    return [state]


def _slots(state: Any) -> list[tuple[Any, str]]:
    """(owner, attribute) of every tensor a state holds: a gradagg ``State``'s fields (its K x D
    lists included), or an ``nn.Module``'s parameters and buffers (the loss weightings' states)."""
    if isinstance(state, torch.nn.Module):
        slots: list[tuple[Any, str]] = []
        for module in state.modules():
            slots.extend((module, name) for name, _ in module.named_parameters(recurse=False))
            slots.extend((module, name) for name, _ in module.named_buffers(recurse=False))
        return slots
    fields = getattr(state, "fields", None)
    if fields is None:
        raise TypeError(f"expected a gradagg state (from gradagg.init), got {type(state).__name__}")
    return [(state, name) for name in (*fields, *getattr(state, "wide", ()))]


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [t.detach().clone() for t in value]
    return value  # None: a K x D field not allocated yet


class Snapshot:
    """The values of some states' tensors, to put back where a step was skipped."""

    def __init__(self, state: Any) -> None:
        self.saved = [(owner, name, _clone(getattr(owner, name))) for s in _states(state) for owner, name in _slots(s)]

    def restore_where(self, skipped: torch.Tensor) -> None:
        """Each tensor becomes its saved value where ``skipped`` (a 0-dim bool tensor) is true and
        keeps its current value elsewhere, in place and without reading ``skipped`` on the host."""
        with torch.no_grad():
            for owner, name, old in self.saved:
                current = getattr(owner, name)
                if isinstance(current, torch.Tensor):
                    current.copy_(torch.where(skipped.to(current.device), old.to(current.device), current))
                elif isinstance(current, list):
                    _restore_wide(current, old, skipped)


def _restore_wide(current: list[torch.Tensor], old: list[torch.Tensor] | None, skipped: torch.Tensor) -> None:
    """A K x D field: allocated by this call (old is None: its initial value is 0), or re-split into
    other leaves (the same columns in the same order)."""
    if old is None:
        old = [torch.zeros_like(t) for t in current]
    elif [t.shape for t in old] != [t.shape for t in current]:
        old = list(torch.cat(old, 1).split([t.shape[1] for t in current], 1))
    for t, o in zip(current, old):
        t.copy_(torch.where(skipped.to(t.device), o.to(t.device), t))


@contextlib.contextmanager
def guard(scaler: Any, *states: Any) -> Iterator[None]:
    """Restores ``states`` if the GradScaler skipped the optimizer step taken in this block.

    The block must hold the whole step, ``scaler.update()`` included: the scaler skipped the step
    exactly when ``update`` lowered its scale (``backoff_factor < 1``; it keeps or raises the scale
    otherwise), and that comparison is made on the device. Use it where a step can be skipped for an
    overflow outside the Jacobian that the stateful methods saw (e.g. in a head's gradient); an
    overflow inside it is already handled by ``scaler=``. ``states`` are gradagg states (or
    sequences of them) and loss-weighting states (``nn.Module``s, e.g. FAMO's, whose ``update`` then
    goes inside the block too).
    """
    if not callable(getattr(scaler, "scale", None)) or not callable(getattr(scaler, "update", None)):
        raise TypeError(f"guard needs a torch.amp.GradScaler, got {type(scaler).__name__}")
    snapshot = Snapshot(list(states))
    device = _device_of(states)
    before = loss_scale(scaler, device)
    yield
    snapshot.restore_where(loss_scale(scaler, device) < before)


def _device_of(states: tuple[Any, ...]) -> torch.device:
    for state in _states(list(states)):
        for owner, name in _slots(state):
            value = getattr(owner, name)
            if isinstance(value, torch.Tensor):
                return value.device
    return torch.device("cpu")


# --- the scaled calls of the public API --------------------------------------------------------------------


def _unscaled(leaf: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # float16/bfloat16 are divided in float32, where gradagg computes them anyway: a half-precision
    # quotient could underflow, which is what the scale was there to prevent.
    if leaf.dtype in (torch.float16, torch.bfloat16):
        leaf = leaf.float()
    return leaf / scale.to(leaf.device)


def all_finite(leaves: list[torch.Tensor]) -> torch.Tensor:
    """Whether every entry is finite, without a temporary of the leaves' size: min and max propagate
    NaN and show ±Inf."""
    flags = [torch.isfinite(torch.stack(torch.aminmax(leaf.detach()))).all() for leaf in leaves if leaf.numel()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=leaves[0].device)


def _agreed(finite: torch.Tensor, group: Any) -> torch.Tensor:
    """The flag of every rank of ``group`` (sharded J): all must skip, and restore, alike."""
    if group is None:
        return finite
    from . import distributed

    return distributed.all_reduce_sum((~finite).to(torch.float64).reshape(1), group)[0] == 0


def check_finite_with_scaler(check_finite: bool | None) -> None:
    if check_finite is True:
        raise ValueError("check_finite=True contradicts scaler=: an overflow under a GradScaler is a step for the "
                         "scaler to skip, not an error (the call then returns NaN and leaves the states alone)")


def _check(kwargs: dict[str, Any]) -> None:
    check_finite_with_scaler(kwargs.get("check_finite"))
    kwargs["check_finite"] = False


def _poisoned(t: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """``t`` where ``finite``, else NaN: the scaler must see a step whose J overflowed."""
    return torch.where(finite.to(t.device), t, torch.full((), float("nan"), dtype=t.dtype, device=t.device))


def scaled_call(fn: Callable[..., Any], jac: Any, method: Any, scaler: Scaler, route: str,
                kwargs: dict[str, Any]) -> Any:
    """``aggregate`` or ``weights`` (``fn``) with ``scaler=``, for the routes that do not divide G
    (``_api._scale_route``): "homogeneous" runs ``fn`` on s J itself; "copy" runs it on J / s and
    multiplies the result by s, in jac's dtypes; "weights" (``weights`` of a cross-Gramian method)
    runs it on J / s. States are restored and NaN returned where J overflowed."""
    _check(kwargs)
    leaves, tree = tree_flatten(jac)
    if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        return fn(jac, method, **kwargs)  # let the call raise its own error about the layout
    scale = loss_scale(scaler, leaves[0].device)
    finite = all_finite(leaves)
    if route == "homogeneous":
        finite = _agreed(finite, kwargs.get("group"))
        out_leaves, out_tree = tree_flatten(fn(jac, method, **kwargs))  # on s J itself: s f(J)
        return tree_unflatten([_poisoned(o, finite) for o in out_leaves], out_tree)
    cross = kwargs.get("cross")
    if isinstance(cross, torch.Tensor):
        kwargs["cross"] = cross / scale.to(cross.device, torch.float64).square()
        finite = finite & torch.isfinite(cross).all().to(finite.device)
    elif isinstance(cross, (tuple, list)) and len(cross) == 2:
        pairs = [tree_flatten(c) for c in cross]
        if all(isinstance(x, torch.Tensor) for flat, _ in pairs for x in flat):
            kwargs["cross"] = tuple(tree_unflatten([_unscaled(x, scale) for x in flat], spec) for flat, spec in pairs)
            finite = finite & torch.stack([all_finite(flat).to(finite.device) for flat, _ in pairs]).all()
    finite = _agreed(finite, kwargs.get("group"))
    snapshot = Snapshot(kwargs.get("state"))
    out = fn(tree_unflatten([_unscaled(leaf, scale) for leaf in leaves], tree), method, **kwargs)
    snapshot.restore_where(~finite)
    if route == "weights":
        return _poisoned(out, finite)
    out_leaves, out_tree = tree_flatten(out)
    back = [_poisoned(o * scale.to(o.device, o.dtype), finite).to(leaf.dtype) for o, leaf in zip(out_leaves, leaves)]
    return tree_unflatten(back, out_tree)


def scaled_gramian_weights(fn: Callable[..., torch.Tensor], gramian: torch.Tensor, method: Any, scaler: Scaler,
                           kwargs: dict[str, Any]) -> torch.Tensor:
    """``weights_from_gramian`` of G / s², with states restored and NaN returned where G overflowed."""
    _check(kwargs)
    if not isinstance(gramian, torch.Tensor):
        return fn(gramian, method, **kwargs)
    # G keeps its dtype, from which the default noise floor is read; half precision is divided in float32.
    g = gramian.float() if gramian.dtype in (torch.float16, torch.bfloat16) else gramian
    scale = loss_scale(scaler, g.device).to(g.dtype)
    finite = torch.isfinite(gramian).all()
    snapshot = Snapshot(kwargs.get("state"))
    w = fn(g / scale.square(), method, **kwargs)
    if snapshot.saved:
        snapshot.restore_where(~finite)
    return _poisoned(w, finite)
