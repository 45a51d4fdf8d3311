"""CI (.ci/wheel): run notebooks top to bottom with nbclient, each in its own folder, as JupyterLab would.

Run with the Python of the virtualenv under test. A first cell is added that prints where
``vsmtrace`` is imported from, and the run fails unless that is inside this virtualenv (so a
notebook can never pass by finding a checkout). Each notebook must print one ``NOTEBOOK_RESULT``
line; the tests in tests/test_notebooks.py check their values, this only checks they ran.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

PROBE = "import vsmtrace\nprint('VSMTRACE_FROM', vsmtrace.__file__)"


def stdout_lines(cell: nbformat.NotebookNode) -> list[str]:
    return [
        line
        for out in cell.get("outputs", [])
        if out.output_type == "stream" and out.name == "stdout"
        for line in out.text.splitlines()
    ]


def run(path: Path) -> str:
    """Execute one notebook; returns a one-line summary or raises with the reason."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
    started = time.monotonic()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    (origin,) = [line.split(" ", 1)[1] for line in stdout_lines(nb.cells[0]) if line.startswith("VSMTRACE_FROM ")]
    if Path(sys.prefix).resolve() not in Path(origin).resolve().parents:
        raise SystemExit(f"{path.name}: vsmtrace came from {origin}, not from the virtualenv {sys.prefix}")
    results = [line for cell in nb.cells for line in stdout_lines(cell) if line.startswith("NOTEBOOK_RESULT ")]
    if len(results) != 1:
        raise SystemExit(f"{path.name}: printed {len(results)} NOTEBOOK_RESULT lines, expected 1")
    return f"{path.name}: {len(nb.cells) - 1} cells ran in {time.monotonic() - started:.1f} s, vsmtrace from {origin}"


def main(paths: list[str]) -> int:
    if not paths:
        raise SystemExit("usage: python .ci/notebooks.py NOTEBOOK.ipynb...")
    for name in paths:
        print(run(Path(name).resolve()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
