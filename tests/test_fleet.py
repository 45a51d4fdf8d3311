"""analysis.fleet and `vsmtrace fleet`: a dataset of recorded boots, its tables, Dask, crashes mid-add.

The fleet is three boots of the demo guest recorded on KVM for this module (two of the
shipped build, one built with -DDEMO_REGRESSION=6, whose seal_key service makes six more
hypercalls per call) plus synthetic traces of two other configurations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from vsmtrace.analysis import load
from vsmtrace.analysis import tables as T
from vsmtrace.analysis.fleet import Dataset, add_traces, fleet_tables, sketch
from vsmtrace.analysis.fleet.compute import PER_TRACE_TABLES, FleetTables
from vsmtrace.analysis.fleet.diff import diff_fleet, format_fleet_diff
from vsmtrace.analysis.report import summarize
from vsmtrace.analysis.synthetic import write_realistic

from tests.conftest import ROOT, _require_kvm, run_vsmtrace

REGRESSION = 6
SEAL_KEY = 0x1002


@dataclass
class Fleet:
    good: list[Path]  # two boots of the shipped demo build
    regressed: Path
    synthetic: list[Path]

    @property
    def all(self) -> list[Path]:
        return [*self.good, self.regressed, *self.synthetic]


def record_demo(out: Path, cflags: list[str]) -> Path:
    """Boot the demo guest (built with ``cflags``) on 2 VPs with `vsmtrace run --record`."""
    from vsmtrace.guests.build import DEMO_SOURCE, SDK_DIR, build_guest

    kernel = build_guest("vbs_demo", sources=[DEMO_SOURCE], source_dir=SDK_DIR, cflags=cflags)
    r = run_vsmtrace(["run", str(kernel), "--smp", "2", "--memory", "128", "--record", str(out)], timeout=600)
    assert r.status == 1, f"demo guest did not exit with 0 (status {r.status}): {r.stderr[-2000:]}"  # isa-debug-exit(0) -> 1
    assert "[vtl0] demo complete" in r.stdout
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    _require_kvm()
    d = tmp_path_factory.mktemp("fleet-traces")
    good = [record_demo(d / f"good{i}.arrow", []) for i in range(2)]
    regressed = record_demo(d / "regressed.arrow", [f"-DDEMO_REGRESSION={REGRESSION}"])
    synthetic = []
    for i, vps in enumerate((2, 4)):
        p = d / f"synthetic{i}.vsmt"
        write_realistic(p, 15_000, vps=vps, seed=40 + i, metadata={"vm_config": {"vps": vps, "memory_mib": 256 * vps, "synthetic": True}})
        synthetic.append(p)
    return Fleet(good, regressed, synthetic)


@pytest.fixture(scope="module")
def dataset(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = tmp_path_factory.mktemp("fleet") / "ds"
    results = add_traces(ds, fleet.all)
    assert [r.added for r in results] == [True] * len(fleet.all)
    return ds


@pytest.fixture(scope="module")
def local_tables(dataset: Path) -> FleetTables:
    return fleet_tables(dataset, by="guest_sha256")


# ----------------------------------------------------------------------------- the dataset


def test_layout_and_columns(dataset: Path, fleet: Fleet) -> None:
    files = sorted(dataset.glob("events/config=*/date=*/trace=*/part-0.parquet"))
    assert len(files) == len(fleet.all)
    lf = pl.scan_parquet(dataset / "events" / "**" / "*.parquet", hive_partitioning=True)
    schema = lf.collect_schema()
    trace_schema = pl.scan_ipc(fleet.good[0]).collect_schema()
    for name, dtype in trace_schema.items():
        assert schema[name] == dtype, f"{name}: {schema[name]} in the dataset, {dtype} in the trace"
    for name in ("guest_sha256", "command_line", "vm_config", "vsmtrace_version", "start_time", "sealed", "recovered", "config", "date", "trace"):
        assert name in schema
    per = lf.group_by("trace", "guest_name", "sealed").agg(pl.len().alias("n")).collect()
    assert per.height == len(fleet.all) and per["sealed"].all()
    assert int(per["n"].sum()) == sum(load(p).select(pl.len()).collect().item() for p in fleet.all)
    # each row group holds one kind, so a query on one kind reads only its row groups
    import pyarrow.parquet as pq

    md = pq.ParquetFile(files[0]).metadata
    kind_col = md.schema.names.index("kind")
    for i in range(md.num_row_groups):
        stats = md.row_group(i).column(kind_col).statistics
        assert stats is not None and stats.min == stats.max


def test_add_is_idempotent(dataset: Path, fleet: Fleet, tmp_path: Path) -> None:
    before = Dataset(dataset).traces()
    again = add_traces(dataset, [fleet.good[0], fleet.synthetic[1]])
    assert [r.added for r in again] == [False, False]
    # a copy of a trace under another name is the same recording
    copy = tmp_path / "copy.arrow"
    copy.write_bytes(fleet.good[1].read_bytes())
    assert add_traces(dataset, [copy])[0].added is False
    assert [e.trace for e in Dataset(dataset).traces()] == [e.trace for e in before]


def test_fleet_report_equals_the_single_trace_reports(local_tables: FleetTables, dataset: Path, fleet: Fleet) -> None:
    ids = {}
    for path in fleet.all:
        r = add_traces(dataset, [path])[0]
        ids[r.trace] = path
    assert set(local_tables.traces["trace"].to_list()) == set(ids)
    for trace, path in ids.items():
        single = summarize(load(path))
        for name in PER_TRACE_TABLES:
            mine = local_tables.per_trace[name].filter(pl.col("trace") == trace).drop("trace")
            assert_frame_equal(mine, getattr(single, name))
        row = local_tables.traces.filter(pl.col("trace") == trace).row(0, named=True)
        assert (row["events"], row["time_span_ns"]) == (single.events, single.time_span_ns)


def test_unmeasured_hypercalls_take_the_reports_bound_fallback(tmp_path: Path) -> None:
    """A trace whose hypercalls partly lack duration_ns (recorded before it existed): the fleet
    skips the report's as-of-join fallback only when no hypercall needs it, so here it runs it
    and the per-trace tables are still the single-trace report's, bounds included."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.ipc as ipc
    from vsmtrace.recorder.reader import open_trace

    src = tmp_path / "measured.vsmt"
    write_realistic(src, 20_000, vps=2, seed=17)
    table = open_trace(src).table()
    kind = pc.cast(table.column("kind"), pa.string())
    unmeasured = pc.and_(pc.equal(kind, "HYPERCALL"), pc.equal(pc.bit_wise_and(table.column("seq"), 1), 1))
    i = table.schema.get_field_index("duration_ns")
    table = table.set_column(i, table.schema.field(i), pc.if_else(unmeasured, None, table.column(i)))
    md = json.loads(table.schema.metadata[b"vsmtrace"])
    md["start_unix_ns"] += 1  # another recording (its own trace id)
    old = tmp_path / "unmeasured.vsmt"
    schema = table.schema.with_metadata({b"vsmtrace": json.dumps(md).encode()})
    with pa.OSFile(str(old), "wb") as f, ipc.new_file(f, schema) as w:
        w.write_table(table.cast(schema))
    single = summarize(load(old))
    assert int(single.hypercalls["bounded"].sum()) > 0, "the trace must need the fallback"
    ds = tmp_path / "ds"
    assert [r.added for r in add_traces(ds, [old, src])] == [True, True]
    ft = fleet_tables(ds)
    for path in (old, src):
        trace = add_traces(ds, [path])[0].trace
        single = summarize(load(path))
        for name in PER_TRACE_TABLES:
            assert_frame_equal(ft.per_trace[name].filter(pl.col("trace") == trace).drop("trace"), getattr(single, name))


