"""MultiDigits: two-task classification built from scikit-learn's bundled ``load_digits``.

Each example places two 8 x 8 digits side by side (an 8 x 16 image); task 1 names the left digit,
task 2 the right one. The digits of the training and test pairs come from disjoint halves of the
data set. A shared-bottom network (two hidden layers) feeds one linear head per task. Every method
trains the same initial network for the same steps and batches: per step, ``model_jacobian``
gives the per-task Jacobian, ``aggregate`` combines it and ``set_grad`` hands it to Adam.
"""

from __future__ import annotations

import time

import torch

import gradagg

METHODS = ("mean", "mgda", "pcgrad", "cagrad", "upgrad", "nash_mtl", "imtl_g")


def make_data(seed: int, train_pairs: int = 4000, test_pairs: int = 1000):
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
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.shared = torch.nn.Sequential(torch.nn.Linear(128, hidden), torch.nn.ReLU(),
                                          torch.nn.Linear(hidden, hidden), torch.nn.ReLU())
        self.heads = torch.nn.ModuleList([torch.nn.Linear(hidden, 10) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.shared(x)
        return torch.stack([head(z) for head in self.heads], 1)  # [batch, 2 tasks, 10 classes]


def task_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.nn.functional.cross_entropy(logits[:, t], y[:, t]) for t in range(2)])


def train(method: str, data, seed: int, steps: int, batch: int = 128, lr: float = 3e-3):
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = SharedBottom()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    state = gradagg.init(method, 2) if gradagg.methods()[method].stateful else None
    gen = torch.Generator().manual_seed(seed)
    batches = torch.Generator().manual_seed(seed + 1)
    history, spent = [], 0.0
    for _ in range(steps):
        idx = torch.randint(len(y_train), (batch,), generator=batches)
        xb, yb = x_train[idx], y_train[idx]
        start = time.perf_counter()
        jac, losses = gradagg.model_jacobian(model, xb, lambda out, yb=yb: task_losses(out, yb))
        gradagg.set_grad(model, gradagg.aggregate(jac, method, state=state, generator=gen))
        optimizer.step()
        spent += time.perf_counter() - start
        history.append(losses)
    with torch.no_grad():
        predictions = model(x_test).argmax(-1)
        accuracy = (predictions == y_test).float().mean(0)
    return torch.stack(history), accuracy, spent / steps


def run(out_dir, seed: int = 0, steps: int = 300, progress=None) -> str:
    data = make_data(seed)
    results = {}
    for i, method in enumerate(METHODS):
        results[method] = train(method, data, seed, steps)
        if progress:
            progress(i + 1, len(METHODS), method)
    _plot(out_dir / "multidigits_training.png", results)
    lines = [f"MultiDigits (load_digits side by side, {len(data[0][1])} train / {len(data[1][1])} test pairs): "
             f"{steps} Adam steps, batch 128",
             f"{'method':<10}{'acc left':>10}{'acc right':>11}{'loss left':>11}{'loss right':>12}{'ms/step':>9}"]
    for method, (history, accuracy, per_step) in results.items():
        final = history[-20:].mean(0)
        lines.append(f"{method:<10}{accuracy[0]:>10.3f}{accuracy[1]:>11.3f}{final[0]:>11.3f}{final[1]:>12.3f}"
                     f"{per_step * 1e3:>9.2f}")
    return "\n".join(lines)


def _plot(path, results) -> None:
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
