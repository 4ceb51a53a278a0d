"""The ``python -m gradagg demo`` program: a method table on real data, the toy problem's
trajectories and a multi-task training run, written to ``--out``."""

from __future__ import annotations

import sys
import time
from pathlib import Path


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, title: str, width: int = 28):
        self.title, self.width, self.start = title, width, time.perf_counter()

    def __call__(self, done: int, total: int, label: str = "") -> None:
        filled = self.width * done // total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        end = "\n" if done == total else ""
        sys.stderr.write(f"\r{self.title:<12} [{bar}] {done}/{total} {label:<10} {elapsed:5.1f}s{end}")
        sys.stderr.flush()


def main(seed: int = 0, out: str = "demo-out", quick: bool = False) -> Path:
    """Runs the three parts; prints their tables and writes tables and plots to ``out``."""
    from . import linnerud, multidigits, toy

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [linnerud.table(seed)]
    print(sections[-1], "\n", flush=True)
    sections.append(toy.run(out_dir, seed=seed, steps=60 if quick else 700, progress=Progress("toy")))
    print(sections[-1], "\n", flush=True)
    sections.append(multidigits.run(out_dir, seed=seed, steps=40 if quick else 500, progress=Progress("multidigits")))
    print(sections[-1], flush=True)
    (out_dir / "report.txt").write_text("\n\n".join(sections) + "\n")
    print(f"\nwrote {out_dir / 'report.txt'}, {out_dir / 'toy_trajectories.png'}, "
          f"{out_dir / 'multidigits_training.png'}")
    return out_dir
