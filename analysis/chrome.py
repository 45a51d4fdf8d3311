"""Chrome trace-event JSON export (opens in Perfetto UI and chrome://tracing).

Layout: one process ("vsmtrace guest"), and per VP two threads (tracks):
``VP n`` carries one complete ("X") slice per VTL stint, named ``VTL0``/``VTL1``, plus
an instant event per secure memory intercept; ``VP n hypercalls`` carries one slice
per hypercall whose duration was recorded (it ends at the event's time) or an instant
event when it was not. Hypercalls get their own track because their slices may
straddle a stint boundary (a VTL call ends in the other VTL), and complete events on
one track must nest. Timestamps are µs since trace start with ns precision.

The JSON lines are formatted as text by Polars (a per-event Python dict cost minutes on a
10-million-event trace) and streamed to the file by one Polars sink, so the text is never
held whole in memory (nor turned into Python strings).
"""

from __future__ import annotations

import codecs
import io
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
    """A string column as JSON text (``null`` for null): ``json.dumps`` of each distinct value.

    Every string column of the export is a dictionary column (names, reasons, access
    types), so the distinct values are few and Polars maps each row to its text.
    """
    return pl.col(col).cast(pl.String).map_batches(_json_series, return_dtype=pl.String)


def _json_series(s: pl.Series) -> pl.Series:
    table = {v: json.dumps(v) for v in s.drop_nulls().unique().to_list()}
    return s.replace_strict(table, default="null", return_dtype=pl.String).fill_null("null")


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
    """Hex digits of non-negative integers (codes, addresses): one format per distinct value."""
    table = {v: f"{v:x}" for v in s.drop_nulls().unique().to_list()}
    return s.replace_strict(table, default=None, return_dtype=pl.String)


def _hex_text(col: str) -> pl.Expr:
    """An integer column as the JSON string ``"0x..."`` (``null`` for null), as ``_hex`` writes it."""
    digits = pl.col(col).map_batches(_hex_series, return_dtype=pl.String)
    return pl.when(pl.col(col).is_null()).then(pl.lit("null")).otherwise(pl.concat_str([pl.lit('"0x'), digits, pl.lit('"')]))


def _intercept_lines(lf: pl.LazyFrame) -> pl.LazyFrame:
    name = pl.concat_str([pl.lit("intercept "), pl.col("access").fill_null("None")]).alias("_name")
    return T.intercepts(lf).with_columns(name).select(
        pl.concat_str([
            pl.lit(f'{{"ph":"i","s":"t","pid":{PID},"tid":'), _int_text("vp"), pl.lit(',"name":'), _str_text("_name"),
            pl.lit(',"cat":"intercept","ts":'), _us_text(pl.col("time_ns")), pl.lit(',"args":{"seq":'), _int_text("seq"),
            pl.lit(',"vtl":'), _int_text("vtl"), pl.lit(',"gpa":'), _hex_text("gpa"), pl.lit(',"gva":'), _hex_text("gva"),
            pl.lit(',"rip":'), _hex_text("rip"), pl.lit("}}"),
        ]).alias("line")
    )  # fmt: skip


class _LineSink(io.RawIOBase):
    """Where the Polars sink writes: passes the bytes on to ``out`` and counts the events (lines) for progress."""

    def __init__(self, out: IO[str] | IO[bytes], on_events: Callable[[int], object] | None) -> None:
        super().__init__()
        text = isinstance(out, io.TextIOBase)
        self._bytes: IO[bytes] | None = getattr(out, "buffer", None) if text else out  # type: ignore[assignment]
        self._text = out if self._bytes is None else None
        self._decode = codecs.getincrementaldecoder("utf-8")().decode
        self._on_events = on_events
        self.lines = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        n = data.count(b"\n")
        if self._bytes is not None:
            self._bytes.write(data)
        else:
            self._text.write(self._decode(data))  # type: ignore[union-attr]
        self.lines += n
        if n and self._on_events is not None:
            self._on_events(n)
        return len(data)


def write_chrome(lf: pl.LazyFrame, out: IO[str] | IO[bytes], on_events: Callable[[int], object] | None = None) -> int:
    """Write the JSON object format to ``out`` (text or binary); returns the number of trace events.

    Stint, hypercall and intercept events (all but the few metadata ones) are formatted as
    JSON text by Polars and streamed to ``out`` by one sink, a line per event, each after a
    comma; ``chrome_events`` is the same content as Python dicts. ``on_events(n)`` is called
    as events are written (``n`` new ones), so callers can show progress.
    """

    def put(text: str) -> None:
        out.write(text if isinstance(out, io.TextIOBase) else text.encode())  # type: ignore[arg-type]

    put('{"displayTimeUnit": "ns", "otherData": {"generator": "vsmtrace export"}, "traceEvents": [\n')
    vps = sorted(lf.select(pl.col("vp").unique()).collect(engine=T.COLLECT_ENGINE)["vp"].to_list())
    meta = [json.dumps(ev, separators=(",", ":")) for ev in _metadata_events(vps)]  # never empty: the process name
    put(",\n".join(meta) + "\n")
    if on_events is not None:
        on_events(len(meta))
    out.flush()  # the sink writes below what is buffered here
    lines = pl.concat([_stint_lines(lf), _hypercall_lines(lf), _intercept_lines(lf)]).select(pl.concat_str([pl.lit(","), pl.col("line")]))
    sink = _LineSink(out, on_events)
    lines.sink_csv(sink, include_header=False, quote_style="never", engine=T.COLLECT_ENGINE)  # type: ignore[arg-type]
    put("]}\n")
    return len(meta) + sink.lines


def export_chrome(lf: pl.LazyFrame, path: str | os.PathLike[str], on_events: Callable[[int], object] | None = None) -> int:
    """Write ``path`` atomically (temp file + rename); returns the number of trace events."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            n = write_chrome(lf, f, on_events)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n
