"""Multi-task training with gradagg inside PyTorch Lightning (manual optimisation), on 1 or more processes.

    python examples/lightning_mtl.py                       # one process
    python examples/lightning_mtl.py --devices 2           # two CPU processes, DDP over gloo
    python examples/lightning_mtl.py --method nash_mtl     # a stateful method

The data are scikit-learn's bundled 8 x 8 digits (no download). Each image is mirrored left-right
with probability 1/2. Task 0 names the digit (10 classes); task 1 says whether the image was
mirrored. A shared trunk feeds one linear head per task (K = 2 tasks).

Each step, with automatic optimisation off: ``gradagg.model_jacobian`` gives the per-task Jacobian J
(``name -> [K, *shape]``) of the losses on this rank's examples, through ``torch.func``. With more
than one process, ``gradagg.distributed.average_jacobian`` averages J over the ranks in one
all-reduce, which makes it the Jacobian of the global batch. The trunk's gradient is
``aggregate(J_trunk, method)``; each head gets the ordinary gradient of the summed losses (the sum
of its rows of J: a head's loss is its own task's). Both go into ``.grad``, and the optimizer from
``self.optimizers()`` steps. Every rank sees the same J, so every rank takes the same step.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradagg
from gradagg.distributed import average_jacobian

NUM_TASKS = 2
#: Methods this recipe can run: all but those that need ``cross=`` (two independent batches' Jacobians).
METHODS = sorted(name for name, info in gradagg.methods().items() if not info.uses_cross)


def make_dataset(seed: int) -> TensorDataset:
    """The 1797 digits, each mirrored with probability 1/2 (drawn from ``seed``): x [N, 64], y [N, 2]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # [N, 8, 8]
    digit = torch.tensor(digits.target, dtype=torch.int64)
    mirrored = torch.randint(0, 2, (len(digit),), generator=torch.Generator().manual_seed(seed))
    images = torch.where(mirrored.bool()[:, None, None], images.flip(-1), images)
    return TensorDataset(images.reshape(len(digit), 64), torch.stack([digit, mirrored], 1))


def make_loader(dataset: TensorDataset, global_batch: int, world: int, rank: int, seed: int) -> DataLoader:
    """Rank ``rank``'s shard of every global batch.

    The sampler draws one permutation per epoch from ``seed`` whatever ``world`` is, and gives rank r
    the positions r, r + world, r + 2 world, ... of it; so batch t of every rank together are the
    same ``global_batch`` examples as batch t of a single process.
    """
    if global_batch % world:
        raise ValueError(f"the global batch ({global_batch}) must split evenly over {world} processes")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=global_batch // world, sampler=sampler, drop_last=True)


