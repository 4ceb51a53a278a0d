"""The public API used the way users call it, for ``make typecheck`` (mypy --strict over this file).

Every call must type-check as written, without casts or ``type: ignore``; ``assert_type`` pins the
results whose annotated type is precise (``aggregate`` and ``init`` return ``Any``: their result
depends on the pytree and the method, so users annotate it). The file also runs as a plain script
(``python tests/typecheck/public_api.py``), on a small CPU problem, so that it stays working code.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

import gradagg

if sys.version_info >= (3, 11):
    from typing import assert_type
else:  # torch requires typing_extensions, so it is installed wherever gradagg is
    from typing_extensions import assert_type

K = 3


def jacobians() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A Jacobian as one Tensor [K, D], and as a dict pytree of [K, ...] leaves."""
    gen = torch.Generator().manual_seed(0)
    jac = torch.randn(K, 5, generator=gen, dtype=torch.float64)
    tree = {"weight": torch.randn(K, 4, 2, generator=gen), "bias": torch.randn(K, 4, generator=gen)}
    return jac, tree


def weightings() -> None:
    jac, tree = jacobians()
    d: torch.Tensor = gradagg.aggregate(jac, "upgrad")
    d_tree: dict[str, torch.Tensor] = gradagg.aggregate(tree, "mgda", check_finite=True)
    assert d.shape == (5,) and d_tree["weight"].shape == (4, 2)

    w = gradagg.weights(jac, "upgrad")
    assert_type(w, torch.Tensor)
    g = gradagg.gramian(tree)
    assert_type(g, torch.Tensor)
    w_g = gradagg.weights_from_gramian(g, "cagrad", c=0.4)
    assert_type(w_g, torch.Tensor)
    assert w.shape == w_g.shape == (K,)

    chained: torch.Tensor = gradagg.aggregate(jac, ("pcgrad", "mean"), generator=torch.Generator().manual_seed(1))
    assert chained.shape == (5,)


def stateful() -> None:
    jac, _ = jacobians()
    state: gradagg.NashMTLState = gradagg.init("nash_mtl", K)
    for _ in range(2):
        d: torch.Tensor = gradagg.aggregate(jac, "nash_mtl", state=state)
        assert d.shape == (5,)
    assert_type(state.alpha, torch.Tensor)
    assert_type(state.step, torch.Tensor)
    saved = state.state_dict()
    assert_type(saved, dict[str, Any])
    state.load_state_dict(saved)
    assert_type(state.reset(), gradagg.State)


def model_training() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, K))
    x = torch.randn(16, 4)

    def task_losses(out: torch.Tensor) -> torch.Tensor:
        return (out**2).mean(0)  # [K]

    jac, losses = gradagg.model_jacobian(model, x, task_losses)
    assert_type(jac, dict[str, torch.Tensor])
    assert_type(losses, torch.Tensor)
    gradagg.set_grad(model, gradagg.aggregate(jac, "upgrad"))

    losses = task_losses(model(x))
    g = gradagg.gramian_of(losses, model, retain_graph=True)
    assert_type(g, torch.Tensor)
    assert g.shape == (K, K)
    gradagg.backward(losses, model, "upgrad")  # (its return type is not pinned here)

    weighting_state = gradagg.init("dwa", K)
    total = gradagg.scalarize(task_losses(model(x)), "dwa", state=weighting_state)
    assert_type(total, torch.Tensor)
    total.backward()
    weighting_state.end_epoch()


def catalogue() -> None:
    table = gradagg.methods()
    assert_type(table, dict[str, gradagg.MethodInfo])
    info = table["upgrad"]
    assert_type(info.stateful, bool)
    assert_type(info.options, dict[str, Any])
    assert_type(gradagg.is_weighting("graddrop"), bool)
    assert "upgrad" in table and not gradagg.is_weighting("graddrop")


def data_parallel_step(jac: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Type-checked only: it needs an initialised process group."""
    averaged: dict[str, torch.Tensor] = gradagg.distributed.average_jacobian(jac)
    d: dict[str, torch.Tensor] = gradagg.aggregate(averaged, "upgrad")
    return d


def main() -> None:
    weightings()
    stateful()
    model_training()
    catalogue()
    print("public API: ok")


if __name__ == "__main__":
    main()
