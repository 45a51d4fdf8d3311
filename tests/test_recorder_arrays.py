"""recorder.arrays builds the same Arrow arrays as ``pa.array`` from buffers, and a recording never imports pandas or Polars."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vsmtrace.recorder.arrays import column

from tests.conftest import ROOT, build_guest

#: No per-example deadline: a slow host (or the first call of an Arrow kernel) is not a failure here.
UNTIMED = settings(deadline=None)

INT_TYPES = [pa.int8(), pa.uint8(), pa.int16(), pa.uint16(), pa.int32(), pa.uint32(), pa.int64(), pa.uint64()]


def _ints(typ: pa.DataType) -> st.SearchStrategy[int]:
    bits = typ.bit_width
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if pa.types.is_signed_integer(typ) else (0, (1 << bits) - 1)
    return st.integers(lo, hi)


def _nullable(values: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(st.one_of(st.none(), values), max_size=70)


def _same(values: list[Any], typ: pa.DataType) -> None:
    got = column(values, typ)
    got.validate(full=True)
    assert got.type == typ
    assert got.equals(pa.array(values, typ)), (values, got)
    assert got.null_count == sum(v is None for v in values)


@pytest.mark.parametrize("typ", INT_TYPES, ids=str)
@UNTIMED
@given(data=st.data())
def test_integers_match_pa_array(typ: pa.DataType, data: st.DataObject) -> None:
    _same(data.draw(_nullable(_ints(typ))), typ)


@UNTIMED
@given(_nullable(st.booleans()))
def test_booleans_match_pa_array(values: list[bool | None]) -> None:
    _same(values, pa.bool_())


@UNTIMED
@given(_nullable(st.text()))
def test_strings_match_pa_array(values: list[str | None]) -> None:
    _same(values, pa.string())


@UNTIMED
@given(_nullable(st.binary()))
def test_binary_matches_pa_array(values: list[bytes | None]) -> None:
    _same(values, pa.binary())


@UNTIMED
@given(_nullable(st.lists(st.one_of(st.none(), _ints(pa.uint64())), max_size=5)))
def test_lists_match_pa_array(values: list[list[int | None] | None]) -> None:
    _same(values, pa.list_(pa.uint64()))


def test_bytes_like_values_are_binary() -> None:
    assert column([bytearray(b"ab"), memoryview(b"c"), None], pa.binary()).to_pylist() == [b"ab", b"c", None]


@pytest.mark.parametrize(
    ("values", "typ"),
    [
        ([True], pa.uint64()),  # pa.array refuses a bool in an integer column too
        ([1.0], pa.uint8()),  # pa.array would truncate a float into it
        ([-1], pa.uint8()),
        ([256], pa.uint8()),
        ([1 << 64], pa.uint64()),
        ([1], pa.bool_()),
        (["a"], pa.binary()),  # pa.array would encode it
        ([5], pa.binary()),  # bytes(5) would be five zero bytes
        ([b"a"], pa.string()),
        (["ab"], pa.list_(pa.uint64())),
        ([1], pa.float64()),  # a type the recorder never converts
    ],
    ids=lambda v: repr(v)[:20],
)
def test_wrong_values_raise(values: list[Any], typ: pa.DataType) -> None:
    with pytest.raises((TypeError, ValueError, OverflowError)):
        column(values, typ)


def _imported(args: list[str]) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``vsmtrace ARGS`` with ``-X importtime``: the result and every module it imported."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "vsmtrace", *args], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)  # fmt: skip
    return r, {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}


def _pandas_or_polars(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in ("pandas", "polars")}


def test_recording_and_replay_import_neither_pandas_nor_polars(tmp_path: Path) -> None:
    """pyarrow imports pandas on its first ``pa.array`` or ``pa.scalar`` of Python values, and Polars is the
    analysis library: recording and replaying need neither, and importing them was 0.45 s of every
    ``run --record``'s start-up and 0.2 s of every replay's (docs/benchmarks.md). The analysis needs
    Polars, not pandas."""
    trace = tmp_path / "t.arrow"
    r, imported = _imported(["run", "--record", str(trace), "--timeout", "60", str(build_guest("hello"))])
    assert "vsmtrace.recorder.writer" in imported and "pyarrow" in imported, r.stderr[-2000:]
    assert r.returncode == 1, r.stderr[-2000:]  # hello's isa-debug-exit write: a clean end
    assert not _pandas_or_polars(imported)
    assert "numpy" not in imported  # pyarrow's optional NumPy: ~45 ms a recording never used
    assert "pyarrow.compute" not in imported  # its ~300 generated wrappers: 25-40 ms (recorder/compute.py)
    from vsmtrace.recorder.reader import open_trace

    kinds = open_trace(trace).table(["kind"])["kind"].cast(pa.string()).to_pylist()
    assert "SERIAL" in kinds and "GUEST_EXIT" in kinds, sorted(set(kinds))

    for args, said in ((["replay", str(trace)], "replay verified"), (["replay", str(trace), "--state", "5"], "state after event 5")):
        r, imported = _imported(args)
        assert r.returncode == 0 and said in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])
        assert "vsmtrace.replayer.engine" in imported
        assert not _pandas_or_polars(imported), args

    # The analysis runs on Polars, still without pandas (Schema.empty_table went through pa.array).
    r, imported = _imported(["report", str(trace), "--out", str(tmp_path / "report")])
    assert r.returncode == 0 and "polars" in imported, r.stderr[-2000:]
    assert not {m for m in imported if m.split(".")[0] == "pandas"}


def test_the_command_line_gives_arrow_the_c_librarys_allocator_unless_told_otherwise() -> None:
    """Mimalloc made sealing 2-4x slower on the development hosts (docs/architecture.md, "Arrow's allocator")."""
    probe = "import vsmtrace.__main__, pyarrow as pa; print(pa.default_memory_pool().backend_name)"
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    chosen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert chosen.stdout.strip() == "system"
    env["ARROW_DEFAULT_MEMORY_POOL"] = "mimalloc"
    kept = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert kept.stdout.strip() == "mimalloc"


def test_arrow_imported_without_numpy_leaves_numpy_importable_and_arrow_working(tmp_path: Path) -> None:
    """What ``vsmtrace run --record`` does to its process: pyarrow without NumPy, NumPy still available."""
    probe = f"""
