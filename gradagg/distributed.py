"""Aggregation across processes with ``torch.distributed``.

Two settings:

* **Parameter sharding** (FSDP, tensor or pipeline parallelism): each rank holds some columns of J,
  its own parameters or its shard of them. ``aggregate(jac_local, method, group=pg)`` all-reduces
  the K x K Gramian (plus, where a method needs one, a K-sized or scalar statistic), never J.
  Every rank then computes bit-identical weights from the identical Gramian and returns its own
  shard of the combined gradient, equal to the matching slice of the single-process result.
  Random weightings (random, pcgrad, gradvac) draw identically on every rank: without a
  ``generator`` a seed is broadcast from the group's first rank; with one, seed it alike on every
  rank. GradDrop and the trimmed mean act per coordinate, so each rank treats its own coordinates:
  the trimmed mean is exactly the single-process one, and GradDrop draws its per-coordinate
  uniforms from a rank-specific stream (independent across shards, as in one process, but not the
  same numbers). Stateful methods keep identical states on every rank.

* **Data parallelism** (DDP): each rank has per-task gradients on its own data. The correct recipe
  averages the per-task Jacobians across ranks first, at K times the usual gradient traffic, then
  aggregates: ``aggregate(average_jacobian(jac), method)``. Aggregating locally and then averaging
  is not the same, because aggregation is not linear in J: MGDA of the mean Jacobian is not the
  mean of the per-rank MGDA directions (each rank would balance its own noisy tasks), and the
  conflict-averse methods only guarantee J d ≥ 0 for the Jacobian they see.

``group=`` works in eager mode; collectives are not traced by ``torch.compile`` here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree


def check_group(group: Any) -> Any:
    """Validates ``group`` (None, or a process group of an initialised default group)."""
    if group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group= needs torch.distributed to be initialised (torch.distributed.init_process_group)")
    if torch.compiler.is_compiling():
        raise ValueError("group= works in eager mode only: its collectives are not traced by torch.compile")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD), "
                        f"got {type(group).__name__}")
    return group


def all_reduce_sum(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Sums ``t`` over the group (in place on a copy; returns it)."""
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def any_flag(flag: bool, group: Any, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any: keeps errors collective, so no rank is left
    waiting in a later collective for one that raised."""
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t[0] > 0)


def shared_generator(generator: torch.Generator | None, group: Any, device: torch.device) -> torch.Generator:
    """The caller's generator, or one seeded by a seed broadcast from the group's first rank."""
    if generator is not None:
        return generator
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    seed = seed.to(device)
    dist.broadcast(seed, src=dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0, group=group)
    return torch.Generator(device=device).manual_seed(int(seed[0]))


def coordinate_generator(generator: torch.Generator | None, group: Any, device: torch.device) -> torch.Generator:
    """A rank-specific stream for per-coordinate draws, derived from the shared generator."""
    base = int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64, device=device)[0])
    return torch.Generator(device=device).manual_seed((base + 1_000_003 * dist.get_rank(group)) % 2**63)


def average_jacobian(jac: Any, group: Any = None) -> Any:
    """The per-task Jacobian averaged over the ranks of a data-parallel group, in one flat all-reduce.

    Every leaf is copied into one contiguous buffer, summed across ranks and divided by the world
    size; the result has ``jac``'s structure. This is K times the traffic of ordinary data
    parallelism, which is what aggregating the true (global-batch) task gradients costs.
    """
    group = dist.group.WORLD if group is None else group
    check_group(group)
    leaves, spec = pytree.tree_flatten(jac)
    if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise TypeError("jac must be a Tensor or a pytree of tensors")
    flat = torch.cat([leaf.detach().reshape(-1) for leaf in leaves])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    out, start = [], 0
    for leaf in leaves:
        out.append(flat[start : start + leaf.numel()].view_as(leaf))
        start += leaf.numel()
    return pytree.tree_unflatten(out, spec)
