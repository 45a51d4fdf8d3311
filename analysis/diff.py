"""``vsmtrace diff``: compare two traces side by side and find where they first diverge.

Two runs of the same guest should make the same requests in the same order; timing
differs. So the divergence search compares, row by row in seq order, every column
except the timing ones (``NONDETERMINISTIC``: seq, time_ns, duration_ns, deadline_ns and
the EMULATION I/O log, which records time reads): kind, vp, vtl, rip and each kind's fields. Dictionary columns are compared as strings (two
traces number their dictionaries independently). Rows are compared in windows, so two
large traces are never held in memory at once: traces (paths or opened ``Trace``s) are
read a record batch at a time and each aligned window is compared column by column with
Arrow's equality, and only a window that differs is searched row by row; frames are
compared a chunk of rows at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa
from vsmtrace.analysis import tables as T
from vsmtrace.analysis.load import TraceLike, load
from vsmtrace.recorder.reader import Trace, open_trace
from vsmtrace.recorder.schema import arrow_schema

__all__ = ["NONDETERMINISTIC", "Divergence", "TraceDiff", "diff_traces", "first_divergence", "format_diff"]

#: Columns that legitimately differ between two runs of the same guest: timing, and the
#: EMULATION I/O log (it carries every time source read, so it differs wherever time does).
NONDETERMINISTIC = ("seq", "time_ns", "duration_ns", "deadline_ns", "emu_args", "emu_io", "emu_result")
_CHUNK = 1 << 20


@dataclass
class Divergence:
    """The first row (0-based position in seq order) where two traces differ."""

    index: int
    seq_a: int | None
    seq_b: int | None
    columns: list[str]  # differing columns; ["<end of A>"] / ["<end of B>"] when one trace is shorter
    a: dict[str, Any] = field(default_factory=dict)  # the differing columns' values (plus kind, vp, vtl)
    b: dict[str, Any] = field(default_factory=dict)


@dataclass
class TraceDiff:
    counts: pl.DataFrame  # kind, a, b, delta
    hypercalls: pl.DataFrame  # name, count_a, count_b, p50_ns_a, p50_ns_b, p99_ns_a, p99_ns_b
    transitions: pl.DataFrame  # reason, count_a, count_b, p50_ns_a, ...
    divergence: Divergence | None
    events_a: int
    events_b: int


def _comparable(lf: pl.LazyFrame, ignore: Sequence[str]) -> tuple[pl.LazyFrame, list[str]]:
    schema = lf.collect_schema()
    cols = [c for c in schema if c not in ignore and c != "seq"]
    exprs = [pl.col(c).cast(pl.String) if isinstance(schema[c], pl.Categorical | pl.Enum) else pl.col(c) for c in cols]
    return lf.select("seq", *exprs), cols


def first_divergence(
    a: TraceLike,
    b: TraceLike,
    ignore: Sequence[str] = NONDETERMINISTIC,
    chunk: int = _CHUNK,
    on_rows: Callable[[int], object] | None = None,
) -> Divergence | None:
    """The first row where the compared columns differ, or where one trace ends early; None if equal.

    ``a`` and ``b`` are traces (paths, opened ``Trace``s: read batch by batch) or frames
    (compared ``chunk`` rows at a time). ``ignore`` names the columns not compared (default
    ``NONDETERMINISTIC``); ``on_rows(n)`` is told each time another ``n`` rows have been
    compared (progress).
    """
    ta, tb = _as_trace(a), _as_trace(b)
    if ta is not None and tb is not None:
        return _first_divergence_batches(ta, tb, ignore, on_rows)
    return _first_divergence_frames(load(a), load(b), ignore, chunk, on_rows)


def _as_trace(x: TraceLike) -> Trace | None:
    if isinstance(x, Trace):
        return x
    if isinstance(x, str | os.PathLike):
        return open_trace(x)
    return None


def _first_divergence_frames(
    a: pl.LazyFrame, b: pl.LazyFrame, ignore: Sequence[str], chunk: int, on_rows: Callable[[int], object] | None
) -> Divergence | None:
    la, cols_a = _comparable(a, ignore)
    lb, cols_b = _comparable(b, ignore)
    cols = [c for c in cols_a if c in cols_b]
    na = la.select(pl.len()).collect().item()
    nb = lb.select(pl.len()).collect().item()
    for off in range(0, max(na, nb), chunk):
        da = la.slice(off, chunk).collect()
        db = lb.slice(off, chunk).collect()
        n = min(da.height, db.height)
        if n:
            d = _row_divergence(da.head(n), db.head(n), cols, off)
            if d is not None:
                return d
        if on_rows is not None:
            on_rows(n)
        if da.height != db.height:
            return _end_divergence(off + n, da.slice(n, 1) if da.height > n else None, db.slice(n, 1) if db.height > n else None)
    return None


def _row_divergence(x: pl.DataFrame, y: pl.DataFrame, cols: list[str], off: int) -> Divergence | None:
    """The first differing row of two equally long windows starting at row ``off``, if any."""
    diff = pl.DataFrame({c: x[c].ne_missing(y[c]) for c in cols})
    bad = diff.select(pl.any_horizontal(pl.all()).arg_true().first()).item()
    if bad is None:
        return None
    which = [c for c in cols if diff[c][bad]]
    show = list(dict.fromkeys(["kind", "vp", "vtl", *which]))
    return Divergence(off + bad, x["seq"][bad], y["seq"][bad], which,
                      {c: x[c][bad] for c in show}, {c: y[c][bad] for c in show})  # fmt: skip


def _end_divergence(i: int, ra_df: pl.DataFrame | None, rb_df: pl.DataFrame | None) -> Divergence:
    """One trace ends at row ``i``; the other's next row (a one-row frame) is shown."""
    ra = ra_df.row(0, named=True) if ra_df is not None else None
    rb = rb_df.row(0, named=True) if rb_df is not None else None
    short = "<end of A>" if ra is None else "<end of B>"
    keep = ("kind", "vp", "vtl", "rip")
    return Divergence(i, ra and ra["seq"], rb and rb["seq"], [short],
                      {k: ra[k] for k in keep} if ra else {}, {k: rb[k] for k in keep} if rb else {})  # fmt: skip


