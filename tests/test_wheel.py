"""The package as users get it: `python -m build` makes an sdist and an abi3 wheel, and the wheel works alone.

The test builds both from the repository, checks what they contain, installs the wheel with torch alone into a
fresh virtual environment outside the source tree, and runs ``check_installed`` there. cibuildwheel runs this file
as a script on every wheel it builds (``python test_wheel.py README.md``, see ``[tool.cibuildwheel]`` in
pyproject.toml), so the part that runs in the installed environment needs nothing but torch and gradagg.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def first_python_block(readme: Path) -> str:
    """The README's first ```python block, as written."""
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, f"{readme} has no ```python block"
    return blocks[0]


def check_installed(readme: Path) -> None:
    """Runs in the environment the wheel was installed into, from a directory outside the source tree."""
    import torch

    import gradagg
    from gradagg.solvers import native

    location = Path(gradagg.__file__).resolve()
    assert location.is_relative_to(Path(sys.prefix).resolve()), f"gradagg came from {location}, not {sys.prefix}"
    assert gradagg.__version__ == importlib.metadata.version("gradagg")

    kkt = importlib.import_module("gradagg._kkt")
    suffix = ".pyd" if sys.platform == "win32" else ".abi3.so"  # the stable ABI's name for the module
    assert Path(kkt.__file__).name == "_kkt" + suffix, kkt.__file__
    assert native.available() and native.enabled()

    # Every call into the extension goes through native._kkt: record which entry points a solve uses.
    calls: list[str] = []

    class Recorder:
        def __getattr__(self, name: str) -> object:
            entry = getattr(kkt, name)
            if not callable(entry):
                return entry

            def recorded(*args: object) -> object:
                calls.append(name)
                return entry(*args)

            return recorded

    native._kkt = Recorder()
    try:
        # MGDA's min-norm point of the hull of two orthogonal gradients: min over w1 + w2 = 1 of w1² a² + w2² b²
        # gives w = (b², a²) / (a² + b²); (1/2, 1/2) for unit gradients, (4/5, 1/5) for norms 1 and 2.
        for scale, expected in ((1.0, [0.5, 0.5]), (2.0, [0.8, 0.2])):
            jac = torch.tensor([[1.0, 0.0], [0.0, scale]], dtype=torch.float64)
            w = gradagg.weights(jac, "mgda")
            torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
        assert "mgda" in calls, f"MGDA did not run in C: {calls}"
    finally:
        native._kkt = kkt

    exec(compile(first_python_block(readme), f"{readme}[first python block]", "exec"), {"__name__": "__readme__"})


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _run(args: list[str | Path], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


def test_wheel_builds_installs_alone_and_runs(tmp_path: Path) -> None:
    import torch

    # A fresh environment with torch alone: the same version as here (the CPU wheel where this is a CPU build),
    # installed while the wheel builds; --no-compile skips byte-compiling torch's files (half the install time).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = _venv_python(venv)
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile"]
    torch_install = subprocess.Popen([*pip, f"torch=={torch.__version__}"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
    try:
        dist = tmp_path / "dist"
        # The wheel is built from the sdist, so this also checks that the sdist alone builds (in an isolated
        # environment: setuptools comes from the package index).
        _run([sys.executable, "-m", "build", "--outdir", dist, ROOT], cwd=ROOT)
    finally:
        log, _ = torch_install.communicate()
    assert torch_install.returncode == 0, f"installing torch=={torch.__version__} failed:\n{log[-4000:]}"

    (sdist,) = dist.glob("gradagg-*.tar.gz")
    (wheel,) = dist.glob("gradagg-*.whl")
    assert re.fullmatch(r"gradagg-[0-9][^-]*-cp310-abi3-[a-z0-9_.]+\.whl", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    extensions = {n for n in names if n.endswith((".so", ".pyd"))}
    assert extensions == {"gradagg/_kkt.pyd" if sys.platform == "win32" else "gradagg/_kkt.abi3.so"}, extensions
    assert "gradagg/py.typed" in names and "gradagg/__init__.py" in names
    assert "gradagg/_kkt.c" not in names

    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    for needed in ("gradagg/_kkt.c", "gradagg/py.typed", "setup.py", "pyproject.toml", "README.md", "CHANGELOG.md"):
        assert needed in members, f"{needed} is missing from {sdist.name}"
    assert not any(m.endswith((".so", ".pyd")) for m in members), "a built module leaked into the sdist"

    _run([*pip, "--no-deps", wheel])
    # From a directory outside the source tree, with a copy of this file: nothing of the checkout is importable.
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(Path(__file__), work / "test_wheel.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADAGG_", "PYTHON"))}
    _run([python, "test_wheel.py", ROOT / "README.md"], cwd=work, env=env)


if __name__ == "__main__":
    check_installed(Path(sys.argv[1]))
    print("gradagg wheel: OK")
