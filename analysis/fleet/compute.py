"""Fleet tables: per-trace work (Polars, in this process or in Dask workers) and its exact combination.

Every trace is one task: read its Parquet file, run ``analysis.report.summarize`` (the
single-trace report, so the per-trace tables are by construction the ones ``vsmtrace
report`` prints) and reduce its latencies to mergeable parts: counts, sums, extremes and
a log-bucket sketch (``sketch``) per table key. Tasks run one after the other here
(``workers=None``), or on a Dask cluster (``scheduler=`` address, or ``workers=N`` for a
LocalCluster of N processes); Dask does the distribution and the retries, including
re-running the tasks of a worker that died. Parts are merged as results arrive, grouped
by a metadata column, so memory stays bounded by one trace plus the merged sketches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import polars as pl
from vsmtrace.analysis.fleet import sketch
from vsmtrace.analysis.fleet.dataset import DATA, META_COLUMNS, Dataset, FleetError, TraceEntry

__all__ = [
    "LATENCY_TABLES",
    "PER_TRACE_TABLES",
    "FleetTables",
    "TracePart",
    "TraceSpec",
    "fleet_tables",
    "read_trace",
    "trace_task",
    "traces_frame",
]

#: The single-trace report's tables (``analysis.report.Summary`` fields), kept per trace.
PER_TRACE_TABLES = ("counts", "transitions", "secure_calls", "residency", "hypercalls", "hypercall_failures",
                    "intercepts_by_page", "intercepts_by_rip", "protections", "interrupts", "exits", "errors")  # fmt: skip

#: Latency tables combined across traces: name -> key columns.
LATENCY_TABLES: dict[str, tuple[str, ...]] = {
    "transitions": ("reason",),
    "secure_calls": ("service",),
    "hypercalls": ("code", "name", "vtl"),
}
QUANTILES = (0.5, 0.9, 0.99)
#: Engine for a trace's queries. A trace is one partition, already in memory when its
#: queries run, so memory is bounded by the partition with either engine; on 100,000-event
#: partitions the streaming engine's set-up per query made each trace ~15 % slower.
TASK_ENGINE = "in-memory"
#: Traces analysed at once on the local path.
LOCAL_THREADS = max(2, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class TraceSpec:
    """What a task needs to find one trace (picklable: it travels to Dask workers)."""

    trace: str
    url: str  # the Parquet file, as a local path or an fsspec URL
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TracePart:
    """One trace's results: its report tables and the mergeable latency parts."""

    trace: str
    events: int
    time_span_ns: int
    tables: dict[str, pl.DataFrame]  # PER_TRACE_TABLES
    latency: dict[str, pl.DataFrame]  # keys, count, measured, sum_ns, min_ns, max_ns
    buckets: dict[str, pl.DataFrame]  # keys, bucket, n
    extra: dict[str, pl.DataFrame]  # full per-trace tables the report trims: hypercall_status, intercepts


def read_trace(spec: TraceSpec, columns: Sequence[str] | None = None, *, sort: bool = True) -> pl.DataFrame:
    """One trace of a dataset as the frame ``analysis.load`` would give for the original file.

    Rows are in seq order (the file groups them by kind; ``sort=False`` leaves them so, for
    the tables, which order what they need themselves); the metadata columns are dropped.
    One trace is one partition: it is read whole (in-memory engine, the fastest for a
    partition this size), so memory is bounded by the largest trace.
    """
    drop = set(META_COLUMNS)

    def wanted(names: Sequence[str]) -> list[str]:
        return [c for c in names if c not in drop and (columns is None or c in columns)]

    if spec.url.startswith("/") or "://" not in spec.url or spec.url.startswith("file://"):
        lf = pl.scan_parquet(spec.url.removeprefix("file://"), hive_partitioning=False)
        df = lf.select(wanted(lf.collect_schema().names())).collect(engine="in-memory")
    else:
        import fsspec

        with fsspec.open(spec.url, "rb", **spec.storage_options) as f:
            names = list(pl.read_parquet_schema(f))
            f.seek(0)
            df = pl.read_parquet(f, columns=wanted(names), hive_partitioning=False)
    return df.sort("seq") if sort else df


