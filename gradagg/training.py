"""Hook-free training helpers: per-task Jacobians, writing the result into ``.grad``, and
aggregation at a shared representation (MGDA-UB style) with an ordinary backward pass.

Three ways to get the Jacobian J (K task gradients, one row each):

* ``task_jacobian(losses_fn, params, *args)``: torch.func (``jacrev``) over a function that
  returns the K losses from a dict of parameters; ``chunk_size`` bounds how many task gradients
  are computed at once.
* ``model_jacobian(model, inputs, losses_fn)``: the same for an ``nn.Module``, via
  ``torch.func.functional_call``.
* ``autograd_jacobian(losses, params)``: plain autograd on an ordinary graph, with
  ``torch.autograd.grad(..., is_grads_batched=True)``.

(A loop over ``torch.autograd.grad``, one call per task, gives K gradients without the leading K:
``stack_gradients`` turns them into J.)

Each returns the structure ``aggregate`` takes; ``set_grad`` puts the combined gradient into the
parameters' ``.grad`` so that any ``torch.optim`` optimizer can step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch.utils import _pytree as pytree

from . import amp
from ._api import _elements, _shapes, aggregate, is_weighting, weights, weights_from_gramian
from ._jacfree import loss_vector, raw_gramian
from ._methods.crmogm import inner_uses_losses

Params = Mapping[str, torch.Tensor] | list[torch.Tensor] | tuple[torch.Tensor, ...] | torch.nn.Module


def task_jacobian(losses_fn: Callable[..., torch.Tensor], params: dict[str, torch.Tensor], *args: Any,
                  chunk_size: int | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(J, losses): J maps each parameter name to [K, *shape], from ``losses_fn(params, *args) -> [K]``.

    Uses ``torch.func.jacrev``, one vector-Jacobian product per task, batched by vmap;
    ``chunk_size`` computes at most that many task gradients at once (memory ~ chunk_size copies
    of the parameters instead of K). The losses are returned detached.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    def with_aux(p: dict[str, torch.Tensor], *a: Any) -> tuple[torch.Tensor, torch.Tensor]:
        losses = loss_vector(losses_fn(p, *a))
        return losses, losses.detach()

    jac, losses = torch.func.jacrev(with_aux, has_aux=True, chunk_size=chunk_size)(params, *args)
    return jac, losses


def _module_in_traceback(model: torch.nn.Module, exc: BaseException) -> str | None:
    """Qualified name of the innermost submodule of ``model`` whose call ``exc`` went through."""
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    found, tb = None, exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def model_jacobian(model: torch.nn.Module, inputs: Any, losses_fn: Callable[[Any], torch.Tensor], *,
                   chunk_size: int | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(J, losses) for the trainable parameters of ``model``: ``losses_fn(model(*inputs)) -> [K]``.

    ``inputs`` is a tensor or a tuple of positional inputs. J's keys are ``model.named_parameters()``
    names. The forward runs once, whatever ``chunk_size``, so a dropout mask is shared by all tasks
    and buffers end as one ordinary ``model(*inputs)`` leaves them: in train mode, batch norm
    normalises with the batch statistics and updates its running statistics and
    ``num_batches_tracked`` once. (The forward runs on copies of the buffers; their new values are
    written back once J is computed, so an error leaves the buffers as they were.)

    Raises:
        ValueError: for a module whose forward mutates in place a tensor that is neither a
            parameter nor a buffer (torch.func cannot run it), naming the module.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    state = {name: b.detach().clone() for name, b in buffers.items()}
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def buffer_now(name: str) -> Any:
        prefix, _, leaf = name.rpartition(".")
        return getattr(model.get_submodule(prefix), leaf)

    def losses(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        # b (the copies, given to jacrev as inputs so that torch.func lets the forward update them
        # in place) is read back at the end of the forward, which also sees buffers it reassigns.
        after = dict(b)

        def read_buffers(*_: Any) -> None:
            after.update((name, buffer_now(name)) for name in b)

        handle = model.register_forward_hook(read_buffers) if b else None
        try:
            out = torch.func.functional_call(model, {**p, **b}, args)
        finally:
            if handle is not None:
                handle.remove()
        values = loss_vector(losses_fn(out))
        detached = {n: t.detach() if isinstance(t, torch.Tensor) else t for n, t in after.items()}
        return values, (values.detach(), detached)

    try:
        jac, (values, after) = torch.func.jacrev(losses, has_aux=True, chunk_size=chunk_size)(params, state)
    except RuntimeError as exc:
        name = _module_in_traceback(model, exc) if "mutate a captured Tensor" in str(exc) else None
        if name is None:
            raise
        what = f"module {name!r}" if name else "the model's own forward"
        raise ValueError(
            f"model_jacobian: {what} ({type(model.get_submodule(name)).__name__}) mutates in place a tensor that is "
            f"neither a parameter nor a buffer of the model, which torch.func cannot run ({exc}). Register that "
            f"tensor as a buffer (register_buffer) so that model_jacobian updates it as an ordinary forward would, "
            f"call model.eval() if it changes only in train mode, or compute J from an ordinary forward with "
            f"gradagg.autograd_jacobian(losses_fn(model(*inputs)), model)") from exc
    with torch.no_grad():
        for name, new in after.items():
            old = buffers[name]
            if not (isinstance(new, torch.Tensor) and new.shape == old.shape and new.dtype == old.dtype
                    and new.device == old.device):
                prefix, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(prefix), leaf, new)
            elif not torch.equal(new, old):
                old.copy_(new)
    return jac, values


def _named(params: Params) -> tuple[list[torch.Tensor], list[str] | None, bool]:
    """(tensors, names or None, is a tuple)."""
    if isinstance(params, torch.nn.Module):
        items = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        return [p for _, p in items], [n for n, _ in items], False
    if isinstance(params, Mapping):
        return list(params.values()), list(params.keys()), False
    if isinstance(params, (list, tuple)):
        return list(params), None, isinstance(params, tuple)
    if isinstance(params, Iterable):
        return list(params), None, False
    raise TypeError(f"params must be a Module, a dict of tensors or a sequence of tensors, got {type(params).__name__}")


def autograd_jacobian(losses: torch.Tensor, params: Params, *, chunk_size: int | None = None,
                      retain_graph: bool = False) -> Any:
    """J for an ordinary autograd graph: row i is ∂losses[i]/∂params.

    Returns a dict (for a Module or a dict of parameters) or a list (tuple) of [K, *shape]
    tensors, in the order of ``params``. Parameters that a loss does not reach get zeros.
    ``chunk_size`` back-propagates at most that many tasks at a time.
    """
    losses = loss_vector(losses)
    tensors, names, as_tuple = _named(params)
    k = losses.shape[0]
    eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
    step = k if chunk_size is None else chunk_size
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    parts: list[list[torch.Tensor]] = [[] for _ in tensors]
    for start in range(0, k, step):
        rows = eye[start : start + step]
        last = start + step >= k
        grads = torch.autograd.grad(losses, tensors, grad_outputs=rows, is_grads_batched=True,
                                    retain_graph=retain_graph or not last, allow_unused=True)
        for i, (grad, tensor) in enumerate(zip(grads, tensors)):
            parts[i].append(torch.zeros((rows.shape[0], *tensor.shape), dtype=tensor.dtype, device=tensor.device)
                            if grad is None else grad)
    jac = [torch.cat(p) if len(p) > 1 else p[0] for p in parts]
    if names is not None:
        return dict(zip(names, jac))
    return tuple(jac) if as_tuple else jac


def _is_none(x: Any) -> bool:
    return x is None


def stack_gradients(per_task: Sequence[Any]) -> Any:
    """J as ``aggregate`` takes it, from K per-task gradients: every leaf stacked into [K, *shape].

    A loop over ``torch.autograd.grad`` gives one gradient per task, a Tensor or a tuple (list,
    dict, nested) of tensors, one per parameter, none with a task dimension. ``aggregate`` reads a
    list as a pytree whose leaves all lead with K, so such a list must be stacked first.

    Args:
        per_task: K ≥ 1 gradients, in task order, with one structure and, leaf by leaf, one shape,
            dtype and device. A None leaf (``torch.autograd.grad(..., allow_unused=True)`` for a
            parameter that a task's loss does not reach), or a None entry for a whole task, becomes
            zeros shaped like the other tasks' gradients of that leaf.

    Returns:
        A Tensor [K, ...] for tensor entries, else the entries' structure with every leaf
        [K, *shape]; a 0-dim leaf (a scalar parameter) becomes [K]. Differentiable in the
        gradients (computed with ``create_graph=True``).

    Raises:
        ValueError: for an empty sequence; for a task whose structure, or whose leaf's shape, dtype
            or device, differs from the first task's (naming the task and the leaf); for a leaf
            that is None in every task.
        TypeError: for ``per_task`` that is not a sequence of gradients, or a leaf that is neither
            a Tensor nor None.

    Example::

        params = list(model.parameters())
        grads = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
        jac = gradagg.stack_gradients(grads)       # a tuple of [K, *p.shape]
        gradagg.set_grad(params, gradagg.aggregate(jac, "upgrad"))
    """
    if isinstance(per_task, (torch.Tensor, Mapping, str)) or not isinstance(per_task, Iterable):
        what = ("a Tensor; a Tensor [K, ...] is already stacked, give it to aggregate as it is"
                if isinstance(per_task, torch.Tensor) else f"{type(per_task).__name__}")
        raise TypeError(f"per_task must be a sequence of per-task gradients (one entry per task), got {what}")
    entries = list(per_task)
    if not entries:
        raise ValueError("stack_gradients needs at least one per-task gradient; got an empty sequence")
    flat = [None if e is None else pytree.tree_flatten_with_path(e, is_leaf=_is_none) for e in entries]
    first = next((i for i, f in enumerate(flat) if f is not None), None)
    if first is None:
        raise ValueError(f"all {len(entries)} entries of per_task are None: no task has a gradient to stack")
    found = cast("tuple[list[tuple[pytree.KeyPath, Any]], pytree.TreeSpec]", flat[first])  # (not None: found above)
    ref_paths, spec = [p for p, _ in found[0]], found[1]
    names = [f"leaf {pytree.keystr(p)}" if p else "the gradient" for p in ref_paths]
    columns: list[list[Any]] = []
    for i, f in enumerate(flat):
        if f is None:
            columns.append([None] * len(names))
            continue
        if f[1] != spec:
            paths = [pytree.keystr(p) for p, _ in f[0]]
            expected = [pytree.keystr(p) for p in ref_paths]
            diff = next((f"it has leaf {b or '(top)'} where per_task[{first}] has leaf {a or '(top)'}"
                         for a, b in zip(expected, paths) if a != b), None)
            if diff is None and len(paths) != len(expected):
                diff = f"{len(paths)} leaves where per_task[{first}] has {len(expected)}"
            shown = f"{_shapes(entries[i])} vs {_shapes(entries[first])}"
            raise ValueError(f"per_task[{i}] has a different structure from per_task[{first}]: "
                             f"{diff or 'the same leaves in other containers'} ({shown}); every task's gradient "
                             f"must have one structure (the same parameters in the same order)")
        columns.append([leaf for _, leaf in f[0]])
    out = []
    for j, name in enumerate(names):
        ref = next((c[j] for c in columns if c[j] is not None), None)
        if ref is None:
            raise ValueError(f"{name} is None for every task: no task's loss reaches that parameter "
                             f"(torch.autograd.grad(..., allow_unused=True) gives None there); leave it out "
                             f"of the inputs, or give zeros for it")
        owner = next(i for i, c in enumerate(columns) if c[j] is not None)
        for i, c in enumerate(columns):
            leaf = c[j]
            if leaf is None:
                continue
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"per_task[{i}]: {name} is a {type(leaf).__name__}; a gradient's leaves must be "
                                f"tensors (or None)")
            for what, mine, theirs in (("shape", tuple(leaf.shape), tuple(ref.shape)),
                                       ("dtype", leaf.dtype, ref.dtype), ("device", leaf.device, ref.device)):
                if mine != theirs:
                    raise ValueError(f"per_task[{i}]: {name} has {what} {mine} but per_task[{owner}] has {theirs}; "
                                     f"every task's gradient of a leaf must have the same {what}")
        out.append(torch.stack([ref.new_zeros(ref.shape) if c[j] is None else c[j] for c in columns]))
    return pytree.tree_unflatten(out, spec)


def set_grad(params: Params, grads: Any, *, accumulate: bool = False) -> None:
    """Writes ``grads`` (as ``aggregate`` returned them) into the parameters' ``.grad``.

    ``params`` and ``grads`` have the same structure: a Module or a dict with a dict of the same
    names (missing names are left alone), or sequences in the same order. With ``accumulate`` the
    gradients are added to what ``.grad`` holds.
    """
    tensors, names, _ = _named(params)
    if names is not None:
        if not isinstance(grads, Mapping):
            raise TypeError("parameters given by name need gradients as a dict of the same names")
        unknown = set(grads) - set(names)
        if unknown:
            raise ValueError(f"gradients for unknown parameters: {sorted(unknown)}")
        pairs = [(p, grads[n]) for n, p in zip(names, tensors) if n in grads]
    else:
        grads = list(grads)
        if len(grads) != len(tensors):
            raise ValueError(f"{len(grads)} gradients for {len(tensors)} parameters")
        pairs = list(zip(tensors, grads))
    for p, g in pairs:
        if g.shape != p.shape:
            raise ValueError(f"a gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")
        g = g.detach().to(dtype=p.dtype, device=p.device)
        if accumulate and p.grad is not None:
            p.grad.add_(g)
        else:
            p.grad = g.clone()


def _over_parameters(inputs: Any) -> bool:
    """Whether ``backward`` takes the parameter route: a Module, a Parameter, or a collection of
    tensors. A plain Tensor is the shared representation of the representation-level route."""
    if isinstance(inputs, torch.Tensor):
        return isinstance(inputs, torch.nn.Parameter)
    if isinstance(inputs, (torch.nn.Module, Mapping)):
        return True
    return isinstance(inputs, Iterable) and not isinstance(inputs, str)


def _needs_losses(method: Any, options: dict[str, Any]) -> bool:
    elements = _elements(method, {})
    if isinstance(method, str):
        elements = [(elements[0][0], options)]
    return (any(m.uses_losses or inner_uses_losses(opts.get("inner")) for m, opts in elements)
            or options.get("grad_normalizer") in ("loss", "loss+"))


def backward(losses: torch.Tensor, inputs: Any, method: Any = "upgrad", *, weighted_loss: bool = False,
             batch_dim: int | None = None, scaler: Any = None, **kwargs: Any) -> torch.Tensor:
    """Combines the K losses' gradients with ``method`` and back-propagates the result, in one call.

    **Parameters** (``inputs`` a Module, a Parameter, or an iterable or dict of tensors): the
    Gramian G = J Jᵀ of the losses' Jacobian with respect to ``inputs`` comes from
    ``gradagg.gramian_of`` (J is never formed), the method's weights w from G
    (``gradagg.weights_from_gramian``, ``kwargs`` are its options: ``state=``, ``generator=``,
    ``normalize=``, the method's options), and one ordinary backward pass of Σ_i w_i L_i writes
    d = Σ_i w_i ∇L_i into ``.grad`` (accumulating, as ``Tensor.backward`` does). Every tensor of the
    graph that requires grad receives the gradient of Σ_i w_i L_i, parameters outside ``inputs``
    included. ``batch_dim=0`` declares one loss per example (see ``gramian_of``). With a
    ``torch.amp.GradScaler`` as ``scaler``, the losses are scaled for the backward passes (so that
    float16 gradients do not underflow), G is divided by the scale's square before weighting, and
    ``.grad`` holds the scaled d for ``scaler.step``; an overflow gives non-finite gradients, which
    the scaler skips, and leaves every state as it was (see ``gradagg.amp``). Methods that act per
    coordinate (graddrop, trimmed_mean) need J itself and are refused: use ``gradagg.aggregate`` on a Jacobian.

    **Representation level** (``inputs`` a Tensor: the shared representation z = encoder(x) from
    which heads computed the losses, MGDA-UB style): the Jacobian of the losses with respect to z
    is aggregated into d = ∂/∂z (``kwargs`` go to ``gradagg.aggregate``), then one backward pass
    sends d into the encoder while each head receives its own task's gradient, as the old hook
    did. With ``weighted_loss=True`` (weighting methods only) it runs ``(w · losses).sum().backward()``
    instead: the same encoder gradient, but each head's gradient is scaled by its w_i. ``scaler``
    works here too: the losses are scaled for the backward passes and the weights are those of the
    unscaled Jacobian (``aggregate``'s ``scaler=``).

    Returns the weights w [K] (float64) of weighting methods, or d (graddrop, trimmed mean, at the
    representation level).
    """
    losses = loss_vector(losses)
    if _over_parameters(inputs):
        return _parameter_backward(losses, inputs, method, batch_dim, scaler, kwargs)
    if batch_dim is not None:
        raise ValueError("batch_dim applies when inputs are parameters (a Module, a Parameter, or a "
                         "collection of tensors), not to a representation-level backward")
    features = inputs
    if not isinstance(features, torch.Tensor) or not features.requires_grad:
        raise ValueError("features must be a Tensor that requires grad (the shared representation z)")
    if scaler is not None:  # scaled backward passes; the weights are those of the unscaled Jacobian
        scale = amp.loss_scale(scaler, losses.device)
        losses = losses * scale.to(losses.dtype)
        kwargs["scaler"] = scale
    jac = autograd_jacobian(losses, [features], retain_graph=True)[0]
    if is_weighting(method):
        w = weights(jac, method, **kwargs)
        if weighted_loss:
            (w.to(losses.dtype) * losses).sum().backward()
            return w
        combined = torch.tensordot(w.to(jac.dtype), jac, 1)
        result = w
    else:
        if weighted_loss:
            raise ValueError(f"{method!r} acts per coordinate and has no weights: use weighted_loss=False")
        result = combined = aggregate(jac, method, **kwargs)
    # One pass: Σ_i L_i gives each head its own gradient and z the sum Σ_i g_i; the second root
    # adds d − Σ_i g_i at z, so the encoder receives exactly d.
    torch.autograd.backward([losses.sum(), features], [None, (combined - jac.sum(0)).detach()])
    return result


def _parameter_backward(losses: torch.Tensor, inputs: Any, method: Any, batch_dim: int | None, scaler: Any,
                        options: dict[str, Any]) -> torch.Tensor:
    if not is_weighting(method):
        name = method if isinstance(method, str) else "this chain"
        raise ValueError(f"{name!r} acts coordinate by coordinate on J (or keeps a K x D state of it), so it needs "
                         f"the Jacobian itself, which "
                         f"backward over parameters never forms (it weights the losses from their Gramian). "
                         f"Compute J (gradagg.autograd_jacobian or model_jacobian), combine it with "
                         f"gradagg.aggregate(jac, {name!r}) and write it with gradagg.set_grad")
    if options.get("losses") is None and _needs_losses(method, options):
        options["losses"] = losses.detach()
    scaled, scale = losses, None
    if scaler is not None:
        scale = amp.loss_scale(scaler, losses.device)
        scaled = losses * scale.to(losses.dtype)  # what scaler.scale(losses) gives
    g, noise = raw_gramian(scaled, inputs, batch_dim=batch_dim, retain_graph=True)
    # With a scale: G of the scaled losses, s² G, divided by s²; NaN weights and untouched states on an overflow.
    w = weights_from_gramian(g, method, noise=noise, scaler=scale, **options)
    scaled.backward(w.to(scaled.dtype))
    return w
