"""Precision: each method's float32 answer against its float64 answer, gradagg and TorchJD in one run.

    python -m benchmarks.precision [--seeds 5] [--out DIR]

For every Jacobian family and method it reports the worst, over the seeds, of

    ‖d₃₂ − d₆₄‖ / max(‖d₆₄‖, 1e-5 max_i ‖g_i‖)

with d₃₂ the answer on J rounded to float32 and d₆₄ the same library's answer in float64, on the
same float32 values (``same values``) and on the exact float64 J (``exact J``); and, by the same
measure, how far TorchJD's float64 answer lies from gradagg's float64 answer (``TorchJD vs
gradagg, float64``), which the test suite checks against independent oracles: an iterative solver
stopped early (TorchJD's MGDA is Frank-Wolfe) can be consistent across precisions and still far
from the method's exact answer. The families:
the Gaussian low-rank products J = A B (A: K x r, B: r x D) of issue 11, a K = 64 low-rank family,
well-conditioned low rank (``conditioned_low_rank`` of the test suite) with and without norms
spread over 10^±6, and full rank with spread norms. TorchJD's column needs ``pip install -e .[bench]``.
Writes precision.md (and prints it).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import gradagg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from strategies import conditioned_low_rank  # the test suite's sampler

METHODS = ["imtl_g", "config", "aligned_mtl", "upgrad", "dualproj", "mgda", "cagrad", "nash_mtl", "fairgrad",
           "pcgrad", "krum", "mean"]


def _torchjd(method: str, k: int):
    try:
        import torchjd.aggregation as A
    except ImportError:
        return None
    return {
        "imtl_g": A.IMTLG, "config": A.ConFIG, "aligned_mtl": A.AlignedMTL, "upgrad": A.UPGrad,
        "dualproj": A.DualProj, "mgda": A.MGDA, "cagrad": lambda: A.CAGrad(c=0.5), "mean": A.Mean,
        "nash_mtl": lambda: A.NashMTL(n_tasks=k), "fairgrad": lambda: A.FairGrad(alpha=1.0),
        "pcgrad": A.PCGrad, "krum": lambda: A.Krum(n_byzantine=1),
    }[method]()


def gaussian_low_rank(k: int, d: int, r: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((k, r)) @ rng.standard_normal((r, d))


FAMILIES = {
    "20 x 100, rank 5 (A B)": lambda rng: gaussian_low_rank(20, 100, 5, rng),
    "9 x 11, rank 5 (A B)": lambda rng: gaussian_low_rank(9, 11, 5, rng),
    "16 x 5000, rank 12 (A B)": lambda rng: gaussian_low_rank(16, 5000, 12, rng),
    "64 x 1000, rank 30 (A B)": lambda rng: gaussian_low_rank(64, 1000, 30, rng),
    "40 x 300, rank 1..39, conditioned": lambda rng: conditioned_low_rank(40, 300, int(rng.integers(1, 40)), 0.0, rng),
    "40 x 300, rank 1..39, norms 10^±6": lambda rng: conditioned_low_rank(40, 300, int(rng.integers(1, 40)), 6.0,
                                                                          rng),
    "16 x 200, full rank, norms 10^±6": lambda rng: conditioned_low_rank(16, 200, 16, 6.0, rng),
}


def error(d: torch.Tensor, ref: torch.Tensor, j: torch.Tensor) -> float:
    scale = max(float(ref.double().norm()), 1e-5 * float(j.double().norm(dim=1).max()))
    return float((d.double() - ref.double()).norm()) / scale


def _gradagg(method: str, j: torch.Tensor) -> torch.Tensor:
    k = j.shape[0]
    state = gradagg.init(method, k) if gradagg.methods()[method].stateful else None
    opts = {"f": 1} if method == "krum" else {}
    return gradagg.aggregate(j, method, state=state, generator=torch.Generator().manual_seed(0), **opts)


def _peer(method: str, j: torch.Tensor) -> torch.Tensor | None:
    aggregator = _torchjd(method, j.shape[0])
    if aggregator is None:
        return None
    torch.manual_seed(0)  # PCGrad draws its orders from torch's global generator
    return aggregator(j)


def measure(seeds: int) -> list[tuple]:
    rows = []
    for family, build in FAMILIES.items():
        for method in METHODS:
            worst = [0.0, 0.0, 0.0, 0.0, 0.0]
            peer = True
            for seed in range(seeds):
                j64 = torch.tensor(build(np.random.default_rng(seed)))
                j32 = j64.float()
                d32, d64 = _gradagg(method, j32), _gradagg(method, j64)
                worst[0] = max(worst[0], error(d32, _gradagg(method, j32.double()), j64))
                worst[1] = max(worst[1], error(d32, d64, j64))
                p32 = _peer(method, j32) if peer else None
                if p32 is None:
                    peer = False
                    continue
                worst[2] = max(worst[2], error(p32, _peer(method, j32.double()), j64))
                p64 = _peer(method, j64)
                worst[3] = max(worst[3], error(p32, p64, j64))
                worst[4] = max(worst[4], error(p64, d64, j64))
            rows.append((family, method, worst[0], worst[1], *(worst[2:] if peer else (None, None, None))))
            print(f"{family:40s} {method:12s} " + " ".join("-" if x is None else f"{x:.1e}" for x in rows[-1][2:]),
                  flush=True)
    return rows


def table(rows) -> str:
    lines = ["| J (K x D) | method | gradagg, same values | gradagg, exact J | TorchJD, same values "
             "| TorchJD, exact J | TorchJD vs gradagg, float64 |", "|---|---|---:|---:|---:|---:|---:|"]
    for family, method, *errors in rows:
        cells = ["–" if e is None else f"{e:.1e}" for e in errors]
        lines.append(f"| {family} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = measure(args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (args.out / "precision.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
