"""notebooks/: committed without outputs, and both run top to bottom on a freshly recorded demo trace.

The demo guest is recorded once for this module (``run_demo`` into a temporary directory, a few
seconds on KVM), and the notebooks are run as the demo tells a user to: copied next to its output
with ``vsmtrace notebooks --copy OUT/notebooks`` and executed there, so each one must find the
trace by itself (``$VSMTRACE_TRACE`` is unset) and import only the installed package. Each notebook
ends with a cell printing ``NOTEBOOK_RESULT {json}``; the tests check those results, so a notebook
that runs but computes the wrong thing fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, _require_kvm, run_vsmtrace

NOTEBOOKS = ROOT / "notebooks"
TITLES = {
    "vtl_transitions.ipynb": "# VTL transitions of a VSM boot",
    "reproduce_bug.ipynb": "# Reproducing a VSM bug from a trace",
    "fleet.ipynb": "# A fleet of VSM boots",  # executed by tests/test_fleet.py (it records its own boots)
    "linux_boot.ipynb": "# Linux's boot on vsmtrace's Hyper-V, next to the VBS demo",  # run by tests/test_linux.py
}
CELL_TIMEOUT_S = 600
RESULT_MARKER = "NOTEBOOK_RESULT "
U32 = 0xFFFF_FFFF


# -- committed form ----------------------------------------------------------------------------


def test_notebooks_are_committed_without_outputs() -> None:
    found = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert set(TITLES) <= set(found), f"notebooks missing from {NOTEBOOKS}: {set(TITLES) - set(found)}"
    for name in found:
        nb = json.loads((NOTEBOOKS / name).read_text())
        for index, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            assert cell.get("outputs") == [], f"{name} cell {index} has outputs: strip them before committing"
            assert cell.get("execution_count") is None, f"{name} cell {index} has an execution count"
        assert "widgets" not in nb.get("metadata", {}), f"{name} carries widget state"


def test_notebooks_start_with_their_titles() -> None:
    for name, title in TITLES.items():
        nb = json.loads((NOTEBOOKS / name).read_text())
        first = nb["cells"][0]
        assert first["cell_type"] == "markdown"
        assert "".join(first["source"]).splitlines()[0] == title


# -- execution ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def python_kernel() -> str:
    """The kernel the notebooks name (python3): ipykernel installed and registered if missing."""
    try:
        import ipykernel  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "ipykernel"], check=True)
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"], check=True)
    return "python3"


@pytest.fixture(scope="module")
def demo_trace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One demo recording for every notebook of this module; $VSMTRACE_TRACE unset meanwhile."""
    _require_kvm()
    from vsmtrace.demo import TRACE_ENV, run_demo

    result = run_demo(tmp_path_factory.mktemp("notebook-demo"), echo=False, step=lambda _text: None)
    previous = os.environ.pop(TRACE_ENV, None)
    try:
        yield result.trace
    finally:
        if previous is not None:
            os.environ[TRACE_ENV] = previous


@pytest.fixture(scope="module")
def notebook_dir(demo_trace: Path) -> Path:
    """The shipped notebooks copied beside the demo's output, as the demo's closing advice says."""
    out = demo_trace.parent / "notebooks"
    r = run_vsmtrace(["notebooks", "--copy", str(out)])
    assert r.status == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.ipynb")) == sorted(TITLES)
    return out


