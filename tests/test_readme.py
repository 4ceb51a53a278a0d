"""The README's Python examples run as written, and the demo prints its table."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


def test_demo_prints_a_row_per_method():
    out = subprocess.run([sys.executable, "-m", "gradagg", "demo", "--seed", "1"], capture_output=True, text=True,
                         check=True).stdout
    import gradagg

    rows = {line.split()[0] for line in out.splitlines() if line and line.split()[0] in gradagg.methods()}
    assert rows == set(gradagg.methods())
    assert "cos(d,weight)" in out
