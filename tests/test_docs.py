"""The documentation site (docs/, mkdocs.yml): every method of ``gradagg.methods()`` has its page,
every Python block on every page runs, every included file is one a test runs, and the site builds
with ``--strict``."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import gradagg

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
SNIPPET = re.compile(r'^--8<-- "([^"]+)"\s*$', flags=re.M)
#: Files the site includes verbatim, and the test file that runs each of them.
INCLUDED = {
    "examples/lightning_mtl.py": "tests/test_lightning.py",
    "examples/distributed_train.py": "tests/test_distributed.py",
    "CHANGELOG.md": None,
}


def python_blocks(page: str) -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(), flags=re.S | re.M)
    return [b for b in blocks if not SNIPPET.search(b)]


def nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [p for value in node.values() for p in nav_pages(value)]
    return [p for item in node for p in nav_pages(item)]


NAV = nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
RUNNABLE = [page for page in PAGES if python_blocks(page)]


def test_every_method_has_a_page_in_the_nav():
    for name in gradagg.methods():
        assert f"methods/{name}.md" in PAGES, name
        assert f"methods/{name}.md" in NAV, name
    for page in NAV:
        assert page in PAGES, f"the nav lists {page}, which does not exist"


def test_method_pages_have_the_template_sections():
    for name in gradagg.methods():
        text = (DOCS / "methods" / f"{name}.md").read_text()
        for section in ("Math", "Options", "State", "When to use it", "Paper"):
            assert re.search(rf"^## {re.escape(section)}\s*$", text, flags=re.M), (name, section)
        assert "<!-- gradagg:facts -->" in text and "<!-- gradagg:figure -->" in text, name
        assert python_blocks(f"methods/{name}.md"), f"{name}'s page has no runnable example"


def test_every_loss_weighting_has_a_section():
    text = (DOCS / "methods" / "loss-weightings.md").read_text()
    sections = set(re.findall(r"^##+ (\S+)\s*$", text, flags=re.M))
    assert set(gradagg.scalarizations()) <= sections, set(gradagg.scalarizations()) - sections


def test_pages_have_runnable_code():
    assert len(RUNNABLE) >= 20, RUNNABLE


@pytest.mark.parametrize("page", RUNNABLE)
def test_page_code_runs(page, tmp_path, monkeypatch):
    """A page's blocks run in order in one namespace, as a reader would paste them."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for index, block in enumerate(python_blocks(page)):
        exec(compile(block, f"docs/{page}[python block {index}]", "exec"), namespace)


def test_included_files_exist_and_are_run_by_tests():
    for page in PAGES:
        for path in SNIPPET.findall((DOCS / page).read_text()):
            assert path in INCLUDED, f"docs/{page} includes {path}, which no test is known to run"
            assert (ROOT / path).is_file(), path
            runner = INCLUDED[path]
            if runner is not None:
                assert Path(path).name in (ROOT / runner).read_text(), f"{runner} does not run {path}"


def test_code_blocks_are_python_or_shell_commands():
    """Every fenced block is Python (run above), an included file, a shell command, or plain text output."""
    for page in PAGES:
        for lang in re.findall(r"^```(\S*)\n.*?^```[ \t]*$", (DOCS / page).read_text(), flags=re.M | re.S):
            assert lang in ("python", "bash", "text"), (page, lang)


def test_site_builds_with_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    for name, info in gradagg.methods().items():
        html = (site / "methods" / name / "index.html").read_text()
        assert f"figures/{name}.png" in html and info.summary.split()[0] in html, name
        png = site / "methods" / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    api = (site / "api" / "index.html").read_text()
    for name in gradagg.__all__:
        assert name in api, name


#: Tools the shell lines may run that are not part of this repository.
EXTERNAL_MODULES = {"cibuildwheel", "jupyter"}


def _source_of_module(module: str) -> Path | None:
    path = ROOT / Path(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__main__.py", path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_shell_lines_refer_to_what_exists():
    """The ```bash blocks are commands, not run here: each must name a make target of the Makefile,
    an extra of pyproject.toml, a file or module of this repository, and only the flags its
    argument parser declares."""
    import tomllib

    makefile = (ROOT / "Makefile").read_text()
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    checked = 0
    for page in PAGES:
        for block in re.findall(r"^```bash\n(.*?)^```", (DOCS / page).read_text(), flags=re.S | re.M):
            for line in block.splitlines():
                words = line.split("#")[0].split()
                if not words:
                    continue
                checked += 1
                tool, args = words[0], words[1:]
                where = f"docs/{page}: {line.strip()}"
                if tool == "make":
                    assert all(re.search(rf"^{re.escape(t)}:", makefile, flags=re.M) for t in args), where
                elif tool == "pip":
                    for spec in re.findall(r"\.\[([\w,]+)\]", line):
                        assert set(spec.split(",")) <= extras, where
                elif tool in ("python", "torchrun"):
                    files = [a for a in args if a.endswith(".py")]
                    if "-m" in args:
                        module = args[args.index("-m") + 1]
                        if module in EXTERNAL_MODULES:
                            continue
                        source = _source_of_module(module)
                        assert source is not None, where
                        files.append(str(source.relative_to(ROOT)))
                    assert files, where
                    for file in files:
                        assert (ROOT / file).is_file(), where
                        text = (ROOT / file).read_text()
                        for flag in (a.split("=")[0] for a in args if a.startswith("--") and tool == "python"):
                            assert f'"{flag}"' in text, f"{where}: {file} declares no {flag}"
                else:
                    raise AssertionError(f"{where}: unexpected command {tool!r}")
    assert checked >= 20
