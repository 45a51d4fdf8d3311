"""Chrome trace-event JSON export (opens in Perfetto UI and chrome://tracing).

Layout: one process ("vsmtrace guest"), and per VP two threads (tracks):
``VP n`` carries one complete ("X") slice per VTL stint, named ``VTL0``/``VTL1``, plus
an instant event per secure memory intercept; ``VP n hypercalls`` carries one slice
per hypercall whose duration was recorded (it ends at the event's time) or an instant
event when it was not. Hypercalls get their own track because their slices may
straddle a stint boundary (a VTL call ends in the other VTL), and complete events on
one track must nest. Timestamps are µs since trace start with ns precision.

The JSON is written row by row from collected slices of the derived tables, so memory
stays bounded by the slice size rather than the trace.
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
    yield {"ph": "M", "pid": PID, "tid": 0, "name": "process_name", "args": {"name": "vsmtrace guest"}}
    for vp in vps:
        for tid, label, order in ((vp, f"VP {vp}", 2 * vp), (HYPERCALL_TID_BASE + vp, f"VP {vp} hypercalls", 2 * vp + 1)):
            yield {"ph": "M", "pid": PID, "tid": tid, "name": "thread_name", "args": {"name": label}}
            yield {"ph": "M", "pid": PID, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": order}}
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
    for r in _rows(T.intercepts(lf)):
        yield {
            "ph": "i", "s": "t", "pid": PID, "tid": r["vp"], "name": f"intercept {r['access']}", "cat": "intercept",
            "ts": _us(r["time_ns"]),
            "args": {"seq": r["seq"], "vtl": r["vtl"], "gpa": _hex(r["gpa"]), "gva": _hex(r["gva"]), "rip": _hex(r["rip"])},
        }  # fmt: skip


def _hex(v: int | None) -> str | None:
    return None if v is None else f"{v:#x}"


#: How many trace events between two ``on_events`` progress calls.
PROGRESS_EVERY = 10_000


def write_chrome(lf: pl.LazyFrame, out: IO[str], on_events: Callable[[int], object] | None = None) -> int:
    """Write the JSON object format to ``out``; returns the number of trace events.

    ``on_events(n)`` is called every ``PROGRESS_EVERY`` events written (and with the rest at the end).
    """
    out.write('{"displayTimeUnit": "ns", "otherData": {"generator": "vsmtrace export"}, "traceEvents": [\n')
    n = 0
    for ev in chrome_events(lf):
        if n:
            out.write(",\n")
        out.write(json.dumps(ev, separators=(",", ":")))
        n += 1
        if on_events is not None and n % PROGRESS_EVERY == 0:
            on_events(PROGRESS_EVERY)
    out.write("\n]}\n")
    if on_events is not None:
        on_events(n % PROGRESS_EVERY)
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