def _latency_parts(lf: pl.LazyFrame, keys: Sequence[str]) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    c = pl.col("latency_ns")
    parts = lf.group_by(list(keys)).agg(
        pl.len().alias("count"),
        c.count().alias("measured"),
        c.sum().cast(pl.Int64).alias("sum_ns"),
        c.min().alias("min_ns"),
        c.max().alias("max_ns"),
    )
    buckets = lf.filter(c.is_not_null()).group_by([*keys, sketch.bucket_expr("latency_ns")]).agg(pl.len().cast(pl.Int64).alias("n"))
    return parts, buckets


def _task_queries(lf: pl.LazyFrame, bound_fallback: bool) -> tuple[int, list[pl.LazyFrame]]:
    """Everything trace_task collects from one trace: the report's own queries (``summary_queries``,
    whose count is returned first) followed by the latency parts, hypercall statuses and intercepts."""
    from vsmtrace.analysis import tables as T
    from vsmtrace.analysis.report import summary_queries

    summary = summary_queries(lf, bound_fallback)
    tr = T.vtl_transitions(lf)
    calls = T.hypercalls(lf, bound_fallback=bound_fallback)
    sources = {
        "transitions": tr,
        "secure_calls": tr.filter(pl.col("reason") == "call").with_columns(pl.col("arg0").alias("service")),
        "hypercalls": calls,
    }
    queries: list[pl.LazyFrame] = []
    for name, keys in LATENCY_TABLES.items():
        queries += _latency_parts(sources[name], keys)
    status = T.hypercall_status(calls)
    icpt = T.intercept_stats(T.intercepts(lf)).select("page", "access", "count")
    return len(summary), [*summary, *queries, status, icpt]


@cache
def report_columns() -> tuple[str, ...]:
    """The trace columns trace_task's queries read, learned from their optimised plans.

    Why: a trace file has ~80 columns and the report reads about a third of them;
    decoding the rest was a third of each trace's time. Polars pushes each query's
    projection down to its source, so the queries are collected once over an empty
    frame of every trace column behind an IO-plugin source that records the columns
    it is asked for. Deriving the list (rather than writing it down) keeps it right
    when a table starts reading another column: a column left out would silently read
    as nulls (``load`` fills in missing columns).
    """
    from polars.io.plugins import register_io_source
    from vsmtrace.analysis.load import _full_schema

    empty = pl.DataFrame(schema=_full_schema())
    asked: set[str] = set()

    def source(with_columns: list[str] | None, predicate: Any, n_rows: int | None, batch_size: int | None) -> Iterator[pl.DataFrame]:
        asked.update(empty.columns if with_columns is None else with_columns)
        yield empty if with_columns is None else empty.select(with_columns)

    _, queries = _task_queries(register_io_source(source, schema=empty.schema), bound_fallback=True)
    pl.collect_all(queries, engine=TASK_ENGINE)
    return tuple(c for c in empty.columns if c in asked)


def _has_unmeasured_hypercalls(df: pl.DataFrame) -> bool:
    """Whether some HYPERCALL row lacks ``duration_ns``: only then does ``tables.hypercalls``
    need its bound fallback (the previous event on each VP, a pass over every event that
    was a third of a trace's query time)."""
    if "duration_ns" not in df.columns:
        return True
    return bool(((df["kind"] == "HYPERCALL") & df["duration_ns"].is_null()).any())


def trace_task(spec: TraceSpec) -> TracePart:
    """The per-trace work (runs in a Dask worker or here): report tables and latency parts."""
    from vsmtrace.analysis import load
    from vsmtrace.analysis.report import summary_from

    df = read_trace(spec, report_columns(), sort=False)
    lf = load(df.lazy())
    # Without unmeasured hypercalls the fallback changes nothing (latency_ns is duration_ns,
    # latency_is_bound is false either way), so it is skipped: same tables, less work.
    n, queries = _task_queries(lf, bound_fallback=_has_unmeasured_hypercalls(df))
    # one collect_all with the report's own queries: the transitions and hypercalls they share run once
    collected = pl.collect_all(queries, engine=TASK_ENGINE)
    s = summary_from(collected[:n])
    results = collected[n:]
    latency, buckets = {}, {}
    for i, name in enumerate(LATENCY_TABLES):
        latency[name], buckets[name] = results[2 * i], results[2 * i + 1]
    k = 2 * len(LATENCY_TABLES)
    tables = {name: getattr(s, name) for name in PER_TRACE_TABLES}
    failed = s.hypercalls.select("code", "name", "vtl", "failed")  # the report's own failed count per call
    return TracePart(spec.trace, s.events, s.time_span_ns, tables, latency, buckets,
                     {"hypercall_status": results[k], "hypercall_failed": failed, "intercepts": results[k + 1]})  # fmt: skip


