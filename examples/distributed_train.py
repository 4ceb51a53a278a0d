"""Multi-task training with the parameters sharded over processes, and gradagg across them.

    torchrun --nproc_per_node=2 examples/distributed_train.py [--steps 150]

Every rank holds a replica of a small three-task model but owns only some of its parameters
(manual sharding: parameter i belongs to rank i mod world size). Each step, each rank computes the
per-task Jacobian of the losses with respect to its own parameters only, and
``gradagg.aggregate(..., group=WORLD)`` all-reduces the 3 x 3 Gramian, so that all ranks agree on
the weights and each gets the combined gradient of its own parameters. Each rank updates what it
owns and broadcasts it, so the replicas stay identical. Runs on CPU with the gloo backend.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import gradagg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--method", default="upgrad")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same model and data on every rank
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    x = torch.randn(512, 8)
    y = torch.stack([x[:, 0] + x[:, 1], -x[:, 0] + 0.5 * x[:, 2], torch.sin(2 * x[:, 3])], 1)
    names = [name for name, _ in model.named_parameters()]
    owner = {name: i % world for i, name in enumerate(names)}
    mine = [name for name in names if owner[name] == rank]
    lr = 0.1
    first = None
    for step in range(args.steps):
        params = {name: p.detach() for name, p in model.named_parameters()}
        frozen = {name: t for name, t in params.items() if name not in mine}

        def task_losses(owned: dict[str, torch.Tensor], frozen=frozen) -> torch.Tensor:
            out = torch.func.functional_call(model, {**frozen, **owned}, (x,))
            return ((out - y) ** 2).mean(0)

        jac, losses = gradagg.task_jacobian(task_losses, {name: params[name] for name in mine})
        update = gradagg.aggregate(jac, args.method, group=dist.group.WORLD)  # only the 3 x 3 Gramian travels
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in mine:
                    p.sub_(lr * update[name])
                dist.broadcast(p, src=owner[name])
        first = losses if first is None else first
        if rank == 0 and (step % 50 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  task losses {[round(float(v), 4) for v in losses]}", flush=True)
    if rank == 0:
        print(f"total loss {float(first.sum()):.4f} -> {float(losses.sum()):.4f} on {world} ranks", flush=True)
        assert losses.sum() < 0.5 * first.sum(), "the losses did not go down"
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
