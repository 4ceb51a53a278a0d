"""Exact K x K solvers, each also registered as an opaque ``torch.library`` operator."""

from .barrier import barrier_op, solve_barrier
from .active_set import nnqp, nnqp_op, scaled_gramian

__all__ = ["barrier_op", "nnqp", "nnqp_op", "scaled_gramian", "solve_barrier"]