# ----------------------------------------------------------------------------- the traces table


def traces_frame(entries: Sequence[TraceEntry]) -> pl.DataFrame:
    """One row per trace: id, directory keys, events, metadata, and ``vm_<key>`` for scalar VM-config keys."""
    rows = []
    for e in entries:
        row = e.row()
        try:
            cfg = json.loads(row.get("vm_config") or "{}")
        except ValueError:
            cfg = {}
        for k, v in cfg.items():
            if isinstance(v, bool | int | float | str):
                row[f"vm_{k}"] = v
        rows.append(row)
    if not rows:
        return pl.DataFrame(schema={"trace": pl.String, "config": pl.String, "date": pl.String, "events": pl.Int64})
    df = pl.from_dicts(rows, infer_schema_length=None)
    if "start_time" in df.columns:
        df = df.with_columns(pl.col("start_time").str.to_datetime(time_zone="UTC", strict=False))
    return df.sort("trace")


# ----------------------------------------------------------------------------- combining


@dataclass
class FleetTables:
    """Everything ``fleet report`` shows: per-trace tables and tables per group of traces."""

    by: str | None
    traces: pl.DataFrame  # one row per trace (traces_frame) plus time_span_ns, and "group"
    per_trace: dict[str, pl.DataFrame]  # PER_TRACE_TABLES, each with a leading "trace" column
    grouped: dict[str, pl.DataFrame]  # tables across the traces of each group (leading "group" column)
    sketches: dict[str, pl.DataFrame] = field(default_factory=dict)  # LATENCY_TABLES: group, keys, bucket, n


class _Merger:
    """Accumulates trace parts, merging sketches and counts per group as they arrive.

    A merger is also what a Dask task returns for its batch of traces (``batch_task``):
    merging is summing (and min/max), so merging batches merged in the workers gives the
    same tables as merging every trace here.
    """

    FLUSH = 64

    def __init__(self, group_of: dict[str, str]) -> None:
        self.group_of = group_of
        self.per_trace: dict[str, list[pl.DataFrame]] = {n: [] for n in PER_TRACE_TABLES}  # compacted batches
        self.per_trace_pending: dict[str, list[pl.DataFrame]] = {n: [] for n in PER_TRACE_TABLES}
        self.spans: dict[str, tuple[int, int]] = {}
        self.pending: dict[str, list[pl.DataFrame]] = {}
        self.merged: dict[str, pl.DataFrame | None] = {}
        self.sum_keys: dict[str, list[str]] = {}
        self.count = 0

    def _add(self, name: str, df: pl.DataFrame, keys: list[str], group: str) -> None:
        self.sum_keys[name] = keys
        self.pending.setdefault(name, []).append(df.with_columns(pl.lit(group).alias("group")))

    def add(self, part: TracePart) -> None:
        group = self.group_of[part.trace]
        self.spans[part.trace] = (part.events, part.time_span_ns)
        for name in PER_TRACE_TABLES:
            self.per_trace_pending[name].append(part.tables[name].with_columns(pl.lit(part.trace).alias("trace")))
        for name, keys in LATENCY_TABLES.items():
            self._add(f"lat:{name}", part.latency[name], list(keys), group)
            self._add(f"bkt:{name}", part.buckets[name], [*keys, "bucket"], group)
        t = part.tables
        self._add("counts", t["counts"].with_columns(pl.lit(1, pl.Int64).alias("traces")), ["kind"], group)
        self._add("residency", t["residency"].select("vtl", "stints", "total_ns"), ["vtl"], group)
        self._add("protections", t["protections"].select("changes", "pages_changed"), [], group)
        self._add("interrupts", t["interrupts"].select("vector", "vtl", "source", "count"), ["vector", "vtl", "source"], group)
        self._add("exits", t["exits"], ["exit_reason", "vtl"], group)
        self._add("errors", pl.DataFrame({"errors": [t["errors"].height]}), [], group)
        self._add("hypercall_status", part.extra["hypercall_status"], ["code", "name", "status", "status_name"], group)
        self._add("hypercall_failed", part.extra["hypercall_failed"], ["code", "name", "vtl"], group)
        self._add("intercepts", part.extra["intercepts"], ["page", "access"], group)
        self.count += 1
        if self.count % self.FLUSH == 0:
            self.flush()

    def absorb(self, other: _Merger) -> None:
        """Take in the traces another merger holds (a batch merged in a Dask worker)."""
        self.spans.update(other.spans)
        other.flush()
        for name, dfs in other.per_trace.items():
            self.per_trace[name].extend(dfs)
        for name, df in other.merged.items():
            if df is not None:
                self.sum_keys[name] = other.sum_keys[name]
                self.pending.setdefault(name, []).append(df)
        before, self.count = self.count, self.count + len(other.spans)
        if self.count // self.FLUSH != before // self.FLUSH:
            self.flush()

    def flush(self) -> None:
        for name, dfs in self.per_trace_pending.items():
            if dfs:
                self.per_trace[name].append(_owned(pl.concat(dfs, how="diagonal_relaxed")))
                self.per_trace_pending[name] = []
        for name, dfs in self.pending.items():
            if not dfs:
                continue
            prev = self.merged.get(name)
            frames = ([prev] if prev is not None else []) + dfs
            df = pl.concat(frames, how="diagonal_relaxed")
            keys = ["group", *self.sum_keys[name]]
            value_cols = [c for c in df.columns if c not in keys]
            aggs = [pl.col(c).min() if c == "min_ns" else pl.col(c).max() if c == "max_ns" else _wide(df, c).sum() for c in value_cols]
            self.merged[name] = df.group_by(keys).agg(aggs)
            self.pending[name] = []


