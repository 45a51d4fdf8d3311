"""``vsmtrace notebooks``: list the Jupyter notebooks shipped in the package, or copy them out.

The notebooks are package data (``vsmtrace/notebooks/*.ipynb``, the repository's
``notebooks/`` folder), so an installed vsmtrace has them without a checkout.
Each one finds its trace by itself (``$VSMTRACE_TRACE``, else a ``demo.arrow``
in the notebook's folder or above, else it records the demo), so copying them
next to a demo's output is all the set-up they need.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import click


def shipped_notebooks() -> list[Path]:
    """The notebooks in the installed package (or the checkout of an editable install)."""
    folder = resources.files("vsmtrace.notebooks")
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".ipynb"))


def notebook_title(path: Path) -> str:
    """The first line of the notebook's first markdown cell, without the ``#``."""
    try:
        cells = json.loads(path.read_text())["cells"]
        first = next(c for c in cells if c["cell_type"] == "markdown")
        return "".join(first["source"]).splitlines()[0].lstrip("# ").strip()
    except (OSError, ValueError, KeyError, IndexError, StopIteration):
        return ""


def copy_notebooks(dest: Path, *, force: bool = False) -> list[Path]:
    """Copy every shipped notebook into ``dest`` (created); refuses to overwrite unless ``force``."""
    sources = shipped_notebooks()
    targets = [dest / src.name for src in sources]
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise click.UsageError(f"{existing[0]} already exists (use --force to overwrite the shipped notebooks)")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for src, target in zip(sources, targets, strict=True):
            shutil.copyfile(src, target)
    except OSError as exc:
        raise click.UsageError(f"cannot copy the notebooks to {dest}: {exc.strerror or exc}") from None
    return targets


@click.command(short_help="List the shipped Jupyter notebooks, or copy them out.")
@click.option("--copy", "copy_to", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Copy the notebooks into DIR (created if needed).")
@click.option("--force", is_flag=True, help="With --copy: overwrite notebooks already in DIR.")
def notebooks(copy_to: Path | None, force: bool) -> None:
    """List the Jupyter notebooks shipped with vsmtrace, or copy them into DIR to open them.

    Opening them needs JupyterLab: pip install 'vsmtrace[notebook]'. Each notebook
    uses $VSMTRACE_TRACE if set, else the demo.arrow in its folder or a parent
    folder (`vsmtrace demo` writes vsmtrace-demo/demo.arrow), else records the demo.
    """
    if copy_to is None:
        for path in shipped_notebooks():
            click.echo(f"{path.name:28} {notebook_title(path)}")
        click.echo("\ncopy them out with: vsmtrace notebooks --copy DIR, then: jupyter lab DIR")
        return
    for target in copy_notebooks(copy_to, force=force):
        click.echo(f"copied {target}")
    click.echo(f"open them with: jupyter lab {copy_to}   (needs: pip install 'vsmtrace[notebook]')")
