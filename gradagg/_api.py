"""The public functions: validation, pytree handling and dispatch to the methods.

Data path (see DESIGN.md): G = Σ_l J_l J_lᵀ (one pass over J, float64 K x K), w = weighting(G)
(K x K work only), d_l = wᵀ J_l (one more pass). The weights are computed from the detached
Jacobian, so ``aggregate`` is differentiable in J with w held constant, like a weighted loss with
detached weights.
"""

from __future__ import annotations

import copy as _copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, cast, overload

import torch
from torch.utils import _pytree as pytree

from . import _device, _methods, amp, distributed  # noqa: F401  (_methods registers every method)
from ._gramian import (
    Gram,
    accumulation_dtype,
    clean,
    clean_gramian,
    clean_gramian_op,
    fast,
    gramian_of_leaves,
    host_gramian,
    noise_of,
    prepared,
    rescaled,
    triton_gramian,
)
from ._numerics import default_noise, eigen_cut
from ._registry import _ALIASES, Context, Method, MethodInfo, all_methods, info, lookup, resolve_options
from .solvers import native
from .state import State

Normalize = Literal["sum"] | None


class NonFiniteError(ValueError):
    """The Jacobian (or Gramian) holds NaN or Inf values."""


# --- validation ----------------------------------------------------------------------------------


def _valid_leaves(leaves: list[Any]) -> bool:
    """One quick pass for the common, valid case (the checks below explain any failure)."""
    first = leaves[0]
    if type(first) is not torch.Tensor or first.dim() == 0 or first.shape[0] == 0:
        return False
    k, device, cpu = first.shape[0], first.get_device(), first.is_cpu
    for leaf in leaves:
        if (type(leaf) is not torch.Tensor or not leaf.is_floating_point() or leaf.dim() == 0
                or leaf.shape[0] != k or leaf.get_device() != device or leaf.is_cpu != cpu):
            return False
    # get_device() is -1 on every device without an index (CPU, meta, ...): compare those in full.
    return cpu or device >= 0 or all(leaf.device == first.device for leaf in leaves)


def _flatten(jac: Any) -> tuple[list[torch.Tensor], Any, int]:
    """(leaves, tree spec (None for a single Tensor), K), validated."""
    if type(jac) is torch.Tensor:  # the common case, without the pytree machinery
        if jac.dim() == 0 or not jac.is_floating_point() or jac.shape[0] == 0:
            _checked_k([jac], None)  # raises, with the error message
        return [jac], None, jac.shape[0]
    leaves, spec = pytree.tree_flatten(jac)
    if not leaves:
        raise ValueError("jac is empty: give a Tensor [K, ...] or a pytree of such tensors")
    if _valid_leaves(leaves):
        return leaves, spec, leaves[0].shape[0]
    return leaves, spec, _checked_k(leaves, jac)


def _checked_k(leaves: list[Any], jac: Any) -> int:
    """K, after the full checks of the leaves (raising the error that explains a failure)."""
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"every leaf of jac must be a torch.Tensor; leaf {i} is {type(leaf).__name__}"
                            f"{_per_task_hint(jac)}")
        if leaf.is_complex() or not leaf.is_floating_point():
            raise TypeError(f"jac must be real floating point (float16/bfloat16/float32/float64); "
                            f"leaf {i} has dtype {leaf.dtype}")
        if leaf.dim() == 0:
            raise ValueError(f"leaf {i} of jac is 0-dimensional; every leaf needs a leading task dimension K"
                             f"{_per_task_hint(jac)}")
    k: int = leaves[0].shape[0]
    for i, leaf in enumerate(leaves):
        if leaf.shape[0] != k:
            shapes = ", ".join(str(tuple(x.shape)) for x in leaves[:8])
            raise ValueError(f"every leaf of jac must share the leading dimension K; leaf 0 has K={k} but "
                             f"leaf {i} has {leaf.shape[0]} (shapes: {shapes}{', ...' if len(leaves) > 8 else ''})"
                             f"{_per_task_hint(jac)}")
        if leaf.device != leaves[0].device:
            raise ValueError(f"every leaf of jac must be on one device; leaf 0 is on {leaves[0].device}, "
                             f"leaf {i} on {leaf.device}")
    if k == 0:
        raise ValueError("jac has K = 0 tasks; aggregation needs at least one task gradient")
    return k


def _per_task_hint(jac: Any) -> str:
    """For an error message: where jac is a list or tuple that looks like K per-task gradients
    (entries that are tuples, lists or dicts of tensors, or tensors whose leading dimensions differ
    or that are 0-dimensional), what was passed and what to do; else "". Error paths only: a
    pytree is always read as a pytree."""
    if not isinstance(jac, (list, tuple)) or not jac:
        return ""

    def gradients(entry: Any) -> bool:
        values = entry.values() if isinstance(entry, dict) else entry
        return (isinstance(entry, (list, tuple, dict)) and len(entry) > 0
                and all(v is None or isinstance(v, torch.Tensor) for v in values))

    tensors = all(isinstance(e, torch.Tensor) for e in jac)
    if not (all(gradients(e) for e in jac)
            or (tensors and (len({e.shape[:1] for e in jac}) > 1 or any(e.dim() == 0 for e in jac)))):
        return ""
    listed = ", ".join(_shapes(e) for e in jac[:8]) + (", ..." if len(jac) > 8 else "")
    return (f".\njac is a {type(jac).__name__} of {len(jac)} entries with shapes [{listed}]. aggregate expects a "
            f"Tensor [K, ...] or a pytree of tensors that all lead with the task dimension K, as "
            f"torch.func.vmap(torch.func.grad(f)) returns it. If these entries are per-task gradients (one per "
            f"task, e.g. from a loop over torch.autograd.grad), stack them first: "
            f"gradagg.aggregate(gradagg.stack_gradients(per_task), method)")


def _shapes(entry: Any) -> str:
    """A pytree of tensors shown by its containers and shapes, for error messages."""
    if isinstance(entry, torch.Tensor):
        return str(tuple(entry.shape))
    if isinstance(entry, dict):
        return "{" + ", ".join(f"{key!r}: {_shapes(v)}" for key, v in entry.items()) + "}"
    if isinstance(entry, list):
        return "[" + ", ".join(_shapes(v) for v in entry) + "]"
    if isinstance(entry, tuple):
        return "(" + ", ".join(_shapes(v) for v in entry) + ("," if len(entry) == 1 else "") + ")"
    return "None" if entry is None else type(entry).__name__


Normalizer = Literal["l2", "loss", "loss+", "none"] | None
_NORMALIZERS = (None, "none", "l2", "loss", "loss+")


@dataclass
class _Step:
    """One element of a plan: a method, its resolved options and its state (if stateful)."""

    method: Method
    options: dict[str, Any]
    state: Any = None


@dataclass
class _Plan:
    """What a call computes: per-task transforms (``steps``), then either the sum of the rows or an
    element-wise method (``tail``), with the optional gradient normaliser in front."""

    steps: list[_Step]
    tail: _Step | None
    normalizer: str | None
    losses: torch.Tensor | None
    generator: torch.Generator | None

    #: Whether G is formed, and whether the plan is one weighting alone (set from the fields).
    uses_gramian: bool = dataclasses.field(init=False)
    simple: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        # A chain of several steps forms G even of fixed weightings: its transforms are applied to G.
        self.uses_gramian = (self.normalizer is not None or len(self.steps) > 1
                             or any(step.method.uses_gramian for step in self.steps))
        self.simple = len(self.steps) == 1 and self.tail is None and self.normalizer is None


