"""`vsmtrace info`: what is in a trace, and whether it is whole, without loading its payload."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from vsmtrace.recorder.reader import Trace, open_trace


@dataclass
class TraceInfo:
    """The numbers `vsmtrace info` prints; also handy for tests and notebooks."""

    path: str
    state: str
    sealed: bool
    torn_tail: bool
    torn_offset: int | None
    file_size: int
    batches: int
    events: int
    first_seq: int | None
    last_seq: int | None
    missing_seqs: int
    time_span_ns: int
    counts: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Messages of the LIMITATION events: what the host could not do for this guest.
    limitations: list[str] = field(default_factory=list)

    @property
    def bytes_per_event(self) -> float | None:
        return self.file_size / self.events if self.events else None


def summarize(path: str | os.PathLike[str]) -> TraceInfo:
    """Open and summarise a trace; only the seq, time_ns and kind columns are read."""
    trace: Trace = open_trace(path)
    lf = trace.lazy().select("seq", "time_ns", "kind")
    stats = lf.select(
        pl.len().alias("n"),
        pl.col("seq").min().alias("smin"),
        pl.col("seq").max().alias("smax"),
        pl.col("time_ns").min().alias("tmin"),
        pl.col("time_ns").max().alias("tmax"),
    ).collect()
    row = stats.row(0, named=True)
    n = int(row["n"])
    counts_df = lf.group_by(pl.col("kind").cast(pl.String)).agg(pl.len().alias("n")).collect()
    counts = {k: int(v) for k, v in sorted(zip(counts_df["kind"], counts_df["n"], strict=True), key=lambda kv: (-kv[1], kv[0]))}
    smin, smax = row["smin"], row["smax"]
    missing = (int(smax) - int(smin) + 1 - n) if n else 0
    span = int(row["tmax"] - row["tmin"]) if n else 0
    limitations: list[str] = []
    if counts.get("LIMITATION"):
        rows = trace.lazy().filter(pl.col("kind").cast(pl.String) == "LIMITATION").select("text").collect()
        limitations = [str(t) for t in rows["text"] if t is not None]
    return TraceInfo(
        path=str(trace.path),
        state=trace.state,
        sealed=trace.sealed,
        torn_tail=trace.torn_tail,
        torn_offset=trace.torn_offset,
        file_size=trace.file_size,
        batches=trace.batch_count,
        events=n,
        first_seq=None if smin is None else int(smin),
        last_seq=None if smax is None else int(smax),
        missing_seqs=missing,
        time_span_ns=span,
        counts=counts,
        metadata=trace.metadata,
        limitations=limitations,
    )


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def format_info(info: TraceInfo) -> str:
    """Human-readable report, one fact per line."""
    md = info.metadata
    image = md.get("guest_image") or {}
    host = md.get("host") or {}
    lines = [
        f"trace        {info.path}",
        f"state        {info.state}",
        f"schema       v{md.get('schema_version')}  (written by vsmtrace {md.get('vsmtrace_version')})",
        f"started      {md.get('start_time_utc')}",
        f"command      {' '.join(map(str, md.get('command_line') or [])) or '-'}",
        f"guest image  {image.get('name', '-')}  sha256 {image.get('sha256', '-')}" if image and isinstance(image, dict) else f"guest image  {image or '-'}",
        f"host         {host.get('sysname', '?')} {host.get('release', '?')} {host.get('machine', '?')}",
        f"vm config    {json.dumps(md.get('vm_config') or {}, sort_keys=True)}",
        f"kvm caps     {json.dumps(md.get('kvm_capabilities') or {}, sort_keys=True)}",
        f"file size    {info.file_size} bytes ({_fmt_bytes(info.file_size)}), {info.batches} batches",
        f"events       {info.events}"
        + (f"  (seq {info.first_seq}..{info.last_seq})" if info.events else "")
        + (f", {info.missing_seqs} seq numbers missing" if info.missing_seqs else ""),
        f"time span    {info.time_span_ns / 1e9:.6f} s",
        f"bytes/event  {info.bytes_per_event:.1f}" if info.bytes_per_event is not None else "bytes/event  -",
    ]
    summary = md.get("summary")
    if isinstance(summary, dict) and (summary.get("dropped") or summary.get("value_errors")):
        lines.append(f"warnings     {summary.get('dropped', 0)} events dropped, {summary.get('value_errors', 0)} bad field values stored as null")
    for message in info.limitations:
        lines.append(f"limitation   {message}")
    if info.counts:
        lines.append("per kind")
        width = max(len(k) for k in info.counts)
        for k, v in info.counts.items():
            lines.append(f"  {k:<{width}}  {v:>12}")
    return "\n".join(lines)
