"""The distribution as a user gets it: the wheel's contents, the guest SDK and notebooks it ships.

A wheel is built (``pip wheel --no-deps``, as CI does) from a copy of this checkout's files into
which a demo's output folder was planted (once picked up as a bogus ``vsmtrace-demo`` package), and
installed with ``--no-deps`` into a virtualenv outside the checkout whose dependencies come from
the system site (CI's ``.ci/run`` also installs it into a fresh virtualenv from PyPI). Commands then
run from an empty directory, so anything that still needs a checkout fails here.

The SDK's user documentation (``guests/README.md``) is tested as written: its example guests are
extracted into a directory outside the repository, built with ``vsmtrace guest build`` and booted.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, RunResult, run_vsmtrace

MAPPED = ("vmm", "recorder", "replayer", "analysis", "guests")  # setup.py's folders -> vsmtrace.<folder>
SDK_DOC = ROOT / "guests" / "README.md"
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs the system gcc")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that could put the checkout on a child's sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "VSMTRACE_TRACE")}
    env.update(extra)
    return env


# -- the SDK doc's example guests ----------------------------------------------------------------


def doc_sources() -> dict[str, str]:
    """The files the SDK doc shows, by name: every ```c block whose first line is ``/* NAME - ...``."""
    text = SDK_DOC.read_text()
    files = {}
    for block in re.findall(r"^```c\n(.*?)^```$", text, re.S | re.M):
        m = re.match(r"/\* (\S+\.[ch]) - ", block)
        if m:
            files[m[1]] = block
    return files


@pytest.fixture
def user_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside the repository holding the doc's example guests, as a user would save them."""
    folder = tmp_path_factory.mktemp("my-guests")
    assert ROOT not in folder.parents
    for name, text in doc_sources().items():
        (folder / name).write_text(text)
    return folder


def vsmtrace_in(cwd: Path, args: list[str], timeout: float = 120) -> RunResult:
    """The checkout's (editable) ``vsmtrace`` run from ``cwd``."""
    r = subprocess.run([sys.executable, "-m", "vsmtrace", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=_clean_env())
    return RunResult(r.returncode, r.stdout, r.stderr)


def test_sdk_doc_shows_both_example_guests() -> None:
    files = doc_sources()
    assert {"my_guest.c", "my_guest.h", "secure_counter.c"} <= set(files)
    assert '#include "my_guest.h"' in files["my_guest.c"]
    assert '#include "vsm.h"' in files["secure_counter.c"] and "vtl1_user_op" in files["secure_counter.c"]


@needs_gcc
@pytest.mark.kvm
def test_one_vtl_guest_with_its_own_header_builds_outside_the_repo_and_boots(user_dir: Path) -> None:
    built = vsmtrace_in(user_dir, ["guest", "build", "my_guest.c"])
    assert built.status == 0, built.stderr
    kernel = Path(built.stdout.strip())
    assert kernel.is_file() and kernel.read_bytes()[:4] == b"\x7fELF" and ROOT not in kernel.parents

    run = vsmtrace_in(user_dir, ["run", str(kernel), "--append", "rounds=5", "--record", "my.arrow"])
    assert run.status == 1, run.stdout + run.stderr  # exit code 0
    assert run.stdout.count("ok spin_wait") == 5 and "ok vp_index" in run.stdout
    assert "PASSED: 0 failed" in run.stdout
    info = vsmtrace_in(user_dir, ["info", "my.arrow"])
    assert re.search(r"HYPERCALL\s+5\b", info.stdout), info.stdout

    # Its own header counts: a -D flag it honours, and an edited header is a new build.
    flagged = vsmtrace_in(user_dir, ["guest", "build", "my_guest.c", "--cflag=-DDEFAULT_ROUNDS=2"])
    assert flagged.status == 0 and Path(flagged.stdout.strip()) != kernel
    run = vsmtrace_in(user_dir, ["run", flagged.stdout.strip()])
    assert run.status == 1 and run.stdout.count("ok spin_wait") == 2, run.stdout
    header = user_dir / "my_guest.h"
    header.write_text(header.read_text().replace("#define DEFAULT_ROUNDS 3", "#define DEFAULT_ROUNDS 4"))
    rebuilt = vsmtrace_in(user_dir, ["guest", "build", "my_guest.c"])
    assert rebuilt.status == 0 and Path(rebuilt.stdout.strip()) != kernel
    run = vsmtrace_in(user_dir, ["run", rebuilt.stdout.strip()])
    assert run.status == 1 and run.stdout.count("ok spin_wait") == 4, run.stdout


@needs_gcc
@pytest.mark.kvm
def test_two_vtl_guest_builds_outside_the_repo_and_vtl1_blocks_the_write(user_dir: Path) -> None:
    from vsmtrace.guests.build import build_file

    kernel = build_file(user_dir / "secure_counter.c")  # the documented Python call
    run = vsmtrace_in(user_dir, ["run", str(kernel), "--record", "sc.arrow"])
    assert run.status == 1, run.stdout + run.stderr
    for check in ("lock", "vtl0_reads_counter", "vtl0_write_blocked", "intercepts_seen_by_vtl1"):
        assert f"ok {check}\n" in run.stdout
    assert "PASSED: 0 failed" in run.stdout
    info = vsmtrace_in(user_dir, ["info", "sc.arrow"]).stdout
    assert re.search(r"INTERCEPT\s+1\b", info) and re.search(r"PROTECTION\s+2\b", info), info
    replay = vsmtrace_in(user_dir, ["replay", "sc.arrow"])
    assert replay.status == 0 and "replay verified" in replay.stdout


@needs_gcc
def test_guest_build_errors_are_one_line(tmp_path: Path) -> None:
    missing = vsmtrace_in(tmp_path, ["guest", "build", "nope.c"])
    assert missing.status == 2 and missing.stderr == "vsmtrace: error: guest source nope.c does not exist\n"

    (tmp_path / "broken.c").write_text("int kmain(void) { return not_declared(); }\n")
    broken = vsmtrace_in(tmp_path, ["guest", "build", "broken.c"])
    assert broken.status == 2 and broken.stdout == ""
    assert "not_declared" in broken.stderr and "Traceback" not in broken.stderr  # gcc's own message first
    assert broken.stderr.splitlines()[-1].startswith("vsmtrace: error: building guest 'broken' (multiboot) failed")

    both = vsmtrace_in(tmp_path, ["guest", "build", "broken.c", "--raw64", "--elf32"])
    assert both.status == 2 and both.stderr.startswith("vsmtrace: error: --raw64 and --elf32")


def test_guest_sdk_command_names_the_shipped_files() -> None:
    r = run_vsmtrace(["guest", "sdk"])
    assert r.status == 0
    paths = dict(line.split(None, 1) for line in r.stdout.splitlines() if line.strip())
    assert Path(paths["documentation"].strip()).read_text() == SDK_DOC.read_text()
    assert (Path(paths["runtime"].split()[0]) / "vsm.h").is_file()
    assert Path(paths["demo"].split()[1]).name == "vbs_demo.c"
    bare = run_vsmtrace(["guest"])  # what is there: help, not an error
    assert bare.status == 0 and bare.stderr == ""
    assert re.search(r"^\s+build\s", bare.stdout, re.M) and re.search(r"^\s+sdk\s", bare.stdout, re.M)


# -- notebooks -----------------------------------------------------------------------------------


def test_notebooks_copy_lists_copies_and_refuses_to_overwrite(tmp_path: Path) -> None:
    listed = run_vsmtrace(["notebooks"])
    assert listed.status == 0
    assert "vtl_transitions.ipynb" in listed.stdout and "VTL transitions of a VSM boot" in listed.stdout

    dest = tmp_path / "out" / "notebooks"
    copied = vsmtrace_in(tmp_path, ["notebooks", "--copy", str(dest)])
    assert copied.status == 0, copied.stderr
    assert sorted(p.name for p in dest.iterdir()) == NOTEBOOKS
    for name in NOTEBOOKS:
        assert (dest / name).read_bytes() == (ROOT / "notebooks" / name).read_bytes()

    (dest / NOTEBOOKS[0]).write_text("my edits")
    again = vsmtrace_in(tmp_path, ["notebooks", "--copy", str(dest)])
    assert again.status == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert (dest / NOTEBOOKS[0]).read_text() == "my edits"
    forced = vsmtrace_in(tmp_path, ["notebooks", "--copy", str(dest), "--force"])
    assert forced.status == 0 and json.loads((dest / NOTEBOOKS[0]).read_text())["cells"]

    (tmp_path / "a-file").write_text("")
    onto_file = vsmtrace_in(tmp_path, ["notebooks", "--copy", "a-file"])
    assert onto_file.status == 2 and onto_file.stderr.startswith("vsmtrace: error:")


def test_notebooks_import_only_the_installed_package() -> None:
    for name in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / name).read_text())
        code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        assert "sys.path" not in code and "ROOT" not in code and "repo_root" not in code, name
        imports = re.findall(r"^\s*(?:from|import) (\w+)", code, re.M)
        assert not set(imports) & {"vmm", "recorder", "replayer", "analysis", "guests", "tests"}, (name, imports)
        if name in ("vtl_transitions.ipynb", "reproduce_bug.ipynb"):  # the demo's notebooks find its trace
            assert "from vsmtrace.demo import demo_trace" in code, name


def test_demo_trace_is_found_without_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vsmtrace.demo import TRACE_ENV, demo_trace

    monkeypatch.delenv(TRACE_ENV, raising=False)
    out = tmp_path / "vsmtrace-demo"
    (out / "notebooks").mkdir(parents=True)
    (out / "demo.arrow").write_bytes(b"trace")
    # Copied next to the demo's output (the demo's advice), or started where the demo ran.
    assert demo_trace(out / "notebooks", record=False) == (out / "demo.arrow").resolve()
    assert demo_trace(tmp_path, record=False) == (out / "demo.arrow").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "demo.arrow").unlink()
    stray = [p for p in tmp_path.parents if (p / "demo.arrow").is_file() or (p / "vsmtrace-demo" / "demo.arrow").is_file()]
    if not stray:  # a demo run in /tmp would be found, rightly
        with pytest.raises(FileNotFoundError, match=TRACE_ENV):
            demo_trace(elsewhere, record=False)
    named = tmp_path / "mine.arrow"
    named.write_bytes(b"x")
    monkeypatch.setenv(TRACE_ENV, str(named))
    assert demo_trace(elsewhere, record=False) == named
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "missing.arrow"))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        demo_trace(out, record=False)


# -- version and layering ------------------------------------------------------------------------


def test_version_comes_from_metadata_and_nothing_below_the_cli_loads_it() -> None:
    code = (
        "import sys, importlib.metadata as md\n"
        "import vsmtrace.recorder.metadata, vsmtrace.recorder.writer, vsmtrace.vmm.machine\n"
        "import vsmtrace.replayer.engine, vsmtrace.analysis, vsmtrace.guests.build\n"
        "import vsmtrace\n"
        "assert 'vsmtrace.cli' not in sys.modules, 'a module below the CLI imported it'\n"
        "assert vsmtrace.__version__ == md.version('vsmtrace'), vsmtrace.__version__\n"
        "print(vsmtrace.__version__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=_clean_env())
    assert r.returncode == 0, r.stderr
    version = r.stdout.strip()
    assert version and version != "0+unknown"
    assert run_vsmtrace(["--version"]).stdout.strip() == f"vsmtrace, version {version}"


# -- the wheel -----------------------------------------------------------------------------------


def _checkout_files() -> list[str]:
    """The files a clean checkout of this tree has (tracked, plus new files not ignored)."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"not a git checkout: {r.stderr.strip()}")
    return [f for f in r.stdout.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout, built after a demo's output folder (and its notebooks) landed in it."""
    src = tmp_path_factory.mktemp("checkout")
    for name in _checkout_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    demo_out = src / "vsmtrace-demo"  # what `vsmtrace demo` and its closing advice leave in a checkout
    (demo_out / "figures").mkdir(parents=True)
    (demo_out / "notebooks").mkdir()
    (demo_out / "demo.arrow").write_bytes(b"ARROW1")
    (demo_out / "figures" / "vtl_timeline.png").write_bytes(b"\x89PNG")
    for name in NOTEBOOKS:
        shutil.copy2(ROOT / "notebooks" / name, demo_out / "notebooks" / name)
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (built,) = dist.glob("vsmtrace-*.whl")
    return built


def _wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def _wheel_text(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(suffix)]
        return z.read(name).decode()


def test_wheel_top_level_is_only_vsmtrace(wheel: Path) -> None:
    assert _wheel_text(wheel, ".dist-info/top_level.txt").split() == ["vsmtrace"]
    outside = [n for n in _wheel_names(wheel) if not re.match(r"vsmtrace(/|-[^/]+\.dist-info/)", n)]
    assert outside == []
    assert not [n for n in _wheel_names(wheel) if "vsmtrace-demo" in n or n.startswith("vsmtrace/tests/")]


def test_wheel_ships_every_module_the_sdk_and_the_notebooks(wheel: Path) -> None:
    names = set(_wheel_names(wheel))
    files = _checkout_files()
    expected = {f for f in files if f.startswith("vsmtrace/") and f.endswith(".py")}
    for folder in MAPPED:
        expected |= {f"vsmtrace/{f}" for f in files if f.startswith(f"{folder}/") and f.endswith(".py")}
    # runtime, vsm.h, demo, doc; guests/programs/ (the suite's and the benchmarks' guests) stays in the checkout
    expected |= {f"vsmtrace/{f}" for f in files if f.startswith("guests/") and not f.startswith("guests/programs/")}
    expected |= {f"vsmtrace/notebooks/{n}" for n in NOTEBOOKS}
    assert sorted(expected - names) == []
    assert {"vsmtrace/guests/runtime/vsm.h", "vsmtrace/guests/build.py", "vsmtrace/guests/vbs_demo.c",
            "vsmtrace/guests/README.md", "vsmtrace/guest_cli.py", "vsmtrace/notebooks_cli.py"} <= names
    assert not [n for n in names if n.startswith("vsmtrace/guests/programs/")]


def test_wheel_metadata_has_the_script_and_the_notebook_extra(wheel: Path) -> None:
    assert re.search(r"^vsmtrace = vsmtrace\.__main__:main$", _wheel_text(wheel, ".dist-info/entry_points.txt"), re.M)
    meta = email.parser.Parser().parsestr(_wheel_text(wheel, ".dist-info/METADATA"))
    assert "notebook" in meta.get_all("Provides-Extra")
    notebook_reqs = {re.split(r"[<>=; ]", r)[0] for r in meta.get_all("Requires-Dist") if 'extra == "notebook"' in r}
    assert {"jupyterlab", "ipykernel", "nbclient", "nbformat"} <= notebook_reqs


@dataclass
class Installed:
    python: Path
    vsmtrace: Path
    home: Path  # an empty working directory outside the checkout

    def run(self, args: list[str], timeout: float = 300) -> RunResult:
        r = subprocess.run([str(self.vsmtrace), *args], cwd=self.home, capture_output=True, text=True,
                           timeout=timeout, env=_clean_env())
        return RunResult(r.returncode, r.stdout, r.stderr)


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel installed (no deps) in a virtualenv outside the checkout; dependencies from the system site."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                        str(wheel)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "no such option: --python" in r.stderr:  # pip < 22.3
        subprocess.run([str(python), "-m", "ensurepip", "--quiet"], check=True)
        r = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    home = tmp_path_factory.mktemp("empty-home")
    return Installed(python, env_dir / "bin" / "vsmtrace", home)


def test_installed_package_comes_from_the_wheel_not_the_checkout(installed: Installed) -> None:
    code = "import vsmtrace, vsmtrace.vmm, vsmtrace.guests.build as b; print(vsmtrace.__file__); print(b.RUNTIME_DIR)"
    r = subprocess.run([str(installed.python), "-c", code], cwd=installed.home, capture_output=True, text=True,
                       env=_clean_env())
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():
        path = Path(line)
        assert ROOT not in path.parents and "site-packages" in path.parts, line
    version = installed.run(["--version"]).stdout
    assert version.startswith("vsmtrace, version ")
    r = subprocess.run([str(installed.python), "-m", "vsmtrace", "--version"], cwd=installed.home, capture_output=True,
                       text=True, env=_clean_env())
    assert r.returncode == 0 and r.stdout == version


def test_installed_notebooks_copy_out_of_the_package(installed: Installed) -> None:
    r = installed.run(["notebooks", "--copy", "nb"])
    assert r.status == 0, r.stderr
    for name in NOTEBOOKS:
        assert (installed.home / "nb" / name).read_bytes() == (ROOT / "notebooks" / name).read_bytes()


@needs_gcc
@pytest.mark.kvm
def test_installed_sdk_builds_a_user_guest_and_the_demo_runs_from_an_empty_directory(
    installed: Installed, user_dir: Path
) -> None:
    built = installed.run(["guest", "build", str(user_dir / "secure_counter.c")])
    assert built.status == 0, built.stderr
    run = installed.run(["run", built.stdout.strip()])
    assert run.status == 1 and "PASSED: 0 failed" in run.stdout, run.stdout + run.stderr

    demo = installed.run(["demo", "--quiet"])
    assert demo.status == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    trace = installed.home / "vsmtrace-demo" / "demo.arrow"
    assert "replay verified" in demo.stdout

    # The closing advice, run as printed: the notebooks land beside the trace and find it from there.
    advice = [line.split("#")[0].split() for line in demo.stdout.splitlines()[-6:]]
    copy = next(words for words in advice if words[:3] == ["vsmtrace", "notebooks", "--copy"])
    lab = next(words for words in advice if words[:2] == ["jupyter", "lab"])
    assert copy[3] == lab[2] == str(Path("vsmtrace-demo") / "notebooks")
    assert installed.run(copy[1:]).status == 0
    folder = installed.home / lab[2]
    assert sorted(p.name for p in folder.glob("*.ipynb")) == NOTEBOOKS
    found = subprocess.run([str(installed.python), "-c", "from vsmtrace.demo import demo_trace; print(demo_trace(record=False))"],
                           cwd=folder, capture_output=True, text=True, env=_clean_env())
    assert found.stdout.strip() == str(trace.resolve()), found.stderr
    replay = installed.run(["replay", str(trace)])
    assert replay.status == 0 and "replay verified" in replay.stdout
    info = installed.run(["info", str(trace)])
    assert info.status == 0 and "sealed" in info.stdout