def _batch_columns(t: Trace, ignore: Sequence[str]) -> list[str]:
    """The compared columns of ``t``: every schema column (a trace may lack newer ones) and its own extras."""
    names = list(dict.fromkeys([*arrow_schema().names, *t.schema.names]))
    return [c for c in names if c not in ignore and c != "seq"]


def _batches(t: Trace, cols: list[str]) -> Iterator[pa.RecordBatch]:
    """``seq`` and ``cols`` of every batch of ``t``; a column the trace lacks is all null."""
    full = arrow_schema()
    have = set(t.schema.names)
    for rb in t.batches(["seq", *[c for c in cols if c in have]], threads=False):
        n = rb.num_rows
        arrays = [rb.column(c) if c in have else pa.nulls(n, full.field(c).type) for c in ("seq", *cols)]
        yield pa.RecordBatch.from_arrays(arrays, names=["seq", *cols])


def _same(x: pa.Array, y: pa.Array) -> bool:
    """Equal values (nulls equal): dictionary columns by value, whatever each trace's dictionary numbering."""
    if pa.types.is_dictionary(x.type) and pa.types.is_dictionary(y.type):
        if x.dictionary.equals(y.dictionary):
            return x.indices.equals(y.indices)
        return x.dictionary_decode().equals(y.dictionary_decode())
    return x.equals(y)


def _frame(rb: pa.RecordBatch) -> pl.DataFrame:
    """A window as Polars compares and shows it (dictionary columns as strings)."""
    df = pl.from_arrow(rb)
    assert isinstance(df, pl.DataFrame)
    return df.with_columns(pl.col(pl.Categorical, pl.Enum).cast(pl.String))