def test_group_tables_combine_exactly(local_tables: FleetTables, fleet: Fleet) -> None:
    g = local_tables.grouped
    good_sha = local_tables.traces.filter(pl.col("guest_name").str.contains("vbs_demo")).sort("start_time")["guest_sha256"][0]
    paths = fleet.good
    # counts: sums of the single traces' counts
    want = pl.concat([T.event_counts(load(p)).collect() for p in paths]).group_by("kind").agg(pl.col("events").sum().cast(pl.Int64))
    got = g["counts"].filter(pl.col("group") == good_sha).select("kind", "events")
    assert_frame_equal(got, want, check_row_order=False)
    assert (g["counts"].filter(pl.col("group") == good_sha)["traces"] == 2).all()
    # latency percentiles: from the merged values, within the sketch's stated error
    lat = pl.concat([T.vtl_transitions(load(p)).collect() for p in paths]).filter(pl.col("reason") == "call")["latency_ns"].drop_nulls().sort()
    row = g["transitions"].filter((pl.col("group") == good_sha) & (pl.col("reason") == "call")).row(0, named=True)
    assert row["count"] == lat.len() and row["max_ns"] == lat.max() and row["mean_ns"] == pytest.approx(lat.mean())
    for q, col in ((0.5, "p50_ns"), (0.9, "p90_ns"), (0.99, "p99_ns")):
        exact = lat[sketch.quantile_rank(q, lat.len())]
        assert abs(row[col] - exact) <= sketch.ALPHA * exact + 1, (col, row[col], exact)
    # secure calls of the demo guest: what guests/vbs_demo.c makes, twice
    sc = g["secure_calls"].filter(pl.col("group") == good_sha)
    assert dict(zip(sc["service"].to_list(), sc["count"].to_list(), strict=True))[SEAL_KEY] == 2 * 12


