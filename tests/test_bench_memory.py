"""The memory benchmark runs end to end (tiny models, one process per row), so that it cannot rot;
no timing or memory size is asserted beyond being positive."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import memory

ROOT = Path(__file__).resolve().parent.parent


def test_memory_bench_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "memory.md").read_text()
    assert "| model | path | K | params | extra MiB | time ms |" in md
    for model in memory.MODELS:
        for path in memory.PATHS:
            assert f"| {model} | {path} |" in md, f"no row for {model}/{path}"
    rows = {(r["model"], r["path"]): r for r in json.loads((tmp_path / "memory.json").read_text())}
    assert len(rows) == len(memory.MODELS) * len(memory.PATHS)
    for model in memory.MODELS:
        for path in ("plain", "jacobian"):
            row = rows[(model, path)]
            assert row["status"] == "ok", row
            assert row["extra_bytes"] > 0 and row["median_s"] > 0, row
        assert rows[(model, "jacobian")]["cos_vs_jacobian"] > 0.999
        gradagg_row = rows[(model, "gradagg")]  # gradagg.backward's step gives the Jacobian path's gradient
        assert gradagg_row["status"] == "ok" and gradagg_row["cos_vs_jacobian"] > 0.99999, gradagg_row
    # torchjd may be n/a (the bench extra is not installed), never an error.
    assert all(r["status"] in ("ok", "n/a") for r in rows.values()), [r.get("reason") for r in rows.values()]


def test_amp_bench_smoke(tmp_path):
    """benchmarks.amp runs end to end on a tiny J (one method, both modes) and writes its table."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.amp", "--k", "3", "--d", "2000", "--repeats", "1",
                           "--methods", "nash_mtl", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| nash_mtl |" in (tmp_path / "amp.md").read_text()
    (row,) = json.loads((tmp_path / "amp.json").read_text())["rows"]
    assert row["plain_ms"] > 0 and row["scaler_ms"] > 0
