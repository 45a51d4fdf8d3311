"""Chrome trace-event JSON export (opens in Perfetto UI and chrome://tracing).

Layout: one process ("vsmtrace guest"), and per VP two threads (tracks):
``VP n`` carries one complete ("X") slice per VTL stint, named ``VTL0``/``VTL1``, plus
an instant event per secure memory intercept; ``VP n hypercalls`` carries one slice
per hypercall whose duration was recorded (it ends at the event's time) or an instant
event when it was not. Hypercalls get their own track because their slices may
straddle a stint boundary (a VTL call ends in the other VTL), and complete events on
one track must nest. Timestamps are µs since trace start with ns precision.

The JSON is written from collected slices of the derived tables, formatted as text by
Polars (a per-event Python dict cost minutes on a 10-million-event trace), so memory
stays bounded by the derived tables and one slice of text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import polars as pl
from vsmtrace.analysis import tables as T

__all__ = ["HYPERCALL_TID_BASE", "chrome_events", "export_chrome", "write_chrome"]

PID = 1
HYPERCALL_TID_BASE = 1000
_SLICE = 50_000


def _us(ns: int) -> float:
    return round(ns / 1000.0, 3)


def _rows(lf: pl.LazyFrame) -> Iterator[dict[str, Any]]:
    df = lf.collect(engine=T.COLLECT_ENGINE)
    for chunk in df.iter_slices(_SLICE):
        yield from chunk.iter_rows(named=True)


def chrome_events(lf: pl.LazyFrame) -> Iterator[dict[str, Any]]:
    """Every trace event of the export, metadata first."""
    vps = sorted(lf.select(pl.col("vp").unique()).collect(engine=T.COLLECT_ENGINE)["vp"].to_list())
    yield from _metadata_events(vps)
    for r in _rows(T.vtl_stints(lf)):
        yield {
            "ph": "X", "pid": PID, "tid": r["vp"], "name": f"VTL{r['vtl']}", "cat": "vtl",
            "ts": _us(r["start_ns"]), "dur": _us(r["duration_ns"]),
            "args": {"start_reason": r["start_reason"], "end_reason": r["end_reason"], "start_seq": r["start_seq"]},
        }  # fmt: skip
    calls = T.hypercalls(lf, bound_fallback=False).select("seq", "time_ns", "vp", "vtl", "code", "name", "status_name", "latency_ns")
    for r in _rows(calls):
        args = {"seq": r["seq"], "vtl": r["vtl"], "code": f"{r['code']:#x}" if r["code"] is not None else None, "status": r["status_name"]}
        ev: dict[str, Any] = {"pid": PID, "tid": HYPERCALL_TID_BASE + r["vp"], "name": r["name"] or "hypercall", "cat": "hypercall", "args": args}
        if r["latency_ns"] is not None:
            ev.update(ph="X", ts=_us(r["time_ns"] - r["latency_ns"]), dur=_us(r["latency_ns"]))
        else:
            ev.update(ph="i", s="t", ts=_us(r["time_ns"]))
        yield ev
    yield from _intercept_events(lf)


def _metadata_events(vps: list[int]) -> Iterator[dict[str, Any]]:
    yield {"ph": "M", "pid": PID, "tid": 0, "name": "process_name", "args": {"name": "vsmtrace guest"}}
    for vp in vps:
        for tid, label, order in ((vp, f"VP {vp}", 2 * vp), (HYPERCALL_TID_BASE + vp, f"VP {vp} hypercalls", 2 * vp + 1)):
            yield {"ph": "M", "pid": PID, "tid": tid, "name": "thread_name", "args": {"name": label}}
            yield {"ph": "M", "pid": PID, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": order}}


def _intercept_events(lf: pl.LazyFrame) -> Iterator[dict[str, Any]]:
    for r in _rows(T.intercepts(lf)):
        yield {
            "ph": "i", "s": "t", "pid": PID, "tid": r["vp"], "name": f"intercept {r['access']}", "cat": "intercept",
            "ts": _us(r["time_ns"]),
            "args": {"seq": r["seq"], "vtl": r["vtl"], "gpa": _hex(r["gpa"]), "gva": _hex(r["gva"]), "rip": _hex(r["rip"])},
        }  # fmt: skip


def _hex(v: int | None) -> str | None:
    return None if v is None else f"{v:#x}"


def _us_text(ns: pl.Expr) -> pl.Expr:
    """``ns`` (>= 0) as the JSON number ``round(ns / 1000, 3)``: exact decimal text, no float formatting."""
    return pl.concat_str([(ns // 1000).cast(pl.String), pl.lit("."), (ns % 1000).cast(pl.String).str.zfill(3)])


def _str_text(col: str) -> pl.Expr:
    """A string column as JSON text (``null`` for null)."""
    c = pl.col(col).cast(pl.String)
    quoted = pl.concat_str([pl.lit('"'), c.str.replace_all("\\", "\\\\", literal=True).str.replace_all('"', '\\"', literal=True), pl.lit('"')])
    return pl.when(c.is_null()).then(pl.lit("null")).otherwise(quoted)


def _int_text(col: str) -> pl.Expr:
    return pl.col(col).cast(pl.String).fill_null("null")


def _stint_lines(lf: pl.LazyFrame) -> pl.LazyFrame:
    return T.vtl_stints(lf).select(
        pl.concat_str([
            pl.lit(f'{{"ph":"X","pid":{PID},"tid":'), _int_text("vp"), pl.lit(',"name":"VTL'), _int_text("vtl"),
            pl.lit('","cat":"vtl","ts":'), _us_text(pl.col("start_ns")), pl.lit(',"dur":'), _us_text(pl.col("duration_ns")),
            pl.lit(',"args":{"start_reason":'), _str_text("start_reason"), pl.lit(',"end_reason":'), _str_text("end_reason"),
            pl.lit(',"start_seq":'), _int_text("start_seq"), pl.lit("}}"),
        ]).alias("line")
    )  # fmt: skip


def _hypercall_lines(lf: pl.LazyFrame) -> pl.LazyFrame:
    calls = T.hypercalls(lf, bound_fallback=False).select("seq", "time_ns", "vp", "vtl", "code", "name", "status_name", "latency_ns")
    code_hex = pl.concat_str([pl.lit('"0x'), pl.col("code").cast(pl.Int64).map_batches(_hex_series, return_dtype=pl.String), pl.lit('"')])
    head = pl.concat_str([
        pl.lit(f'{{"pid":{PID},"tid":'), (pl.col("vp").cast(pl.Int64) + HYPERCALL_TID_BASE).cast(pl.String),
        pl.lit(',"name":'), pl.when(pl.col("name").is_null()).then(pl.lit('"hypercall"')).otherwise(_str_text("name")),
        pl.lit(',"cat":"hypercall","args":{"seq":'), _int_text("seq"), pl.lit(',"vtl":'), _int_text("vtl"),
        pl.lit(',"code":'), pl.when(pl.col("code").is_null()).then(pl.lit("null")).otherwise(code_hex),
        pl.lit(',"status":'), _str_text("status_name"), pl.lit("}"),
    ])  # fmt: skip
    timed = pl.concat_str([pl.lit(',"ph":"X","ts":'), _us_text(pl.col("time_ns") - pl.col("latency_ns")), pl.lit(',"dur":'),
                           _us_text(pl.col("latency_ns")), pl.lit("}")])  # fmt: skip
    instant = pl.concat_str([pl.lit(',"ph":"i","s":"t","ts":'), _us_text(pl.col("time_ns")), pl.lit("}")])
    return calls.select(pl.concat_str([head, pl.when(pl.col("latency_ns").is_not_null()).then(timed).otherwise(instant)]).alias("line"))


def _hex_series(s: pl.Series) -> pl.Series:
    """Hex digits of small non-negative integers (hypercall codes): one format per distinct value."""
    table = {v: f"{v:x}" for v in s.drop_nulls().unique().to_list()}
    return s.replace_strict(table, default=None, return_dtype=pl.String)


def write_chrome(lf: pl.LazyFrame, out: IO[str], on_events: Callable[[int], object] | None = None) -> int:
    """Write the JSON object format to ``out``; returns the number of trace events.

    Stint and hypercall events (nearly all of them) are formatted as JSON text by Polars,
    a slice of rows at a time; ``chrome_events`` is the same content as Python dicts.
    ``on_events(n)`` is called as events are written (``n`` new ones), so callers can show progress.
    """
    out.write('{"displayTimeUnit": "ns", "otherData": {"generator": "vsmtrace export"}, "traceEvents": [\n')
    n = 0

    def put(lines: list[str]) -> None:
        nonlocal n
        if not lines:
            return
        out.write((",\n" if n else "") + ",\n".join(lines))
        n += len(lines)
        if on_events is not None:
            on_events(len(lines))

    vps = sorted(lf.select(pl.col("vp").unique()).collect(engine=T.COLLECT_ENGINE)["vp"].to_list())
    put([json.dumps(ev, separators=(",", ":")) for ev in _metadata_events(vps)])
    for q in (_stint_lines(lf), _hypercall_lines(lf)):
        df = q.collect(engine=T.COLLECT_ENGINE)
        for chunk in df.iter_slices(_SLICE):
            put(chunk["line"].to_list())
    put([json.dumps(ev, separators=(",", ":")) for ev in _intercept_events(lf)])
    out.write("\n]}\n")
    return n


def export_chrome(lf: pl.LazyFrame, path: str | os.PathLike[str], on_events: Callable[[int], object] | None = None) -> int:
    """Write ``path`` atomically (temp file + rename); returns the number of trace events."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            n = write_chrome(lf, f, on_events)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n
