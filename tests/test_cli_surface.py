"""The user's surface of every command: help, refusals, seal, schema checks, partial traces, replay options, interop.

Traces are real: one `vsmtrace run --record` of a two-VTL guest (module fixture), and
traces derived from it (cut short, columns dropped or retyped) the way a user's
files get damaged. Every bad input must give one `vsmtrace: error:` line and status 2.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from tests.conftest import ROOT, RunResult, run_in_process, run_vsmtrace


def assert_error(r: RunResult, *fragments: str) -> str:
    """One `vsmtrace: error:` line, status 2, no traceback; returns the line."""
    assert r.status == 2, (r.status, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vsmtrace: error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sealed trace of a real two-VTL guest (protections, intercepts, VTL switches, emulation entries)."""
    from tests.conftest import _require_kvm
    from tests.guests import build_guest

    _require_kvm()
    trace = tmp_path_factory.mktemp("rec") / "vsm.arrow"
    r = run_vsmtrace(["run", str(build_guest("vsm_protect")), "--record", str(trace), "--timeout", "120"], timeout=240)
    assert r.guest_exit_code == 0, (r.status, r.stderr)
    return trace


def torn_copy(trace: Path, dest: Path) -> Path:
    """A killed recording: the trace as an IPC stream whose last batch is cut in half."""
    table = ipc.open_file(trace).read_all()
    with pa.OSFile(str(dest), "wb") as f, ipc.new_stream(f, table.schema) as w:
        for batch in table.to_batches(max_chunksize=500):
            w.write_batch(batch)
    data = dest.read_bytes()
    dest.write_bytes(data[: len(data) - 2000])
    return dest


def rewritten(trace: Path, dest: Path, change) -> Path:  # type: ignore[no-untyped-def]
    """``trace`` with its table passed through ``change`` (metadata kept: it still says vsmtrace)."""
    table = ipc.open_file(trace).read_all()
    out = change(table).replace_schema_metadata(table.schema.metadata)
    with pa.OSFile(str(dest), "wb") as f, ipc.new_file(f, out.schema) as w:
        w.write_table(out)
    return dest


# -- the command line itself -------------------------------------------------------------------------------


def test_bare_vsmtrace_prints_help_and_exits_0() -> None:
    r = run_vsmtrace([])
    assert r.status == 0, r
    assert r.stdout.startswith("Usage: vsmtrace [OPTIONS] COMMAND") and "Commands:" in r.stdout and r.stderr == ""


def test_command_list_is_not_cut_mid_sentence() -> None:
    r = run_vsmtrace(["--help"])
    commands = r.stdout.split("Commands:")[1]
    assert "..." not in commands, commands
    for line in commands.strip().splitlines():
        if line.startswith("  ") and not line.startswith("   "):  # a command's first line
            assert len(line.split(None, 1)) == 2, line
    joined = " ".join(commands.split())
    assert "Export TRACE as Chrome trace-event JSON (a track per VP, a slice per VTL stint) or as Parquet." in joined


def test_run_help_gives_the_exit_status_table() -> None:
    out = run_vsmtrace(["run", "--help"]).stdout
    table = out.split("Exit status:")[1]
    for status, words in (("124", "--timeout"), ("130", "interrupted"), ("2", "bad input"), ("4", "faulted"), ("6", "internal")):
        assert re.search(rf"^\s+{status}\s+.*{words}", table, re.M), (status, table)


def test_replay_help_points_at_shipped_docs_and_no_url() -> None:
    out = run_vsmtrace(["replay", "--help"]).stdout
    assert "http" not in out
    assert "Exit status: 0" in " ".join(out.split())
    assert "--state SEQ" in out and "--break-at SEQ" in out and "docs/replay.md" in out
    assert (ROOT / "docs" / "replay.md").exists()


def test_demo_help_says_what_it_needs() -> None:
    out = " ".join(run_vsmtrace(["demo", "--help"]).stdout.split())
    assert "gcc" in out and "/dev/kvm" in out


def test_verbose_is_accepted_after_the_command(tmp_path: Path) -> None:
    for args in (["info", "-v", str(tmp_path / "none.arrow")], ["-v", "info", str(tmp_path / "none.arrow")]):
        assert_error(run_vsmtrace(args), "no such file")


