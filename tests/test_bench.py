"""The benchmark command runs (at tiny sizes, without timing assertions), so that it cannot rot."""

import json

import pytest

from benchmarks import bench


def test_bench_smoke(tmp_path):
    rows = bench.main(["--quick", "--out", str(tmp_path)])
    assert {r["method"] for r in rows} >= {"mgda", "upgrad", "nash_mtl", "graddrop"}
    assert all(r["eager_s"] > 0 and r["floor_s"] > 0 and r["peak_extra_bytes"] >= 0 for r in rows)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved) == len(rows)
    assert "| K | D | method |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "time_vs_k.png").stat().st_size > 1000


def test_cuda_bench_smoke(tmp_path):
    """The CUDA benchmark end to end at tiny sizes on CPU tensors (Triton's interpreter), so that
    it runs on the first GPU it meets; no timing is asserted."""
    pytest.importorskip("triton")
    from benchmarks import cuda

    rows = cuda.main(["--smoke", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["mean", "mgda", "nash_mtl", "trimmed_mean"]
    assert all(r["triton_s"] > 0 and r["host_s"] > 0 and r["floor_s"] > 0 for r in rows)
    assert all(r["ops"] is not None and r["ops"] <= 60 for r in rows)
    assert "| K | D | method |" in (tmp_path / "results.md").read_text()


def test_op_census_benchmark_runs_every_method():
    """benchmarks.ops builds valid arguments for every method (no counts asserted: that is
    tests/test_gpu_route.py's job)."""
    pytest.importorskip("triton")
    import torch

    import gradagg
    from benchmarks import ops

    with gradagg.use_solver("triton"):
        for method in gradagg.methods():
            assert ops.count(method, 4, torch.device("cpu")).total > 0, method
