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


def _scalar(value: Any, key: str = "") -> str:
    """A config value as text: integers that are bit masks, addresses or CPUID words in hex."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "-"
    if isinstance(value, int):
        hexy = any(w in key for w in ("gpa", "addr", "mask", "leaf", "base", "msr", "features", "eax", "ebx", "ecx", "edx"))
        return f"{value:#x}" if hexy or value > 0xFFFF else str(value)
    return str(value)


def _kv_lines(obj: Any, indent: str, width: int | None = None) -> list[str]:
    """Nested dicts as aligned ``key  value`` lines; lists of scalars on one line, other lists one item a line."""
    if not isinstance(obj, dict) or not obj:
        return [f"{indent}-"] if not obj else [f"{indent}{_scalar(obj)}"]
    w = width or max(len(str(k)) for k in obj)
    lines: list[str] = []
    for k in sorted(obj, key=str):
        v = obj[k]
        key = str(k)
        if isinstance(v, dict) and v:
            lines.append(f"{indent}{key}")
            lines += _kv_lines(v, indent + "  ")
        elif isinstance(v, list | tuple) and v and all(not isinstance(x, dict | list | tuple) for x in v):
            lines.append(f"{indent}{key:<{w}}  {' '.join(_scalar(x, key) for x in v)}")
        elif isinstance(v, list | tuple) and v:
            lines.append(f"{indent}{key:<{w}}  ({len(v)} entries)")
            for x in v:
                if isinstance(x, list | tuple):
                    lines.append(f"{indent}  {' '.join(_scalar(y, key) for y in x)}")
                elif isinstance(x, dict):
                    lines.append(f"{indent}  " + ", ".join(f"{a}={_scalar(b, str(a))}" for a, b in x.items()))
                else:
                    lines.append(f"{indent}  {_scalar(x, key)}")
        else:
            lines.append(f"{indent}{key:<{w}}  {_scalar(v, key) if not isinstance(v, list | tuple | dict) else '-'}")
    return lines


def seal_hint(info: TraceInfo) -> str | None:
    """What to run when the trace is not sealed (Polars, pyarrow and pandas need a sealed file)."""
    if info.sealed:
        return None
    return f"vsmtrace seal {info.path}   (keeps every complete batch; Polars, pyarrow and pandas need a sealed trace)"


def format_info(info: TraceInfo) -> str:
    """Human-readable report: one ``key  value`` line per fact, nested config indented under its key."""
    md = info.metadata
    image = md.get("guest_image") or {}
    host = md.get("host") or {}
    rows: list[tuple[str, str]] = [
        ("trace", info.path),
        ("state", info.state),
    ]
    hint = seal_hint(info)
    if hint:
        rows.append(("to seal", hint))
    rows += [
        ("schema", f"v{md.get('schema_version')}  (written by vsmtrace {md.get('vsmtrace_version')})"),
        ("started", str(md.get("start_time_utc"))),
        ("command", " ".join(map(str, md.get("command_line") or [])) or "-"),
        ("guest image", f"{image.get('name', '-')}  sha256 {image.get('sha256', '-')}" if isinstance(image, dict) and image else str(image or "-")),
        ("host", f"{host.get('sysname', '?')} {host.get('release', '?')} {host.get('machine', '?')}"),
        ("file size", f"{info.file_size} bytes ({_fmt_bytes(info.file_size)}), {info.batches} batches"),
        ("events", f"{info.events}"
         + (f"  (seq {info.first_seq}..{info.last_seq})" if info.events else "")
         + (f", {info.missing_seqs} seq numbers missing" if info.missing_seqs else "")),
        ("time span", f"{info.time_span_ns / 1e9:.6f} s"),
        ("bytes/event", f"{info.bytes_per_event:.1f}" if info.bytes_per_event is not None else "-"),
    ]  # fmt: skip
    summary = md.get("summary")
    if isinstance(summary, dict) and (summary.get("dropped") or summary.get("value_errors")):
        rows.append(("warnings", f"{summary.get('dropped', 0)} events dropped, {summary.get('value_errors', 0)} bad field values stored as null"))
    for message in info.limitations:
        rows.append(("limitation", message))
    width = max(len(k) for k, _ in rows + [("vm config", ""), ("kvm caps", "")])
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("vm config")
    lines += _kv_lines(md.get("vm_config") or {}, "  ")
    lines.append("kvm caps")
    lines += _kv_lines(md.get("kvm_capabilities") or {}, "  ")
    if info.counts:
        lines.append("per kind")
        w = max(len(k) for k in info.counts)
        for k, v in info.counts.items():
            lines.append(f"  {k:<{w}}  {v:>12}")
    return "\n".join(lines)


def info_json(info: TraceInfo) -> str:
    """The machine form of `vsmtrace info --json`: every field, the metadata as recorded."""
    d = {
        "path": info.path, "state": info.state, "sealed": info.sealed, "torn_tail": info.torn_tail,
        "torn_offset": info.torn_offset, "file_size": info.file_size, "batches": info.batches, "events": info.events,
        "first_seq": info.first_seq, "last_seq": info.last_seq, "missing_seqs": info.missing_seqs,
        "time_span_ns": info.time_span_ns, "bytes_per_event": info.bytes_per_event, "counts": info.counts,
        "limitations": info.limitations, "seal_command": None if info.sealed else f"vsmtrace seal {info.path}", "metadata": info.metadata,
    }  # fmt: skip
    return json.dumps(d, indent=2, sort_keys=True, default=str)
