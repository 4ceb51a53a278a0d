"""The public functions: validation, pytree handling and dispatch to the methods.

Data path (see DESIGN.md): G = Σ_l J_l J_lᵀ (one pass over J, float64 K x K), w = weighting(G)
(K x K work only), d_l = wᵀ J_l (one more pass). The weights are computed from the detached
Jacobian, so ``aggregate`` is differentiable in J with w held constant, like a weighted loss with
detached weights.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.utils import _pytree as pytree

from . import _methods  # noqa: F401  (registers every method)
from ._gramian import accumulation_dtype, gramian_op
from ._registry import Context, Method, MethodInfo, all_methods, info, lookup, resolve_options

Normalize = Literal["sum"] | None


class NonFiniteError(ValueError):
    """The Jacobian (or Gramian) holds NaN or Inf values."""


# --- validation ----------------------------------------------------------------------------------


def _flatten(jac: Any) -> tuple[list[torch.Tensor], Any, int]:
    leaves, spec = pytree.tree_flatten(jac)
    if not leaves:
        raise ValueError("jac is empty: give a Tensor [K, ...] or a pytree of such tensors")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"every leaf of jac must be a torch.Tensor; leaf {i} is {type(leaf).__name__}")
        if leaf.is_complex() or not leaf.is_floating_point():
            raise TypeError(f"jac must be real floating point (float16/bfloat16/float32/float64); "
                            f"leaf {i} has dtype {leaf.dtype}")
        if leaf.dim() == 0:
            raise ValueError(f"leaf {i} of jac is 0-dimensional; every leaf needs a leading task dimension K")
    k = leaves[0].shape[0]
    for i, leaf in enumerate(leaves):
        if leaf.shape[0] != k:
            shapes = ", ".join(str(tuple(x.shape)) for x in leaves[:8])
            raise ValueError(f"every leaf of jac must share the leading dimension K; leaf 0 has K={k} but "
                             f"leaf {i} has {leaf.shape[0]} (shapes: {shapes}{', ...' if len(leaves) > 8 else ''})")
        if leaf.device != leaves[0].device:
            raise ValueError(f"every leaf of jac must be on one device; leaf 0 is on {leaves[0].device}, "
                             f"leaf {i} on {leaf.device}")
    if k == 0:
        raise ValueError("jac has K = 0 tasks; aggregation needs at least one task gradient")
    return leaves, spec, k


def _check_call(method: Method, k: int, device: torch.device, normalize: Any, generator: Any,
                state: Any, options: dict[str, Any]) -> dict[str, Any]:
    if normalize not in (None, "sum"):
        raise ValueError(f"normalize must be None or 'sum', got {normalize!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but jac is on {device}; "
                             f"create it with torch.Generator(device={str(device)!r})")
    if state is not None and not method.stateful:
        raise ValueError(f"method {method.name!r} is stateless and takes no state; got {type(state).__name__}")
    return resolve_options(method, options, k)


def _rows(leaf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows = leaf.reshape(leaf.shape[0], -1)
    return rows if rows.dtype == dtype else rows.to(dtype)


def _raise_non_finite(leaves: list[torch.Tensor]) -> None:
    finite = torch.stack([torch.isfinite(leaf.detach().reshape(leaf.shape[0], -1)).all(1) for leaf in leaves])
    tasks = [int(i) for i in torch.nonzero(~finite.all(0)).flatten()]
    if tasks:
        raise NonFiniteError(f"the Jacobian holds NaN or Inf in the rows of tasks {tasks}. Fix the losses, or "
                             f"pass check_finite=False to skip this check (non-finite input then gives NaN).")


def _eager_checks(check_finite: bool) -> bool:
    return check_finite and not torch.compiler.is_compiling()


# --- weights -------------------------------------------------------------------------------------


def _weights_from_g(method: Method, g: torch.Tensor, ctx: Context, opts: dict[str, Any],
                    normalize: Normalize) -> torch.Tensor:
    w = method.weighting(g, ctx, **opts)
    if normalize == "sum":
        target = g.sum().clamp_min(0).sqrt()
        norm = (w @ g @ w).clamp_min(0).sqrt()
        w = w * torch.where(norm > 0, target / torch.where(norm > 0, norm, 1.0), 0.0)
    return w


def _gramian(leaves: list[torch.Tensor], check_finite: bool) -> torch.Tensor:
    detached = [leaf.detach() for leaf in leaves]
    rescue = check_finite or detached[0].device.type == "cpu"
    return gramian_op(detached, rescue)


def _weights(leaves: list[torch.Tensor], method: Method, ctx: Context, opts: dict[str, Any],
             normalize: Normalize, check_finite: bool) -> tuple[torch.Tensor, bool]:
    """(w in float64, whether G was formed)."""
    k, device = leaves[0].shape[0], leaves[0].device
    formed = method.uses_gramian or normalize is not None
    if formed:
        g = _gramian(leaves, check_finite)
        if _eager_checks(check_finite) and not bool(torch.isfinite(torch.diagonal(g)).all()):
            _raise_non_finite(leaves)
    else:
        g = torch.zeros(k, k, dtype=torch.float64, device=device)
    w = _weights_from_g(method, g, ctx, opts, normalize)
    if formed:
        # Non-finite input must never give a finite answer, whatever a solver did with it.
        w = w + 0.0 * torch.diagonal(g).sum()
    return w, formed


# --- public API ----------------------------------------------------------------------------------


def aggregate(jac: Any, method: str = "upgrad", *, normalize: Normalize = None,
              generator: torch.Generator | None = None, state: Any = None, check_finite: bool = True,
              **options: Any) -> Any:
    """Combines K task gradients into one: ``d = Σ_i w_i g_i`` for a weighting method.

    Args:
        jac: the per-task Jacobian, a Tensor [K, ...] or a pytree (dict, list, tuple, nested) of
            tensors sharing the leading K, as ``torch.func.vmap(torch.func.grad(f))`` returns it.
        method: a name from ``gradagg.methods()`` (aliases accepted).
        normalize: None keeps the method's scale; "sum" rescales d to ‖Σ_i g_i‖, as the old
            hook-based module did.
        generator: a ``torch.Generator`` on jac's device for the random methods (ignored by the others).
        state: the state object of a stateful method.
        check_finite: in eager mode, raise ``NonFiniteError`` naming the tasks whose gradients hold
            NaN or Inf (one flag is read per call). Off, or under ``torch.compile``, non-finite input
            gives NaN output, never a finite number.
        **options: the method's options, see ``gradagg.methods()``.

    Returns:
        The combined gradient with jac's structure, leaves without the leading K, in each leaf's
        dtype (float16/bfloat16 are computed in float32). Differentiable in jac with the weights
        held constant.
    """
    spec = lookup(method)
    leaves, tree, k = _flatten(jac)
    dtype = accumulation_dtype([leaf.dtype for leaf in leaves])
    opts = _check_call(spec, k, leaves[0].device, normalize, generator, state, options)
    ctx = Context(generator=generator, state=state)
    if spec.is_weighting:
        w, formed = _weights(leaves, spec, ctx, opts, normalize, check_finite)
        wd = w.to(dtype)
        out = [(wd @ _rows(leaf, dtype)).to(leaf.dtype).reshape(leaf.shape[1:]) for leaf in leaves]
        if not formed and _eager_checks(check_finite):
            # wᵀJ turns any NaN or Inf of J into a non-finite entry; a sum reads it in one pass.
            if not bool(torch.isfinite(torch.stack([o.detach().float().sum() for o in out]).sum())):
                _raise_non_finite(leaves)
        return pytree.tree_unflatten(out, tree)
    if _eager_checks(check_finite):
        if not bool(torch.stack([torch.isfinite(leaf.detach()).all() for leaf in leaves]).all()):
            _raise_non_finite(leaves)
    rows = [_rows(leaf, dtype) for leaf in leaves]
    combined = spec.combine(rows, ctx, **opts)
    if normalize == "sum":
        target = torch.stack([r.sum(0).square().sum() for r in rows]).sum().sqrt()
        norm = torch.stack([c.square().sum() for c in combined]).sum().sqrt()
        scale = torch.where(norm > 0, target / torch.where(norm > 0, norm, 1.0), 0.0)
        combined = [c * scale for c in combined]
    out = [c.to(leaf.dtype).reshape(leaf.shape[1:]) for c, leaf in zip(combined, leaves)]
    return pytree.tree_unflatten(out, tree)


def weights(jac: Any, method: str = "upgrad", *, normalize: Normalize = None,
            generator: torch.Generator | None = None, state: Any = None, check_finite: bool = True,
            **options: Any) -> torch.Tensor:
    """The weights w [K] such that ``aggregate`` returns Σ_i w_i g_i (weighting methods only).

    Takes the same arguments as ``aggregate``. Returns a detached float64 tensor on jac's device.
    graddrop and trimmed_mean act per coordinate and have no such weights; they raise ValueError.
    """
    spec = lookup(method)
    _require_weighting(spec)
    leaves, _, k = _flatten(jac)
    opts = _check_call(spec, k, leaves[0].device, normalize, generator, state, options)
    w, _ = _weights(leaves, spec, Context(generator=generator, state=state), opts, normalize, check_finite)
    return w


def weights_from_gramian(gramian: torch.Tensor, method: str = "upgrad", *, normalize: Normalize = None,
                         generator: torch.Generator | None = None, state: Any = None,
                         check_finite: bool = True, **options: Any) -> torch.Tensor:
    """The weights w [K] of a weighting method, from a precomputed K x K Gramian G = J Jᵀ.

    For Gramians computed elsewhere: with respect to shared features (MGDA-UB), all-reduced over
    parameter shards, or by another engine. Returns float64 on G's device; ``Σ_i w_i g_i`` is then
    the combined gradient.
    """
    spec = lookup(method)
    _require_weighting(spec)
    if not isinstance(gramian, torch.Tensor):
        raise TypeError(f"gramian must be a torch.Tensor, got {type(gramian).__name__}")
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise ValueError(f"gramian must be a square K x K matrix with K ≥ 1, got shape {tuple(gramian.shape)}")
    if gramian.is_complex() or not gramian.is_floating_point():
        raise TypeError(f"gramian must be real floating point, got dtype {gramian.dtype}")
    k = gramian.shape[0]
    opts = _check_call(spec, k, gramian.device, normalize, generator, state, options)
    g = gramian.detach().to(torch.float64)
    if _eager_checks(check_finite) and not bool(torch.isfinite(g).all()):
        raise NonFiniteError("the Gramian holds NaN or Inf; pass check_finite=False to skip this check")
    return _weights_from_g(spec, g, Context(generator=generator, state=state), opts, normalize) + 0.0 * g.sum()


def gramian(jac: Any, *, check_finite: bool = True) -> torch.Tensor:
    """The K x K Gramian G = J Jᵀ = Σ_leaves J_l J_lᵀ, in float64 on jac's device.

    Accumulated leaf by leaf (no K x D copy) in float32 (float64 for float64 input), and formed
    again with exact power-of-two scaling when squares would overflow or underflow float32.
    """
    leaves, _, _ = _flatten(jac)
    g = _gramian(leaves, check_finite)
    if _eager_checks(check_finite) and not bool(torch.isfinite(torch.diagonal(g)).all()):
        _raise_non_finite(leaves)
    return g


def methods() -> dict[str, MethodInfo]:
    """Every method by name: aliases, whether it is a weighting, stateful or random, and its options."""
    return {name: info(m) for name, m in sorted(all_methods().items())}


def _require_weighting(spec: Method) -> None:
    if not spec.is_weighting:
        raise ValueError(f"method {spec.name!r} acts coordinate by coordinate on J, so no weight vector w "
                         f"gives its result as Σ w_i g_i; use gradagg.aggregate(jac, method={spec.name!r})")
