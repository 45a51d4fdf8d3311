"""`vsmtrace seal`: turn a killed recording's stream into a sealed trace, keeping every complete batch.

A recording that was killed (or interrupted while sealing) leaves an Arrow IPC
*stream*, possibly with a torn last message; Polars' ``scan_ipc``,
``pyarrow.ipc.open_file`` and pandas want the IPC *file* format. Sealing rewrites
the complete batches as a file (``writer.seal_trace``, atomic: temp file and
rename), drops the torn bytes, and notes in the metadata that the trace was
recovered, so reports on it still say it is partial. Sealing a sealed trace
changes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vsmtrace.recorder.reader import open_trace
from vsmtrace.recorder.writer import seal_trace


@dataclass
class SealResult:
    """What `vsmtrace seal` did, in numbers."""

    path: Path
    already_sealed: bool
    events: int  # events in the sealed trace
    batches_kept: int  # complete record batches of the stream (incl. the writer's initial empty one)
    torn_bytes: int  # bytes of an incomplete last message that were dropped
    torn_offset: int | None
    had_end_marker: bool  # the writer had closed the stream (only sealing itself was missing)
    bytes_before: int
    bytes_after: int


def seal(path: str | os.PathLike[str]) -> SealResult:
    """Seal the trace at ``path`` in place (idempotent); raises ``TraceFormatError`` for non-traces."""
    p = Path(path)
    before = open_trace(p)
    if before.sealed:
        events = sum(b.num_rows for b in before.batches(["seq"]))
        return SealResult(p, True, events, before.batch_count, 0, None, True, before.file_size, before.file_size)
    torn = before.file_size - before.torn_offset if before.torn_tail and before.torn_offset is not None else 0
    recovered = None
    if before.torn_tail or not before.end_of_stream:
        reason = f"torn tail of {torn} bytes dropped" if torn else "stream without end marker"
        recovered = {"recovered": {"reason": reason, "torn_bytes": torn, "batches": before.batch_count}}
    seal_trace(p, extra=recovered)
    after = open_trace(p)
    events = sum(b.num_rows for b in after.batches(["seq"]))
    return SealResult(
        p, False, events, before.batch_count, torn, before.torn_offset, before.end_of_stream, before.file_size, after.file_size
    )


def format_seal(r: SealResult) -> str:
    """One or two lines for the user."""
    if r.already_sealed:
        return f"{r.path}: already sealed ({r.events} events); nothing to do"
    lines = [f"sealed {r.path}: {r.events} events kept from {r.batches_kept} complete batches ({r.bytes_before} -> {r.bytes_after} bytes)"]
    if r.torn_bytes:
        lines.append(f"  dropped a torn tail of {r.torn_bytes} bytes at byte {r.torn_offset} (an event batch cut short when the recording was killed)")
    elif not r.had_end_marker:
        lines.append("  the stream had no end marker (the recording was killed between batches): nothing was lost after the last batch")
    return "\n".join(lines)