#: A method's ``weighting`` (``Method.weighting``, where the method is known to be a weighting).
_Weighting: TypeAlias = Callable[..., torch.Tensor]


def _elements(method: Any, options: dict[str, Any]) -> list[tuple[Method, dict[str, Any]]]:
    if isinstance(method, str):
        return [(lookup(method), options)]
    if isinstance(method, tuple) and len(method) == 2 and isinstance(method[0], str) and isinstance(method[1], dict):
        method = [method]  # one (name, options) pair, as in init(("crmogm", {"inner": "nash_mtl"}), K)
    if isinstance(method, (list, tuple)):
        if not method:
            raise ValueError("method is an empty sequence; give at least one method (\"sum\" for the plain sum)")
        if options:
            raise ValueError(f"options {sorted(options)} are ambiguous for a chain of methods; give them per element, "
                             f"as in method=[(\"gradvac\", {{\"decay\": 0.02}}), \"nsgd\"]")
        out: list[tuple[Method, dict[str, Any]]] = []
        for item in method:
            if isinstance(item, str):
                out.append((lookup(item), {}))
            elif (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
                  and isinstance(item[1], dict)):
                out.append((lookup(item[0]), dict(item[1])))
            else:
                raise TypeError(f"a chain's elements are method names or (name, options) pairs; got {item!r}")
        return out
    return [(lookup(method), options)]  # raises the TypeError for a non-string


def _check_losses(losses: Any, k: int, needed: str | None) -> torch.Tensor | None:
    if losses is None:
        if needed:
            raise ValueError(f"{needed} needs the task losses: pass losses=, a Tensor [K={k}]")
        return None
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"losses must be a Tensor [K={k}], got {type(losses).__name__}")
    if losses.shape != (k,):
        raise ValueError(f"losses must have shape [K] = [{k}], got {tuple(losses.shape)}")
    if losses.is_complex() or not losses.is_floating_point():
        raise TypeError(f"losses must be real floating point, got dtype {losses.dtype}")
    if not torch.compiler.is_compiling() and losses.device.type == "cpu" and not _device.on_triton(losses):
        if not bool(torch.isfinite(losses).all()) or not bool((losses > 0).all()):
            raise ValueError(f"losses must be finite and positive (they divide), got {losses.detach()}")
    return losses.detach()


def _bind_states(steps: list[_Step], state: Any, k: int, device: torch.device) -> None:
    stateful = [step for step in steps if step.method.stateful]
    names = [step.method.name for step in stateful]
    if not stateful:
        if state is not None:
            raise ValueError(f"method {steps[0].method.name if len(steps) == 1 else 'chain'!r} is stateless and takes "
                             f"no state; got {type(state).__name__}")
        return
    if state is None:
        raise ValueError(f"{', '.join(map(repr, names))} {'is' if len(names) == 1 else 'are'} stateful: create the "
                         f"state with gradagg.init(...) and pass it as state= (see gradagg.init)")
    states = list(state) if isinstance(state, (list, tuple)) else [state]
    if len(states) != len(stateful):
        raise ValueError(f"the chain has {len(stateful)} stateful methods ({', '.join(names)}), so state= must be a "
                         f"sequence of {len(stateful)} states in that order; got {len(states)}")
    for step, st in zip(stateful, states):
        if not isinstance(st, State):
            raise TypeError(f"state for {step.method.name!r} must be a gradagg state object, got {type(st).__name__}")
        st.check(step.method.name, k, device)
        step.state = st


_PLANS: dict[tuple[Any, ...], _Plan] = {}


def _make_plan(method: Any, k: int, device: torch.device, normalize: Any, generator: Any, state: Any,
               losses: Any, grad_normalizer: Any, options: dict[str, Any]) -> _Plan:
    # A plain call (a method name, no options, state, losses or generator) is validated once (in
    # eager mode: under torch.compile a global cache would only add guards).
    plain = (type(method) is str and not options and generator is None and state is None and losses is None
             and not torch.compiler.is_compiling())
    key = (method, k, device, normalize, grad_normalizer) if plain else None
    if key is not None and key in _PLANS:
        return _PLANS[key]
    plan = _new_plan(method, k, device, normalize, generator, state, losses, grad_normalizer, options)
    if key is not None:
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _new_plan(method: Any, k: int, device: torch.device, normalize: Any, generator: Any, state: Any,
              losses: Any, grad_normalizer: Any, options: dict[str, Any]) -> _Plan:
    elements = _elements(method, options)
    if normalize not in (None, "sum"):
        raise ValueError(f"normalize must be None or 'sum', got {normalize!r}")
    if grad_normalizer not in _NORMALIZERS:
        raise ValueError(f"grad_normalizer must be one of 'l2', 'loss', 'loss+', 'none' or None; "
                         f"got {grad_normalizer!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but jac is on {device}; "
                             f"create it with torch.Generator(device={str(device)!r})")
    crossed = [m.name for m, _ in elements if m.uses_cross]
    if crossed and len(elements) > 1:
        raise ValueError(f"{crossed[0]!r} weights a cross-Gramian of two batches and cannot be chained with other "
                         f"methods")
    steps = [_Step(m, resolve_options(m, opts, k)) for m, opts in elements]
    tail = None
    for i, step in enumerate(steps):
        if not step.method.is_weighting:
            if i != len(steps) - 1:
                raise ValueError(f"{step.method.name!r} acts coordinate by coordinate, so it can only be the last "
                                 f"method of a chain")
            tail = steps.pop()
    norm = None if grad_normalizer in (None, "none") else grad_normalizer
    if norm is not None and not steps:
        # (no weighting left: the one method was taken as the tail)
        raise ValueError(f"grad_normalizer applies to weighting methods, not to {cast(_Step, tail).method.name!r} "
                         f"alone")
    every = steps + ([tail] if tail is not None else [])
    needs = next((f"method {s.method.name!r}" for s in every if s.method.uses_losses), None)
    if norm in ("loss", "loss+"):
        needs = needs or f"grad_normalizer={norm!r}"
    plan = _Plan(steps, tail, norm, _check_losses(losses, k, needs), generator)
    _bind_states(every, state, k, device)
    return plan


