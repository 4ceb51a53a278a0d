"""The cost of ``scaler=``: one ``aggregate`` call on a scaled Jacobian, with and without the scaler.

    python -m benchmarks.amp [--out DIR] [--k 8] [--d 2000000] [--repeats 5] [--device cpu|cuda]
                             [--methods upgrad,nash_mtl,graddrop,moco]

J is a seeded float32 [K, D] times the loss scale 2^16; every (method, mode) runs in processes of its
own (one for time, one for memory, as in ``benchmarks.memory``, whose memory probes this reuses),
after one warm-up call. Time: the median of ``--repeats`` calls (CUDA: synchronised). Memory: the
largest peak of a call minus the memory in use before it, in MiB. The modes: ``plain`` (the call
without the scaler, whose weights are then those of s J) and ``scaler`` (``scaler=GradScaler``).
How ``scaler=`` works differs by family (see ``gradagg.amp``): weightings divide G by s², stateless
per-coordinate methods use their homogeneity, the others (K x D states, cross-Gramians) copy J / s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .memory import CPUMemory, CUDAMemory, describe_machine

SCALE = 2.0**16


def worker(method: str, mode: str, phase: str, k: int, d: int, repeats: int, device: str) -> dict:
    import gradagg

    probe = CUDAMemory() if device == "cuda" else CPUMemory()
    if phase == "memory":
        probe.prepare()
    gen = torch.Generator().manual_seed(0)
    jac = (torch.randn(k, d, generator=gen) * SCALE).to(device)
    info = gradagg.methods()[method]
    state = gradagg.init(method, k) if info.stateful else None
    kwargs: dict = {"state": state}
    if info.uses_losses:
        kwargs["losses"] = (torch.rand(k, generator=gen) + 0.5).to(device)
    if info.random:
        kwargs["generator"] = torch.Generator(device).manual_seed(1)
    if mode == "scaler":
        kwargs["scaler"] = torch.amp.GradScaler(device, init_scale=SCALE)

    def call() -> None:
        gradagg.aggregate(jac, method, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()

    call()
    if phase == "time":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return {"ms": 1e3 * statistics.median(times)}
    peaks = []
    for _ in range(3):
        before = probe.before()
        call()
        peaks.append(probe.peak() - before)
    return {"mib": max(peaks) / 2**20, "notes": probe.notes}


def run(method: str, mode: str, phase: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.amp", "--worker", method, mode, phase, "--k", str(args.k),
           "--d", str(args.d), "--repeats", str(args.repeats), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def table(rows: list[dict]) -> str:
    lines = ["| method | extra MiB, plain | extra MiB, scaler= | ms, plain | ms, scaler= | time ×plain |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['plain_mib']:.1f} | {r['scaler_mib']:.1f} | {r['plain_ms']:.1f} | "
                     f"{r['scaler_ms']:.1f} | {r['scaler_ms'] / r['plain_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--d", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--methods", default="upgrad,nash_mtl,graddrop,moco")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.k, args.d, args.repeats, args.device)))
        return []
    rows = []
    for method in args.methods.split(","):
        row: dict = {"method": method}
        for mode in ("plain", "scaler"):
            row[f"{mode}_ms"] = run(method, mode, "time", args)["ms"]
            row[f"{mode}_mib"] = run(method, mode, "memory", args)["mib"]
        rows.append(row)
    size = args.k * args.d * 4 / 2**20
    header = (f"{describe_machine(args.device)}; J float32 [{args.k}, {args.d}] ({size:.1f} MiB) times 2^16; "
              f"time: median of {args.repeats} calls; memory: peak of a call minus memory before it.")
    report = f"{header}\n\n{table(rows)}\n"
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "amp.md").write_text(report)
        (args.out / "amp.json").write_text(json.dumps({"machine": header, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