def _owned(df: pl.DataFrame) -> pl.DataFrame:
    """``df`` with string columns that own their bytes.

    Why: a string column taken from a trace's rows (a table's ``name``, ``status_name``)
    holds views into the buffer of the whole column it came from (every hypercall name of
    the trace), so a few kept rows pinned about a megabyte per trace: the fleet's peak
    memory grew with the fleet. Through Arrow's plain (non-view) strings they are copied.
    """
    if pl.String not in df.schema.dtypes():
        return df
    return pl.from_arrow(df.to_arrow(compat_level=pl.CompatLevel.oldest()))  # type: ignore[return-value]


def _wide(df: pl.DataFrame, c: str) -> pl.Expr:
    """Counts summed over a fleet can pass 2^32: integers are summed as Int64."""
    return pl.col(c).cast(pl.Int64) if df.schema[c].is_integer() else pl.col(c)


def batch_task(specs: Sequence[TraceSpec], group_of: dict[str, str]) -> _Merger:
    """A Dask task: trace_task over a few traces, merged in the worker.

    Why batches: per trace, shipping two dozen small frames back and merging them in the
    client cost the client a quarter of a worker's time, on the same cores as the workers.
    """
    m = _Merger(group_of)
    for spec in specs:
        m.add(trace_task(spec))
    m.flush()
    return m


#: Traces per Dask task at most; fewer when the fleet is small, so every worker gets
#: several tasks (load balance, and little work lost when a worker dies).
MAX_BATCH = 16