def test_hv_disable_list_needs_no_kernel() -> None:
    r = run_vsmtrace(["run", "--hv-disable", "list"])
    assert r.status == 0, r
    assert r.stdout.startswith("Hyper-V features that --hv-disable can hide:") and "stimers" in r.stdout


def test_missing_kernel_is_still_an_error() -> None:
    assert_error(run_vsmtrace(["run"]), "Missing argument 'KERNEL'")


def test_broken_pipe_is_quiet(recorded: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "vsmtrace", "info", str(recorded)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert p.stdout is not None
    p.stdout.readline()
    p.stdout.close()  # like `| head -1`
    err = p.stderr.read().decode() if p.stderr else ""
    p.wait(timeout=60)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert p.returncode in (0, 141)


# -- refusing to overwrite ------------------------------------------------------------------------------------


def test_run_refuses_to_replace_an_existing_trace(recorded: Path, tmp_path: Path) -> None:
    from tests.guests import build_guest

    existing = tmp_path / "keep.arrow"
    existing.write_bytes(recorded.read_bytes())
    before = existing.read_bytes()
    r = run_vsmtrace(["run", str(build_guest("hello")), "--record", str(existing), "--timeout", "30"])
    assert_error(r, str(existing), "already exists", "--force")
    assert existing.read_bytes() == before


def test_run_never_records_over_its_kernel(tmp_path: Path) -> None:
    from tests.guests import build_guest

    kernel = tmp_path / "k.elf"
    kernel.write_bytes(build_guest("hello").read_bytes())
    assert_error(run_vsmtrace(["run", str(kernel), "--record", str(kernel), "--force"]), "is the kernel")
    assert_error(run_vsmtrace(["run", str(kernel), "--serial", str(kernel)]), "is the kernel")
    assert kernel.read_bytes() == build_guest("hello").read_bytes()


@pytest.mark.kvm
def test_run_force_replaces_a_trace(recorded: Path, tmp_path: Path) -> None:
    from tests.guests import build_guest

    target = tmp_path / "t.arrow"
    target.write_bytes(b"old")
    r = run_vsmtrace(["run", str(build_guest("hello")), "--record", str(target), "--force", "--timeout", "30"])
    assert r.guest_exit_code == 0, r
    assert target.read_bytes()[:6] == b"ARROW1"


def test_export_refuses_to_overwrite_its_input_or_another_trace(recorded: Path, tmp_path: Path) -> None:
    trace = tmp_path / "t.arrow"
    trace.write_bytes(recorded.read_bytes())
    before = trace.read_bytes()
    assert_error(run_vsmtrace(["export", str(trace), "-o", str(trace)]), "is the input trace")
    assert_error(run_vsmtrace(["export", str(trace), "-o", str(trace), "--force"]), "is the input trace")
    other = tmp_path / "other.arrow"
    other.write_bytes(before)
    assert_error(run_vsmtrace(["export", str(trace), "-o", str(other)]), "already exists", "--force")
    assert trace.read_bytes() == before and other.read_bytes() == before
    r = run_vsmtrace(["export", str(trace), "-o", str(other), "--force"])
    assert r.status == 0, r
    assert json.loads(other.read_text())["traceEvents"]


# -- sealing ---------------------------------------------------------------------------------------------------


def test_seal_recovers_a_killed_recording(recorded: Path, tmp_path: Path) -> None:
    import polars as pl

    torn = torn_copy(recorded, tmp_path / "torn.arrow")
    info = run_vsmtrace(["info", str(torn)])
    assert info.status == 0 and re.search(rf"^to seal +vsmtrace seal {re.escape(str(torn))} ", info.stdout, re.M), info.stdout
    with pytest.raises(pl.exceptions.PolarsError):  # what a user hits with a killed trace today
        pl.scan_ipc(torn).collect()
    r = run_vsmtrace(["seal", str(torn)])
    assert r.status == 0, r
    m = re.match(rf"sealed {re.escape(str(torn))}: (\d+) events kept from (\d+) complete batches", r.stdout)
    assert m, r.stdout
    assert "dropped a torn tail of" in r.stdout
    total = ipc.open_file(recorded).read_all().num_rows
    kept = int(m.group(1))
    assert 0 < kept < total and kept % 500 == 0  # every complete 500-event batch, nothing of the torn one
    frame = pl.scan_ipc(torn).collect()  # now Polars (and pyarrow's file reader) open it
    assert frame.height == kept and frame["seq"].to_list() == list(range(kept))
    assert "to seal" not in run_vsmtrace(["info", str(torn)]).stdout
    again = run_vsmtrace(["seal", str(torn)])
    assert again.status == 0 and "already sealed" in again.stdout
    rep = run_vsmtrace(["report", str(torn), "--no-figures"])
    assert "partial trace" in rep.stdout  # recovered by seal: still partial


def test_seal_refuses_foreign_files(tmp_path: Path) -> None:
    bad = tmp_path / "x.arrow"
    bad.write_text("hello")
    before = bad.read_bytes()
    assert_error(run_vsmtrace(["seal", str(bad)]), "not an Arrow IPC trace")
    assert bad.read_bytes() == before


# -- schema validation ------------------------------------------------------------------------------------------


MISTYPED = {
    "no_kind": (lambda t: t.drop_columns(["kind"]), "'kind' missing"),
    "no_seq_time": (lambda t: t.drop_columns(["seq", "time_ns"]), "'seq', 'time_ns' missing"),
    "vp_strings": (lambda t: t.set_column(t.schema.get_field_index("vp"), "vp", t["vp"].cast(pa.string())), "column 'vp' is string"),
    "rip_float": (lambda t: t.set_column(t.schema.get_field_index("rip"), "rip", t["rip"].cast(pa.float64())), "column 'rip' is double"),
}


@pytest.mark.parametrize("damage", sorted(MISTYPED))
@pytest.mark.parametrize("command", [["info"], ["report", "--no-figures"], ["export"], ["replay", "--no-progress"], ["seal"], ["diff", "SELF"]])
def test_traces_with_bad_core_columns_are_named(recorded: Path, tmp_path: Path, damage: str, command: list[str]) -> None:
    change, fragment = MISTYPED[damage]
    bad = rewritten(recorded, tmp_path / f"{damage}.arrow", change)
    args = [command[0], str(bad), *[str(bad) if a == "SELF" else a for a in command[1:]]]
    line = assert_error(run_in_process(args), str(bad), fragment)
    assert "schema v1" in line or "vsmtrace v1 trace" in line


# -- partial traces ----------------------------------------------------------------------------------------------


def test_report_and_export_say_a_trace_is_partial(recorded: Path, tmp_path: Path) -> None:
    torn = torn_copy(recorded, tmp_path / "torn.arrow")
    rep = run_vsmtrace(["report", str(torn), "--out", str(tmp_path / "fig")])
    assert rep.status == 0, rep
    assert rep.stdout.splitlines()[1].startswith("note: partial trace: recording cut short"), rep.stdout
    whole = run_vsmtrace(["report", str(recorded), "--no-figures"])
    assert "partial" not in whole.stdout
    exp = run_vsmtrace(["export", str(torn), "-o", str(tmp_path / "t.json")])
    assert exp.status == 0 and "partial trace" in exp.stdout, exp


def test_figure_titles_say_a_trace_is_partial(recorded: Path, tmp_path: Path) -> None:
    import matplotlib.pyplot as plt
    from vsmtrace.analysis import figures, load

    seen: list[str] = []
    real_save = figures.save

    def spy(fig, path):  # type: ignore[no-untyped-def]
        seen.extend(ax.get_title() for ax in fig.axes)
        return real_save(fig, path)

    figures.save = spy
    try:
        figures.write_figures(load(recorded), tmp_path, note="partial trace: recording cut short")
    finally:
        figures.save = real_save
        plt.close("all")
    assert len(seen) >= len(figures.FIGURES)
    assert all("partial trace" in t for t in seen), seen


# -- diff ----------------------------------------------------------------------------------------------------------


def test_diff_rejects_unknown_ignore_columns(recorded: Path) -> None:
    assert_error(run_vsmtrace(["diff", str(recorded), str(recorded), "--ignore", "vtll"]), "--ignore", "'vtll'")
    ok = run_vsmtrace(["diff", str(recorded), str(recorded), "--ignore", "rip"])
    assert ok.status == 0 and "identical" in ok.stdout


def test_diff_prints_ports_in_hex(recorded: Path, tmp_path: Path) -> None:
    table = ipc.open_file(recorded).read_all()
    kinds = table["kind"].cast(pa.string()).to_pylist()
    i = kinds.index("PIO")

    def change(t: pa.Table) -> pa.Table:
        addr = t["address"].to_pylist()
        addr[i] = 0x3F9 if addr[i] != 0x3F9 else 0x3FA
        return t.set_column(t.schema.get_field_index("address"), "address", pa.array(addr, pa.uint64()))

    other = rewritten(recorded, tmp_path / "b.arrow", change)
    r = run_vsmtrace(["diff", str(recorded), str(other)])
    assert r.status == 1, r
    line = next(x for x in r.stdout.splitlines() if x.lstrip().startswith("* address:"))
    assert re.search(r"A=0x[0-9a-f]+\s+B=0x3f[9a]", line), line


# -- replay options ----------------------------------------------------------------------------------------------------


def test_replay_json_without_state_prints_the_report(recorded: Path) -> None:
    r = run_vsmtrace(["replay", str(recorded), "--json", "--no-progress"], timeout=300)
    assert r.status == 0, r
    d = json.loads(r.stdout)
    assert d["verified"] is True and d["entries_replayed"] > 0 and d["divergence"] is None


def test_replay_state_past_the_end_of_a_sealed_trace(recorded: Path) -> None:
    n = ipc.open_file(recorded).read_all().num_rows
    line = assert_error(run_vsmtrace(["replay", str(recorded), "--state", "99999999"]), "no event 99999999", f"ends at event {n - 1}")
    assert "torn" not in line and "cut short" not in line


def test_replay_state_is_readable_text(recorded: Path) -> None:
    n = ipc.open_file(recorded).read_all().num_rows
    r = run_vsmtrace(["replay", str(recorded), "--state", str(n - 1)], timeout=300)
    assert r.status == 0, r
    assert not re.search(r"[{}]|'\w+': ", r.stdout), r.stdout[-2000:]  # no Python dict anywhere
    assert "vsm:" in r.stdout


def _break_run(trace: Path, seq: int) -> RunResult:
    env = dict(os.environ, PYTHONBREAKPOINT="0")  # the breakpoint is a no-op: we check where it would stop
    p = subprocess.run([sys.executable, "-m", "vsmtrace", "replay", "--no-progress", "--break-at", str(seq), str(trace)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)  # fmt: skip
    return RunResult(p.returncode, p.stdout, p.stderr)


def test_break_at_a_non_emulation_event_stops_at_the_next_entry(recorded: Path) -> None:
    table = ipc.open_file(recorded).read_all()
    kinds = table["kind"].cast(pa.string()).to_pylist()
    emu = [i for i, k in enumerate(kinds) if k == "EMULATION"]
    pio = next(i for i, k in enumerate(kinds) if k == "PIO" and i > emu[0])
    nxt = next(i for i in emu if i >= pio)
    r = _break_run(recorded, pio)
    assert r.status == 0, r
    assert f"event {pio} (PIO) did not come from the emulation; stopping at the next emulation entry, event {nxt}" in r.stderr
    assert "stopping before entry" in r.stdout and f"of event {nxt}" in r.stdout


def test_break_at_past_the_end_fails(recorded: Path) -> None:
    n = ipc.open_file(recorded).read_all().num_rows
    assert_error(_break_run(recorded, n + 10), f"--break-at {n + 10}", f"ends at event {n - 1}")


# -- interoperability ----------------------------------------------------------------------------------------------------


def test_pandas_reads_a_trace_without_corrupting_64_bit_columns(recorded: Path) -> None:
    """docs/trace-format.md: `pd.read_feather(path, dtype_backend="pyarrow")` keeps every 64-bit value exact."""
    import pandas as pd

    exact = ipc.open_file(recorded).read_all()
    df = pd.read_feather(recorded, dtype_backend="pyarrow")
    for col in ("rip", "value", "gpa", "control", "data", "address"):
        want = exact[col].to_pylist()
        got = [None if pd.isna(v) else int(v) for v in df[col]]
        assert got == want, col
    values = [v for v in exact["value"].to_pylist() if v is not None and v >= 1 << 53]
    assert values, "the trace must have a value above 2**53 for this test to mean something"


def test_duckdb_reads_a_trace_and_its_parquet_export(recorded: Path, tmp_path: Path) -> None:
    import duckdb

    exact = ipc.open_file(recorded).read_all()
    table = ipc.open_file(recorded).read_all()
    con = duckdb.connect()
    con.register("trace", table)
    big = con.execute("select max(value) from trace where kind = 'MSR'").fetchone()[0]
    assert big == max(v for k, v in zip(exact["kind"].cast(pa.string()).to_pylist(), exact["value"].to_pylist(), strict=True) if k == "MSR" and v is not None)
    out = tmp_path / "t.parquet"
    r = run_vsmtrace(["export", str(recorded), "--format", "parquet", "-o", str(out)])
    assert r.status == 0 and r.stdout == f"wrote {exact.num_rows} events to {out}\n", r
    n, vsm = con.execute(f"select count(*), count(*) filter (where kind = 'VTL_SWITCH') from read_parquet('{out}')").fetchone()
    assert n == exact.num_rows and vsm == exact["kind"].cast(pa.string()).to_pylist().count("VTL_SWITCH")
    import pyarrow.parquet as pq

    back = pq.read_table(out)
    assert back.schema.metadata[b"vsmtrace"] == exact.schema.metadata[b"vsmtrace"]
    assert back.schema.names == exact.schema.names
    assert back["rip"].type == pa.uint64() and back["rip"].to_pylist() == exact["rip"].to_pylist()


def test_parquet_default_name_and_no_overwrite(recorded: Path, tmp_path: Path) -> None:
    trace = tmp_path / "t.arrow"
    trace.write_bytes(recorded.read_bytes())
    r = run_vsmtrace(["export", str(trace), "--format", "parquet"])
    assert r.status == 0 and (tmp_path / "t.arrow.parquet").exists(), r
    assert_error(run_vsmtrace(["export", str(trace), "--format", "parquet"]), "already exists")


# -- progress -------------------------------------------------------------------------------------------------------------


def _on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal (stdout a pipe); returns the status and what the terminal showed."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size (tqdm draws to fit)
    p = subprocess.Popen([sys.executable, "-m", "vsmtrace", *args], stdout=subprocess.PIPE, stderr=slave, cwd=ROOT)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    p.communicate(timeout=300)
    os.close(master)
    return p.returncode, shown.decode(errors="replace")


@pytest.mark.parametrize("command", ["report", "export", "diff", "replay"])
def test_long_commands_show_progress_on_a_terminal_only(recorded: Path, tmp_path: Path, command: str) -> None:
    args = {
        "report": ["report", str(recorded), "--out", str(tmp_path / "r")],
        "export": ["export", str(recorded), "-o", str(tmp_path / "e.json")],
        "diff": ["diff", str(recorded), str(recorded)],
        "replay": ["replay", str(recorded)],
    }[command]
    status, terminal = _on_a_terminal(args)
    assert status == 0, terminal
    assert re.search(rf"{command}: .*\d", terminal), terminal  # a tqdm line named after the command
    if command == "export":
        (tmp_path / "e.json").unlink()
    quiet = run_vsmtrace(args, timeout=300)
    assert quiet.status == 0 and quiet.stderr == "", quiet.stderr


# -- read-only outputs and caches ------------------------------------------------------------------------------------------


def test_report_to_a_readonly_directory(recorded: Path, readonly_dir: Path) -> None:
    line = assert_error(run_vsmtrace(["report", str(recorded), "--out", str(readonly_dir)]), f"cannot write figures to {readonly_dir}")
    assert str(recorded) not in line  # the trace is fine: do not blame it
    assert_error(run_vsmtrace(["report", str(recorded), "--out", str(readonly_dir / "sub")]), "cannot write figures to")


def test_demo_to_a_readonly_directory(readonly_dir: Path) -> None:
    assert_error(run_vsmtrace(["demo", "--out", str(readonly_dir / "demo")]), "cannot write the demo's results to")


def test_export_to_a_readonly_directory(recorded: Path, readonly_dir: Path) -> None:
    assert_error(run_vsmtrace(["export", str(recorded), "-o", str(readonly_dir / "t.json")]), f"cannot write {readonly_dir / 't.json'}")


def _run_with_env(args: list[str], **env: str) -> RunResult:
    e = {k: v for k, v in os.environ.items() if k not in ("VSMTRACE_CACHE", "XDG_CACHE_HOME")}
    e.update(env)
    p = subprocess.run([sys.executable, "-m", "vsmtrace", *args], capture_output=True, text=True, cwd=ROOT, env=e, timeout=600)
    return RunResult(p.returncode, p.stdout, p.stderr)


@pytest.mark.kvm
def test_unwritable_home_falls_back_to_a_temporary_cache(readonly_dir: Path) -> None:
    from tests.guests import build_guest

    r = _run_with_env(["run", str(build_guest("hello")), "--timeout", "60"], HOME=str(readonly_dir))
    assert "Traceback" not in r.stderr, r.stderr
    assert r.guest_exit_code == 0, r
    assert "VSMTRACE_CACHE" in r.stderr and "using" in r.stderr  # the warning says where and what to set


def test_unwritable_vsmtrace_cache_is_one_line(readonly_dir: Path) -> None:
    from tests.guests import build_guest

    r = _run_with_env(["run", str(build_guest("hello")), "--timeout", "60"], VSMTRACE_CACHE=str(readonly_dir / "cache"))
    assert_error(r, "VSMTRACE_CACHE=", "Read-only file system")


def test_cache_base_has_one_meaning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vsmtrace.guests import build
    from vsmtrace.vmm import native

    monkeypatch.delenv("VSMTRACE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_dir() == tmp_path / "xdg" / "vsmtrace"
    assert build.cache_dir() == tmp_path / "xdg" / "vsmtrace" / "guests"
    monkeypatch.setenv("VSMTRACE_CACHE", str(tmp_path / "mine"))
    assert native.cache_dir() == tmp_path / "mine"
    assert build.cache_dir() == tmp_path / "mine" / "guests"
    docs = (ROOT / "docs" / "cache.md").read_text()
    assert "VSMTRACE_CACHE" in docs and "XDG_CACHE_HOME" in docs and "<base>/guests" in docs and "<base>/cffi" in docs


# -- kernels cut short -------------------------------------------------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.parametrize("keep", [10, 64, 200, 3000])
def test_kernel_cut_short_is_described_in_words(tmp_path: Path, keep: int) -> None:
    from tests.guests import build_guest

    cut = tmp_path / "cut.elf"
    cut.write_bytes(build_guest("hello").read_bytes()[:keep])
    line = assert_error(run_vsmtrace(["run", str(cut), "--timeout", "10"]), str(cut), "ELF file cut short")
    assert "expected" not in line and "found" not in line


# -- figures a reader can use --------------------------------------------------------------------------------------------


def _synthetic(path: Path) -> Path:
    """A small trace with adjacent pages under different masks, two intercepts and one timed hypercall."""
    from vsmtrace.analysis.synthetic import synthetic_writer
    from vsmtrace.vmm.events import EventKind as K

    with synthetic_writer(path) as w:
        w.emit(K.VP_START, 0, 0, 0x1000, at=1_000)
        w.emit(K.PROTECTION, 0, 1, None, at=2_000, target_vtl=0, gpa_start=0x100000, pages=1, old_mask=0xF, new_mask=0x1)
        w.emit(K.PROTECTION, 0, 1, None, at=2_000, target_vtl=0, gpa_start=0x101000, pages=1, old_mask=0xF, new_mask=0x5)
        w.emit(K.INTERCEPT, 0, 0, 0x2000, at=5_000, access="read", gpa=0x100010, gva=0x100010)
        w.emit(K.INTERCEPT, 0, 0, 0x2008, at=5_000, access="write", gpa=0x101020, gva=0x101020)
        w.emit(K.HYPERCALL, 0, 0, 0x3000, at=5_000, code=2, name="HvCallFlushVirtualAddressSpace", duration_ns=1500, status=0)
        w.emit(K.VP_STOP, 0, 0, None, at=9_000, reason="guest-exit")
    return path


def test_protection_map_keeps_adjacent_pages_with_different_masks_apart(tmp_path: Path) -> None:
    from vsmtrace.analysis import figures, load
    from vsmtrace.analysis import tables as T

    lf = load(_synthetic(tmp_path / "s.arrow"))
    runs = figures.protection_runs(T.protection_pages(lf).collect(), 9_000)
    assert sorted(zip(runs["first"].to_list(), runs["pages"].to_list(), runs["new_mask"].to_list(), strict=True)) == [
        (0x100, 1, 0x1), (0x101, 1, 0x5)
    ]  # fmt: skip


def _drawn(fn, lf, path):  # type: ignore[no-untyped-def]
    """Call figure ``fn`` and return its matplotlib Figure (still open) as well as writing it."""
    from vsmtrace.analysis import figures

    kept = []
    real_save = figures.save

    def keep(fig, p):  # type: ignore[no-untyped-def]
        fig.canvas.draw()
        kept.append(fig)
        return real_save(fig, p)

    figures.save = keep
    try:
        fn(lf, path)
    finally:
        figures.save = real_save
    return kept[0]


def test_figures_show_page_numbers_in_hex_and_keep_legends_off_the_data(tmp_path: Path) -> None:
    from vsmtrace.analysis import figures, load

    lf = load(_synthetic(tmp_path / "s.arrow"))
    for fn in (figures.protection_map, figures.intercept_scatter):
        fig = _drawn(fn, lf, tmp_path / f"{fn.__name__}.png")
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert labels and all(re.fullmatch(r"0x[0-9a-f]+", t) for t in labels), labels
        assert "page number" in ax.get_ylabel()
        legend = ax.get_legend().get_window_extent()
        axes_box = ax.get_window_extent()
        assert legend.x0 >= axes_box.x1 - 1, (fn.__name__, legend, axes_box)  # outside: it hides nothing


def test_vtl_timeline_legend_does_not_cover_vp0(recorded: Path, tmp_path: Path) -> None:
    from vsmtrace.analysis import figures, load

    fig = _drawn(figures.vtl_timeline, load(recorded), tmp_path / "t.png")
    ax = fig.axes[0]
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1 - 1


def test_latency_cdf_shows_a_one_sample_series(tmp_path: Path) -> None:
    from vsmtrace.analysis import figures, load

    fig = _drawn(figures.latency_cdf, load(_synthetic(tmp_path / "s.arrow")), tmp_path / "cdf.png")
    ax = fig.axes[1]  # hypercalls: one timed call
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    assert any(ln.get_marker() not in (None, "", "None") for ln in lines)  # a marker per sample
    ys = [y for ln in lines for y in ln.get_ydata()]
    assert min(ys) == 0.0 and max(ys) == 1.0  # a visible step from 0 to 1, not a lone point


def test_readme_and_help_agree() -> None:
    readme = (ROOT / "README.md").read_text()
    top = run_vsmtrace(["--help"]).stdout
    commands = re.findall(r"^  (\w+)\s", top.split("Commands:")[1], re.M)
    for cmd in commands:
        if cmd in ("demo", "run", "info", "seal", "replay", "report", "export", "diff"):
            assert f"vsmtrace {cmd}" in readme, cmd
    for cmd in ("demo", "run", "info", "seal", "replay", "report", "export", "diff"):
        assert cmd in commands, cmd
    run_help = run_vsmtrace(["run", "--help"]).stdout
    for status in ("124", "130", "(V << 1) | 1"):
        assert status in run_help and status.replace("V", "value") in readme
    for option in ("--force", "--hv-disable", "--timeout", "--serial-input"):
        assert option in run_help and option in readme
    export_help = run_vsmtrace(["export", "--help"]).stdout
    assert "parquet" in export_help and "--format parquet" in readme
    assert "--json" in run_vsmtrace(["info", "--help"]).stdout and "info trace.arrow [--json]" in readme
