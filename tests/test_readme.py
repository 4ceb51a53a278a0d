"""The README's Python examples run as written, and the demo prints its table."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


def test_demo_writes_its_report_and_plots(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gradagg", "demo", "--seed", "1", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    import gradagg
    from gradagg.demo import multidigits, toy

    first_words = {line.split()[0] for line in out.splitlines() if line.split()}
    assert set(gradagg.methods()) <= first_words  # the Linnerud table has a row per method
    assert "cos(d,weight)" in out and "Toy problem" in out and "MultiDigits" in out
    assert set(toy.METHODS) <= first_words and set(multidigits.METHODS) <= first_words
    for name in ("report.txt", "toy_trajectories.png", "multidigits_training.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert (tmp_path / "toy_trajectories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_is_deterministic_given_the_seed():
    from gradagg.demo import multidigits, toy

    for method in ("pcgrad", "nash_mtl"):
        assert torch.equal(toy.trajectories(method, 15, 0.05, seed=3), toy.trajectories(method, 15, 0.05, seed=3))
    data = multidigits.make_data(seed=2, train_pairs=300, test_pairs=100)
    first = multidigits.train("pcgrad", data, seed=2, steps=5)
    second = multidigits.train("pcgrad", data, seed=2, steps=5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