def test_regression_moves_seal_key_and_its_hypercalls(dataset: Path, local_tables: FleetTables) -> None:
    t = local_tables.traces.filter(pl.col("guest_name").str.contains("vbs_demo"))
    shas = t.group_by("guest_sha256").len().sort("len")
    regressed_sha, good_sha = shas["guest_sha256"][0], shas["guest_sha256"][1]
    d = diff_fleet(dataset, f"guest_sha256={good_sha}", f"guest_sha256={regressed_sha}")
    hc = d.latency["hypercalls"].filter((pl.col("name") == "HvCallGetVpRegisters") & (pl.col("vtl") == 1)).row(0, named=True)
    # 12 seal_key calls per boot, REGRESSION more GetVpRegisters each, all in VTL1
    assert hc["per_trace_b"] - (hc["per_trace_a"] or 0) == 12 * REGRESSION and hc["moved"]
    seal = d.latency["secure_calls"].filter(pl.col("service") == SEAL_KEY).row(0, named=True)
    assert seal["per_trace_a"] == seal["per_trace_b"] == 12
    assert seal["p50_b"] > seal["p50_a"] and seal["moved"]
    assert d.pair is None  # different guest images: nothing to compare event by event
    text = format_fleet_diff(d)
    assert "no trace of A ran the same guest image" in text


def test_diff_finds_first_divergence_of_two_boots_of_one_guest(dataset: Path, local_tables: FleetTables) -> None:
    t = local_tables.traces.filter(pl.col("guest_name").str.contains("vbs_demo")).sort("start_time")
    a, b = t["trace"][0], t["trace"][1]
    assert t["guest_sha256"][0] == t["guest_sha256"][1]
    d = diff_fleet(dataset, f"trace={a}", f"trace={b}")
    assert d.pair == (a, b)
    text = format_fleet_diff(d)
    if d.divergence is None:
        assert "match event for event" in text
    else:
        assert f"first divergence between trace {a} (A) and {b} (B), same guest, at event #{d.divergence.index}" in text