def _first_divergence_batches(a: Trace, b: Trace, ignore: Sequence[str], on_rows: Callable[[int], object] | None) -> Divergence | None:
    ca, cb = _batch_columns(a, ignore), _batch_columns(b, ignore)
    cols = [c for c in ca if c in cb]
    ia, ib = _batches(a, cols), _batches(b, cols)
    xa: pa.RecordBatch | None = None
    xb: pa.RecordBatch | None = None
    oa = ob = pos = 0
    while True:
        while xa is None or (oa == xa.num_rows and xa is not None):
            xa, oa = next(ia, None), 0
            if xa is None:
                break
        while xb is None or (ob == xb.num_rows and xb is not None):
            xb, ob = next(ib, None), 0
            if xb is None:
                break
        if xa is None or xb is None:
            break
        n = min(xa.num_rows - oa, xb.num_rows - ob)
        wa, wb = xa.slice(oa, n), xb.slice(ob, n)
        if not all(_same(wa.column(i), wb.column(i)) for i in range(1, wa.num_columns)):
            d = _row_divergence(_frame(wa), _frame(wb), cols, pos)
            if d is not None:
                return d
        pos, oa, ob = pos + n, oa + n, ob + n
        if on_rows is not None:
            on_rows(n)
    if xa is None and xb is None:
        return None
    rest_a = _frame(xa.slice(oa, 1)) if xa is not None else None
    rest_b = _frame(xb.slice(ob, 1)) if xb is not None else None
    return _end_divergence(pos, rest_a, rest_b)


def _side_by_side(a: pl.DataFrame, b: pl.DataFrame, key: list[str], cols: list[str]) -> pl.DataFrame:
    j = a.select(*key, *cols).join(b.select(*key, *cols), on=key, how="full", coalesce=True, suffix="_b", nulls_equal=True)
    j = j.rename({c: f"{c}_a" for c in cols})
    order = [*key] + [f"{c}_{s}" for c in cols for s in ("a", "b")]
    return j.select(order).sort(key, nulls_last=True)


def diff_traces(
    a: TraceLike, b: TraceLike, ignore: Sequence[str] = NONDETERMINISTIC, on_rows: Callable[[int], object] | None = None
) -> TraceDiff:
    """Counts and latencies of A and B side by side, and their first divergence (``on_rows``: progress).

    A and B are traces (paths or opened ``Trace``s: the divergence search reads their
    batches) or frames. The six tables are collected together, so each trace's shared
    subplans (hypercalls, transitions) run once, and on a worker thread while the rows are
    compared (Polars and Arrow release the GIL: the two overlap on a second core).
    """
    la, lb = load(a), load(b)
    lat = ["count", "p50_ns", "p99_ns"]
    queries = (
        [T.event_counts(la), T.event_counts(lb)]
        + [T.hypercall_stats(T.hypercalls(x, bound_fallback=False), by=("name",)) for x in (la, lb)]
        + [T.transition_latency(T.vtl_transitions(x), by=("reason",)) for x in (la, lb)]
    )
    with ThreadPoolExecutor(max_workers=1) as pool:
        tables = pool.submit(pl.collect_all, queries, engine=T.COLLECT_ENGINE)
        div = first_divergence(a, b, ignore, on_rows=on_rows)
        ca, cb, ha, hb, ra, rb = tables.result()
    counts = (
        ca.rename({"events": "a"})
        .join(cb.rename({"events": "b"}), on="kind", how="full", coalesce=True)
        .with_columns(pl.col("a").fill_null(0).cast(pl.Int64), pl.col("b").fill_null(0).cast(pl.Int64))
        .with_columns((pl.col("b") - pl.col("a")).alias("delta"))
        .sort(["a", "kind"], descending=[True, False])
    )
    hc = _side_by_side(ha, hb, ["name"], lat)
    tr = _side_by_side(ra, rb, ["reason"], lat)
    return TraceDiff(counts, hc, tr, div, int(ca["events"].sum()), int(cb["events"].sum()))


