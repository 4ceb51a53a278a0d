"""Method specifications: names, aliases, options with defaults, and one place that validates them."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ._numerics import FLOAT64_NOISE

if TYPE_CHECKING:
    from .state import State

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "<required>"})()


class Context(NamedTuple):
    """What a method may read besides G and its options. (A NamedTuple: built on every call, and
    several times cheaper to build than a frozen dataclass.)"""

    generator: torch.Generator | None = None
    state: Any = None
    losses: torch.Tensor | None = None
    #: δ, the rounding of each entry of G relative to ‖g_i‖‖g_j‖ (see ``_numerics``).
    noise: float = FLOAT64_NOISE
    #: The projector (K x K, on weights) onto the range of G where cleaning removed a null space,
    #: else None: a method that keeps weights across calls (crmogm) keeps them without components
    #: that the current G cannot resolve.
    proj: Any = None
    #: The process group over whose ranks J's columns are sharded (per-coordinate methods that
    #: reduce over D all-reduce those sums), or None.
    group: Any = None


@dataclass(frozen=True)
class Option:
    """One option: its default (or REQUIRED) and a check that returns the normalised value."""

    name: str
    default: Any
    check: Callable[[str, Any, int], Any]
    doc: str


@dataclass(frozen=True)
class Method:
    """A method. Weightings give ``weighting(G, ctx, **opts) -> w``; the others ``combine``."""

    name: str
    summary: str
    source: str
    options: tuple[Option, ...] = ()
    aliases: tuple[str, ...] = ()
    weighting: Callable[..., torch.Tensor] | None = None
    combine: Callable[..., list[torch.Tensor]] | None = None
    random: bool = False
    state_class: type[State] | None = None
    uses_gramian: bool = True
    uses_losses: bool = False
    #: The weighting reads a cross-Gramian A = J_a J_bᵀ of two independent batches (``cross=``) in
    #: place of G: neither symmetric nor cleaned, and the method cannot be chained.
    uses_cross: bool = False
    #: Its weights may grow without bound along directions of G's null space (Nash-MTL's and
    #: FairGrad's equations where a nonnegative combination of the gradients vanishes): harmless in
    #: one call's d, but a method that keeps weights across calls (crmogm) keeps them projected.
    unbounded_null: bool = False
    #: The K x K stage has a Triton kernel (``solvers/gpu``). A plan with a method that has none
    #: takes the host route on CUDA instead of running a solver's iterations as device ops.
    kernel: bool = True
    #: For per-task transforms that are not row scalings: ``transform(G, ctx, **opts) -> T`` with
    #: J' = T J (K x K). Any other weighting acts in a chain as T = diag(w).
    transform: Callable[..., torch.Tensor] | None = None
    #: The weights depend on K alone (sum, mean): computed once per K, dtype and device.
    fixed: bool = False
    #: The weights are computed from G's off-diagonal entries (a solver, a pseudo-inverse, a
    #: projection): where cleaning G removed a null space, ``aggregate`` combines them without
    #: their components along it (see ``_api._weights``). The others (a fixed vector, norms only,
    #: Krum's selection) are combined as they are.
    project_null: bool = False

    @property
    def is_weighting(self) -> bool:
        return self.weighting is not None

    @property
    def stateful(self) -> bool:
        return self.state_class is not None


@dataclass(frozen=True)
class MethodInfo:
    """What ``gradagg.methods()`` reports about a method (``uses_losses``: it needs ``losses=``;
    ``uses_cross``: it needs ``cross=``, two independent batches' Jacobians)."""

    name: str
    aliases: tuple[str, ...]
    weighting: bool
    stateful: bool
    random: bool
    options: dict[str, Any]
    summary: str
    source: str = field(repr=False)
    uses_losses: bool = False
    uses_cross: bool = False


_METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(method: Method) -> Method:
    _METHODS[method.name] = method
    for name in (method.name, *method.aliases):
        _ALIASES[name] = method.name
    return method


def unknown(kind: str, name: str, valid: Sequence[str]) -> ValueError:
    """The error for an unknown name, with the closest valid one and the list."""
    close = difflib.get_close_matches(name.lower(), list(valid), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Valid {kind}s: {', '.join(sorted(valid))}.")


def lookup(name: object) -> Method:
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}: {name!r}")
    key = name.lower()
    if key not in _ALIASES:
        raise unknown("method", name, list(_ALIASES))
    return _METHODS[_ALIASES[key]]


def all_methods() -> dict[str, Method]:
    return dict(_METHODS)


def info(method: Method) -> MethodInfo:
    return MethodInfo(
        name=method.name,
        aliases=method.aliases,
        weighting=method.is_weighting,
        stateful=method.stateful,
        random=method.random,
        options={opt.name: opt.default for opt in method.options},
        summary=method.summary,
        source=method.source,
        uses_losses=method.uses_losses,
        uses_cross=method.uses_cross,
    )


def resolve_options(method: Method, given: dict[str, Any], k: int) -> dict[str, Any]:
    """Checks option names, fills defaults and validates values for K tasks."""
    known = {opt.name: opt for opt in method.options}
    for name in given:
        if name not in known:
            valid = ", ".join(sorted(known)) or "none"
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown option {name!r} for method {method.name!r}.{hint} Valid options: {valid}.")
    resolved = {}
    for opt in method.options:
        value = given.get(opt.name, opt.default)
        if value is REQUIRED:
            raise ValueError(f"method {method.name!r} requires the option {opt.name!r}: {opt.doc}")
        resolved[opt.name] = opt.check(opt.name, value, k)
    return resolved


# --- option checks -------------------------------------------------------------------------------


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"option {name!r} must be a real number, got {type(value).__name__}: {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"option {name!r} must be finite, got {value!r}")
    return float(value)


def real_at_least(low: float, strict: bool = False) -> Callable[[str, Any, int], float]:
    def check(name: str, value: Any, k: int) -> float:
        x = _real(name, value)
        if x < low or (strict and x == low):
            raise ValueError(f"option {name!r} must be {'>' if strict else '≥'} {low}, got {x!r}")
        return x

    return check


def real_in(low: float, high: float, *, open_low: bool = False, open_high: bool = False
            ) -> Callable[[str, Any, int], float]:
    """A real in the interval from ``low`` to ``high``, each end closed unless said open."""
    span = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"

    def check(name: str, value: Any, k: int) -> float:
        x = _real(name, value)
        if x < low or x > high or (open_low and x == low) or (open_high and x == high):
            raise ValueError(f"option {name!r} must lie in {span}, got {x!r}")
        return x

    return check


def choice(*choices: Any) -> Callable[[str, Any, int], Any]:
    def check(name: str, value: Any, k: int) -> Any:
        if isinstance(value, bool) or value not in choices:
            raise ValueError(f"option {name!r} must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value

    return check


def integer(low: Callable[[int], int], high: Callable[[int], int], what: str) -> Callable[[str, Any, int], int]:
    def check(name: str, value: Any, k: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"option {name!r} must be an int, got {type(value).__name__}: {value!r}")
        if not low(k) <= value <= high(k):
            raise ValueError(f"option {name!r} must satisfy {what} (here K={k}), got {value}")
        return value

    return check


def nonnegative_int(name: str, value: Any, k: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"option {name!r} must be an int, got {type(value).__name__}: {value!r}")
    if value < 0:
        raise ValueError(f"option {name!r} must be ≥ 0, got {value}")
    return value


def positive_int(name: str, value: Any, k: int) -> int:
    n = nonnegative_int(name, value, k)  # (value itself, checked)
    if n < 1:
        raise ValueError(f"option {name!r} must be ≥ 1, got {value}")
    return n


def optional_positive_real(name: str, value: Any, k: int) -> float | None:
    return None if value is None else real_at_least(0.0, strict=True)(name, value, k)


def k_vector(nonnegative: bool, positive_sum: bool) -> Callable[[str, Any, int], torch.Tensor | None]:
    """A K-vector given as a sequence or a 1-D tensor; None stays None (the method's default)."""

    def check(name: str, value: Any, k: int) -> torch.Tensor | None:
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            vec = value
        elif isinstance(value, Sequence) and not isinstance(value, str):
            vec = torch.tensor([_real(f"{name}[{i}]", v) for i, v in enumerate(value)], dtype=torch.float64)
        else:
            raise TypeError(f"option {name!r} must be a sequence or 1-D tensor of {k} numbers, got {value!r}")
        if vec.dim() != 1 or vec.shape[0] != k:
            raise ValueError(f"option {name!r} must have length K={k}, got shape {tuple(vec.shape)}")
        if vec.is_complex() or vec.dtype == torch.bool:
            raise TypeError(f"option {name!r} must be real, got dtype {vec.dtype}")
        if not torch.compiler.is_compiling() and (vec.device.type == "cpu"):
            values = vec.detach()
            if not torch.isfinite(values).all():
                raise ValueError(f"option {name!r} must be finite, got {value!r}")
            if nonnegative and (values < 0).any():
                raise ValueError(f"option {name!r} must be nonnegative, got {value!r}")
            if positive_sum and not values.sum() > 0:
                raise ValueError(f"option {name!r} must have a positive sum, got {value!r}")
        return vec

    return check


def as_vector(vec: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
    """The option vector on G's device and dtype; uniform 1/K when it was not given."""
    if vec is None:
        k = g.shape[-1]
        return torch.full((k,), 1.0 / k, dtype=g.dtype, device=g.device)
    return vec.to(device=g.device, dtype=g.dtype)