def _rows(leaf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows = leaf if leaf.dim() == 2 else leaf.reshape(leaf.shape[0], -1)
    return rows if rows.dtype == dtype else rows.to(dtype)


def _unflatten(out: list[torch.Tensor], tree: Any) -> Any:
    return out[0] if tree is None else pytree.tree_unflatten(out, tree)


def _combine(w: torch.Tensor, leaves: list[torch.Tensor], dtype: torch.dtype,
             group: Any = None) -> tuple[list[torch.Tensor], bool | None]:
    """(wᵀJ_l for every leaf, in each leaf's dtype and shape; whether their sum is finite, where
    that came for free, else None). w is float64."""
    differentiable = torch.is_grad_enabled() and any(leaf.requires_grad for leaf in leaves)
    if group is None and not differentiable and native.combine_ok(w, leaves, dtype) and not _device.on_triton(w):
        out, finite = [], True
        w = w.contiguous()
        for leaf in leaves:
            d, ok = native.combine(w, leaf if leaf.dim() == 2 else leaf.reshape(leaf.shape[0], -1))
            finite = finite and ok
            out.append(d if leaf.dim() == 2 else d.reshape(leaf.shape[1:]))
        return out, finite
    w = w.to(dtype)
    # Compiled, Σ_i w_i J_i as a broadcast-and-reduce becomes one fused pass over J; inductor's
    # extern mm for a [1, K] x [K, D] product is slower than that, and than eager BLAS.
    compiling = torch.compiler.is_compiling()
    out = []
    for leaf in leaves:
        d = (w.unsqueeze(1) * _rows(leaf, dtype)).sum(0) if compiling else w @ _rows(leaf, dtype)
        if d.dtype != leaf.dtype:
            d = d.to(leaf.dtype)
        out.append(d if leaf.dim() == 2 else d.reshape(leaf.shape[1:]))
    return out, None


#: Pytrees of at most this many entries (2 MiB of float32) are packed into one [K, D] buffer: every
#: operation per leaf costs microseconds of dispatch, which for small leaves exceeds the arithmetic.
#: Larger pytrees are processed leaf by leaf, without a K x D copy.
PACK_MAX = 1 << 19


def _pack(leaves: list[torch.Tensor], k: int) -> torch.Tensor | None:
    if len(leaves) < 2 or torch.compiler.is_compiling():
        return None
    first = leaves[0]
    total = 0
    for leaf in leaves:
        if leaf.dtype != first.dtype:
            return None
        total += leaf.numel()
    if total > PACK_MAX:
        return None
    # reshape(k, -1), not flatten(1): a 1-D leaf [K] (a scalar parameter) becomes [K, 1].
    return torch.cat([leaf if leaf.dim() == 2 else leaf.reshape(k, -1) for leaf in leaves], 1)


def _unpack(d: torch.Tensor, leaves: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The packed result split back into the leaves' shapes (views of d)."""
    parts = d.split_with_sizes([leaf.numel() // k for leaf in leaves])
    return [part if leaf.dim() == 2 else part.view(leaf.shape[1:]) for part, leaf in zip(parts, leaves)]


_ZEROS: dict[tuple[int, torch.device], torch.Tensor] = {}
_FIXED: dict[tuple[str, int, torch.device], torch.Tensor] = {}


def _fixed_weights(method: Method, k: int, device: torch.device) -> torch.Tensor:
    """The weights (float64) of a method whose weights depend on K alone (cached)."""
    weighting = cast(_Weighting, method.weighting)  # (a fixed method is a weighting)
    if torch.compiler.is_compiling():
        return weighting(_zero_gramian(k, device), Context())
    key = (method.name, k, device)
    if key not in _FIXED:
        if len(_FIXED) > 64:
            _FIXED.clear()
        _FIXED[key] = weighting(_zero_gramian(k, device), Context())
    return _FIXED[key]


def _zero_gramian(k: int, device: torch.device) -> torch.Tensor:
    """A read-only stand-in for G, for the methods that never read it (mean, sum, constant, random)."""
    if torch.compiler.is_compiling():
        return torch.zeros(k, k, dtype=torch.float64, device=device)
    key = (k, device)
    if key not in _ZEROS:
        if len(_ZEROS) > 64:
            _ZEROS.clear()
        _ZEROS[key] = torch.zeros(k, k, dtype=torch.float64, device=device)
    return _ZEROS[key]


def _raise_non_finite(leaves: list[torch.Tensor], group: Any = None) -> None:
    """Names the tasks whose rows hold NaN or Inf. With a group, called on every rank once any rank
    found some: ranks whose own shard is finite report that another rank's is not."""
    finite = torch.stack([torch.isfinite(leaf.detach().reshape(leaf.shape[0], -1)).all(1) for leaf in leaves])
    tasks = [int(i) for i in torch.nonzero(~finite.all(0)).flatten()]
    if tasks:
        raise NonFiniteError(f"the Jacobian holds NaN or Inf in the rows of tasks {tasks}. Fix the losses, or "
                             f"pass check_finite=False to skip this check (non-finite input then gives NaN).")
    if group is not None:
        raise NonFiniteError("the Jacobian holds NaN or Inf on another rank of the process group (this rank's "
                             "shard is finite); pass check_finite=False to skip this check")


CheckFinite = bool | None


def _eager_checks(check_finite: CheckFinite, t: torch.Tensor, free: bool = False) -> bool:
    """Whether to read the finite flag: always with True, never with False or while compiling;
    with None (the default) where reading it is free: CPU tensors, and accelerator calls whose
    K x K stage goes to the host anyway (``free``). On the Triton route the default reads nothing
    and non-finite input gives NaN."""
    if check_finite is False or torch.compiler.is_compiling():
        return False
    return check_finite is True or free or _device.placement(t) == "cpu"


# --- weights -------------------------------------------------------------------------------------


def _normalizer_scale(g: torch.Tensor, kind: str, losses: torch.Tensor | None) -> torch.Tensor:
    """The divisors c_i of the gradient normaliser (zero norms and losses divide by 1)."""
    norms = torch.diagonal(g).clamp_min(0).sqrt()
    if kind == "l2":
        c = norms
    else:
        c = cast(torch.Tensor, losses).to(device=g.device, dtype=g.dtype)  # (the plan checked them present)
        if kind == "loss+":
            c = c * norms
    return torch.where(c > 0, c, 1.0)


def _coefficients(plan: _Plan, g: torch.Tensor, noise: float) -> torch.Tensor:
    """C (K x K) with the transformed rows J' = C J; the weights are 1ᵀC."""
    k = g.shape[-1]
    c = torch.eye(k, dtype=g.dtype, device=g.device)
    root = torch.diagonal(g).clamp_min(0).sqrt()  # the original norms, for the rounding bound below
    if plan.normalizer is not None:
        c = torch.diag(1.0 / _normalizer_scale(g, plan.normalizer, plan.losses))
        g = c @ g @ c
    for step in plan.steps:
        ctx = Context(generator=plan.generator, state=step.state, losses=plan.losses, noise=noise)
        if step.method.transform is not None:
            t = step.method.transform(g, ctx, **step.options)
        else:
            t = torch.diag(cast(_Weighting, step.method.weighting)(g, ctx, **step.options))  # (steps: weightings)
        c = t @ c
        g, c = _transformed_gramian(t @ g @ t.T, c, root, noise)
    return c


def _transformed_gramian(g: torch.Tensor, c: torch.Tensor, root: torch.Tensor,
                         noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """T G Tᵀ cleaned of its rounding: symmetric, denoised at G's floor, and with rows that a
    transform cancelled (‖g_i'‖² within the floor of the terms that make it, e.g. PCGrad on opposite
    gradients) exactly 0. G's entries carry δ ‖g_i‖‖g_j‖, so (C G Cᵀ)_ii carries δ (Σ_j |C_ij| ‖g_j‖)²."""
    g = 0.5 * (g + g.T)
    scale = (c.abs() @ root) ** 2  # (Σ_j |C_ij| ‖g_j‖)², the size of the terms of ‖g_i'‖²
    cut = eigen_cut(noise, g.shape[-1])
    alive = torch.diagonal(g) > max(1e-13, cut) * scale
    keep = alive.to(g.dtype)
    return clean(g * keep.unsqueeze(0) * keep.unsqueeze(1), noise)[0], c * keep.unsqueeze(1)


def _weights_from_g(plan: _Plan, gram: Gram, normalize: Normalize) -> torch.Tensor:
    g = gram.g
    if plan.simple:
        step = plan.steps[0]
        ctx = Context(generator=plan.generator, state=step.state, losses=plan.losses, noise=gram.noise,
                      proj=gram.proj)
        w = cast(_Weighting, step.method.weighting)(g, ctx, **step.options)  # (steps: weightings)
    else:
        w = _coefficients(plan, g, gram.noise).sum(0)
    if normalize == "sum":
        target = g.sum().clamp_min(0).sqrt()
        norm = (w @ g @ w).clamp_min(0).sqrt()
        w = w * torch.where(norm > 0, target / torch.where(norm > 0, norm, 1.0), 0.0)
    return w


def _gramian_and_finite(leaves: list[torch.Tensor], check_finite: CheckFinite, group: Any = None) -> Gram:
    """The clean Gramian, its floor and range projector, and whether G is finite where that came
    for free (else None)."""
    detached = [leaf.detach() for leaf in leaves]
    dtype = accumulation_dtype([leaf.dtype for leaf in leaves])
    noise = noise_of(detached, sharded=group is not None)
    rescue = bool(check_finite) or detached[0].device.type == "cpu"
    proj: torch.Tensor | None
    if group is None:
        if native.on_host(detached[0]) and not _device.on_triton(detached[0]):
            return host_gramian(detached, dtype, noise)
        if _device.on_triton(detached[0]):
            return triton_gramian(detached, dtype, noise, _eager_checks(check_finite, detached[0]))
        if _host_route(detached[0]):
            g, proj = _host_stage(detached, None, check_finite, lambda plan, gram: [gram.g, _projector(gram)])
            return Gram(g, noise, proj, True if _eager_checks(check_finite, g, free=True) else None)
        if torch.compiler.is_compiling():
            g, proj = clean_gramian_op(detached, rescue, noise)
            return Gram(g, noise, proj)
        g, proj = clean_gramian(detached, rescue, noise)
        return Gram(g, noise, proj)
    # Parameter shards: G = Σ_ranks J_r J_rᵀ, the only thing that travels (eager only).
    g, proj = clean(distributed.all_reduce_sum(gramian_of_leaves(detached, rescue), group), noise)
    return Gram(g, noise, proj)


def _checked_gramian(leaves: list[torch.Tensor], check_finite: CheckFinite, group: Any = None) -> Gram:
    gram = _gramian_and_finite(leaves, check_finite, group)
    # After the all-reduce every rank sees the same G, so every rank raises or none does.
    if _eager_checks(check_finite, leaves[0], gram.finite is not None):
        finite = gram.finite
        if finite is None:
            finite = bool(torch.isfinite(torch.diagonal(gram.g)).all())
            gram = gram._replace(finite=finite)
        if not finite:
            _raise_non_finite(leaves, group)
    return gram


def _weights(leaves: list[torch.Tensor], plan: _Plan, normalize: Normalize, check_finite: CheckFinite,
             group: Any = None, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(w in float64, the weights to combine J with, whether G was formed). The two differ where
    cleaning G removed a null space and the weights come from G's off-diagonal entries
    (``Method.project_null``): any w + v with Jᵀv = 0 gives the same d, and such a w may have
    components v along directions that G's noise floor cannot tell from null, computed from that
    noise (large ones: the singular Nash-MTL and FairGrad equations, MGDA's minimum at d = 0,
    PCGrad's projections between nearly dependent gradients), which in floating point would add it
    to d. The weights combined are w with those components dropped. With a loss ``scale`` s (the
    leaves are s J), G is divided by s² once formed: the weights are those of J."""
    k, device = leaves[0].shape[0], leaves[0].device
    formed = plan.uses_gramian or normalize is not None
    if formed and group is None and _host_route(leaves[0], plan):
        w, combined = _host_stage(leaves, plan, check_finite, lambda p, gram: _weights_on(p, gram, normalize),
                                  scale=scale)
        return w, combined, True
    gram = _checked_gramian(leaves, check_finite, group) if formed else Gram(_zero_gramian(k, device), 0.0, None, True)
    if scale is not None and formed:
        gram = gram._replace(g=gram.g / scale.to(device=gram.g.device, dtype=gram.g.dtype).square())
    w, combined = _weights_on(plan, gram, normalize)
    return w, combined, formed


def _weights_on(plan: _Plan, gram: Gram, normalize: Normalize) -> list[torch.Tensor]:
    """[w, the weights to combine J with] from the clean Gramian (see ``_weights``)."""
    w = _weights_from_g(plan, gram, normalize)
    if not gram.finite:
        # Non-finite input must never give a finite answer, whatever a solver did with it.
        w = w + 0.0 * torch.diagonal(gram.g).sum()
    project = gram.proj is not None and any(step.method.project_null for step in plan.steps)
    return [w, (cast(torch.Tensor, gram.proj) @ w if project else w)]


def _projector(gram: Gram) -> torch.Tensor:
    k = gram.g.shape[-1]
    return torch.eye(k, dtype=gram.g.dtype, device=gram.g.device) if gram.proj is None else gram.proj


# --- the host route: the K x K stage of an accelerator call in C, one device-to-host copy ----------


def _host_route(t: torch.Tensor, plan: _Plan | None = None) -> bool:
    """Whether an eager call runs its K x K stage on the host route (``_device.placement``): also
    on the Triton route where a method of the plan has no kernel there."""
    if torch.compiler.is_compiling():
        return False
    where = _device.placement(t)
    return where == "host" or (where == "triton" and plan is not None and not _has_kernels(plan))


def _has_kernels(plan: _Plan) -> bool:
    def ok(method: Method, options: dict[str, Any]) -> bool:
        inner = options.get("inner")  # a wrapper (crmogm) runs its inner method's stage
        return method.kernel and (inner is None or not hasattr(inner, "method") or inner.method.kernel)

    return all(ok(step.method, step.options) for step in plan.steps)


# ``compute`` gets the plan ``_host_stage`` was given (copied to the host): a plan, or None for G alone.
@overload
def _host_stage(leaves: list[torch.Tensor], plan: _Plan, check_finite: CheckFinite,
                compute: Callable[[_Plan, Gram], list[torch.Tensor]],
                given: tuple[torch.Tensor, float] | None = None, as_is: bool = False,
                scale: torch.Tensor | None = None) -> list[torch.Tensor]: ...


@overload
def _host_stage(leaves: list[torch.Tensor], plan: None, check_finite: CheckFinite,
                compute: Callable[[None, Gram], list[torch.Tensor]],
                given: tuple[torch.Tensor, float] | None = None, as_is: bool = False,
                scale: torch.Tensor | None = None) -> list[torch.Tensor]: ...


def _host_stage(leaves: list[torch.Tensor], plan: _Plan | None, check_finite: CheckFinite,
                compute: Callable[[Any, Gram], list[torch.Tensor]],
                given: tuple[torch.Tensor, float] | None = None, as_is: bool = False,
                scale: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Runs ``compute(plan, gram)`` on the host and returns its tensors on the leaves' device.

    The raw Gramian is formed on the device, then copied to the host in one transfer together with
    everything else the K x K stage reads: the losses, the tensors of every state, and a seed drawn
    from the call's generator for the random methods (whose draws then come from a CPU generator
    seeded with it, so that a seeded device generator still gives reproducible results). That copy
    is the call's one synchronisation (a second one only where the Gramian must be formed again,
    rescaled, because its float32 accumulation overflowed). The C solvers then run as on the CPU,
    the states are written back, and the results return in one more transfer. ``given`` is a
    (Gramian, noise) pair to use instead of the leaves' (``leaves`` is then [that Gramian]); with
    ``as_is`` it is used as it is (a cross-Gramian: not symmetrised, not cleaned). ``scale`` is a
    loss scale s (0-dim, on the device) that travels with the rest: G is divided by s² before
    ``compute``.
    """
    detached = [leaf.detach() for leaf in leaves]
    device = detached[0].device
    if given is None:
        dtype = accumulation_dtype([leaf.dtype for leaf in detached])
        noise = noise_of(detached)
        raw = fast(detached, dtype)
    else:
        (raw, noise), dtype = given, torch.float64
    extras: list[torch.Tensor] = []
    stateful: list[_Step] = [] if plan is None else [step for step in plan.steps if step.state is not None]
    if plan is not None and plan.losses is not None:
        extras.append(plan.losses)
    for step in stateful:
        extras.extend(getattr(step.state, name) for name in step.state.fields)
    seeded = plan is not None and any(step.method.random for step in plan.steps) and (
        plan.generator is None or plan.generator.device.type != "cpu")
    if seeded:  # an integer below 2^52 travels exactly as a float64
        # (seeded: plan is not None)
        extras.append(torch.randint(0, 2**52, (1,), generator=cast(_Plan, plan).generator, device=device))
    if scale is not None:
        extras.append(scale)
    parts = [raw.reshape(-1).to(torch.float64)] + [e.reshape(-1).to(torch.float64) for e in extras]
    host = (torch.cat(parts) if extras else parts[0]).to("cpu").split([p.numel() for p in parts])
    raw_h, rest = host[0].view(raw.shape), list(host[1:])
    if plan is not None:
        losses = rest.pop(0).to(plan.losses.dtype) if plan.losses is not None else None
        states = {}
        for step in stateful:
            copy = _copy.copy(step.state)
            copy._device = torch.device("cpu")
            for name in step.state.fields:
                value = getattr(step.state, name)
                setattr(copy, name, rest.pop(0).view(value.shape).to(value.dtype))
            states[id(step)] = copy
        generator = torch.Generator().manual_seed(int(rest.pop(0))) if seeded else plan.generator
        plan = dataclasses.replace(plan, steps=[_Step(s.method, s.options, states.get(id(s))) for s in plan.steps],
                                   losses=losses, generator=generator)
    divisor = rest.pop(0).square() if scale is not None else None
    if as_is:
        gram = Gram(raw_h, noise, None, bool(torch.isfinite(raw_h).all()))
    else:
        gram = prepared(raw_h, dtype, noise, None if given else lambda: rescaled(detached, dtype).to("cpu"))
    if _eager_checks(check_finite, detached[0], free=True):
        if gram.finite is None:
            gram = gram._replace(finite=bool(torch.isfinite(torch.diagonal(gram.g)).all()))
        if not gram.finite:
            if given:
                raise NonFiniteError("the Gramian holds NaN or Inf; pass check_finite=False to skip this check")
            _raise_non_finite(leaves)
    if divisor is not None:
        gram = gram._replace(g=gram.g / divisor)
    out = compute(plan, gram)
    if plan is not None:
        for original, step in zip(stateful, [s for s in plan.steps if s.state is not None]):
            for name in original.state.fields:
                getattr(original.state, name).copy_(getattr(step.state, name), non_blocking=True)
    shapes = [o.shape for o in out]
    back = torch.cat([o.reshape(-1) for o in out]).to(device, non_blocking=True)
    return [b.view(shape) for b, shape in zip(back.split([o.numel() for o in out]), shapes)]


# --- public API ----------------------------------------------------------------------------------


def aggregate(jac: Any, method: Any = "upgrad", *, normalize: Normalize = None,
              generator: torch.Generator | None = None, state: Any = None, losses: torch.Tensor | None = None,
              grad_normalizer: Normalizer = None, check_finite: CheckFinite = None, group: Any = None,
              cross: Any = None, scaler: Any = None, **options: Any) -> Any:
    """Combines K task gradients into one: ``d = Σ_i w_i g_i`` for a weighting method.

    Args:
        jac: the per-task Jacobian, a Tensor [K, ...] or a pytree (dict, list, tuple, nested) of
            tensors sharing the leading K, as ``torch.func.vmap(torch.func.grad(f))`` returns it.
            A 1-D leaf [K] (a scalar parameter) gives a 0-dim result. A list of K per-task
            gradients without the leading K (a loop over ``torch.autograd.grad``) is not this
            layout, since a list is read as a pytree: stack it with ``gradagg.stack_gradients``.
        method: a name from ``gradagg.methods()`` (aliases accepted), or a chain of per-task
            transforms applied in order and then summed: a sequence of names or (name, options)
            pairs, such as ``("pcgrad", "nsgd")``. graddrop or trimmed_mean may end a chain.
        normalize: None keeps the method's scale; "sum" rescales d to ‖Σ_i g_i‖, as the old
            hook-based module did.
        generator: a ``torch.Generator`` on jac's device for the random methods (ignored by the others).
        state: the state of a stateful method, from ``gradagg.init``; for a chain with several
            stateful methods, a sequence of their states in chain order. Advanced in place.
        losses: the task losses, a Tensor [K], for ``gradnorm_loss`` and the loss normalisers.
        grad_normalizer: divide each task gradient first by its norm ("l2"), its loss ("loss"),
            both ("loss+") or nothing ("none", None), as the MGDA-UB code did. Weighting methods
            and chains only; the returned weights include the division.
        check_finite: in eager mode, raise ``NonFiniteError`` naming the tasks whose gradients hold
            NaN or Inf (one flag is read per call). Off, or under ``torch.compile``, non-finite input
            gives NaN output, never a finite number.
        group: a ``torch.distributed`` process group whose ranks each hold some columns (parameter
            shards) of J: the K x K Gramian is all-reduced and each rank returns its shard of the
            result. See ``gradagg.distributed``.
        cross: for the methods that weight a cross-Gramian (``uses_cross`` in ``gradagg.methods()``:
            sdmgrad, modo): ``(jac_a, jac_b)``, the Jacobians of two independent mini-batches with
            jac's structure, or their cross-Gramian ``gradagg.cross_gramian(jac_a, jac_b)``. ``jac``
            is then the Jacobian the step combines (a third batch, or the two batches' mean).
        scaler: mixed precision: the ``torch.amp.GradScaler`` whose scaled losses gave jac (or the
            loss scale s itself, a number or a 0-dim tensor). s is divided out before weighting, so
            the weights and states are those of the unscaled J, and the result is returned times s,
            for ``scaler.step`` to unscale with the other gradients. A J holding NaN or Inf (an
            overflow, which the scaler skips) raises nothing: the result is NaN and every state is
            left as it was. ``losses`` stay unscaled. See ``gradagg.amp``.
        **options: the method's options, see ``gradagg.methods()``.

    Returns:
        The combined gradient with jac's structure, leaves without the leading K, in each leaf's
        dtype (float16/bfloat16 are computed in float32). Differentiable in jac with the weights
        held constant.
    """
    route = None if scaler is None else _scale_route(method, cross, normalize)
    if route is not None and route != "gramian":  # per-coordinate methods and cross-Gramians see J itself
        return amp.scaled_call(aggregate, jac, method, scaler, route, dict(
            normalize=normalize, generator=generator, state=state, losses=losses, grad_normalizer=grad_normalizer,
            check_finite=check_finite, group=group, cross=cross, **options))
    leaves, tree, k = _flatten(jac)
    packed = _pack(leaves, k)
    if packed is not None:  # a small pytree: one [K, D] buffer costs less than a dispatch per leaf
        d = aggregate(packed, method, normalize=normalize, generator=generator, state=state, losses=losses,
                      grad_normalizer=grad_normalizer, check_finite=check_finite, group=group, cross=cross,
                      scaler=scaler, **options)
        return _unflatten(_unpack(d, leaves, k), tree)
    device = leaves[0].device
    plan = _make_plan(method, k, device, normalize, generator, state, losses, grad_normalizer, options)
    plan, group = _distribute(plan, group, device)
    dtype = accumulation_dtype([leaf.dtype for leaf in leaves])
    if cross is not None or _crossed(plan):
        if _eager_checks(check_finite, leaves[0]):  # J itself, before the cross-Gramian's state moves
            _check_before_state(leaves, leaves, group)
        w = _cross_weights(plan, cross, leaves, normalize, check_finite, group)
        return _unflatten(_combine(w, leaves, dtype, group)[0], tree)
    if plan.tail is None:
        if plan.simple and plan.steps[0].method.fixed and normalize is None:
            w, formed = _fixed_weights(plan.steps[0].method, k, device), False
            raw = w  # d = wᵀ(s J) = s d: nothing to unscale
        elif scaler is not None:  # the leaves are s J: G / s², and d = wᵀ(s J) in the scaled units
            raw, w, formed = _scaled_weights(leaves, plan, normalize, check_finite, group, scaler, state)
            check_finite = False
        else:
            raw, w, formed = _weights(leaves, plan, normalize, check_finite, group)
        out, finite = _combine(w, leaves, dtype, group)
        if w is not raw and torch.is_grad_enabled() and any(leaf.requires_grad for leaf in leaves):
            # The value combines the cleaned weights; the derivative in J is still the method's own
            # w, as ``weights`` returns it (the two differ by a v with Jᵀv = 0).
            rest = _combine(raw - w, leaves, dtype, group)[0]
            out = [o + (r - r.detach()) for o, r in zip(out, rest)]
        if not formed and _eager_checks(check_finite, leaves[0]):
            if finite is None:
                _check_output(out, leaves, group)
            elif not finite:
                _raise_non_finite(leaves, group)
        return _unflatten(out, tree)
    rows = [_rows(leaf, dtype) for leaf in leaves]
    if plan.steps or plan.normalizer is not None:
        if group is None and _host_route(leaves[0], plan):
            c = _host_stage(leaves, plan, check_finite, lambda p, gram: [_coefficients(p, gram.g, gram.noise)])[0]
        else:
            gram = _gramian_and_finite(leaves, check_finite, group)
            c = _coefficients(plan, gram.g, gram.noise)
        rows = [c.to(dtype) @ r for r in rows]
    gen = plan.generator
    if group is not None and plan.tail.method.random:  # per-coordinate draws: a stream per rank
        gen = distributed.coordinate_generator(gen, group, device)
    if plan.tail.state is not None and _eager_checks(check_finite, leaves[0]):
        # A stateful tail would take NaN into its state before the output check could raise.
        _check_before_state(rows, leaves, group)
    ctx = Context(generator=gen, losses=plan.losses, state=plan.tail.state, group=group)
    combine = cast("Callable[..., list[torch.Tensor]]", plan.tail.method.combine)  # a per-coordinate tail's
    combined = combine(rows, ctx, **plan.tail.options)
    if normalize == "sum":
        original = [_rows(leaf, dtype) for leaf in leaves]
        squares = torch.stack([torch.stack([r.sum(0).square().sum() for r in original]).sum(),
                               torch.stack([c.square().sum() for c in combined]).sum()]).to(torch.float64)
        if group is not None:
            squares = distributed.all_reduce_sum(squares, group)
        target, norm = squares.sqrt()
        scale = torch.where(norm > 0, target / torch.where(norm > 0, norm, 1.0), 0.0).to(dtype)
        combined = [c * scale for c in combined]
    out = [c.to(leaf.dtype).reshape(leaf.shape[1:]) for c, leaf in zip(combined, leaves)]
    if _eager_checks(check_finite, leaves[0]):
        _check_output(combined, leaves, group)
    return _unflatten(out, tree)


def _distribute(plan: _Plan, group: Any, device: torch.device) -> tuple[_Plan, Any]:
    """Validates ``group``; gives random methods a generator that draws alike on every rank."""
    if group is None:
        return plan, None
    group = distributed.check_group(group)
    random = any(step.method.random for step in plan.steps) or (plan.tail is not None and plan.tail.method.random)
    if group is not None and random:
        plan = dataclasses.replace(plan, generator=distributed.shared_generator(plan.generator, group, device))
    return plan, group


def _check_before_state(tensors: list[torch.Tensor], leaves: list[torch.Tensor], group: Any) -> None:
    """Raises ``NonFiniteError`` (on every rank of ``group``) if ``tensors`` (J's rows, or their
    transform) hold NaN or Inf: a check made before a state moves, which the output check comes too
    late for."""
    bad = not bool(amp.all_finite(tensors))
    if group is not None:
        bad = distributed.any_flag(bad, group, leaves[0].device)
    if bad:
        _raise_non_finite(leaves, group)


def _check_output(out: list[torch.Tensor], leaves: list[torch.Tensor], group: Any = None) -> None:
    """Where G was not formed: every result here (wᵀJ, and graddrop and the trimmed mean, which
    start from column sums) turns a NaN or Inf of J into a non-finite entry, and one sum reads
    that in a pass over the output, far cheaper than a pass over J. Only then is J searched, to
    name the tasks (an overflow of a finite J finds none and passes)."""
    sums = [(o.detach() if o.dtype in (torch.float32, torch.float64) else o.detach().float()).sum() for o in out]
    bad = not bool(torch.isfinite(sums[0] if len(sums) == 1 else torch.stack(sums).sum()))
    if group is not None:
        bad = distributed.any_flag(bad, group, leaves[0].device)
    if bad:
        _raise_non_finite(leaves, group)


def weights(jac: Any, method: Any = "upgrad", *, normalize: Normalize = None,
            generator: torch.Generator | None = None, state: Any = None, losses: torch.Tensor | None = None,
            grad_normalizer: Normalizer = None, check_finite: CheckFinite = None, group: Any = None,
            cross: Any = None, scaler: Any = None, **options: Any) -> torch.Tensor:
    """The weights w [K] such that ``aggregate`` returns Σ_i w_i g_i (weighting methods and chains).

    Takes the same arguments as ``aggregate`` and advances a state the same way. Returns a
    detached float64 tensor on jac's device. graddrop and trimmed_mean act per coordinate and have
    no such weights; they raise ValueError. With ``scaler=`` (see ``aggregate``) the weights are
    those of the unscaled J, and NaN where J overflowed (the states then stay as they were).
    """
    if scaler is not None and _scale_route(method, cross, normalize) != "gramian":  # a cross-Gramian
        return cast(torch.Tensor, amp.scaled_call(weights, jac, method, scaler, "weights", dict(
            normalize=normalize, generator=generator, state=state, losses=losses, grad_normalizer=grad_normalizer,
            check_finite=check_finite, group=group, cross=cross, **options)))
    leaves, _, k = _flatten(jac)
    plan = _make_plan(method, k, leaves[0].device, normalize, generator, state, losses, grad_normalizer, options)
    _require_weighting(plan)
    plan, group = _distribute(plan, group, leaves[0].device)
    if cross is not None or _crossed(plan):
        return _cross_weights(plan, cross, leaves, normalize, check_finite, group)
    if scaler is not None:
        return _scaled_weights(leaves, plan, normalize, check_finite, group, scaler, state)[0]
    return _weights(leaves, plan, normalize, check_finite, group)[0]


def _scale_route(method: Any, cross: Any, normalize: Normalize) -> str:
    """How ``scaler=`` divides the loss scale s out of a call (see ``gradagg.amp``): "gramian" for
    the weightings of G (G / s² once formed), "homogeneous" for a stateless per-coordinate method
    (positively homogeneous, f(s J) = s f(J) exactly for a power of two s: it runs on s J), "copy"
    for the others (K x D states, cross-Gramians: they get J / s)."""
    try:
        elements = _elements(method, {})
    except (TypeError, ValueError):
        return "copy"  # the call itself raises the error
    if cross is None and all(m.weighting and not m.uses_cross for m, _ in elements):
        return "gramian"
    stateless = not any(m.weighting or m.stateful or m.uses_cross or m.uses_losses for m, _ in elements)
    return "homogeneous" if len(elements) == 1 and stateless and cross is None and normalize is None else "copy"


def _scaled_weights(leaves: list[torch.Tensor], plan: _Plan, normalize: Normalize, check_finite: CheckFinite,
                    group: Any, scaler: Any, state: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``_weights`` of J from its scaled leaves s J, with ``aggregate``'s ``scaler=`` contract: no
    error on an overflow, whose weights are NaN (a non-finite G gives non-finite weights), and the
    states as they were before the call wherever the weights are not finite."""
    amp.check_finite_with_scaler(check_finite)
    snapshot = amp.Snapshot(state)
    scale = amp.loss_scale(scaler, leaves[0].device)
    raw, w, formed = _weights(leaves, plan, normalize, False, group, scale)
    if snapshot.saved:
        snapshot.restore_where(~torch.isfinite(raw).all())
    return raw, w, formed


def weights_from_gramian(gramian: torch.Tensor, method: Any = "upgrad", *, normalize: Normalize = None,
                         generator: torch.Generator | None = None, state: Any = None,
                         losses: torch.Tensor | None = None, grad_normalizer: Normalizer = None,
                         check_finite: CheckFinite = None, noise: float | None = None, scaler: Any = None,
                         **options: Any) -> torch.Tensor:
    """The weights w [K] of a weighting method (or chain), from a precomputed Gramian G = J Jᵀ.

    For Gramians computed elsewhere: with respect to shared features (MGDA-UB), all-reduced over
    parameter shards, or by another engine. Returns float64 on G's device; ``Σ_i w_i g_i`` is then
    the combined gradient.

    ``noise`` is δ, the rounding of each entry G_ij relative to ‖g_i‖‖g_j‖, from which every rank
    decision is taken (see "Numerics" in the README). By default it is that of a Gramian
    accumulated in G's dtype over 2¹⁵ columns (float32 for float32, bfloat16 and float16 G). For a
    float64 G that was accumulated in float32 elsewhere, pass ``gradagg.gramian_noise(jac)`` or
    your own bound; ``gradagg.gramian`` already removes the null space its floor cannot resolve.

    With ``scaler=`` (a ``torch.amp.GradScaler`` or the loss scale s, see ``aggregate``), G is the
    Gramian of the scaled Jacobian s J and is divided by s² before weighting; a G holding NaN or Inf
    gives NaN weights and leaves the states as they were.
    """
    if scaler is not None:
        return amp.scaled_gramian_weights(weights_from_gramian, gramian, method, scaler, dict(
            normalize=normalize, generator=generator, state=state, losses=losses, grad_normalizer=grad_normalizer,
            check_finite=check_finite, noise=noise, **options))
    if not isinstance(gramian, torch.Tensor):
        raise TypeError(f"gramian must be a torch.Tensor, got {type(gramian).__name__}")
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise ValueError(f"gramian must be a square K x K matrix with K ≥ 1, got shape {tuple(gramian.shape)}")
    if gramian.is_complex() or not gramian.is_floating_point():
        raise TypeError(f"gramian must be real floating point, got dtype {gramian.dtype}")
    if noise is None:
        noise = default_noise(gramian.dtype)
    elif isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise < 0.01:
        raise ValueError(f"noise must be a float in [0, 0.01) (the relative rounding of G's entries), got {noise!r}")
    k = gramian.shape[0]
    plan = _make_plan(method, k, gramian.device, normalize, generator, state, losses, grad_normalizer, options)
    _require_weighting(plan)
    g = gramian.detach().to(torch.float64)
    if _crossed(plan):
        return _weights_from_cross(plan, g, float(noise), normalize, check_finite)
    if _host_route(g, plan):
        return _host_stage([g], plan, check_finite, lambda p, gram: [_from_gramian(p, gram, normalize)],
                           given=(g, float(noise)))[0]
    if _eager_checks(check_finite, g) and not bool(torch.isfinite(g).all()):
        raise NonFiniteError("the Gramian holds NaN or Inf; pass check_finite=False to skip this check")
    g, proj = clean(g, float(noise))
    return _from_gramian(plan, Gram(g, float(noise), proj), normalize)


def _from_gramian(plan: _Plan, gram: Gram, normalize: Normalize) -> torch.Tensor:
    return _weights_from_g(plan, gram, normalize) + 0.0 * gram.g.sum()


def _crossed(plan: _Plan) -> bool:
    return bool(plan.steps) and plan.steps[0].method.uses_cross


def _cross_weights(plan: _Plan, cross: Any, leaves: list[torch.Tensor], normalize: Normalize,
                   check_finite: CheckFinite, group: Any) -> torch.Tensor:
    """The weights of a cross-Gramian method, from ``cross`` (two Jacobians or their A)."""
    k = leaves[0].shape[0]
    if not _crossed(plan):
        names = ", ".join(n for n, m in all_methods().items() if m.uses_cross)
        raise ValueError(f"cross= is for the methods that weight a cross-Gramian of two batches ({names}); "
                         f"this method weights the Gramian of jac")
    name = plan.steps[0].method.name
    if cross is None:
        raise ValueError(f"{name!r} weights the cross-Gramian A = J_a J_bᵀ of two independent mini-batches: pass "
                         f"cross=(jac_a, jac_b), their Jacobians, or cross=gradagg.cross_gramian(jac_a, jac_b); "
                         f"jac is the Jacobian of the step")
    if isinstance(cross, torch.Tensor):
        if cross.shape != (k, k):
            raise ValueError(f"cross= as a Tensor is the K x K cross-Gramian; expected shape ({k}, {k}), got "
                             f"{tuple(cross.shape)}")
        a, noise = cross.detach().to(device=leaves[0].device, dtype=torch.float64), default_noise(cross.dtype)
    elif isinstance(cross, (tuple, list)) and len(cross) == 2:
        a_leaves, b_leaves = _cross_pair(cross[0], cross[1])
        if a_leaves[0].shape[0] != k:
            raise ValueError(f"cross= holds Jacobians with K={a_leaves[0].shape[0]} rows, but jac has K={k}")
        a, noise = _cross_products(a_leaves, b_leaves), noise_of([x.detach() for x in a_leaves])
        if group is not None:
            a = distributed.all_reduce_sum(a, group)
    else:
        raise TypeError(f"cross= must be a pair (jac_a, jac_b) or a K x K Tensor, got {type(cross).__name__}")
    return _weights_from_cross(plan, a, noise, normalize, check_finite)


def _weights_from_cross(plan: _Plan, a: torch.Tensor, noise: float, normalize: Normalize,
                        check_finite: CheckFinite) -> torch.Tensor:
    if normalize is not None:
        raise ValueError(f"normalize={normalize!r} rescales by the Gramian of jac, which a cross-Gramian method "
                         f"does not form; rescale the result yourself")
    if plan.normalizer is not None:
        raise ValueError("grad_normalizer divides the rows of G, which a cross-Gramian method does not form")

    def compute(p: _Plan, gram: Gram) -> list[torch.Tensor]:
        step = p.steps[0]
        ctx = Context(generator=p.generator, state=step.state, losses=p.losses, noise=gram.noise)
        w = cast(_Weighting, step.method.weighting)(gram.g, ctx, **step.options)  # (a cross method: a weighting)
        return [w + 0.0 * gram.g.sum()]  # non-finite A never gives finite weights

    if _host_route(a) or _device.on_triton(a):  # (no kernel: one round trip to the host)
        return _host_stage([a], plan, check_finite, compute, given=(a, noise), as_is=True)[0]
    if _eager_checks(check_finite, a) and not bool(torch.isfinite(a).all()):
        raise NonFiniteError("the cross-Gramian holds NaN or Inf; pass check_finite=False to skip this check")
    return compute(plan, Gram(a, noise))[0]


def _cross_pair(jac_a: Any, jac_b: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    a_leaves, a_tree, _ = _flatten(jac_a)
    b_leaves, b_tree, _ = _flatten(jac_b)
    if a_tree != b_tree or len(a_leaves) != len(b_leaves):
        raise ValueError("the two Jacobians of a cross-Gramian must have one structure (the same parameters)")
    for i, (x, y) in enumerate(zip(a_leaves, b_leaves)):
        if x.shape != y.shape or x.device != y.device:
            raise ValueError(f"leaf {i} of the two Jacobians differs: {tuple(x.shape)} on {x.device} vs "
                             f"{tuple(y.shape)} on {y.device}")
    return a_leaves, b_leaves


def _cross_products(a_leaves: list[torch.Tensor], b_leaves: list[torch.Tensor]) -> torch.Tensor:
    """Σ_l J_a,l J_b,lᵀ in float64, from products over chunks of ``CHUNK`` columns in the
    accumulation dtype (the rounding of ``gramian``)."""
    from ._numerics import CHUNK

    dtype = accumulation_dtype([x.dtype for x in a_leaves] + [y.dtype for y in b_leaves])
    k = a_leaves[0].shape[0]
    total = torch.zeros(k, k, dtype=torch.float64, device=a_leaves[0].device)
    for x, y in zip(a_leaves, b_leaves):
        rx, ry = _rows(x.detach(), dtype), _rows(y.detach(), dtype)
        for start in range(0, rx.shape[1], CHUNK):
            total += (rx[:, start:start + CHUNK] @ ry[:, start:start + CHUNK].T).to(torch.float64)
    return total


def cross_gramian(jac_a: Any, jac_b: Any) -> torch.Tensor:
    """The K x K cross-Gramian A = J_a J_bᵀ = Σ_leaves J_a,l J_b,lᵀ of two Jacobians with one structure
    (the same parameters, two independent mini-batches), in float64 on their device.

    A_ij = <g_i(batch a), g_j(batch b)> is an unbiased estimate of <∇L_i, ∇L_j> where the batches
    are independent, which the Gramian of one batch is not. It is neither symmetric nor positive
    semidefinite, and is used as it is (sdmgrad, modo: ``aggregate(jac, method, cross=...)``).
    """
    a_leaves, b_leaves = _cross_pair(jac_a, jac_b)
    return _cross_products(a_leaves, b_leaves)


def gramian(jac: Any, *, check_finite: CheckFinite = None, group: Any = None) -> torch.Tensor:
    """The K x K Gramian G = J Jᵀ = Σ_leaves J_l J_lᵀ, in float64 on jac's device.

    Accumulated leaf by leaf (no K x D copy) in float32 (float64 for float64 input) by products over
    chunks of 2¹⁴ columns added in float64, and formed again with exact power-of-two scaling when
    squares would overflow or underflow float32. The eigenvalues of S G S (S = diag(1/‖g_i‖)) within
    the accumulation's noise floor are then removed (see ``gramian_noise``), which leaves G positive
    semidefinite with the null space the data determines.
    """
    leaves, _, _ = _flatten(jac)
    return _checked_gramian(leaves, check_finite, distributed.check_group(group)).g


def gramian_noise(jac: Any) -> float:
    """δ: the rounding of each entry of ``gramian(jac)`` relative to ‖g_i‖‖g_j‖, from the dtypes and
    the width D of ``jac`` (the rule is in the README's "Numerics"). Reads only shapes and dtypes."""
    leaves, _, _ = _flatten(jac)
    return noise_of(leaves)


def init(method: Any, num_tasks: int, *, device: torch.device | str | None = None,
         dtype: torch.dtype = torch.float64, **options: Any) -> Any:
    """A fresh state for a stateful method, to pass to ``aggregate``/``weights`` as ``state=``.

    Without ``device`` the state is placed on the device of the first Jacobian it is used with.
    For a chain, returns the state of its one stateful method, or a tuple of the states of its
    stateful methods in chain order when it has several. A loss weighting's name (see
    ``gradagg.scalarizations()``) gives its state for ``gradagg.scalarize``, with ``options`` the
    state's own (famo's ``lr``, uw's ``init``, ...).
    """
    if isinstance(method, str) and method.lower() not in _ALIASES:
        from . import scalarization

        if method.lower() in scalarization.known_names():
            return scalarization.init_state(method, num_tasks, device=device, dtype=dtype, **options)
    if options:
        raise ValueError(f"gradagg.init takes options only for loss weightings; a gradient method's options go to "
                         f"aggregate (for a wrapper such as crmogm, pass (name, options)); got {sorted(options)}")
    elements = _elements(method, {})
    # A state whose layout depends on the method's options (a wrapper's inner method) is built from them.
    classes = [(cast("type[State]", m.state_class), opts) for m, opts in elements if m.stateful]
    states = [cls.from_options(opts, num_tasks, device=device, dtype=dtype)
              if hasattr(cls, "from_options") else cls(num_tasks, device=device, dtype=dtype)
              for cls, opts in classes]
    if not states:
        names = ", ".join(m.name for m, _ in elements)
        raise ValueError(f"{names} {'is' if len(elements) == 1 else 'are'} stateless and needs no state; stateful "
                         f"methods: {', '.join(n for n, m in all_methods().items() if m.stateful)}")
    return states[0] if len(states) == 1 else tuple(states)


def is_weighting(method: Any) -> bool:
    """Whether ``method`` (a name or a chain) returns Σ_i w_i g_i, i.e. has ``weights``."""
    return _elements(method, {})[-1][0].is_weighting


def methods() -> dict[str, MethodInfo]:
    """Every method by name: aliases, whether it is a weighting, stateful or random, and its options."""
    return {name: info(m) for name, m in sorted(all_methods().items())}


def _require_weighting(plan: _Plan) -> None:
    if plan.tail is not None:
        name = plan.tail.method.name
        raise ValueError(f"method {name!r} acts coordinate by coordinate on J (or on a K x D state built from it), "
                         f"so no weight vector w of the current J gives its result as Σ w_i g_i; use "
                         f"gradagg.aggregate(jac, method={name!r})")