#: Columns whose values read as addresses, ports, bit masks or register values: always hex.
HEX_COLUMNS = frozenset({
    "rip", "address", "data", "msr", "value", "leaf", "subleaf", "eax", "ebx", "ecx", "edx", "vector", "code", "control",
    "status", "input_gpa", "output_gpa", "gpa", "gva", "gpa_start", "old_mask", "new_mask", "message_type", "exit_code",
})  # fmt: skip


def _v(v: Any, column: str = "") -> str:
    if v is None:
        return "null"
    if isinstance(v, bytes):
        return v[:16].hex() + ("..." if len(v) > 16 else "") + f" ({len(v)} bytes)"
    if isinstance(v, int) and not isinstance(v, bool) and (column in HEX_COLUMNS or v > 0xFFFF):
        return f"{v:#x}"
    return str(v)


def format_diff(d: TraceDiff, name_a: str = "A", name_b: str = "B", notes: Sequence[str] = ()) -> str:
    """The diff as text: counts table, latency tables, and the divergence verdict (``notes``: e.g. a partial trace)."""
    from vsmtrace.analysis.report import _ns  # one duration formatter for every text output

    out = [f"A = {name_a} ({d.events_a} events)", f"B = {name_b} ({d.events_b} events)"]
    out += [f"note: {n}" for n in notes]
    out += ["", "events per kind"]
    w = max([len("kind"), *(len(k) for k in d.counts["kind"].to_list())])
    out.append(f"  {'kind'.ljust(w)}  {'A':>10}  {'B':>10}  {'B-A':>8}")
    for r in d.counts.iter_rows(named=True):
        out.append(f"  {r['kind'].ljust(w)}  {r['a']:>10}  {r['b']:>10}  {r['delta']:>+8}")
    for title, df, key in (("hypercalls", d.hypercalls, "name"), ("VTL transitions (entry reason)", d.transitions, "reason")):
        out += ["", f"{title}: count and latency, A vs B"]
        if df.height == 0:
            out.append("  (none in either trace)")
            continue
        w = max([len(key), *(len(str(k)) for k in df[key].to_list())])
        out.append(f"  {key.ljust(w)}  {'count A':>8}  {'count B':>8}  {'p50 A':>9}  {'p50 B':>9}  {'p99 A':>9}  {'p99 B':>9}")
        for r in df.iter_rows(named=True):
            out.append(
                f"  {str(r[key]).ljust(w)}  {_v(r['count_a']):>8}  {_v(r['count_b']):>8}  {_ns(r['p50_ns_a']):>9}  {_ns(r['p50_ns_b']):>9}"
                f"  {_ns(r['p99_ns_a']):>9}  {_ns(r['p99_ns_b']):>9}"
            )
    out.append("")
    v = d.divergence
    if v is None:
        out.append("identical: every event matches in kind, vp, vtl, rip and fields (timing ignored)")
    elif v.columns[0].startswith("<end of"):
        shorter = "A" if v.columns[0] == "<end of A>" else "B"
        longer = v.b if shorter == "A" else v.a
        out.append(f"first divergence at event #{v.index}: {shorter} ends there; the other trace continues with "
                   + ", ".join(f"{k}={_v(x, k)}" for k, x in longer.items()))  # fmt: skip
    else:
        out.append(f"first divergence at event #{v.index} (seq A={v.seq_a}, B={v.seq_b}) in {', '.join(v.columns)}:")
        for c in v.a:
            mark = "*" if c in v.columns else " "
            out.append(f"  {mark} {c}: A={_v(v.a[c], c)}  B={_v(v.b[c], c)}")
    return "\n".join(out) + "\n"
