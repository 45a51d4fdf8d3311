"""Trace analysis: a lazy loader, derived tables, figures, a text report, Chrome export and diff.

Everything is Polars-lazy: ``load`` returns a LazyFrame over the trace and every table in
``analysis.tables`` maps LazyFrames to LazyFrames, so queries stream over the columns they
need instead of loading a whole trace. See docs/analysis.md.
"""

from __future__ import annotations

from vsmtrace.analysis.load import load
from vsmtrace.analysis.tables import (
    errors,
    event_counts,
    exits,
    hypercall_stats,
    hypercall_status,
    hypercalls,
    intercept_stats,
    intercepts,
    interrupts,
    latency_stats,
    msr_mix,
    protection_changes,
    protection_map,
    protection_pages,
    secure_calls,
    transition_latency,
    vtl_residency,
    vtl_stints,
    vtl_switches,
    vtl_transitions,
)

__all__ = [
    "errors",
    "event_counts",
    "exits",
    "hypercall_stats",
    "hypercall_status",
    "hypercalls",
    "intercept_stats",
    "intercepts",
    "interrupts",
    "latency_stats",
    "load",
    "msr_mix",
    "protection_changes",
    "protection_map",
    "protection_pages",
    "secure_calls",
    "transition_latency",
    "vtl_residency",
    "vtl_stints",
    "vtl_switches",
    "vtl_transitions",
]
