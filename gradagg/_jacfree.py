"""The Gramian G = J Jᵀ of the losses' Jacobian, without the Jacobian.

J is K x D (one row per loss, one column per parameter entry). Every weighting method needs only
G, and the combined gradient Σ_i w_i g_i is one ordinary backward pass of Σ_i w_i L_i, so a
training step never needs J itself. ``gramian_of`` forms G from one backward pass over the
autograd graph the forward pass left, without changing the model and without hooks on modules:

* **Tasks (the default).** One backward pass batched over the K one-hot output gradients
  (``is_grads_batched``) carries every task's gradient through the graph at once. Each parameter's
  K gradients are folded into G as soon as the engine produces them, then dropped, so at most one
  parameter's K x |p| block exists at a time. A weight that enters a matrix product once, as
  ``x @ W`` or ``x @ Wᵀ`` (``nn.Linear``), never gets even that: its task gradients are
  ``J_k(W) = Xᵀ Δ_k`` for the product's input X (rows x in) and the task's output gradient Δ_k
  (rows x out), whence ``<J_k(W), J_l(W)> = <Δ_k, (X Xᵀ) Δ_l>``. With the QR factorisation
  ``Xᵀ = Q R`` that is the Gramian of the rows ``R Δ_k`` (rows x out), used where it is smaller
  than W; the engine then skips W's gradient altogether. An embedding table's task gradients are
  folded from its looked-up rows only. Heads that are the only consumers of one representation
  add their batched gradients of it in place (``_Pool``), where autograd would add them out of
  place.
* **Examples (``batch_dim=0``, instance-wise risk minimisation).** Where losses[b] depends only on
  example b, one plain backward pass of Σ_b L_b gives every example's output gradient at once
  (row b of Δ), and the per-example Gramian of a product's weight is ``(X Xᵀ) ⊙ (Δ Δᵀ)`` where
  X has one row per example (summed over an example's rows where X flattens [B, T, in]), that of
  its bias ``Δ Δᵀ``; a layer norm's per-example affine gradients come from its saved statistics,
  and a convolution's per-example weight gradients are formed one layer at a time. Parameters used any other way take
  the batched pass above, restricted to them. Batch normalisation in train mode mixes the examples
  and is refused with the module's name.

Autograd does the differentiation, so any model it differentiates works (dropout, in-place
operations, recurrent layers, shared parameters), and the result equals ``gradagg.gramian`` of the
explicit Jacobian up to rounding. A parameter used in several places has its contributions summed
by the engine before it reaches G.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import torch
from torch.autograd.graph import GradientEdge

from ._gramian import accumulation_dtype, clean, fast
from ._numerics import full_precision_matmul, gramian_noise

Inputs = torch.nn.Module | torch.Tensor | Iterable[torch.Tensor] | Mapping[str, torch.Tensor]

# Product nodes whose second operand can be a weight: (node type, attribute of the first operand).
_PRODUCTS = {"AddmmBackward0": "_saved_mat1", "MmBackward0": "_saved_self"}
# Nodes between a weight and its product that change nothing but layout or dtype.
_PASS = ("TBackward0", "ToCopyBackward0")
# The most rows of a product's input X that are factored (QR of Xᵀ); beyond, a weight's K gradients are formed.
_MAX_ROWS = 2048
# Entries of the rows formed at a time from a product's output gradients (4 MiB of float32).
_BLOCK = 1 << 20
_BATCH_NORM = ("NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0")


def _named_inputs(inputs: Inputs) -> list[tuple[str, torch.Tensor]]:
    items: list[tuple[str, torch.Tensor]]  # (the loop below checks that each entry is a Tensor)
    if isinstance(inputs, torch.nn.Module):
        items = [(n, p) for n, p in inputs.named_parameters() if p.requires_grad]
    elif isinstance(inputs, torch.Tensor):
        items = [("inputs", inputs)]
    elif isinstance(inputs, Mapping):
        items = [(str(n), t) for n, t in inputs.items()]
    elif isinstance(inputs, Iterable) and not isinstance(inputs, str):
        items = [(f"inputs[{i}]", t) for i, t in enumerate(inputs)]
    else:
        raise TypeError(f"inputs must be a Module, a Tensor, or an iterable or dict of tensors, got "
                        f"{type(inputs).__name__}")
    if not items:
        raise ValueError("inputs holds no tensor that requires grad: there is nothing to differentiate")
    seen: dict[int, str] = {}
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} is a {type(t).__name__}, not a Tensor")
        if not t.requires_grad:
            raise ValueError(f"{name} does not require grad, so the losses have no gradient with respect to it")
        if id(t) in seen:
            raise ValueError(f"{name} and {seen[id(t)]} are the same tensor; give each input once")
        seen[id(t)] = name
    return items


def loss_vector(losses: Any) -> torch.Tensor:
    """``losses`` if it is a 1-D Tensor [K] with K ≥ 1, else a ValueError saying so."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.shape[0] == 0:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"the losses must be a 1-D Tensor [K] with K ≥ 1 (one loss per task or example), got {shape}")
    return losses


