"""Benchmark: gradagg (eager and compiled) against the floor and against TorchJD, in one run.

    python -m benchmarks.bench [--out DIR] [--repeats N] [--ks 2,8,32,64] [--ds 10000,1000000] [--quick]

For every case (K tasks x D coordinates, float32) and method it times, as medians over repeats
taken in interleaved rounds (one call of each per round, so that the machine's drift affects all
columns of a row alike):
- the floor: t(J @ J.T) + t(w @ J), the two passes over J that any Gramian-based method makes;
- gradagg eager, and compiled with torch.compile(fullgraph=True);
- TorchJD's aggregator for the same method, when torchjd is installed (``pip install -e .[bench]``);
and the same Jacobian split into about 50 leaves (a pytree, as vmap(grad) returns it).
Peak extra memory is measured with torch.profiler's memory events (CPU: the running total of bytes
allocated minus freed during one call, at its highest; CUDA: max_memory_allocated). It writes
results.json, results.md and a plot of time against K.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

import gradagg


def _torchjd_factories():
    """gradagg method name -> TorchJD aggregator for K tasks (None without TorchJD)."""
    try:
        import torchjd.aggregation as A
    except ImportError:
        return None
    return {
        "mean": lambda k: A.Mean(),
        "sum": lambda k: A.Sum(),
        "mgda": lambda k: A.MGDA(),
        "pcgrad": lambda k: A.PCGrad(),
        "cagrad": lambda k: A.CAGrad(c=0.5),
        "imtl_g": lambda k: A.IMTLG(),
        "upgrad": lambda k: A.UPGrad(),
        "dualproj": lambda k: A.DualProj(),
        "aligned_mtl": lambda k: A.AlignedMTL(),
        "config": lambda k: A.ConFIG(),
        "graddrop": lambda k: A.GradDrop(),
        "krum": lambda k: A.Krum(n_byzantine=max(0, min(1, k - 3))),
        "trimmed_mean": lambda k: A.TrimmedMean(trim_number=1 if k >= 3 else 0),
        "fairgrad": lambda k: A.FairGrad(alpha=1.0),
        "nash_mtl": lambda k: A.NashMTL(n_tasks=k),
        "random": lambda k: A.Random(),
        "constant": lambda k: A.Constant(torch.ones(k)),
    }


METHODS = ["mean", "mgda", "pcgrad", "cagrad", "imtl_g", "upgrad", "dualproj", "aligned_mtl", "config", "graddrop",
           "krum", "trimmed_mean", "fairgrad", "nash_mtl", "random"]


def options(method: str, k: int) -> dict:
    return {"krum": {"f": max(0, min(1, k - 3))}, "trimmed_mean": {"trim": 1 if k >= 3 else 0}}.get(method, {})


def median_times(fns: dict, repeats: int, device: torch.device, budget: float = 20.0) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds (one call of each per
    round), so that the machine's drift over time affects every column of a row alike. A function
    that has spent ``budget`` seconds stops after 3 calls (TorchJD's cvxpy at K = 64)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        fn()
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if len(times[name]) >= 3 and sum(times[name]) > budget:
                continue
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated beyond the inputs during one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each op event carries the bytes it allocated itself (self_cpu_memory_usage: children
    # excluded, so nothing counts twice); "[memory]" events carry the frees, as negative bytes.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    running = peak = 0
    for event in events:
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def split_leaves(j: torch.Tensor, n: int = 50) -> dict[str, torch.Tensor]:
    d = j.shape[1]
    cuts = torch.linspace(0, d, n + 1).round().long().tolist()
    return {f"p{i}": j[:, a:b].clone() for i, (a, b) in enumerate(itertools.pairwise(cuts)) if b > a}


def run_case(k: int, d: int, device: torch.device, repeats: int, compiled: bool, torchjd) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(k * 1000 + d % 997)
    j = torch.randn(k, d, generator=gen).to(device)
    w = torch.rand(k, generator=gen).to(device)
    # A fresh J: let the allocator and the OS settle (first touches, page handling) before timing.
    median_times({"gram": lambda: j @ j.T, "combine": lambda: w @ j}, 20, device)
    rows = []
    tree = split_leaves(j) if d >= 1000 else None
    for method in METHODS:
        opts = options(method, k)
        if method == "krum" and k < 3:
            continue
        state = gradagg.init(method, k) if gradagg.methods()[method].stateful else None

        def eager(method=method, opts=opts, state=state):
            return gradagg.aggregate(j, method, state=state, **opts)

        # Every column of the row is timed in the same interleaved rounds, the floor included.
        fns = {"gram": lambda: j @ j.T, "combine": lambda: w @ j, "eager_s": eager}
        if tree is not None:
            fns["pytree_s"] = lambda m=method, o=opts, s=state: gradagg.aggregate(tree, m, state=s, **o)
        if compiled:
            torch._dynamo.reset()
            fn = torch.compile(lambda x, m=method, o=opts, s=state: gradagg.aggregate(x, m, state=s, **o),
                               fullgraph=True)
            fns["compiled_s"] = lambda fn=fn: fn(j)
        row = {"method": method, "K": k, "D": d, "device": device.type}
        if torchjd is not None and method in torchjd:
            agg = torchjd[method](k)
            try:
                agg(j)
                fns["torchjd_s"] = lambda agg=agg: agg(j)
            except Exception as exc:  # a TorchJD failure is reported, not hidden
                row["torchjd_error"] = f"{type(exc).__name__}: {exc}"[:120]
        medians = median_times(fns, repeats, device)
        row["floor_s"] = medians.pop("gram") + medians.pop("combine")
        row.update(medians)
        row["peak_extra_bytes"] = peak_extra_bytes(eager, device)
        row["input_bytes"] = j.numel() * j.element_size()
        rows.append(row)
    return rows


def describe_machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def table(rows: list[dict]) -> str:
    head = ("| K | D | method | floor ms | eager ms | eager/floor | compiled/floor | pytree/flat | TorchJD ms "
            "| TorchJD/eager | peak extra / input |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        fmt = lambda x: f"{x * 1e3:.3f}" if x is not None else "–"  # noqa: E731
        ratio = lambda a, b: f"{a / b:.2f}" if a is not None and b else "–"  # noqa: E731
        lines.append(
            f"| {r['K']} | {r['D']:.0e} | {r['method']} | {fmt(r['floor_s'])} | {fmt(r['eager_s'])} | "
            f"{ratio(r['eager_s'], r['floor_s'])} | {ratio(r.get('compiled_s'), r['floor_s'])} | "
            f"{ratio(r.get('pytree_s'), r['eager_s'])} | {fmt(r.get('torchjd_s'))} | "
            f"{ratio(r.get('torchjd_s'), r['eager_s'])} | {r['peak_extra_bytes'] / r['input_bytes']:.2f} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line per target of the benchmark (see the README's performance section)."""
    def case(r: dict) -> str:
        return f"{r['method']} K={r['K']} D={r['D']:.0e}"

    both = [r for r in rows if r.get("torchjd_s")]
    lines = []
    if both:
        speedups = [r["torchjd_s"] / r["eager_s"] for r in both]
        geo = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        slower = sorted((r for r in both if r["torchjd_s"] < r["eager_s"]), key=lambda r: r["torchjd_s"] / r["eager_s"])
        lines.append(f"- geometric-mean speed-up over TorchJD (eager): x{geo:.2f} over {len(both)} cases")
        lines.append(f"- cases where TorchJD is faster: {len(slower)}" + "".join(
            f"; {case(r)} (x{r['torchjd_s'] / r['eager_s']:.2f})" for r in slower))
    big = [r for r in rows if r["D"] >= 10**6 and r["method"] not in ("graddrop", "trimmed_mean")]
    if big:
        worst = max(big, key=lambda r: r["eager_s"] / r["floor_s"])
        lines.append(f"- D ≥ 1e6, weightings, eager/floor: worst x{worst['eager_s'] / worst['floor_s']:.2f} "
                     f"({case(worst)})")
    small = [r for r in rows if r["D"] <= 10**4 and r["K"] <= 32 and r.get("compiled_s")]
    if small:
        worst = max(small, key=lambda r: r["compiled_s"] / r["floor_s"])
        over = [r for r in small if r["compiled_s"] > 3 * r["floor_s"]]
        lines.append(f"- D ≤ 1e4, K ≤ 32, compiled/floor: worst x{worst['compiled_s'] / worst['floor_s']:.2f} "
                     f"({case(worst)}); {len(over)} of {len(small)} cases above x3")
    for d in sorted({r["D"] for r in rows if r.get("pytree_s")}):
        sel = [r for r in rows if r["D"] == d and r.get("pytree_s")]
        worst = max(sel, key=lambda r: r["pytree_s"] / r["eager_s"])
        ratio = worst["pytree_s"] / worst["eager_s"]
        lines.append(f"- pytree (50 leaves) / one tensor at D={d:.0e}: worst x{ratio:.2f} ({case(worst)})")
    worst = max(rows, key=lambda r: r["peak_extra_bytes"] / r["input_bytes"])
    lines.append(f"- peak extra memory / input: worst {worst['peak_extra_bytes'] / worst['input_bytes']:.2f} "
                 f"({case(worst)})")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = sorted({r["D"] for r in rows})
    fig, axes = plt.subplots(1, len(ds), figsize=(6 * len(ds), 4), squeeze=False)
    for ax, d in zip(axes[0], ds):
        for method in ("mgda", "upgrad", "cagrad", "nash_mtl"):
            sel = sorted((r for r in rows if r["D"] == d and r["method"] == method), key=lambda r: r["K"])
            if not sel:
                continue
            ks = [r["K"] for r in sel]
            line = ax.plot(ks, [r["eager_s"] * 1e3 for r in sel], marker="o", label=f"gradagg {method}")[0]
            jd = [(r["K"], r["torchjd_s"] * 1e3) for r in sel if r.get("torchjd_s")]
            if jd:
                ax.plot(*zip(*jd), marker="x", ls="--", c=line.get_color(), label=f"TorchJD {method}")
        ks = sorted({r["K"] for r in rows if r["D"] == d})
        floor = [statistics.median(r["floor_s"] for r in rows if r["D"] == d and r["K"] == k) * 1e3 for k in ks]
        ax.plot(ks, floor, c="k", lw=2, label="floor (median over the rows)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K (tasks)")
        ax.set_ylabel("ms per call")
        ax.set_title(f"D = {d:.0e}, float32")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--ks", default="2,8,32,64")
    parser.add_argument("--ds", default="10000,1000000")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled column")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two repeats: a smoke test")
    args = parser.parse_args(argv)
    ks = [int(v) for v in args.ks.split(",")]
    ds = [int(v) for v in args.ds.split(",")]
    repeats = args.repeats
    if args.quick:
        ks, ds, repeats = [2, 4], [2000], 2
    torchjd = _torchjd_factories()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for d in ds:
            for k in ks:
                print(f"{device.type} K={k} D={d} ...", flush=True)
                rows += run_case(k, d, device, repeats, not args.no_compile, torchjd)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = (f"Machine: {describe_machine()}; TorchJD {'installed' if torchjd else 'not installed'}\n\n"
            f"{table(rows)}\n\n{summary(rows)}\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "time_vs_k.png")
    print(text)
    return rows


if __name__ == "__main__":
    main()