def test_dataset_on_another_fsspec_filesystem(fleet: Fleet, local_tables: FleetTables) -> None:
    """The same dataset in fsspec's memory filesystem (the object-storage code path: copy, then marker)."""
    import fsspec

    url = f"memory://fleet-{os.getpid()}"
    try:
        assert all(r.added for r in add_traces(url, fleet.all))
        assert not any(r.added for r in add_traces(url, fleet.all[:2]))
        ds = Dataset(url)
        assert not ds.local and ds.leftovers() == [] and ds.orphans() == []
        remote = fleet_tables(url, by="guest_sha256")
        _assert_same_tables(local_tables, remote)
    finally:
        fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


# ----------------------------------------------------------------------------- Dask


def _assert_same_tables(x: FleetTables, y: FleetTables) -> None:
    assert_frame_equal(x.traces, y.traces)
    assert set(x.per_trace) == set(y.per_trace) and set(x.grouped) == set(y.grouped)
    for name in x.per_trace:
        assert_frame_equal(x.per_trace[name], y.per_trace[name])
    for name in x.grouped:
        assert_frame_equal(x.grouped[name], y.grouped[name])


def test_dask_local_cluster_gives_the_same_tables(dataset: Path, local_tables: FleetTables, monkeypatch: pytest.MonkeyPatch) -> None:
    dask_tables = fleet_tables(dataset, by="guest_sha256", workers=2)
    _assert_same_tables(local_tables, dask_tables)
    # a large fleet goes to the workers in batches merged there: batches of two and three traces here
    from vsmtrace.analysis.fleet import compute

    sizes: list[int] = []

    def batches(specs: list, slots: int) -> list[list]:
        out = [specs[:2], specs[2:]]
        sizes.extend(len(b) for b in out)
        return out

    monkeypatch.setattr(compute, "_batches", batches)
    batched = fleet_tables(dataset, by="guest_sha256", workers=2)
    assert sorted(sizes) == [2, 3]
    _assert_same_tables(local_tables, batched)


