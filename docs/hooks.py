"""MkDocs hooks of the gradagg site (registered in mkdocs.yml).

- Every method of ``gradagg.methods()`` must have a page ``methods/<name>.md`` in the navigation, with
  the sections of the method template; a missing one is a warning, which ``--strict`` turns into a
  failed build.
- ``<!-- gradagg:facts -->`` on a method page becomes a table of what the registry says about the
  method: aliases, family, state, randomness, extra inputs, options and their defaults. The page
  cannot drift from the code.
- ``<!-- gradagg:figure -->`` becomes a figure of the direction the method picks for two conflicting
  gradients, drawn at build time from ``gradagg.aggregate``; ``<!-- gradagg:overview -->`` becomes
  a grid of all of them. The figures are generated files: nothing is written to the source tree.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import torch

log = logging.getLogger("mkdocs.plugins.gradagg")

#: The sections every method page has (level-2 headings).
SECTIONS = ("Math", "Options", "State", "When to use it", "Paper")

#: Two conflicting gradients of different norms (cos = -0.6, ‖g₂‖ = 2 ‖g₁‖), and for the methods
#: that need more tasks (robust aggregators), four gradients, one an outlier.
TWO = torch.tensor([[1.0, 0.0], [-1.2, 1.6]], dtype=torch.float64)
FOUR = torch.tensor([[1.0, 0.2], [0.8, 0.6], [0.9, -0.2], [-2.0, 1.0]], dtype=torch.float64)
#: Options the figure passes where a method has required ones; the tasks it uses.
FIGURE = {
    "constant": ({"weights": torch.tensor([0.25, 0.75], dtype=torch.float64)}, TWO),
    "crmogm": ({"inner": "upgrad"}, TWO),
    "krum": ({"f": 1}, FOUR),
    "trimmed_mean": ({"trim": 1}, FOUR),
}


def _direction(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(J, d): the gradients of the figure and the method's combination of them (its first call)."""
    import gradagg

    info = gradagg.methods()[name]
    options, jac = FIGURE.get(name, ({}, TWO))
    kwargs: dict[str, Any] = dict(options)
    if info.stateful:
        kwargs["state"] = gradagg.init((name, options) if options else name, jac.shape[0])
    if info.random:
        kwargs["generator"] = torch.Generator().manual_seed(0)
    if info.uses_losses:
        kwargs["losses"] = torch.ones(jac.shape[0], dtype=jac.dtype)
    if info.uses_cross:
        kwargs["cross"] = (jac, jac)
    return jac, gradagg.aggregate(jac, name, **kwargs)


def _arrow(ax: Any, tip: torch.Tensor, span: float, **style: Any) -> None:
    """An arrow from 0 to ``tip`` whose head shrinks with it, so that a short one still points its way."""
    length = float(tip.norm())
    size = 12.0 * min(1.0, length / (0.3 * span)) if length > 0 else 0.0
    ax.annotate("", xy=tuple(tip.tolist()), xytext=(0, 0),
                arrowprops={"shrinkA": 0, "shrinkB": 0, "mutation_scale": size, **style})


def _draw(ax: Any, name: str) -> None:
    jac, d = _direction(name)
    mean = jac.mean(0)
    span = float(max(jac.abs().max(), d.abs().max())) * 1.25
    for i, g in enumerate(jac):
        _arrow(ax, g, span, arrowstyle="->", color="0.55", lw=1.2)
        ax.text(*(1.08 * g).tolist(), f"g{i + 1}", color="0.35", fontsize=8, ha="center", va="center")
    _arrow(ax, mean, span, arrowstyle="->", color="0.55", lw=1.0, ls="--")
    _arrow(ax, d, span, arrowstyle="-|>", color="C3", lw=2.0)
    ax.set_xlim(-span, span)
    ax.set_ylim(-span, span)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.9", lw=0.6, zorder=0)
    ax.axvline(0, color="0.9", lw=0.6, zorder=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(name, fontsize=9)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def figure(name: str) -> bytes:
    """The PNG of one method's direction for the figure's gradients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.8, 2.8))
    _draw(ax, name)
    ax.text(0.02, 0.02, "red: d   dashed: mean", transform=ax.transAxes, fontsize=7, color="0.4")
    return _png(fig)


def overview(names: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 7
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows))
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        _draw(ax, name)
    return _png(fig)


def facts(name: str) -> str:
    """The registry's facts about one method, as a Markdown table."""
    import gradagg

    info = gradagg.methods()[name]
    family = ("weighting: d = Σᵢ wᵢ gᵢ, with w from the Gramian (`gradagg.weights` returns w)" if info.weighting
              else "per-coordinate: d is not a combination Jᵀw (`gradagg.weights` refuses it)")
    state = (f"`state = gradagg.init({name!r}, K)`, advanced in place by each call" if info.stateful
             else "stateless: a pure function of its inputs")
    needs = [text for flag, text in ((info.random, "`generator=` (random draws)"),
                                     (info.uses_losses, "`losses=` (the K task losses)"),
                                     (info.uses_cross, "`cross=` (two independent mini-batches' Jacobians)")) if flag]
    rows = [("name", f"`{name}`" + (" (aliases: " + ", ".join(f"`{a}`" for a in info.aliases) + ")"
                                    if info.aliases else "")),
            ("family", family), ("state", state), ("extra inputs", ", ".join(needs) or "none")]
    if info.options:
        rows.append(("options (default)", ", ".join(f"`{key}` (`{value!r}`)" for key, value in info.options.items())))
    else:
        rows.append(("options", "none"))
    body = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"| | |\n|---|---|\n{body}\n\n{info.summary}\n"


# --- MkDocs events -------------------------------------------------------------------------------------


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    import gradagg

    names = sorted(gradagg.methods())
    for name in names:
        if files.get_file_from_path(f"methods/{name}.md") is None:
            log.warning(f"gradagg.methods() has {name!r} but docs/methods/{name}.md is missing")
        files.append(File.generated(config, f"methods/figures/{name}.png", content=figure(name)))
    files.append(File.generated(config, "methods/figures/overview.png", content=overview(names)))
    return files


def on_nav(nav: Any, config: Any, files: Any) -> Any:
    import gradagg

    listed = {page.file.src_uri for page in nav.pages}
    for name in gradagg.methods():
        if f"methods/{name}.md" not in listed:
            log.warning(f"docs/methods/{name}.md is not in mkdocs.yml's nav")
    return nav


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    import gradagg

    uri = page.file.src_uri
    match = re.fullmatch(r"methods/(\w+)\.md", uri)
    if match and match.group(1) in gradagg.methods():
        name = match.group(1)
        headings = set(re.findall(r"^## (.+?)\s*$", markdown, flags=re.M))
        for section in SECTIONS:
            if section not in headings:
                log.warning(f"{uri} lacks the section '## {section}'")
        for marker in ("<!-- gradagg:facts -->", "<!-- gradagg:figure -->"):
            if marker not in markdown:
                log.warning(f"{uri} lacks {marker}")
        markdown = markdown.replace("<!-- gradagg:facts -->", facts(name))
        markdown = markdown.replace(
            "<!-- gradagg:figure -->",
            f"![The direction {name} picks for two conflicting gradients](figures/{name}.png)\n\n"
            "*The direction d (red) this method picks for two conflicting gradients g1 and g2 "
            "(cos = -0.6, ‖g2‖ = 2‖g1‖; four gradients for the robust aggregators), its first call; "
            "dashed: their mean. Drawn by `gradagg.aggregate` when the site is built.*")
    return markdown.replace("<!-- gradagg:overview -->", "![Every method's direction](figures/overview.png)")
