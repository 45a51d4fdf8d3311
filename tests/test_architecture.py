"""The import graph keeps the layers of docs/architecture.md: no cycles, nothing imports tests, only the CLI imports the CLI.

Read with the standard library's ``ast`` from the source folders, so a function-local
import counts as much as a module-level one; only imports under ``if TYPE_CHECKING:``
are left out (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Source folder -> the package it installs as (setup.py).
PACKAGES = {
    "vmm": "vsmtrace.vmm",
    "recorder": "vsmtrace.recorder",
    "replayer": "vsmtrace.replayer",
    "analysis": "vsmtrace.analysis",
    "guests": "vsmtrace.guests",
    "vsmtrace": "vsmtrace",
}
#: The command line: the only modules that may import ``vsmtrace.cli``.
CLI_MODULES = frozenset({"vsmtrace.cli", "vsmtrace.__main__"})


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return skipped


def imported_names(path: Path) -> list[str]:
    """Every absolute module name ``path`` imports at run time (``from a import b`` gives ``a.b``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    names: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the product modules it imports (a name resolves to its longest module prefix)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {resolve(name) for name in imported_names(path)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(_modules())


def test_the_checker_sees_a_cycle_and_skips_type_checking_imports(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nfrom pkg.a import f\nif TYPE_CHECKING:\n    from pkg.c import h\n")
    (tmp_path / "c.py").write_text("from pkg.b import g\n")
    modules = {f"pkg.{name}": tmp_path / f"{name}.py" for name in "abc"}
    graph = import_graph(modules)
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.b"}}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_the_graph_covers_the_package(graph: dict[str, set[str]]) -> None:
    assert {"vsmtrace.cli", "vsmtrace.vmm.machine", "vsmtrace.replayer.engine", "vsmtrace.recorder.writer"} <= graph.keys()
    assert "vsmtrace.vmm.virtual_processor" in graph["vsmtrace.vmm.machine"]


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_only_the_cli_imports_the_cli(graph: dict[str, set[str]]) -> None:
    offenders = sorted(m for m, targets in graph.items() if "vsmtrace.cli" in targets and m not in CLI_MODULES)
    assert offenders == []


def test_product_and_bench_never_import_tests() -> None:
    files = [*_modules().values(), *sorted((ROOT / "bench").rglob("*.py"))]
    bench_scripts = [p for p in (ROOT / "bench").iterdir() if p.is_file() and p.suffix == "" and p.read_text().startswith("#!") and "python" in p.read_text().splitlines()[0]]
    offenders = []
    for path in [*files, *bench_scripts]:
        for name in imported_names(path):
            if name == "tests" or name.startswith("tests."):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


#: Module prefixes of the pure emulation: it runs unchanged under KVM and under replay.
EMULATION = ("vsmtrace.vmm.hyperv", "vsmtrace.vmm.vsm")
#: What the emulation must not reach: KVM, the machine, its backends, the recorder and replayer.
KVM_SIDE = (
    "vsmtrace.vmm.kvm", "vsmtrace.vmm.machine", "vsmtrace.vmm.virtual_processor", "vsmtrace.vmm.backends",
    "vsmtrace.vmm.builder", "vsmtrace.vmm.memory_view", "vsmtrace.vmm.emulation_io", "vsmtrace.recorder",
    "vsmtrace.replayer",
)  # fmt: skip


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_emulation_stays_pure(graph: dict[str, set[str]]) -> None:
    offenders = sorted(
        f"{m} -> {t}" for m, targets in graph.items() if _under(m, EMULATION) for t in targets if _under(t, KVM_SIDE)
    )
    assert offenders == []


def test_the_machine_does_not_import_its_extensions(graph: dict[str, set[str]]) -> None:
    """The bare machine is below Hyper-V and VSM: they plug in through vmm/extension.py (vmm/builder.py)."""
    bare = ("vsmtrace.vmm.machine", "vsmtrace.vmm.virtual_processor")
    offenders = sorted(f"{m} -> {t}" for m in bare for t in graph[m] if _under(t, ("vsmtrace.vmm.backends", *EMULATION)))
    assert offenders == []
