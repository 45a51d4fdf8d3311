"""Fleets of recordings: many traces as one Hive-partitioned Parquet dataset, analysed together.

``dataset`` adds traces to a dataset (atomic, idempotent, locked) and lists them;
``compute`` runs the per-trace work locally (Polars, one trace partition in memory at a time) or on a Dask
cluster and combines it; ``report`` and ``diff`` turn the combined tables into text and
figures. See docs/fleet.md.
"""

from __future__ import annotations

from vsmtrace.analysis.fleet.compute import FleetTables, fleet_tables
from vsmtrace.analysis.fleet.dataset import AddResult, Dataset, FleetError, TraceEntry, add_traces, open_dataset

__all__ = ["AddResult", "Dataset", "FleetError", "FleetTables", "TraceEntry", "add_traces", "fleet_tables", "open_dataset"]
