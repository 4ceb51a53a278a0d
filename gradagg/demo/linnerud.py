"""A real three-task Jacobian: a linear model on scikit-learn's bundled Linnerud data.

Three exercise variables (chins, situps, jumps) predict three physiological targets (weight, waist,
pulse); each target is a task with its own mean-squared-error loss. A shared tanh layer of width 4
feeds one linear head per task, so the tasks compete for the shared weights. The per-task
Jacobian comes from ``vmap(grad)`` over the task index, exactly as a user would build it, and
every method combines it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import gradagg

TASKS = ("weight", "waist", "pulse")


Losses = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _problem(seed: int) -> tuple[dict[str, torch.Tensor], Losses]:
    from sklearn.datasets import load_linnerud

    data = load_linnerud()
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean(0)) / y.std(0)
    gen = torch.Generator().manual_seed(seed)
    params = {"shared.weight": 0.8 * torch.randn(4, 3, generator=gen, dtype=torch.float64),
              "shared.bias": 0.1 * torch.randn(4, generator=gen, dtype=torch.float64),
              "heads": 0.8 * torch.randn(3, 4, generator=gen, dtype=torch.float64)}

    def all_losses(p: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = torch.tanh(x @ p["shared.weight"].T + p["shared.bias"])
        return ((hidden @ p["heads"].T - y) ** 2).mean(0)

    return params, all_losses


def linnerud_losses(seed: int = 0) -> torch.Tensor:
    params, all_losses = _problem(seed)
    return all_losses(params)


def linnerud_jacobian(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(Jacobian as a dict of [3, *shape], the Gramian) at a random initial point of the model."""
    params, all_losses = _problem(seed)

    def task_loss(p: dict[str, torch.Tensor], task: torch.Tensor) -> torch.Tensor:
        return all_losses(p).gather(0, task.reshape(1)).squeeze(0)

    jac = torch.func.vmap(torch.func.grad(task_loss), in_dims=(None, 0))(params, torch.arange(3))
    return jac, gradagg.gramian(jac)


def demo_options(name: str, k: int) -> dict[str, Any]:
    """Options for the methods that need some (constant weights, Krum's f, the trim count)."""
    options: dict[str, dict[str, Any]] = {"constant": {"weights": [1.0] * k}, "krum": {"f": 0},
                                          "trimmed_mean": {"trim": 1}, "crmogm": {"inner": "upgrad"}}
    return options.get(name, {})


def table(seed: int = 0) -> str:
    jac, g = linnerud_jacobian(seed)
    k = g.shape[0]
    flat = torch.cat([leaf.reshape(k, -1) for leaf in jac.values()], 1)
    norms = flat.norm(dim=1)
    head = f"{'method':<14}{'weights':<30}{'‖d‖':>9}  " + "  ".join(f"{'cos(d,' + t + ')':>13}" for t in TASKS)
    lines = [f"Linnerud: 3 tasks ({', '.join(TASKS)}), D = {flat.shape[1]} parameters",
             "task gradient norms: " + ", ".join(f"{t} {float(n):.3f}" for t, n in zip(TASKS, norms)),
             "pairwise cosines: " + ", ".join(
                 f"{TASKS[i]}/{TASKS[j]} {float(g[i, j] / (norms[i] * norms[j])):+.3f}"
                 for i in range(k) for j in range(i + 1, k)),
             "", head, "-" * len(head)]
    losses = linnerud_losses(seed)
    for name, info in gradagg.methods().items():
        opts = demo_options(name, k)
        # Stateful methods get a fresh state: the table shows their first step.
        extra: dict[str, Any] = {"losses": losses} if info.uses_losses else {}
        if info.uses_cross:  # two independent batches' Jacobians in training; this table has one batch
            extra["cross"] = (jac, jac)
        def state(name: str = name, stateful: bool = info.stateful) -> gradagg.State | None:
            return gradagg.init([(name, demo_options(name, k))], k) if stateful else None

        # The same draws for d and for its weights, so that each row is one consistent call.
        d_tree = gradagg.aggregate(jac, name, generator=torch.Generator().manual_seed(seed), state=state(), **extra,
                                   **opts)
        d = torch.cat([d_tree[key].reshape(-1) for key in jac])
        if info.weighting:
            w = gradagg.weights(jac, name, generator=torch.Generator().manual_seed(seed), state=state(), **extra,
                                **opts)
            weights = "[" + ", ".join(f"{float(v):.3f}" for v in w) + "]"
        elif info.stateful:  # excess_mtl, moco, db_mtl: a combination that their K x D state shapes
            weights = "(from its state)"
        else:
            weights = "(per coordinate)"
        dn = d.norm()
        cos = flat @ d / (norms * dn) if float(dn) > 0 else torch.zeros(k, dtype=d.dtype)
        lines.append(f"{name:<14}{weights:<30}{float(dn):>9.4f}  " + "  ".join(f"{float(c):>+13.4f}" for c in cos))
    return "\n".join(lines)
