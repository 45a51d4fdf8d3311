"""``vsmtrace fleet diff``: what moved between two groups of traces, and where two boots of one guest diverge.

Each side is a FILTER over the traces table (``compute.parse_filter``). Counts are
compared per trace (the sides may hold different numbers of traces); latency
percentiles come from each side's merged sketches. When a trace of A and a trace of B
ran the same guest image (same ``guest_sha256``), the earliest such pair is compared
event by event with ``analysis.diff.first_divergence`` (timing columns ignored).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl
from vsmtrace.analysis.diff import NONDETERMINISTIC, Divergence, first_divergence
from vsmtrace.analysis.fleet.compute import LATENCY_TABLES, FleetTables, TraceSpec, fleet_tables, read_trace
from vsmtrace.analysis.fleet.dataset import DATA, Dataset, FleetError

__all__ = ["FleetDiff", "diff_fleet", "format_fleet_diff"]


@dataclass
class FleetDiff:
    filter_a: str
    filter_b: str
    a: FleetTables
    b: FleetTables
    counts: pl.DataFrame  # kind, per_trace_a, per_trace_b, change (B/A - 1), moved
    latency: dict[str, pl.DataFrame]  # keys, count_a, count_b, p50/p99 a and b, moved
    pair: tuple[str, str] | None  # (trace in A, trace in B) of one guest, compared event by event
    divergence: Divergence | None
    threshold: float


def _moved(a: pl.Expr, b: pl.Expr, threshold: float) -> pl.Expr:
    """B differs from A by more than ``threshold`` (relative), or exists on one side only."""
    return (
        pl.when(a.is_null() | b.is_null() | (a == 0))
        .then(a.is_null() != b.is_null())
        .otherwise(((b - a).abs() / a) > threshold)
        .fill_null(False)
    )


def _enough(percentile: int) -> pl.Expr:
    """Both sides hold enough values for their p``percentile`` to be more than one value's noise.

    p50 needs 10 values a side, p99 100: below that a percentile is one or two samples,
    and on a shared host two boots differ by more than any threshold.
    """
    need = 10 if percentile <= 50 else 100
    return (pl.col("count_a").fill_null(0) >= need) & (pl.col("count_b").fill_null(0) >= need)


def diff_fleet(
    dataset: Dataset | str,
    filter_a: str,
    filter_b: str,
    *,
    threshold: float = 0.1,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FleetDiff:
    """Compare the traces FILTER A selects with those FILTER B selects."""
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    a = fleet_tables(ds, where=filter_a, scheduler=scheduler, workers=workers, progress=progress)
    b = fleet_tables(ds, where=filter_b, scheduler=scheduler, workers=workers, progress=progress)
    for side, ft, f in (("A", a, filter_a), ("B", b, filter_b)):
        if ft.traces.height == 0:
            raise FleetError(f"--{side.lower()} {f}: selects no trace")
    ca = a.grouped.get("counts", pl.DataFrame(schema={"kind": pl.String, "events_per_trace": pl.Float64}))
    cb = b.grouped.get("counts", pl.DataFrame(schema={"kind": pl.String, "events_per_trace": pl.Float64}))
    counts = (
        ca.select("kind", pl.col("events_per_trace").alias("per_trace_a"))
        .join(cb.select("kind", pl.col("events_per_trace").alias("per_trace_b")), on="kind", how="full", coalesce=True)
        .with_columns(pl.col("per_trace_a").fill_null(0.0), pl.col("per_trace_b").fill_null(0.0))
        .with_columns(
            pl.when(pl.col("per_trace_a") > 0).then(pl.col("per_trace_b") / pl.col("per_trace_a") - 1).alias("change"),
            _moved(pl.col("per_trace_a"), pl.col("per_trace_b"), threshold).alias("moved"),
        )
        .sort(["per_trace_a", "kind"], descending=[True, False])
    )
    latency = {}
    for name, keys in LATENCY_TABLES.items():
        ka, kb = a.grouped.get(name), b.grouped.get(name)
        cols = ["count", "p50_ns", "p99_ns"]
        empty = pl.DataFrame(schema={**{k: pl.String for k in keys}, **{c: pl.Int64 for c in cols}})
        ka = empty if ka is None else ka.drop("group")
        kb = empty if kb is None else kb.drop("group")
        na, nb = a.traces.height, b.traces.height
        side = ("count", "p50_ns", "p99_ns")
        j = (
            ka.select(*keys, (pl.col("count") / na).alias("per_trace_a"), *[pl.col(c).alias(f"{c.removesuffix('_ns')}_a") for c in side])
            .join(
                kb.select(*keys, (pl.col("count") / nb).alias("per_trace_b"), *[pl.col(c).alias(f"{c.removesuffix('_ns')}_b") for c in side]),
                on=list(keys), how="full", coalesce=True, nulls_equal=True,
            )  # fmt: skip
            .with_columns(
                (
                    _moved(pl.col("per_trace_a"), pl.col("per_trace_b"), threshold)
                    | (_enough(50) & _moved(pl.col("p50_a"), pl.col("p50_b"), threshold))
                    | (_enough(99) & _moved(pl.col("p99_a"), pl.col("p99_b"), threshold))
                ).alias("moved")
            )
            .drop("count_a", "count_b")
            .sort(list(keys), nulls_last=True)
        )
        latency[name] = j
    pair = _same_guest_pair(a.traces, b.traces)
    divergence = None
    if pair is not None:
        by_id = {e.trace: e for e in ds.traces()}
        ra = read_trace(TraceSpec(pair[0], ds.url_of(f"{by_id[pair[0]].directory}/{DATA}"), ds.storage_options))
        rb = read_trace(TraceSpec(pair[1], ds.url_of(f"{by_id[pair[1]].directory}/{DATA}"), ds.storage_options))
        divergence = first_divergence(ra.lazy(), rb.lazy(), NONDETERMINISTIC)
    return FleetDiff(filter_a, filter_b, a, b, counts, latency, pair, divergence, threshold)


def _same_guest_pair(ta: pl.DataFrame, tb: pl.DataFrame) -> tuple[str, str] | None:
    """The earliest (A, B) traces that ran the same guest image and are not the same trace."""
    if "guest_sha256" not in ta.columns or "guest_sha256" not in tb.columns:
        return None
    cols = ["trace", "guest_sha256", "start_time"]
    j = ta.select(cols).join(tb.select(cols), on="guest_sha256", suffix="_b").filter(
        pl.col("guest_sha256").is_not_null() & (pl.col("trace") != pl.col("trace_b"))
    )
    if j.height == 0:
        return None
    row = j.sort(["start_time", "start_time_b", "trace", "trace_b"]).row(0, named=True)
    return row["trace"], row["trace_b"]


def _v(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bytes):
        return v[:16].hex() + ("..." if len(v) > 16 else "") + f" ({len(v)} bytes)"
    if isinstance(v, int) and not isinstance(v, bool) and v > 0xFFFF:
        return f"{v:#x}"
    return str(v)


def format_fleet_diff(d: FleetDiff) -> str:
    from vsmtrace.analysis.report import _ns

    na, nb = d.a.traces.height, d.b.traces.height
    out = [f"A = {d.filter_a} ({na} traces, {int(d.a.traces['events'].sum())} events)",
           f"B = {d.filter_b} ({nb} traces, {int(d.b.traces['events'].sum())} events)",
           f"* = moved by more than {d.threshold:.0%}: count per trace, or p50/p99 (merged sketches, 0.5% error) when each side has",
           "    at least 10 (p50) / 100 (p99) values", "",
           "events per kind, mean per trace"]  # fmt: skip
    w = max([4, *(len(k) for k in d.counts["kind"].to_list())])
    out.append(f"    {'kind'.ljust(w)}  {'A':>12}  {'B':>12}  {'change':>8}")
    for r in d.counts.iter_rows(named=True):
        ch = "new" if r["change"] is None else f"{r['change']:+.1%}"
        out.append(f"  {'*' if r['moved'] else ' '} {r['kind'].ljust(w)}  {r['per_trace_a']:>12.1f}  {r['per_trace_b']:>12.1f}  {ch:>8}")
    titles = {"transitions": "VTL transitions by entry reason", "secure_calls": "secure calls by service code",
              "hypercalls": "hypercalls by code, name and VTL"}  # fmt: skip
    for name, df in d.latency.items():
        keys = list(LATENCY_TABLES[name])
        out += ["", f"{titles[name]}: per trace, p50 and p99, A vs B"]
        if df.height == 0:
            out.append("  (none on either side)")
            continue

        def key_text(r: dict[str, Any], keys: list[str] = keys) -> str:
            return " ".join(f"{r[k]:#x}" if k in ("service", "code") and r[k] is not None else str(r[k]) for k in keys)

        texts = [key_text(r) for r in df.iter_rows(named=True)]
        w = max([len(" ".join(keys)), *(len(t) for t in texts)])
        out.append(f"    {' '.join(keys).ljust(w)}  {'n/trace A':>9}  {'n/trace B':>9}  {'p50 A':>9}  {'p50 B':>9}  {'p99 A':>9}  {'p99 B':>9}")
        for t, r in zip(texts, df.iter_rows(named=True), strict=True):
            fa = "-" if r["per_trace_a"] is None else f"{r['per_trace_a']:.1f}"
            fb = "-" if r["per_trace_b"] is None else f"{r['per_trace_b']:.1f}"
            out.append(f"  {'*' if r['moved'] else ' '} {t.ljust(w)}  {fa:>9}  {fb:>9}  {_ns(r['p50_a']):>9}  {_ns(r['p50_b']):>9}"
                       f"  {_ns(r['p99_a']):>9}  {_ns(r['p99_b']):>9}")  # fmt: skip
    out.append("")
    if d.pair is None:
        out.append("first divergence: no trace of A ran the same guest image as a trace of B (nothing to compare event by event)")
    else:
        ta, tb = d.pair
        v = d.divergence
        if v is None:
            out.append(f"first divergence: none: trace {ta} (A) and {tb} (B) match event for event (timing ignored)")
        elif v.columns[0].startswith("<end of"):
            shorter = "A" if v.columns[0] == "<end of A>" else "B"
            longer = v.b if shorter == "A" else v.a
            out.append(f"first divergence between trace {ta} (A) and {tb} (B), same guest, at event #{v.index}: {shorter} ends there; "
                       "the other continues with " + ", ".join(f"{k}={_v(x)}" for k, x in longer.items()))  # fmt: skip
        else:
            out.append(f"first divergence between trace {ta} (A) and {tb} (B), same guest, at event #{v.index} "
                       f"(seq A={v.seq_a}, B={v.seq_b}) in {', '.join(v.columns)}:")  # fmt: skip
            for c in v.a:
                mark = "*" if c in v.columns else " "
                out.append(f"  {mark} {c}: A={_v(v.a[c])}  B={_v(v.b[c])}")
    return "\n".join(out) + "\n"