class Net(torch.nn.Module):
    """A shared trunk and one linear head per task; returns the K tasks' logits."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(),
                                         torch.nn.Linear(hidden, hidden), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList([torch.nn.Linear(hidden, 10), torch.nn.Linear(hidden, 2)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = self.trunk(x)
        return tuple(head(z) for head in self.heads)


def task_losses(logits: tuple[torch.Tensor, ...], y: torch.Tensor) -> torch.Tensor:
    """[K]: the mean cross-entropy of each task on the batch."""
    return torch.stack([F.cross_entropy(out, y[:, k]) for k, out in enumerate(logits)])


class MultiTaskModule(L.LightningModule):
    """The network, trained with manual optimisation: per-task Jacobian, ``aggregate``, optimizer step."""

    def __init__(self, method: str = "upgrad", options: dict[str, Any] | None = None, lr: float = 0.5,
                 batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # training_step computes .grad itself
        with torch.random.fork_rng(devices=[]):  # the same initial network in every process, from the seed
            torch.manual_seed(seed)                # (DDP also broadcasts rank 0's), and the global RNG untouched
            self.net = Net()
        info = gradagg.methods()[method]
        self.uses_losses, self.is_random = info.uses_losses, info.random
        # A stateful method's state (nash_mtl's weights, gradvac's targets, ...) lives on the module and
        # goes into checkpoints (on_save_checkpoint). It stays identical across ranks, since every rank
        # aggregates the same averaged Jacobian.
        self.options = dict(options or {})  # the method's options, e.g. {"update_every": 2} for nash_mtl
        self.agg_state = gradagg.init([(method, self.options)], NUM_TASKS) if info.stateful else None
        self.history: list[torch.Tensor] = []  # the global batch's task losses, per step
        self.initial: dict[str, torch.Tensor] = {}  # the parameters training started from

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return make_loader(make_dataset(hp.seed), hp.batch_size, self.trainer.world_size, self.global_rank, hp.seed)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        # Why no backward, and why DDP does not mind: Lightning calls this method through the
        # DistributedDataParallel wrapper, but `self` here is the unwrapped module. model_jacobian runs
        # self.net through torch.func.functional_call on detached copies of the parameters, so the real
        # parameters never enter an autograd graph: DDP's reducer (whose hooks sit on their gradient
        # accumulators) is never triggered, and with automatic optimisation off Lightning prepares it
        # only in manual_backward, which this recipe never calls. The one collective is ours, below.
        # (A loss.backward() instead would make DDP all-reduce every parameter's *summed* gradient,
        # of no use for the trunk, whose gradient must be aggregated from the per-task rows.)
        jac, losses = gradagg.model_jacobian(self.net, x, lambda logits: task_losses(logits, y))
        if self.trainer.world_size > 1:
            # J of the global batch: the losses are means over equal shards, so the mean of the ranks'
            # Jacobians is the Jacobian of the global means. One all-reduce carries J and the losses.
            jac, losses = average_jacobian((jac, losses))
        shared = {name: j for name, j in jac.items() if name.startswith("trunk.")}
        extra: dict[str, Any] = {"losses": losses} if self.uses_losses else {}
        if self.is_random:  # pcgrad's order, graddrop's masks, ...: the same draws on every rank, and on resuming
            extra["generator"] = torch.Generator(x.device).manual_seed(1_000_003 * self.hparams.seed + self.global_step)
        update = gradagg.aggregate(shared, self.hparams.method, state=self.agg_state, **self.options, **extra)
        heads = {name: j.sum(0) for name, j in jac.items() if name.startswith("heads.")}  # ∇ Σ_k L_k

        optimizer = self.optimizers()
        optimizer.zero_grad()
        gradagg.set_grad(self.net, {**update, **heads})
        optimizer.step()
        self.history.append(losses)

    def on_train_start(self) -> None:
        self.initial = {name: p.detach().clone() for name, p in self.net.state_dict().items()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.agg_state is not None:
            checkpoint["gradagg_state"] = self.agg_state.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.agg_state is not None:
            self.agg_state.load_state_dict(checkpoint["gradagg_state"])

    def spread(self) -> float:
        """The largest difference between a parameter on any rank and on rank 0 (0 in one process)."""
        if self.trainer.world_size == 1:
            return 0.0
        flat = torch.cat([p.detach().reshape(-1) for p in self.net.parameters()])
        reference = flat.clone()
        torch.distributed.broadcast(reference, src=0)
        gap = (flat - reference).abs().max()
        torch.distributed.all_reduce(gap, op=torch.distributed.ReduceOp.MAX)
        return float(gap)


def make_trainer(devices: int, steps: int, **kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer: no progress bar, logger, model summary or checkpoints unless asked."""
    for name in ("lightning.pytorch", "lightning.fabric"):  # quiet: no "GPU available", "Initializing distributed"
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the data are in memory
    warnings.filterwarnings("ignore", category=FutureWarning, module="lightning")  # Lightning's own, about torch
    options: dict[str, Any] = dict(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                                   max_steps=steps, use_distributed_sampler=False,  # make_loader shards the data
                                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                   enable_model_summary=False)
    return L.Trainer(**{**options, **kwargs})


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (more than 1: DDP over gloo)")
    parser.add_argument("--method", default="upgrad", choices=METHODS)
    parser.add_argument("--options", type=json.loads, default={},
                        help='the method\'s options as JSON, e.g. \'{"weights": [1, 3]}\' for constant')
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (Trainer max_steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch, split over the processes")
    parser.add_argument("--out", default=None, help="torch.save the initial and final parameters here (rank 0)")
    args = parser.parse_args(argv)

    module = MultiTaskModule(args.method, args.options, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    trainer = make_trainer(args.devices, args.steps)
    trainer.fit(module)
    spread = module.spread()  # a collective: every rank calls it
    if trainer.world_size > 1:
        torch.distributed.barrier()  # no rank tears the group down while another still uses it
        torch.distributed.destroy_process_group()
    if trainer.global_rank != 0:
        return None
    history = torch.stack(module.history)
    result = {"initial": module.initial, "final": module.net.state_dict(), "losses": history, "spread": spread,
              "method_state": None if module.agg_state is None else module.agg_state.state_dict(),
              "world_size": trainer.world_size, "local_batch": trainer.train_dataloader.batch_size, "lr": args.lr}
    first, last = history[0].tolist(), history[-1].tolist()
    print(f"{args.method}, {trainer.world_size} process(es), {len(history)} steps: task losses "
          f"{[round(v, 3) for v in first]} -> {[round(v, 3) for v in last]}", flush=True)
    if args.out:
        torch.save(result, args.out)
    return result


if __name__ == "__main__":
    main()
