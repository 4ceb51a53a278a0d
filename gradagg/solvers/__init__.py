"""Exact K x K solvers, each also registered as an opaque ``torch.library`` operator."""

from .active_set import nnqp, nnqp_op, scaled_gramian
from .barrier import barrier_op, solve_barrier

__all__ = ["barrier_op", "nnqp", "nnqp_op", "scaled_gramian", "solve_barrier"]