def execute(folder: Path, name: str, kernel: str) -> tuple[Any, dict[str, Any]]:
    """Run a notebook top to bottom in its own folder (as Jupyter does); returns it with outputs and its result JSON."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(folder / name, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel, resources={"metadata": {"path": str(folder)}})
    client.execute()  # a failing cell raises CellExecutionError with its traceback
    lines = [
        line
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stdout"
        for line in output.text.splitlines()
        if line.startswith(RESULT_MARKER)
    ]
    assert len(lines) == 1, f"{name} printed {len(lines)} result lines"
    return nb, json.loads(lines[0][len(RESULT_MARKER) :])


def images(nb: Any) -> int:
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type in ("display_data", "execute_result") and "image/png" in output.get("data", {})
    )


@pytest.mark.kvm
def test_vtl_transitions_notebook(demo_trace: Path, notebook_dir: Path, python_kernel: str) -> None:
    nb, r = execute(notebook_dir, "vtl_transitions.ipynb", python_kernel)
    assert r["trace"] == str(demo_trace.resolve())  # found in the folder above the notebook's

    # Secure calls by service code (args[0] = RDX), per VP, as the guest source says.
    calls = r["secure_calls"]
    assert (calls["vp0/0x1001"], calls["vp0/0x1002"], calls["vp0/0x1003"], calls["vp1/0x1004"]) == (24, 12, 6, 8)
    assert "vp1/0x1001" not in calls and "vp0/0x1004" not in calls
    assert r["secure_calls_match_source"] is True

    # Transitions per VP and reason: calls on both VPs, VTL1's timer on VP0, the two intercepts.
    t = r["transitions"]
    assert t["vp0/intercept"] == 2
    assert t["vp0/call"] >= 24 + 12 + 6 and t["vp1/call"] >= 8
    assert t["vp0/interrupt"] > 0

    # Residency: shares of each VP add up to 1.
    for vp in (0, 1):
        shares = [v for k, v in r["residency_share"].items() if k.startswith(f"vp{vp}/")]
        assert len(shares) == 2 and abs(sum(shares) - 1) < 1e-3

    # Protections: default mask over all RAM, then the secret page hidden and kernel code R+X.
    prot = r["protections"]
    assert len(prot) == 3 and prot[0]["new_mask"] == 0xF and prot[0]["pages"] > 1
    assert [(p["pages"], p["new_mask"]) for p in prot[1:]] == [(1, 0x0), (1, 0x5)]

    # The two intercepts, their code, target, the mask that denied them, and VTL1's #GP answer.
    by_access = {i["access"]: i for i in r["intercepts"]}
    assert set(by_access) == {"read", "write"} and len(r["intercepts"]) == 2
    read, write = by_access["read"], by_access["write"]
    assert (read["rip_symbol"], read["gpa_symbol"], read["mask"]) == ("driver_peek", "secure_secret", 0x0)
    assert read["gpa"] == prot[1]["gpa_start"]
    assert write["rip_symbol"] == "driver_patch" and write["mask"] == 0x5
    assert write["gpa"] == prot[2]["gpa_start"]
    for i in (read, write):
        assert (i["gp_vector"], i["gp_vtl"], i["gp_rip"]) == (13, 0, i["rip"])
        assert i["answered_with"] == "HvCallSetVpRegisters"
        assert i["message_type"] == 0x80000001

    # Interrupts per vector and VTL.
    irqs = {(i["vector"], i["vtl"], i["source"]): i["count"] for i in r["interrupts"]}
    assert irqs[(13, 0, "exception")] == 2
    assert irqs[(0x30, 1, "apic")] == 2
    assert irqs[(0x31, 1, "apic")] > 0 and irqs[(0x40, 0, "apic")] > 0
    assert r["event_counts"]["INTERCEPT"] == 2 and r["event_counts"]["PROTECTION"] == 3

    # Figures written and shown.
    for figure in r["figures"]:
        assert Path(figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert images(nb) >= 2  # the timeline and the protection map


@pytest.mark.kvm
def test_reproduce_bug_notebook(demo_trace: Path, notebook_dir: Path, python_kernel: str) -> None:
    _, r = execute(notebook_dir, "reproduce_bug.ipynb", python_kernel)
    assert r["trace"] == str(demo_trace.resolve())

    base = r["baseline"]
    assert base["verified"] is True and base["entries"] > 100

    d = r["divergence"]
    assert (d["kind"], d["entry"], d["hypercall"], d["vtl"]) == ("EMULATION", "hypercall", "HvCallVtlReturn", 1)
    assert d["recorded_op"] == d["replayed_op"] == "vsm.request_transition"
    rax, rcx = d["recorded_rax_rcx"]
    assert d["replayed_rax_rcx"] == [rax & U32, rax >> 32], "the bug returns a 32-bit split of VtlReturnX64Rax"
    assert d["replayed_rax_rcx"] != d["recorded_rax_rcx"]
    assert 0 < d["entries_replayed_before"] < base["entries"]

    state = r["state_before"]
    assert state["seq"] == d["seq"] - 1
    assert state["enabled_vtls"] == [0, 1]
    assert state["vtl_return_rax_rcx"] == d["recorded_rax_rcx"], (
        "VTL1's assist page holds what the correct code returns"
    )

    assert r["after_undo"] == {"verified": True, "entries": base["entries"]}
