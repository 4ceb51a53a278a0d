"""CUDA benchmark: gradagg's Triton route and host route against the floor and TorchJD, in one run.

    python -m benchmarks.cuda [--out DIR] [--ks 2,8,32,64] [--ds 1000000,10000000] [--repeats N]

Needs a CUDA device (it prints that nothing was measured otherwise; ``--smoke`` runs the whole
script at tiny sizes on CPU tensors through Triton's interpreter, without the CUDA graph column,
so that the test suite keeps it working). For every method, K and D
(float32 J on the device) it times, as medians of interleaved rounds with a device synchronisation
after each call:
- the floor: t(J @ J.T) + t(w @ J);
- the Triton route eager, compiled (``torch.compile(fullgraph=True)``) and replayed from a CUDA
  graph captured around the eager call;
- the host route eager (one copy of G to the host, the C solvers);
- TorchJD's aggregator for the same method, when installed;
- the K x K stage alone: ``weights_from_gramian`` on the Triton route, as device time per call over
  100 calls issued back to back (CUDA events), which leaves out the host's launch latency;
- the torch ops and kernel launches one eager call dispatches on the Triton route.
It writes results.json and results.md to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import gradagg
from benchmarks.bench import METHODS, _torchjd_factories, median_times, options


def _graphed(fn):
    """fn captured once in a CUDA graph; returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _stage_time(g: torch.Tensor, method: str, opts: dict, state) -> float:
    """Device seconds per K x K stage (weights from a precomputed G), 100 calls back to back."""
    def call():
        return gradagg.weights_from_gramian(g, method, state=state, check_finite=False, **opts)
    for _ in range(3):
        call()
    if g.device.type != "cuda":  # (the smoke run: wall time)
        start = time.perf_counter()
        call()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(100):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / 100


def _ops(fn) -> int | None:
    """Torch ops plus kernel launches of one call (the dispatch mode of the test suite)."""
    try:
        from gradagg.solvers.gpu.census import Census
    except ImportError:
        return None
    with Census() as census:
        fn()
    return census.total


def case(k: int, d: int, repeats: int, torchjd, device: torch.device, methods: list[str]) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(k * 1000 + d % 997)
    j = torch.randn(k, d, generator=gen).to(device)
    w = torch.rand(k, generator=gen).to(device)
    g = (j.double() @ j.double().T)
    rows = []
    for method in methods:
        opts = options(method, k)
        if method == "krum" and k < 3:
            continue
        stateful = gradagg.methods()[method].stateful
        weighting = gradagg.methods()[method].weighting
        row = {"method": method, "K": k, "D": d, "device": _device_name(device)}

        def make(solver, method=method, opts=opts, stateful=stateful):
            state = gradagg.init(method, k, device=device) if stateful else None

            def call(x=j):
                with gradagg.use_solver(solver):
                    return gradagg.aggregate(x, method, state=state, check_finite=False, **opts)
            return call

        eager, host = make("triton"), make("host")
        fns = {"gram": lambda: j @ j.T, "combine": lambda: w @ j, "triton_s": eager, "host_s": host}
        try:
            torch._dynamo.reset()
            state = gradagg.init(method, k, device=device) if stateful else None
            # Compiled without the solver context (traced once under it; every timed call runs in it).
            compiled = torch.compile(lambda x=j, m=method, o=opts, s=state: gradagg.aggregate(
                x, m, state=s, check_finite=False, **o), fullgraph=True)
            with gradagg.use_solver("triton"):
                compiled()
            fns["compiled_s"] = compiled
        except Exception as exc:  # reported, not hidden
            row["compiled_error"] = f"{type(exc).__name__}: {exc}"[:160]
        if device.type == "cuda":
            try:
                with gradagg.use_solver("triton"):
                    fns["graph_s"] = _graphed(make("triton"))
            except Exception as exc:
                row["graph_error"] = f"{type(exc).__name__}: {exc}"[:160]
        if torchjd is not None and method in torchjd:
            agg = torchjd[method](k)
            try:
                agg(j)
                fns["torchjd_s"] = lambda agg=agg: agg(j)
            except Exception as exc:
                row["torchjd_error"] = f"{type(exc).__name__}: {exc}"[:160]
        with gradagg.use_solver("triton"):
            medians = median_times(fns, repeats, device)
            if weighting:
                state = gradagg.init(method, k, device=device) if stateful else None
                row["stage_s"] = _stage_time(g, method, opts, state)
            row["ops"] = _ops(eager)
        row["floor_s"] = medians.pop("gram") + medians.pop("combine")
        row.update(medians)
        rows.append(row)
        print(row, flush=True)
    return rows


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter, smoke run)"


def table(rows: list[dict]) -> str:
    cols = ["floor_s", "triton_s", "compiled_s", "graph_s", "host_s", "torchjd_s", "stage_s"]
    head = "| K | D | method | " + " | ".join(c.removesuffix("_s") + " (µs)" for c in cols) + " | ops | triton/floor |"
    lines = [head, "|" + "---|" * (len(cols) + 5)]
    for r in rows:
        cells = [f"{r[c] * 1e6:.0f}" if c in r else "-" for c in cols]
        ratio = f"{r['triton_s'] / r['floor_s']:.2f}"
        lines.append(f"| {r['K']} | {r['D']:.0e} | {r['method']} | " + " | ".join(cells)
                     + f" | {r.get('ops')} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-cuda")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--ks", default="2,8,32,64")
    parser.add_argument("--ds", default="1000000,10000000")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU tensors through Triton's interpreter")
    args = parser.parse_args(argv)
    ks, ds, repeats, methods = args.ks, args.ds, args.repeats, METHODS
    if args.smoke:
        device = torch.device("cpu")
        ks, ds, repeats, methods = "3", "500", 2, ["mean", "mgda", "nash_mtl", "trimmed_mean"]
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no CUDA device: nothing measured")
        return []
    torchjd = _torchjd_factories()
    rows = []
    for d in (int(v) for v in ds.split(",")):
        for k in (int(v) for v in ks.split(",")):
            rows += case(k, d, repeats, torchjd, device, methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = f"Device: {_device_name(device)}, torch {torch.__version__}\n\n{table(rows)}\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return rows


if __name__ == "__main__":
    main()