import sys
from vsmtrace.session import import_arrow_without_numpy
import_arrow_without_numpy()
assert "numpy" not in sys.modules and "pyarrow" in sys.modules
from vsmtrace.recorder.writer import TraceWriter
from vsmtrace.recorder.reader import open_trace
from vsmtrace.vmm.events import EventKind
with TraceWriter({str(tmp_path / "t.arrow")!r}, {{}}) as w:
    w.emit(EventKind.SERIAL, 0, 0, 0x1000, data=b"hi")
assert "numpy" not in sys.modules
import numpy
assert numpy.arange(3).sum() == 3
print(open_trace({str(tmp_path / "t.arrow")!r}).table(["serial_data"])["serial_data"].to_pylist())
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[b'hi']"


def test_the_recorders_compute_calls_are_pyarrow_computes() -> None:
    """recorder/compute.py calls Arrow's functions by name: same results as pyarrow.compute's wrappers."""
    import pyarrow.compute as pc
    from vsmtrace.recorder import compute

    values = pa.array([5, None, 3, 5, 1, 3, 3], pa.int64())
    indices = pa.array([6, 0, 2], pa.int32())
    assert compute.sort_indices(values).equals(pc.sort_indices(values))
    assert compute.take(values, indices).equals(values.take(indices))
    batch = pa.RecordBatch.from_arrays([values, values.cast(pa.string())], names=["a", "b"])
    assert compute.take(batch, indices).equals(batch.take(indices))
    assert compute.value_counts(values).equals(pc.value_counts(values))
    lengths = pa.array([0, 3, 4, 9], pa.int32())
    assert compute.cumulative_sum_checked(lengths).equals(pc.cumulative_sum_checked(lengths))
    with pytest.raises(pa.ArrowInvalid):
        compute.cumulative_sum_checked(pa.array([2**31 - 1, 1], pa.int32()))
    flags = pa.array([0, 1, 1, 0], pa.uint8())
    assert compute.cast(flags, pa.bool_()).equals(flags.cast(pa.bool_()))
    with pytest.raises(pa.ArrowInvalid):
        compute.cast(pa.array([300], pa.int64()), pa.uint8())  # safe, as Array.cast


@pytest.mark.parametrize(("installed", "blocks"), [("18.0.0", True), ("26.0.1", True), ("17.0.0", False), (None, False)])
def test_numpy_is_kept_out_only_of_a_pyarrow_that_imports_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, installed: str | None, blocks: bool
) -> None:
    """pyarrow before 18.0 imports NumPy unconditionally: blocking it there would break every recording."""
    import importlib.machinery
    import importlib.util

    from vsmtrace import session

    package = tmp_path / "pyarrow"
    package.mkdir()
    if installed is not None:
        (tmp_path / f"pyarrow-{installed}.dist-info").mkdir()
    spec = importlib.machinery.ModuleSpec("pyarrow", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "pyarrow" else None)
    assert session._arrow_runs_without_numpy() is blocks


@pytest.mark.parametrize(
    "typ", [pa.uint64(), pa.int8(), pa.bool_(), pa.string(), pa.binary(), pa.list_(pa.uint64()), pa.dictionary(pa.int32(), pa.string())]
)
def test_null_columns_are_nulls_of_every_length_and_type_as_arrow_makes_them(typ: pa.DataType) -> None:
    """recorder/nulls.py shares one zero buffer and reuses arrays by (type, length); each must be Arrow's nulls."""
    from vsmtrace.recorder.nulls import NullColumns

    nulls = NullColumns(rows=8)
    for n in (0, 3, 8, 9, 3, 100):  # 9 and 100 grow the shared buffer (and start the cache over)
        arr = nulls.array(typ, n, column(["a"], pa.string()) if pa.types.is_dictionary(typ) else None)
        arr.validate(full=True)
        assert arr.type == typ and len(arr) == n and arr.null_count == n
        assert arr.to_pylist() == pa.nulls(n, typ).to_pylist()
    again = nulls.array(pa.uint64(), 100)
    assert again is nulls.array(pa.uint64(), 100)  # immutable: one array serves every column that asks