def _check_losses(losses: Any) -> torch.Tensor:
    vec = loss_vector(losses)
    if vec.grad_fn is None:
        raise ValueError("the losses have no autograd graph (computed under torch.no_grad, detached, or from "
                         "tensors that do not require grad)")
    if not vec.is_floating_point():
        raise TypeError(f"the losses must be floating point, got {vec.dtype}")
    return vec


# --- the autograd graph ----------------------------------------------------------------------------


@dataclass
class _Graph:
    """The nodes reachable from the losses, each with its children and how many edges enter it."""

    nodes: dict[int, Any] = field(default_factory=dict)
    children: dict[int, list[Any]] = field(default_factory=dict)
    entering: dict[int, int] = field(default_factory=dict)
    leaves: dict[int, Any] = field(default_factory=dict)  # id(leaf tensor) -> its AccumulateGrad node
    slots: dict[tuple[int, int], int] = field(default_factory=dict)  # (id(node), input) -> edges entering it

    def target(self, t: torch.Tensor) -> int:
        """The id of the node where the gradient of ``t`` is captured."""
        return id(t.grad_fn) if t.grad_fn is not None else id(self.leaves.get(id(t)))


def _walk(root: Any) -> _Graph:
    graph = _Graph()
    stack = [root]
    graph.nodes[id(root)] = root
    graph.entering[id(root)] = 0
    while stack:
        node = stack.pop()
        kids = [child for child, _ in node.next_functions if child is not None]
        graph.children[id(node)] = kids
        for child, nr in node.next_functions:
            if child is not None:
                graph.slots[(id(child), nr)] = graph.slots.get((id(child), nr), 0) + 1
        if not kids and type(node).__name__ == "AccumulateGrad":
            graph.leaves[id(node.variable)] = node
        for child in kids:
            graph.entering[id(child)] = graph.entering.get(id(child), 0) + 1
            if id(child) not in graph.nodes:
                graph.nodes[id(child)] = child
                stack.append(child)
    return graph


def _leaf_behind(graph: _Graph, node: Any) -> torch.Tensor | None:
    """The leaf that ``node`` (an edge's target) feeds alone, through layout and dtype nodes that are
    entered by that edge only; None if the edge leads anywhere else."""
    while True:
        if graph.entering.get(id(node), 0) != 1:
            return None
        name = type(node).__name__
        if name == "AccumulateGrad":
            leaf: torch.Tensor = node.variable
            return leaf
        if name not in _PASS:
            return None
        kids = [child for child, _ in node.next_functions if child is not None]
        if len(kids) != 1:
            return None
        node = kids[0]


@dataclass
class _Factor:
    """A product node whose weight (and, with ``bias``, bias) is handled from Δ and X."""

    node: Any
    weight: torch.Tensor
    kind: str  # "product", "embedding", "conv" or "layer_norm"
    bias: torch.Tensor | None = None
    runs: bool = False  # whether the engine executes the node anyway (else its input is captured)


