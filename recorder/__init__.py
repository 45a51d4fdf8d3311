"""The recorder: events from the VMM into crash-safe Arrow IPC traces, and back.

``TraceWriter`` (an ``EventSink``) writes, ``open_trace`` reads, ``recorder.schema``
defines the one schema both use; see docs/trace-format.md.
"""

from vsmtrace.recorder.errors import TraceError, TraceFormatError
from vsmtrace.recorder.reader import Trace, open_trace
from vsmtrace.recorder.schema import SCHEMA_VERSION
from vsmtrace.recorder.writer import TraceWriter, WriterStats, seal_trace

__all__ = ["SCHEMA_VERSION", "Trace", "TraceError", "TraceFormatError", "TraceWriter", "WriterStats", "open_trace", "seal_trace"]