def test_killing_a_worker_mid_query_still_completes(dataset: Path, fleet: Fleet, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    # more, slower tasks than workers, so a worker dies with work in flight
    extra = []
    for i in range(8):
        p = tmp_path / f"more{i}.vsmt"
        write_realistic(p, 40_000, vps=2, seed=100 + i)
        extra.append(p)
    ds = tmp_path / "ds"
    add_traces(ds, [*fleet.all, *extra])
    local = fleet_tables(ds, by="config")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        first_result = threading.Event()
        result: dict[str, object] = {}

        def query() -> None:
            try:
                result["tables"] = fleet_tables(ds, by="config", scheduler=cluster.scheduler_address,
                                                progress=lambda done, total: first_result.set())  # fmt: skip
            except BaseException as exc:  # reported below
                result["error"] = exc

        th = threading.Thread(target=query)
        th.start()
        assert first_result.wait(300), "no task finished"
        victim_address, victim = sorted(pids.items())[0]
        os.kill(victim, signal.SIGKILL)
        th.join(600)
        assert not th.is_alive()
        assert "error" not in result, result.get("error")
        # the nanny restarted the killed worker: its process is gone, a new one took its place
        assert victim not in client.run(os.getpid).values()
    _assert_same_tables(local, result["tables"])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- crashes and concurrent writers


def _staged_parquet(ds: Path) -> list[Path]:
    return [p for p in (ds / "_staging").glob("*/part-0.parquet") if p.stat().st_size > 0] if (ds / "_staging").exists() else []


def test_killed_add_leaves_no_partial_trace(dataset: Path, fleet: Fleet, tmp_path: Path) -> None:
    big = tmp_path / "big.vsmt"
    write_realistic(big, 400_000, vps=4, seed=9)
    ds = tmp_path / "ds"
    add_traces(ds, fleet.synthetic)
    committed = {e.trace for e in Dataset(ds).traces()}
    proc = subprocess.Popen([sys.executable, "-m", "vsmtrace.cli", "fleet", "add", str(ds), str(big)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not _staged_parquet(ds) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the add finished before it could be killed mid-write"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _staged_parquet(ds), "killed while writing the staged file"

    r = run_vsmtrace(["fleet", "info", str(ds)])
    assert r.status == 0, r.stderr
    assert f"{len(committed)} traces" in r.stdout and "staging directory" in r.stdout
    assert {e.trace for e in Dataset(ds).traces()} == committed
    report = fleet_tables(ds)
    assert set(report.traces["trace"].to_list()) == committed
    # the next add removes the dead writer's staging and adds the trace whole
    r = run_vsmtrace(["fleet", "add", str(ds), str(big)], timeout=300)
    assert r.status == 0, r.stderr
    assert list((ds / "_staging").iterdir()) == []
    entries = {e.trace: e for e in Dataset(ds).traces()}
    assert len(entries) == len(committed) + 1
    new = next(e for t, e in entries.items() if t not in committed)
    assert new.events == load(big).select(pl.len()).collect().item()


def test_recovered_copy_is_replaced_by_the_complete_trace(tmp_path: Path) -> None:
    full = tmp_path / "t.vsmt"
    write_realistic(full, 200_000, vps=2, seed=5)
    cut = tmp_path / "cut.vsmt"  # what a killed recording leaves: complete batches, then a torn tail
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    ds = tmp_path / "ds"
    first = add_traces(ds, [cut])[0]
    (entry,) = Dataset(ds).traces()
    assert entry.meta["recovered"] is True and entry.meta["sealed"] is False and 0 < entry.events < 200_000
    second = add_traces(ds, [full, cut])
    assert second[0].trace == second[1].trace == first.trace, "one recording, one trace id"
    assert [r.added for r in second] == [True, False]
    (entry,) = Dataset(ds).traces()
    assert entry.meta["sealed"] is True and entry.meta["recovered"] is False and entry.events == load(full).select(pl.len()).collect().item()
    assert list((ds / "_staging").iterdir()) == []


def test_two_writers_add_each_trace_once(fleet: Fleet, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    order_a = [str(p) for p in fleet.all]
    order_b = list(reversed(order_a))
    procs = [subprocess.Popen([sys.executable, "-m", "vsmtrace.cli", "fleet", "add", str(ds), *order], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for order in (order_a, order_b)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    added = sum(line.startswith("added") for out, _ in outs for line in out.splitlines())
    assert added == len(fleet.all)
    assert len(Dataset(ds).traces()) == len(fleet.all)
    assert list((ds / "_staging").iterdir()) == []


# ----------------------------------------------------------------------------- the command line


def test_cli_report_info_diff(dataset: Path, tmp_path: Path) -> None:
    r = run_vsmtrace(["fleet", "info", str(dataset)])
    assert r.status == 0 and "5 traces" in r.stdout, r.stderr
    out = tmp_path / "figs"
    r = run_vsmtrace(["fleet", "report", str(dataset), "--by", "vm_vps", "--out", str(out)], timeout=300)
    assert r.status == 0, r.stderr
    assert "grouped by vm_vps (2 groups)" in r.stdout and "secure calls by service code" in r.stdout
    for name in ("fleet_call_latency_cdf.png", "fleet_call_p99_by_group.png", "fleet_trend.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_vsmtrace(["fleet", "diff", str(dataset), "--a", "vm_vps=2", "--b", "vm_vps=4"], timeout=300)
    assert r.status == 0, r.stderr
    assert r.stdout.startswith("A = vm_vps=2 (4 traces") and "events per kind, mean per trace" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["fleet", "info", "{tmp}/nothing"], "no such dataset"),
        (["fleet", "info", "{tmp}"], "not a fleet dataset"),
        (["fleet", "report", "{ds}", "--by", "nope"], "--by nope: no such column"),
        (["fleet", "report", "{ds}", "--where", "vm_vps=two"], "is not a"),
        (["fleet", "report", "{ds}", "--where", "garbage"], "expected COLUMN=VALUE"),
        (["fleet", "diff", "{ds}", "--a", "vm_vps=2", "--b", "vm_vps=99"], "--b vm_vps=99: selects no trace"),
        (["fleet", "report", "{ds}", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "exclude each other"),
        (["fleet", "add", "{tmp}/new", "{tmp}/notatrace.txt"], "not an Arrow IPC trace"),
    ],
)
def test_bad_input_is_one_line(args: list[str], message: str, dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "notatrace.txt").write_text("hello\n")
    r = run_vsmtrace([a.format(tmp=tmp_path, ds=dataset) for a in args])
    assert r.status == 2, (r.status, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vsmtrace: error:") and message in lines[0], r.stderr


def test_duckdb_reads_the_dataset_directly(dataset: Path, local_tables: FleetTables) -> None:
    import duckdb

    con = duckdb.connect()
    rows = con.sql(
        f"SELECT trace, count(*) AS n FROM read_parquet('{dataset}/events/*/*/*/*.parquet', hive_partitioning = true) "
        "WHERE kind = 'VTL_SWITCH' GROUP BY trace ORDER BY trace"
    ).fetchall()
    want = local_tables.per_trace["counts"].filter(pl.col("kind") == "VTL_SWITCH").sort("trace")
    assert rows == list(zip(want["trace"].to_list(), want["events"].to_list(), strict=True))


# ----------------------------------------------------------------------------- the notebook


def test_fleet_notebook(fleet: Fleet, tmp_path: Path) -> None:
    """notebooks/fleet.ipynb top to bottom, on this module's recordings plus the boots it records itself."""
    import json
    import shutil

    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    from nbclient import NotebookClient

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"], check=True)
    traces = tmp_path / "fleet" / "traces"
    traces.mkdir(parents=True)
    for src, name in ((fleet.good[0], "good-1"), (fleet.good[1], "good-2"), (fleet.regressed, "regressed-1")):
        shutil.copy(src, traces / f"{name}.arrow")
    nb = nbformat.read(ROOT / "notebooks" / "fleet.ipynb", as_version=4)
    assert nb.cells[0].source.splitlines()[0] == "# A fleet of VSM boots"
    old = os.environ.get("VSMTRACE_FLEET_DIR")
    os.environ["VSMTRACE_FLEET_DIR"] = str(tmp_path / "fleet")
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        if old is None:
            os.environ.pop("VSMTRACE_FLEET_DIR")
        else:
            os.environ["VSMTRACE_FLEET_DIR"] = old
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    lines = [ln for o in outputs if o.output_type == "stream" for ln in o.text.splitlines() if ln.startswith("NOTEBOOK_RESULT ")]
    assert len(lines) == 1
    r = json.loads(lines[0].removeprefix("NOTEBOOK_RESULT "))
    assert r["traces"] == 5 and r["added_again"] == 0
    assert r["seal_key_per_boot"] == {"shipped": 12.0, "regressed": 12.0}
    got = r["get_vp_registers_vtl1_per_boot"]
    assert got["regressed"] - got["shipped"] == 12 * REGRESSION
    assert "HvCallGetVpRegisters" in r["moved_hypercalls"]
    assert r["seal_key_p50_us"]["regressed"] > r["seal_key_p50_us"]["shipped"]
    # the two intercepts of every boot: 4 boots at 128 MiB, 1 at 256 MiB
    assert sorted(map(tuple, r["intercepts"])) == [("128", "read", 4), ("128", "write", 4), ("256", "read", 1), ("256", "write", 1)]
    assert r["builds_pair"] is None and r["memory_pair"] is not None
    assert r["dask_identical"] is True
    for figure in r["figures"]:
        assert Path(figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(1 for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})) == 3