def _factors(graph: _Graph, wanted: dict[int, str], examples: int | None) -> list[_Factor]:
    """The nodes whose weight (and bias) is handled from Δ and what the node saved: matrix products
    and embeddings per task; matrix products, convolutions and layer norms per example (``examples``
    = K), where the rows of their inputs are known to be grouped by example (``_per_example_rows``)."""
    found = []
    for node in graph.nodes.values():
        name = type(node).__name__
        edges = node.next_functions
        if name in _PRODUCTS and len(edges) >= 2:
            weight = None if edges[-1][0] is None else _leaf_behind(graph, edges[-1][0])
            if weight is None or id(weight) not in wanted or weight.dim() != 2:
                continue
            bias = None
            if examples is not None:
                if _per_example_rows(getattr(node, _PRODUCTS[name]), examples) is None:
                    continue
                if name == "AddmmBackward0" and edges[0][0] is not None:
                    b = _leaf_behind(graph, edges[0][0])
                    bias = b if b is not None and id(b) in wanted and b.dim() == 1 else None
            found.append(_Factor(node, weight, "product", bias))
        elif name == "EmbeddingBackward0" and examples is None and edges[0][0] is not None:
            weight = _leaf_behind(graph, edges[0][0])
            if weight is not None and id(weight) in wanted and not bool(node._saved_sparse):
                found.append(_Factor(node, weight, "embedding"))
        elif name == "NativeLayerNormBackward0" and examples is not None and len(edges) == 3:
            if node._saved_input.shape[0] != examples:
                continue
            affine = [None if e is None else _leaf_behind(graph, e) for e, _ in edges[1:]]
            weight, b = (t if t is not None and id(t) in wanted else None for t in affine)
            if weight is not None:
                found.append(_Factor(node, weight, "layer_norm", b))
        elif name == "ConvolutionBackward0" and examples is not None and len(edges) == 3:
            weight = None if edges[1][0] is None else _leaf_behind(graph, edges[1][0])
            if weight is None or id(weight) not in wanted or bool(node._saved_transposed):
                continue
            if node._saved_input.shape[0] != examples:
                continue
            b = None if edges[2][0] is None else _leaf_behind(graph, edges[2][0])
            found.append(_Factor(node, weight, "conv", b if b is not None and id(b) in wanted else None))
    return found


def _per_example_rows(x: torch.Tensor, k: int) -> int | None:
    """How many rows of a product's 2-D input X belong to each of the K examples, where that is
    known: K rows (one each), or K·T rows that flatten a contiguous [K, T, ...] tensor (a
    sequence's tokens, example by example). Rows grouped any other way (a recurrent layer's
    time-major steps, a copy that the graph does not relate to the batch) give None."""
    if x.shape[0] == k:
        return 1
    base = x._base
    if (base is None or base.dim() < 3 or base.shape[0] != k or not base.is_contiguous() or not x.is_contiguous()
            or x.data_ptr() != base.data_ptr() or x.numel() != base.numel()):
        return None
    return x.shape[0] // k


def _mark_runs(graph: _Graph, targets: set[int], factors: list[_Factor]) -> dict[int, bool]:
    """Which factored nodes the engine executes: those with an edge leading to a captured input or
    to another factored node (whose gradient must reach it). The others have their input captured."""
    targets = targets | {id(f.node) for f in factors}
    reach: dict[int, bool] = {}
    for key, node in graph.nodes.items():  # iterative post-order over the DAG
        if key in reach:
            continue
        stack = [(node, False)]
        while stack:
            n, expanded = stack.pop()
            k = id(n)
            if k in reach:
                continue
            kids = graph.children.get(k, [])
            if not expanded:
                stack.append((n, True))
                stack.extend((c, False) for c in kids if id(c) not in reach)
                continue
            reach[k] = any(id(c) in targets or reach.get(id(c), False) for c in kids)
    for f in factors:
        f.runs = reach[id(f.node)]
    return reach


# --- the Gramian's parts ---------------------------------------------------------------------------


