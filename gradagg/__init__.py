"""gradagg: functional, hook-free aggregation of per-task gradients for multi-task learning.

    g = gradagg.aggregate(jac, method="upgrad")

``jac`` is a per-task Jacobian (Tensor [K, ...] or a pytree of them); the result has its structure
without the leading K.
"""

from . import amp, distributed
from ._api import (
                   NonFiniteError,
                   aggregate,
                   cross_gramian,
                   gramian,
                   gramian_noise,
                   init,
                   is_weighting,
                   methods,
                   weights,
                   weights_from_gramian,
)
from ._config import Config, from_config
from ._device import get_solver, set_solver, use_solver
from ._jacfree import gramian_of
from ._registry import MethodInfo
from .scalarization import scalarizations, scalarize
from .solvers._loop import SolverError
from .state import GradNormLossState, GradNormState, GradVacState, NashMTLState, NSGDState, State
from .training import autograd_jacobian, backward, model_jacobian, set_grad, stack_gradients, task_jacobian

__version__ = "0.1.0"

__all__ = [
    "Config",
    "GradNormLossState",
    "GradNormState",
    "GradVacState",
    "MethodInfo",
    "NSGDState",
    "NashMTLState",
    "NonFiniteError",
    "SolverError",
    "State",
    "aggregate",
    "amp",
    "autograd_jacobian",
    "backward",
    "cross_gramian",
    "distributed",
    "from_config",
    "get_solver",
    "gramian",
    "gramian_noise",
    "gramian_of",
    "init",
    "is_weighting",
    "methods",
    "model_jacobian",
    "scalarizations",
    "scalarize",
    "set_grad",
    "set_solver",
    "stack_gradients",
    "task_jacobian",
    "use_solver",
    "weights",
    "weights_from_gramian",
]
