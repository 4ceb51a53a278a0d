"""The two-objective toy problem of the CAGrad paper (Liu et al. 2021), also used by Nash-MTL.

Two losses on R², each a log-barrier valley where x2 > 0 and a quadratic bowl where x2 < 0,
blended by tanh gates:

    f_i(x) = c1(x) · (log max(|a_i(x)|, 5e-6) + 6) + c2(x) · q_i(x)
    a_1 = ½(−x1 − 7) − tanh(−x2),   a_2 = ½(−x1 + 3) + tanh(−x2) + 2
    q_1 = ((7 − x1)² + 0.1 (x2 + 8)²)/10 − 20,   q_2 = ((x1 + 7)² + 0.1 (x2 + 8)²)/10 − 20
    c1 = max(tanh(x2/2), 0),   c2 = max(tanh(−x2/2), 0)

Each method runs Adam on d = aggregate(∇f) from the five starting points of the paper; the
distance to the Pareto set is measured against its non-dominated points on a fine grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import gradagg

STARTS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
#: The methods of the paper's figure, and the newer families that need no positive losses (the toy
#: losses go negative): pcd (task 1 primary), the cross-Gramian methods (here one exact gradient,
#: so the "two batches" are the same), excess_mtl's K x D state and crmogm smoothing upgrad.
METHODS = ("mean", "mgda", "pcgrad", "cagrad", "upgrad", "nash_mtl", "imtl_g", "pcd", "sdmgrad", "modo",
           "excess_mtl", "crmogm")
OPTIONS: dict[str, dict[str, Any]] = {"crmogm": {"inner": "upgrad"}}
FLOOR = 5e-6


def losses(x: torch.Tensor) -> torch.Tensor:
    """The two losses at x (..., 2) -> (..., 2)."""
    x1, x2 = x[..., 0], x[..., 1]
    t = torch.tanh(-x2)
    log1 = torch.log(torch.clamp((0.5 * (-x1 - 7) - t).abs(), min=FLOOR)) + 6
    log2 = torch.log(torch.clamp((0.5 * (-x1 + 3) + t + 2).abs(), min=FLOOR)) + 6
    quad1 = ((7 - x1) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    quad2 = ((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    up = torch.clamp(torch.tanh(x2 / 2), min=0)
    down = torch.clamp(torch.tanh(-x2 / 2), min=0)
    return torch.stack([log1 * up + quad1 * down, log2 * up + quad2 * down], -1)


def pareto_points(lo: float = -10.0, hi: float = 10.0, n: int = 801) -> torch.Tensor:
    """Non-dominated points of a grid over [lo, hi]²: the Pareto set up to the grid spacing."""
    axis = torch.linspace(lo, hi, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    values = losses(grid)
    order = torch.argsort(values[:, 0])
    f2 = values[order, 1]
    best_before = torch.cat([torch.tensor([float("inf")], dtype=f2.dtype), torch.cummin(f2, 0).values[:-1]])
    return grid[order[f2 < best_before]]


def trajectories(method: str, steps: int, lr: float, seed: int) -> torch.Tensor:
    """The paths [starts, steps + 1, 2] of Adam on the aggregated direction, all starts at once."""
    x = torch.tensor(STARTS, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=lr)
    info = gradagg.methods()[method]
    options = OPTIONS.get(method, {})
    states = [gradagg.init([(method, options)], 2) if info.stateful else None for _ in STARTS]
    gen = torch.Generator().manual_seed(seed)
    jacobians = torch.func.vmap(torch.func.jacrev(losses))
    path = [x.detach().clone()]
    for _ in range(steps):
        jac = jacobians(x.detach())  # [starts, 2 tasks, 2 coordinates]
        x.grad = torch.stack([gradagg.aggregate(j, method, state=st, generator=gen,
                                                cross=(j, j) if info.uses_cross else None, **options)
                              for j, st in zip(jac, states)])
        optimizer.step()
        path.append(x.detach().clone())
    return torch.stack(path, 1)


def run(out_dir: Path, seed: int = 0, steps: int = 700, lr: float = 0.05,
        progress: Callable[[int, int, str], None] | None = None) -> str:
    """Runs every method from every start, saves the plot, returns the table as text."""
    pareto = pareto_points()
    rows: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    paths: dict[str, list[torch.Tensor]] = {}
    start_time = time.perf_counter()
    for i, method in enumerate(METHODS):
        paths[method] = list(trajectories(method, steps, lr, seed))
        if progress:
            progress(i + 1, len(METHODS), method)
        ends = torch.stack([p[-1] for p in paths[method]])
        f = losses(ends)
        dist = torch.cdist(ends, pareto).amin(1)
        rows.append((method, f, dist))
    elapsed = time.perf_counter() - start_time
    _plot(out_dir / "toy_trajectories.png", paths, pareto)
    lines = [f"Toy problem (CAGrad/Nash-MTL): Adam lr={lr}, {steps} steps from {len(STARTS)} starts "
             f"({elapsed:.1f} s); distance to the Pareto set on a 0.025 grid",
             f"{'method':<10}" + "".join(f"{'start ' + str(k + 1):>22}" for k in range(len(STARTS))),
             f"{'':<10}" + "".join(f"{'(f1, f2) dist':>22}" for _ in STARTS)]
    for method, f, dist in rows:
        cells = "".join(f"{f'({f[k, 0]:.2f}, {f[k, 1]:.2f}) {dist[k]:.2f}':>22}" for k in range(len(STARTS)))
        lines.append(f"{method:<10}{cells}")
    return "\n".join(lines)


def _plot(path: Path, paths: dict[str, list[torch.Tensor]], pareto: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = torch.linspace(-10, 10, 201, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)
    mean_loss = losses(grid).mean(-1)
    cols = (len(paths) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(3.1 * cols, 6.4), sharex=True, sharey=True)
    axes = axes.reshape(-1)
    for ax in axes[len(paths):]:
        ax.axis("off")
    for ax, (method, trajectories) in zip(axes, paths.items()):
        ax.contourf(axis, axis, mean_loss.T, levels=30, cmap="Greys")
        ax.scatter(pareto[:, 0], pareto[:, 1], s=1, c="tab:orange", label="Pareto set")
        for traj in trajectories:
            ax.plot(traj[:, 0], traj[:, 1], c="tab:blue", lw=1.2)
            ax.scatter(traj[0, 0], traj[0, 1], c="k", s=12, zorder=3)
            ax.scatter(traj[-1, 0], traj[-1, 1], c="tab:red", s=12, zorder=3)
        ax.set_title(method)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
    axes[0].legend(loc="lower left", fontsize=7)
    fig.suptitle("Trajectories over the mean loss (black: start, red: end, orange: Pareto set)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