class _Sum:
    """G accumulated in float64 from parts each formed in the accumulation dtype."""

    def __init__(self, k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.g = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.dtype = dtype
        self.roots = _Roots()

    def rows(self, rows: torch.Tensor) -> None:
        """Adds the Gramian of K rows (any shape [K, ...])."""
        if rows.numel():
            self.g += fast([rows.detach()], self.dtype).to(torch.float64)

    def add(self, part: torch.Tensor) -> None:
        self.g += part.detach().to(torch.float64)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` detached (a saved input of the graph must not start a new one) in ``dtype``."""
    t = t.detach()
    return t if t.dtype == dtype else t.to(dtype)


class _Roots(dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]]):
    """R of the QR factorisation Xᵀ = Q R per product input X, so that Xᵀ Δ and R Δ have one
    Gramian; several products of one input (task heads on a shared representation) share it."""

    def of(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)
        if key not in self:  # (the saved inputs all exist at once, so equal keys are equal data)
            r = torch.linalg.qr(x.detach().T.to(torch.float64), mode="r")[1]
            self[key] = (x, r.to(dtype))
        return self[key][1]


def _fold_product_rows(x: torch.Tensor, delta: torch.Tensor, alpha: float, total: _Sum) -> None:
    """Adds the Gramian of J_k(W) = α Xᵀ Δ_k (x: rows x in, delta: K x rows x out), from the K
    gradients themselves or from R Δ_k (Xᵀ = Q R), whichever is smaller, formed a block of
    output columns at a time so that no more than ``_BLOCK`` entries exist beside Δ."""
    dtype = total.dtype
    n, width = x.shape
    k, _, out = delta.shape
    direct = width <= n or n > _MAX_ROWS
    left = _as(x, dtype) if direct else total.roots.of(x, dtype)
    step = max(1, _BLOCK // (k * left.shape[1 if direct else 0]))
    for start in range(0, out, step):
        d = _as(delta[..., start:start + step], dtype)
        rows = torch.matmul(d.transpose(1, 2), left) if direct else torch.matmul(left, d)
        total.rows(rows * alpha if alpha != 1 else rows)


def _unbatcher() -> Callable[[torch.Tensor, int], torch.Tensor]:
    """Inside a backward batched with ``is_grads_batched``, the physical [K, ...] tensor of a batched
    gradient (the engine's own vmap level is the innermost)."""
    level = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    return lambda t, k: torch._remove_batch_dim(t, level - 1, k, 0)


def _rebatch(t: torch.Tensor) -> torch.Tensor:
    level = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    return torch._add_batch_dim(t, 0, level - 1)


@dataclass
class _Pool:
    """Factored products that are the only consumers of one input X (task heads on a shared
    representation). The engine would add their K-batched gradients of X out of place (a batched
    gradient cannot be accumulated in place), holding three copies at once. Instead the first to
    run lets the engine compute its part, which a hook keeps a view of; the others add theirs into
    that tensor in place and pass no gradient on, so X's consumer receives the sum in one copy."""

    members: list[_Factor]
    biases: list[torch.Tensor | None]
    buffer: torch.Tensor | None = None  # [K·rows, in], the engine's tensor


def _pools(graph: _Graph, factors: list[_Factor], reach: dict[int, bool], targets: set[int],
           wanted: set[int]) -> dict[int, _Pool]:
    by_input: dict[tuple[int, int], list[tuple[_Factor, torch.Tensor | None]]] = {}
    for f in factors:
        name = type(f.node).__name__
        if f.kind != "product" or not f.runs:
            continue
        edges = f.node.next_functions
        node, nr = edges[1] if name == "AddmmBackward0" else edges[0]
        if node is None:
            continue
        bias = None
        if name == "AddmmBackward0" and edges[0][0] is not None:
            bias = _leaf_behind(graph, edges[0][0])
            if bias is None or bias.dim() != 1:
                continue  # the bias edge leads elsewhere: the engine must run the node
            bias = bias if id(bias) in wanted else None
        by_input.setdefault((id(node), nr), []).append((f, bias))
    pools = {}
    for (key, slot), members in by_input.items():
        if len(members) < 2 or graph.slots.get((key, slot), 0) != len(members):
            continue
        if key in targets or not reach.get(key, False):  # X's gradient is captured, or not needed
            continue
        pools[key] = _Pool([f for f, _ in members], [b for _, b in members])
    return pools


def _batched_pass(losses: torch.Tensor, items: list[tuple[str, torch.Tensor]], factors: list[_Factor],
                  total: _Sum, graph: _Graph, retain_graph: bool) -> None:
    """One backward pass batched over the K one-hot output gradients: every requested leaf's K x |p|
    gradient is folded into G in a hook (and replaced by a stride-0 zero so the engine keeps
    nothing); every factored product from X and its batched Δ."""
    k = losses.shape[0]
    handled = {id(f.weight) for f in factors}
    plain = [(n, t) for n, t in items if id(t) not in handled]
    targets = {graph.target(t) for _, t in plain}
    reach = _mark_runs(graph, targets, factors)
    captured_nodes = {id(f.node) for f in factors if not f.runs}
    pools = _pools(graph, factors, reach, targets | captured_nodes, {id(t) for _, t in plain})
    pooled = {id(b) for pool in pools.values() for b in pool.biases if b is not None}
    plain = [(n, t) for n, t in plain if id(t) not in pooled]  # their gradients are folded by the pool
    removers: list[Any] = []
    captured: list[_Factor] = []

    def fold_leaf(grad: torch.Tensor) -> torch.Tensor:
        rows = _unbatcher()(grad, k)
        total.rows(rows)
        return _rebatch(torch.zeros((), dtype=grad.dtype, device=grad.device).expand(rows.shape))

    def fold_feature(grad: torch.Tensor) -> None:
        total.rows(_unbatcher()(grad, k))

    def fold_product(f: _Factor) -> Callable[[tuple[torch.Tensor, ...]], None]:
        def hook(grad_outputs: tuple[torch.Tensor, ...]) -> None:
            _fold_product(f, _unbatcher()(grad_outputs[0], k), total)
        return hook

    def fold_member(pool: _Pool, i: int) -> Callable[[tuple[torch.Tensor, ...]], Any]:
        f, bias = pool.members[i], pool.biases[i]

        def hook(grad_outputs: tuple[torch.Tensor, ...]) -> Any:
            if grad_outputs[0] is None:
                return None
            delta = _unbatcher()(grad_outputs[0], k)
            _fold_product(f, delta, total)
            node = f.node
            if bias is not None:  # addmm: β Δ summed over the rows
                total.rows(delta.sum(1) * float(node._saved_beta))
            if pool.buffer is None:
                return None  # the engine computes this one's part of X's gradient (kept by ``keep``)
            alpha, mat2 = float(getattr(node, "_saved_alpha", 1)), node._saved_mat2.detach()
            pool.buffer.addmm_(delta.reshape(-1, delta.shape[-1]), mat2.T, alpha=alpha)
            return (None,)  # added to the engine's own tensor in place: no gradient to pass on
        return hook

    def keep(pool: _Pool, position: int) -> Callable[[tuple[Any, ...], tuple[Any, ...]], None]:
        def hook(grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]) -> None:
            grad = grad_inputs[position]
            if pool.buffer is None and grad is not None:
                physical = _unbatcher()(grad, k)
                if physical.is_contiguous():
                    pool.buffer = physical.view(-1, physical.shape[-1])
        return hook

    def release(pool: _Pool) -> Callable[[tuple[Any, ...]], None]:
        def hook(grad_outputs: tuple[Any, ...]) -> None:
            pool.buffer = None  # X's consumer runs: the engine's tensor is its alone, to free after
        return hook

    try:
        members = {id(f.node): (pool, i) for pool in pools.values() for i, f in enumerate(pool.members)}
        for key, pool in pools.items():
            removers.append(graph.nodes[key].register_prehook(release(pool)))
            for f in pool.members:
                position = 1 if type(f.node).__name__ == "AddmmBackward0" else 0
                removers.append(f.node.register_hook(keep(pool, position)))
        for _, t in plain:
            removers.append(t.register_hook(fold_leaf if t.grad_fn is None else fold_feature))
        for f in factors:
            if id(f.node) in members:
                removers.append(f.node.register_prehook(fold_member(*members[id(f.node)])))
            elif f.runs:
                removers.append(f.node.register_prehook(fold_product(f)))
            else:
                captured.append(f)
        edges: list[torch.Tensor | GradientEdge] = [t for _, t in plain]
        edges += [GradientEdge(f.node, 0) for f in captured]
        if not edges:
            return
        eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
        try:
            # (torch's annotation takes tensors or edges, but a list may mix them)
            grads = torch.autograd.grad(losses, edges, grad_outputs=eye, is_grads_batched=True,  # type: ignore[arg-type]
                                        retain_graph=retain_graph, allow_unused=True, materialize_grads=False)
        except RuntimeError as exc:
            compiled = sorted({type(n).__name__ for n in graph.nodes.values() if "Compiled" in type(n).__name__})
            if not compiled:
                raise
            raise RuntimeError(
                f"gramian_of batches one backward pass over the {k} losses, and the backward of a torch.compile'd "
                f"forward ({', '.join(compiled)}) cannot run batched with this backend ({exc}). Compile the forward "
                f"with backend='aot_eager', leave this step's forward uncompiled, or compute the K gradients with a "
                f"loop of torch.autograd.grad and use gradagg.stack_gradients and gradagg.aggregate") from exc
    finally:
        for r in removers:
            r.remove()
    for f, grad in zip(captured, grads[len(plain):]):
        if grad is not None:
            _fold_product(f, grad, total)


def _fold_product(f: _Factor, delta: torch.Tensor, total: _Sum) -> None:
    """Task route: the Gramian of one product's weight from Δ [K, rows, out], or of an embedding
    table's from the gradients of its looked-up rows."""
    if f.kind == "embedding":
        _fold_embedding(f.node, delta, total)
        return
    x = getattr(f.node, _PRODUCTS[type(f.node).__name__])
    alpha = float(getattr(f.node, "_saved_alpha", 1))
    _fold_product_rows(x, delta, alpha, total)


def _fold_embedding(node: Any, delta: torch.Tensor, total: _Sum) -> None:
    """J_k(E) has a row per distinct index: the sum of task k's output gradients at its lookups
    (each divided by the index's count with ``scale_grad_by_freq``; none at ``padding_idx``). Its
    Gramian needs only those U rows, not the table's V. (Finding the distinct indices reads their
    number: one synchronisation on an accelerator.)"""
    k = delta.shape[0]
    idx = node._saved_indices.reshape(-1)
    d = _as(delta, total.dtype).reshape(k, idx.numel(), -1)
    pad = int(node._saved_padding_idx)
    if pad >= 0:
        keep = idx != pad
        idx, d = idx[keep], d[:, keep]
    unique, inverse, counts = torch.unique(idx, return_inverse=True, return_counts=True)
    if bool(node._saved_scale_grad_by_freq):
        d = d / counts[inverse].to(d.dtype)[:, None]
    rows = d.new_zeros(k, unique.numel(), d.shape[-1]).index_add_(1, inverse, d)
    total.rows(rows)


# --- the per-example pass --------------------------------------------------------------------------


def _saved(node: Any) -> Any:
    """What an autograd node saved (its ``_saved_*`` attributes), read while the graph holds them."""
    return SimpleNamespace(**{name: getattr(node, name) for name in dir(node) if name.startswith("_saved_")})


def _fold_example(f: _Factor, delta: torch.Tensor, total: _Sum, k: int, node: Any) -> None:
    """Folds one factored node's per-example gradients into G; ``node`` is what it saved (``_saved``)."""
    dtype = total.dtype
    if f.kind == "product":
        x = getattr(node, _PRODUCTS[type(f.node).__name__])
        alpha = float(getattr(node, "_saved_alpha", 1))
        t = cast(int, _per_example_rows(x, k))  # (not None: checked when the factor was made)
        x, d = _as(x, dtype), _as(delta, dtype)
        n, width, out = x.shape[0], x.shape[1], d.shape[1]
        if t == 1 or n * n <= k * width * out:  # G_bb' = Σ over b's rows r, b''s rows r' of (X Xᵀ ⊙ Δ Δᵀ)_rr'
            both = (x @ x.T).to(torch.float64) * (d @ d.T).to(torch.float64)
            total.add(both.view(k, t, k, t).sum((1, 3)) * alpha**2 if t > 1 else both * alpha**2)
        else:  # each example's weight gradient Σ_r Δ_rᵀ X_r
            total.rows(torch.matmul(d.view(k, t, out).transpose(1, 2), x.view(k, t, width)) * alpha)
        if f.bias is not None:
            total.rows(d.view(k, t, out).sum(1) * float(getattr(node, "_saved_beta", 1)))
        return
    if f.kind == "layer_norm":
        x = _as(node._saved_input, torch.float64 if dtype == torch.float64 else torch.float32)
        mean, rstd = node._saved_result1.detach(), node._saved_result2.detach()
        width = math.prod(node._saved_normalized_shape)
        d = _as(delta, x.dtype).reshape(k, -1, width)
        normalised = ((x - mean) * rstd).reshape(k, -1, width)
        total.rows((d * normalised).sum(1).to(dtype))
        if f.bias is not None:
            total.rows(d.sum(1).to(dtype))
        return
    x = node._saved_input.detach()
    weight = node._saved_weight.detach()
    args = (list(node._saved_stride), list(node._saved_padding), list(node._saved_dilation), False,
            list(node._saved_output_padding), int(node._saved_groups))

    def one(xb: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        grad_weight: torch.Tensor = torch.ops.aten.convolution_backward(
            db[None], xb[None], weight, None, args[0], args[1], args[2], args[3], args[4], args[5],
            [False, True, False])[1]
        return grad_weight

    total.rows(torch.func.vmap(one)(x, delta.detach()).to(dtype))
    if f.bias is not None:
        total.rows(_as(delta, dtype).flatten(2).sum(2))


def _example_pass(losses: torch.Tensor, factors: list[_Factor], total: _Sum, retain_graph: bool) -> None:
    """One plain backward pass of Σ_b L_b that stops at the factored nodes: their input gradients
    hold every example's output gradients (row b of Δ for loss b)."""
    k = losses.shape[0]
    edges = [GradientEdge(f.node, 0) for f in factors]
    # The folds read what the factored nodes saved, which a pass without retain_graph frees: read first.
    saved = [_saved(f.node) for f in factors]
    grads = torch.autograd.grad(losses, edges, grad_outputs=torch.ones_like(losses), retain_graph=retain_graph,
                                allow_unused=True, materialize_grads=False)
    for f, grad, node in zip(factors, grads, saved):
        if grad is not None:
            _fold_example(f, grad, total, k, node)


def _refuse_batch_mixing(graph: _Graph, owners: dict[int, str], module: torch.nn.Module | None) -> None:
    for node in graph.nodes.values():
        name = type(node).__name__
        if name in _BATCH_NORM and bool(getattr(node, "_saved_training", True)):
            where = ""
            if module is not None:
                names = [n for n, m in module.named_modules()
                         if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
                if names:
                    where = f" (train-mode batch norm in the model: {', '.join(repr(n) for n in names)})"
            else:
                params = [owners[id(c.variable)] for c, _ in node.next_functions
                          if c is not None and type(c).__name__ == "AccumulateGrad" and id(c.variable) in owners]
                if params:
                    where = f" (its parameters: {', '.join(params)})"
            raise ValueError(f"batch_dim=0 needs each loss to depend on its own example only, but batch "
                             f"normalisation in train mode mixes the examples of the batch{where}. Use "
                             f"batch_dim=None (exact, one backward pass batched over the losses), put the batch "
                             f"norm in eval mode, or use a per-example normalisation (GroupNorm, LayerNorm)")


# --- public ----------------------------------------------------------------------------------------


def raw_gramian(losses: torch.Tensor, inputs: Inputs, *, batch_dim: int | None = None,
                retain_graph: bool = False) -> tuple[torch.Tensor, float]:
    """(G as accumulated, float64, not cleaned; its noise δ)."""
    losses = _check_losses(losses)
    items = _named_inputs(inputs)
    if batch_dim not in (None, 0):
        raise ValueError(f"batch_dim must be None (one loss per task) or 0 (one loss per example, the examples "
                         f"along the first dimension of every tensor), got {batch_dim!r}")
    k = losses.shape[0]
    dtypes = list({t.dtype for _, t in items})
    acc = accumulation_dtype(dtypes)
    width = sum(t.numel() for _, t in items)
    noise = gramian_noise(acc, dtypes, width)
    total = _Sum(k, acc, losses.device)
    wanted = {id(t): n for n, t in items}
    graph = _walk(losses.grad_fn)
    with full_precision_matmul():
        if batch_dim is None:
            _batched_pass(losses, items, _factors(graph, wanted, None), total, graph, retain_graph)
        else:
            module = inputs if isinstance(inputs, torch.nn.Module) else None
            _refuse_batch_mixing(graph, wanted, module)
            factors = _factors(graph, wanted, k)
            handled = {id(f.weight) for f in factors} | {id(f.bias) for f in factors if f.bias is not None}
            rest = [(n, t) for n, t in items if id(t) not in handled]
            if factors:
                _example_pass(losses, factors, total, retain_graph or bool(rest))
            if rest:
                _batched_pass(losses, rest, [], total, graph, retain_graph)
    return total.g, noise


def gramian_of(losses: torch.Tensor, inputs: Inputs, *, batch_dim: int | None = None,
               retain_graph: bool = False) -> torch.Tensor:
    """The K x K Gramian G = J Jᵀ of the Jacobian J of ``losses`` with respect to ``inputs``,
    without forming J.

    ``G_ij = <∇L_i, ∇L_j>`` summed over every input. It comes from one backward pass over the
    graph that computed ``losses`` (see the module ``gradagg._jacfree`` for how): batched over the
    K losses by default; with ``batch_dim=0``, for one loss per example (instance-wise risk
    minimisation), a plain backward pass where the model lets it. Peak memory is one parameter's
    K gradients (K x |p|) on top of the backward pass, and a weight used once in a matrix product
    (``nn.Linear``) costs only K copies of its output gradient, or its K gradients if smaller.

    Args:
        losses: a Tensor [K] with a graph: K task losses, or K per-example losses.
        inputs: what to differentiate with respect to: a Module (its parameters that require
            grad), a Tensor, or an iterable or dict of tensors (parameters or intermediate
            features).
        batch_dim: None for any losses. 0 asserts that losses[b] depends only on the b-th example,
            the examples leading every tensor of the forward pass (no batch normalisation in train
            mode, which is refused). Linear layers (on [B, in] or [B, T, in] inputs), convolutions
            and layer norms are then folded from one plain backward pass, and the Gramian costs
            about one backward pass; the other parameters take the batched pass. A tensor of your
            own that puts another dimension first ([T, B, D]) breaks the assertion.
        retain_graph: keep the graph for another backward pass (``gradagg.backward`` does).

    Returns:
        G in float64 on the losses' device, symmetrised and cleaned of the eigenvalues below the
        rounding floor of its accumulation (float32 for float32 inputs), as ``gradagg.gramian``
        returns it for the explicit Jacobian.

    Runs in eager mode: the model's forward pass may be compiled, this call is not (it hooks the
    autograd graph). Hooks that you registered on the inputs' tensors see the batched gradients.
    """
    g, noise = raw_gramian(losses, inputs, batch_dim=batch_dim, retain_graph=retain_graph)
    return clean(g, noise)[0]
