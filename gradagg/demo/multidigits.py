"""MultiDigits: two-task classification built from scikit-learn's bundled ``load_digits``.

Each example places two 8 x 8 digits side by side (an 8 x 16 image); task 1 names the left digit,
task 2 the right one. The digits of the training and test pairs come from disjoint halves of the
data set. A shared-bottom network (two hidden layers) feeds one linear head per task. Every method
trains the same initial network for the same steps and batches. A gradient method, per step:
``model_jacobian`` gives the per-task Jacobian, ``aggregate`` combines it and ``set_grad`` hands it
to Adam. A loss weighting, per step: ``scalarize`` and one backward pass (its trainable state, if
any, in the same Adam).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import gradagg

#: Gradient weightings (per step: the Jacobian, then ``aggregate``), one of each family: G only,
#: G and the losses, a cross-Gramian of two more batches (sdmgrad, modo), the K x D states
#: (excess_mtl, moco, db_mtl) and a modifier (crmogm smoothing upgrad's weights).
METHODS = ("mean", "mgda", "pcgrad", "cagrad", "upgrad", "nash_mtl", "imtl_g", "pcd", "sdmgrad", "modo",
           "excess_mtl", "moco", "db_mtl", "crmogm")
#: Loss weightings (per step: ``scalarize`` and one backward pass), trained alike.
LOSS_METHODS = ("uw", "dwa", "famo", "geometric_mean", "imtl_l")
OPTIONS: dict[str, dict[str, Any]] = {"crmogm": {"inner": "upgrad", "alpha": 0.9}}
EPOCH = 25  # steps per "epoch" for dwa's epoch boundaries


#: (train, test), each (images [n, 128], labels [n, 2]).
Data = list[tuple[torch.Tensor, torch.Tensor]]
#: (training losses per step [steps, 2], test accuracy per task [2], seconds per step).
Result = tuple[torch.Tensor, torch.Tensor, float]


def make_data(seed: int, train_pairs: int = 4000, test_pairs: int = 1000) -> Data:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    half = len(order) * 3 // 4
    splits = []
    for pool, n in ((order[:half], train_pairs), (order[half:], test_pairs)):
        left = pool[torch.randint(len(pool), (n,), generator=gen)]
        right = pool[torch.randint(len(pool), (n,), generator=gen)]
        x = torch.cat([images[left], images[right]], dim=2).reshape(n, -1)  # [n, 8 * 16]
        splits.append((x, torch.stack([labels[left], labels[right]], 1)))
    return splits


class SharedBottom(torch.nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.shared = torch.nn.Sequential(torch.nn.Linear(128, hidden), torch.nn.ReLU(),
                                          torch.nn.Linear(hidden, hidden), torch.nn.ReLU())
        self.heads = torch.nn.ModuleList([torch.nn.Linear(hidden, 10) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.shared(x)
        return torch.stack([head(z) for head in self.heads], 1)  # [batch, 2 tasks, 10 classes]


def task_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.nn.functional.cross_entropy(logits[:, t], y[:, t]) for t in range(2)])


def train(method: str, data: Data, seed: int, steps: int, batch: int = 128, lr: float = 3e-3) -> Result:
    """Trains a fresh network with ``method`` (a gradient method or a loss weighting); returns the
    training losses per step, the test accuracy per task and the mean time of a step."""
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = SharedBottom()
    loss_level = method in gradagg.scalarizations() and method not in gradagg.methods()
    info = None if loss_level else gradagg.methods()[method]  # (None: a loss weighting)
    options = OPTIONS.get(method, {})
    state: Any
    if info is None:
        state = gradagg.init(method, 2) if gradagg.scalarizations()[method].stateful else None
    else:
        state = gradagg.init([(method, options)], 2) if info.stateful else None
    extra = list(state.parameters()) if loss_level and gradagg.scalarizations()[method].trainable else []
    optimizer = torch.optim.Adam([*model.parameters(), *extra], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    batches = torch.Generator().manual_seed(seed + 1)
    history: list[torch.Tensor] = []
    spent = 0.0

    def jacobian(idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        yb = y_train[idx]

        def losses_fn(out: torch.Tensor) -> torch.Tensor:
            return task_losses(out, yb)

        return gradagg.model_jacobian(model, x_train[idx], losses_fn)

    for step in range(steps):
        idx = torch.randint(len(y_train), (batch,), generator=batches)
        start = time.perf_counter()
        if info is None:
            losses = task_losses(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            gradagg.scalarize(losses, method, state=state, generator=gen).backward()
            optimizer.step()
            if method == "famo":  # FAMO learns from the change of the losses on the same batch
                with torch.no_grad():
                    state.update(task_losses(model(x_train[idx]), y_train[idx]))
            if method == "dwa" and (step + 1) % EPOCH == 0:
                state.end_epoch()
            losses = losses.detach()
        else:
            jac, losses = jacobian(idx)
            kwargs = dict(options)
            if info.uses_losses:
                kwargs["losses"] = losses
            if info.uses_cross:  # two more, independent batches for the cross-Gramian
                pair = [jacobian(torch.randint(len(y_train), (batch,), generator=batches))[0] for _ in range(2)]
                kwargs["cross"] = tuple(pair)
            gradagg.set_grad(model, gradagg.aggregate(jac, method, state=state, generator=gen, **kwargs))
            optimizer.step()
        spent += time.perf_counter() - start
        history.append(losses)
    with torch.no_grad():
        predictions = model(x_test).argmax(-1)
        accuracy = (predictions == y_test).float().mean(0)
    return torch.stack(history), accuracy, spent / steps


def run(out_dir: Path, seed: int = 0, steps: int = 300,
        progress: Callable[[int, int, str], None] | None = None) -> str:
    data = make_data(seed)
    results: dict[str, Result] = {}
    every = METHODS + LOSS_METHODS
    for i, method in enumerate(every):
        results[method] = train(method, data, seed, steps)
        if progress:
            progress(i + 1, len(every), method)
    _plot(out_dir / "multidigits_training.png", results)
    lines = [f"MultiDigits (load_digits side by side, {len(data[0][1])} train / {len(data[1][1])} test pairs): "
             f"{steps} Adam steps, batch 128",
             f"{'method':<15}{'family':<9}{'acc left':>10}{'acc right':>11}{'loss left':>11}{'loss right':>12}"
             f"{'ms/step':>9}"]
    for method, (history, accuracy, per_step) in results.items():
        final = history[-20:].mean(0)
        family = "loss" if method in LOSS_METHODS else "gradient"
        lines.append(f"{method:<15}{family:<9}{accuracy[0]:>10.3f}{accuracy[1]:>11.3f}{final[0]:>11.3f}"
                     f"{final[1]:>12.3f}{per_step * 1e3:>9.2f}")
    return "\n".join(lines)


def _plot(path: Path, results: dict[str, Result]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    width = 15
    kernel = torch.ones(width) / width
    for method, (history, _, _) in results.items():
        for task, ax in enumerate(axes):
            smooth = torch.nn.functional.conv1d(history[:, task].reshape(1, 1, -1), kernel.reshape(1, 1, -1))[0, 0]
            ax.plot(torch.arange(len(smooth)) + width // 2, smooth, label=method)
    for task, ax in enumerate(axes):
        ax.set_title(f"task {task + 1}: {'left' if task == 0 else 'right'} digit")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0].set_ylabel(f"training loss (moving mean of {width})")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
