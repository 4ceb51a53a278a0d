"""What one call dispatches on the Triton route: torch ops, kernel launches, host reads.

    TRITON_INTERPRET=1 python -m benchmarks.ops      # without a GPU: CPU tensors through the interpreter
    python -m benchmarks.ops                         # with a GPU: CUDA tensors

Counted with ``gradagg.solvers.gpu.census.Census`` (a dispatch mode that also looks inside gradagg's
Triton operators) for every method at K = 4 and K = 32, D = 1000, float32, one tensor leaf,
``check_finite`` at its default, after one warm-up call. Prints a Markdown table. Methods without a
Triton kernel (pcd, sdmgrad, modo) take the host route, whose one round trip shows as host reads.
"""

from __future__ import annotations

import torch

import gradagg
from gradagg.solvers.gpu.census import Census


def arguments(method: str, k: int, device: torch.device, j: torch.Tensor) -> dict:
    info = gradagg.methods()[method]
    out: dict = {"krum": {"f": 1}, "trimmed_mean": {"trim": 1}, "constant": {"weights": [1.0] * k},
                 "crmogm": {"inner": "upgrad"}}.get(method, {})
    if info.stateful:
        out["state"] = gradagg.init([(method, dict(out))], k, device=device)
    if info.uses_losses:
        out["losses"] = torch.linspace(1.0, 2.0, k, device=device)
    if info.uses_cross:  # (the two batches: here one, twice)
        out["cross"] = (j, j)
    if info.random:
        out["generator"] = torch.Generator(device=device).manual_seed(0)
    return out


def count(method: str, k: int, device: torch.device) -> Census:
    j = torch.randn(k, 1000, device=device)
    kwargs = arguments(method, k, device, j)
    gradagg.aggregate(j, method, **kwargs)
    with Census() as census:
        gradagg.aggregate(j, method, **kwargs)
    return census


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"Triton route on {device.type}{' (interpreter)' if device.type == 'cpu' else ''}, torch {torch.__version__}")
    print()
    print("| method | torch ops + launches, K = 4 | of which launches | K = 32 | host reads |")
    print("|---|---|---|---|---|")
    with gradagg.use_solver("triton"):
        for method in sorted(gradagg.methods()):
            small, large = count(method, 4, device), count(method, 32, device)
            reads = len(small.reads) + len(large.reads)
            print(f"| {method} | {small.total} | {small.launches} | {large.total} | {reads} |")


if __name__ == "__main__":
    main()
