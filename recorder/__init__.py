"""The recorder: events from the VMM into crash-safe Arrow IPC traces, and back.

``TraceWriter`` (an ``EventSink``) writes, ``open_trace`` reads, ``recorder.schema``
defines the one schema both use; see docs/trace-format.md.

The names below load their module on first use (PEP 562), so importing one submodule
(``recorder.errors`` for ``vsmtrace run`` without ``--record``) does not import Polars'
reader and the schema, whose Arrow arrays pull in pandas: ~0.2 s of every start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vsmtrace.recorder.errors import TraceError, TraceFormatError
    from vsmtrace.recorder.reader import Trace, open_trace
    from vsmtrace.recorder.schema import SCHEMA_VERSION
    from vsmtrace.recorder.writer import TraceWriter, WriterStats, seal_trace

_HOMES = {
    "TraceError": "errors",
    "TraceFormatError": "errors",
    "Trace": "reader",
    "open_trace": "reader",
    "SCHEMA_VERSION": "schema",
    "TraceWriter": "writer",
    "WriterStats": "writer",
    "seal_trace": "writer",
}

__all__ = ["SCHEMA_VERSION", "Trace", "TraceError", "TraceFormatError", "TraceWriter", "WriterStats", "open_trace", "seal_trace"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