def _batches(specs: Sequence[TraceSpec], slots: int) -> list[list[TraceSpec]]:
    size = max(1, min(MAX_BATCH, len(specs) // (8 * max(1, slots))))
    return [list(specs[i : i + size]) for i in range(0, len(specs), size)]


def _run(specs: Sequence[TraceSpec], group_of: dict[str, str], scheduler: str | None, workers: int | None,
         progress: Callable[[int, int], None] | None) -> Iterator[TracePart | _Merger]:  # fmt: skip
    """Run trace_task over ``specs`` here (yields TraceParts), or batch_task on Dask (yields
    the batches' mergers), as they complete."""
    total = len(specs)
    if scheduler is None and workers is None:
        # Polars releases the GIL: a few traces at once keep the cores busy through each
        # trace's many small queries; memory is then bounded by that many traces.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=LOCAL_THREADS) as pool:
            for i, part in enumerate(pool.map(trace_task, specs)):
                yield part
                if progress:
                    progress(i + 1, total)
        return
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        batches = _batches(specs, sum(client.nthreads().values()))
        futures = [
            client.submit(batch_task, b, {s.trace: group_of[s.trace] for s in b}, pure=False, retries=2) for b in batches
        ]
        done = 0
        for fut in as_completed(futures):
            batch = fut.result()
            fut.release()
            yield batch
            done += len(batch.spans)
            if progress:
                progress(done, total)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def select_traces(traces: pl.DataFrame, where: str | None) -> pl.DataFrame:
    """The rows of the traces table a FILTER selects (``COL=V,COL2>=V2``; see ``parse_filter``)."""
    return traces if not where else traces.filter(parse_filter(where, traces.schema))


_OPS = ("!=", ">=", "<=", "=", ">", "<", "~")


def parse_filter(text: str, schema: pl.Schema) -> pl.Expr:
    """``COL OP VALUE`` terms joined by commas (AND); OP is = != < <= > >= or ~ (substring).

    Values are read as the column's type (dates and times as ISO text); a trace id may be
    given by a prefix with ``trace~PREFIX``.
    """
    expr = pl.lit(True)
    for term in (t.strip() for t in text.split(",")):
        if not term:
            continue
        op = next((o for o in sorted(_OPS, key=len, reverse=True) if o in term), None)
        if op is None:
            raise FleetError(f"filter term {term!r}: expected COLUMN=VALUE (or != < <= > >= ~)")
        col, _, raw = term.partition(op)
        col, raw = col.strip(), raw.strip()
        if col not in schema:
            raise FleetError(f"filter term {term!r}: no column {col!r} (columns: {', '.join(schema.names())})")
        dtype = schema[col]
        if op == "~":
            expr &= pl.col(col).cast(pl.String).str.contains(raw, literal=True)
            continue
        try:
            if dtype == pl.Boolean:
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                value: Any = pl.lit(raw.lower() in ("true", "1"))
            elif dtype.is_integer():
                value = pl.lit(int(raw, 0))
            elif dtype.is_float():
                value = pl.lit(float(raw))
            elif isinstance(dtype, pl.Datetime):
                value = pl.lit(raw).str.to_datetime(time_zone=dtype.time_zone)
            else:
                value = pl.lit(raw)
        except ValueError:
            raise FleetError(f"filter term {term!r}: {raw!r} is not a {dtype}") from None
        c = pl.col(col)
        expr &= {"=": c == value, "!=": c != value, "<": c < value, "<=": c <= value, ">": c > value, ">=": c >= value}[op]
    return expr


def fleet_tables(
    dataset: Dataset | str,
    *,
    by: str | None = None,
    where: str | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FleetTables:
    """Per-trace and per-group tables of the dataset's traces (those ``where`` selects), grouped by ``by``.

    ``by`` is any column of the traces table (``trace``, ``config``, ``date``, ``guest_name``,
    ``guest_sha256``, ``command_line``, ``vm_config``, ``vsmtrace_version``, ``sealed``,
    ``recovered``, ``vm_<key>``...); None puts every trace in one group, "fleet".
    """
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset, storage_options)
    entries = ds.traces()
    traces = traces_frame(entries)
    if by is not None and by not in traces.columns:
        raise FleetError(f"--by {by}: no such column (columns: {', '.join(traces.columns)})")
    traces = select_traces(traces, where)
    group = pl.lit("fleet") if by is None else pl.col(by).cast(pl.String).fill_null("(none)")
    traces = traces.with_columns(group.alias("group"))
    group_of = dict(zip(traces["trace"].to_list(), traces["group"].to_list(), strict=True))
    by_id = {e.trace: e for e in entries}
    specs = [TraceSpec(t, ds.url_of(f"{by_id[t].directory}/{DATA}"), ds.storage_options) for t in traces["trace"].to_list()]
    m = _Merger(group_of)
    for part in _run(specs, group_of, scheduler, workers, progress):
        if isinstance(part, _Merger):
            m.absorb(part)
        else:
            m.add(part)
    m.flush()
    spans = pl.DataFrame(
        {"trace": list(m.spans), "time_span_ns": [v[1] for v in m.spans.values()]}, schema={"trace": pl.String, "time_span_ns": pl.Int64}
    )
    traces = traces.join(spans, on="trace", how="left")
    per_trace = {}
    for name, dfs in m.per_trace.items():
        if dfs:
            df = pl.concat(dfs, how="diagonal_relaxed")
            per_trace[name] = df.select("trace", *[c for c in df.columns if c != "trace"]).sort("trace", maintain_order=True)
        else:
            per_trace[name] = pl.DataFrame({"trace": []}, schema={"trace": pl.String})
    sketches = {name: m.merged[f"bkt:{name}"] for name in LATENCY_TABLES if m.merged.get(f"bkt:{name}") is not None}
    return FleetTables(by, traces, per_trace, _grouped(m, traces), sketches)  # type: ignore[arg-type]


def _sorted(df: pl.DataFrame, keys: Sequence[str]) -> pl.DataFrame:
    return df.sort(["group", *keys], nulls_last=True)


def _grouped(m: _Merger, traces: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Per-group tables from the merged parts (empty frames when the fleet has no such rows)."""
    out: dict[str, pl.DataFrame] = {}
    ntraces = traces.group_by("group").agg(pl.len().alias("group_traces"))

    def get(name: str) -> pl.DataFrame | None:
        df = m.merged.get(name)
        return df if df is not None and df.height else None

    counts = get("counts")
    if counts is not None:
        counts = counts.join(ntraces, on="group").with_columns(
            (pl.col("events") / pl.col("group_traces")).alias("events_per_trace")
        ).select("group", "kind", "traces", "events", "events_per_trace")
        out["counts"] = counts.sort(["group", "events", "kind"], descending=[False, True, False])
    for name, keys in LATENCY_TABLES.items():
        lat, bkt = get(f"lat:{name}"), get(f"bkt:{name}")
        if lat is None:
            continue
        qrows = []
        if bkt is not None:
            for key, sub in bkt.group_by(["group", *keys], maintain_order=False):
                qs = sketch.quantiles(sub["bucket"].to_list(), sub["n"].to_list(), QUANTILES)
                qrows.append({**dict(zip(["group", *keys], key, strict=True)), **{f"p{int(q * 100)}_ns": v for q, v in zip(QUANTILES, qs, strict=True)}})
        qdf = pl.DataFrame(qrows, schema={**{c: lat.schema[c] for c in ["group", *keys]}, **{f"p{int(q * 100)}_ns": pl.Int64 for q in QUANTILES}})
        t = lat.join(qdf, on=["group", *keys], how="left", nulls_equal=True).with_columns(
            pl.when(pl.col("measured") > 0).then(pl.col("sum_ns") / pl.col("measured")).alias("mean_ns"),
            # a bucket's representative may lie just outside the values seen: keep it within them
            *[pl.col(f"p{int(q * 100)}_ns").clip(pl.col("min_ns"), pl.col("max_ns")) for q in QUANTILES],
        )
        cols = ["group", *keys, "count", "measured", "mean_ns", "p50_ns", "p90_ns", "p99_ns", "max_ns"]
        if name == "hypercalls":
            failed = get("hypercall_failed")
            if failed is not None:
                t = t.join(failed, on=["group", *keys], how="left", nulls_equal=True)
                cols.insert(len(keys) + 2, "failed")
            out[name] = t.select(cols).sort(["group", "count", *keys], descending=[False, True] + [False] * len(keys), nulls_last=True)
        else:
            out[name] = _sorted(t.select(cols), keys)
    res = get("residency")
    if res is not None:
        out["residency"] = _sorted(
            res.with_columns((pl.col("total_ns") / pl.col("total_ns").sum().over("group")).alias("share")), ["vtl"]
        )
    for name, keys in (("hypercall_status", ["code", "status"]), ("interrupts", ["vector", "vtl", "source"]),
                       ("exits", ["exit_reason", "vtl"])):  # fmt: skip
        df = get(name)
        if df is not None:
            out[name] = _sorted(df, keys)
    icpt = get("intercepts")
    if icpt is not None:
        out["intercepts"] = icpt.sort(["group", "count", "page", "access"], descending=[False, True, False, False])
    for name in ("protections", "errors"):
        df = get(name)
        if df is not None:
            out[name] = df.sort("group")
    return out


def iter_specs(ds: Dataset, entries: Iterable[TraceEntry]) -> list[TraceSpec]:
    return [TraceSpec(e.trace, ds.url_of(f"{e.directory}/{DATA}"), ds.storage_options) for e in entries]
