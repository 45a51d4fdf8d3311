"""The tables behind the figures, as lazy queries (no matplotlib here).

``figure_queries(lf)`` gives each figure's table reduced to what is drawn (binned
timeline bars, sampled CDF points, protection runs), so a report can collect them with
its own queries in one ``collect_all`` while matplotlib is still being imported; see
``figures.draw_figures``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import polars as pl
from vsmtrace.analysis import tables as T

__all__ = ["FIGURE_NAMES", "MAX_POINTS", "MAX_STINTS", "NEEDS", "cdf_samples", "figure_queries", "protection_runs", "timeline_bars"]

FrameT = TypeVar("FrameT", pl.DataFrame, pl.LazyFrame)
MAX_STINTS = 20000  # per figure: beyond this, stints are merged per VP into time bins
MAX_POINTS = 50000

#: The figures, in the order they are drawn (``figures.FIGURES`` maps them to their functions).
FIGURE_NAMES = ("vtl_timeline", "hypercall_mix", "latency_cdf", "protection_map", "intercept_scatter")

#: What each figure draws: the names of its tables in ``figure_queries``.
NEEDS = {
    "vtl_timeline": ("stints",),
    "hypercall_mix": ("call_mix",),
    "latency_cdf": ("transition_latency", "call_latency"),
    "protection_map": ("protection_runs", "t_end"),
    "intercept_scatter": ("intercepts",),
}


def timeline_bars(stints: pl.LazyFrame) -> pl.LazyFrame:
    """The bars of the VTL timeline (vp, vtl, start_ns, end_ns): one per stint, or beyond MAX_STINTS,
    one per VP and time bin coloured by the highest VTL entered in it (binned in the query, so a
    10-million-event trace's million stints never reach Python)."""
    n_vp = pl.col("vp").n_unique().cast(pl.Float64)
    span = (pl.col("end_ns").max() - pl.col("start_ns").min()).cast(pl.Float64)
    width = pl.max_horizontal(pl.lit(1, pl.Int64), (span / (MAX_STINTS / pl.max_horizontal(n_vp, 1.0))).floor().cast(pl.Int64))
    binned = pl.when(pl.len() > MAX_STINTS).then(pl.col("start_ns") // width).otherwise(pl.int_range(pl.len(), dtype=pl.Int64))
    return (
        stints.select("vp", "vtl", "start_ns", "end_ns")
        .with_columns(binned.alias("_bin"))
        .group_by("vp", "_bin")
        .agg(pl.col("vtl").max(), pl.col("start_ns").min(), pl.col("end_ns").max())
        .sort("vp", "_bin")
    )


def cdf_samples(df: pl.LazyFrame, key: str, col: str = "latency_ns") -> pl.LazyFrame:
    """Per ``key``: how many positive ``col`` values (n) and up to MAX_POINTS of them, sorted (values).

    Beyond MAX_POINTS, evenly spaced order statistics (which keep a CDF exact at this
    resolution); computed in the query, so millions of latencies never reach Python.
    """
    v = pl.col(col)
    n = pl.len().cast(pl.Int64)
    m = pl.min_horizontal(n, MAX_POINTS)
    idx = pl.int_range(0, m) * (n - 1) // pl.max_horizontal(m - 1, 1)
    return df.filter(v.is_not_null() & (v > 0)).group_by(key).agg(n.alias("n"), v.sort().gather(idx).alias("values"))


def protection_runs(pp: FrameT, t_end: int | pl.Expr) -> FrameT:
    """The bars of the protection map: runs of consecutive pages of one VTL's view with one mask and one lifetime.

    Enabling protections touches every page of RAM at once, and a bar per page would be
    tens of thousands of artists. A run never spans two masks, two views or two lifetimes.
    ``pp`` is ``T.protection_pages`` (eager or lazy); ``t_end`` ends the runs still open at
    the end of the trace. Columns: target_vtl, new_mask, time_ns, until_ns, first (page), pages.
    """
    keys = ["target_vtl", "new_mask", "time_ns", "until_ns"]
    return (
        pp.with_columns(pl.col("until_ns").fill_null(t_end))
        .unique(subset=[*keys, "page"])
        .sort([*keys, "page"])
        .with_columns((pl.col("page").cast(pl.Int64) - pl.int_range(pl.len()).over(keys)).alias("run"))
        .group_by([*keys, "run"])
        .agg(pl.col("page").min().alias("first"), pl.len().alias("pages"))
        .sort([*keys, "first"])
        .drop("run")
    )


def figure_queries(lf: pl.LazyFrame, names: Sequence[str] | None = None) -> dict[str, pl.LazyFrame]:
    """The tables behind the figures ``names`` (default: all), by table name, not yet collected.

    Collect them together with other queries of the same trace (``pl.collect_all``) so the
    subplans they share run once, then hand the frames to ``draw_figures``. The hypercall
    tables derive from ``T.hypercalls(lf)`` (the summary's): the figures keep only the
    recorded service times (``latency_is_bound`` rows are upper bounds, not drawn).
    """
    wanted = set(FIGURE_NAMES) if names is None else set(names)
    calls = T.hypercalls(lf)
    tables = {
        "stints": lambda: timeline_bars(T.vtl_stints(lf)),
        "call_mix": lambda: calls.group_by("name", "vtl").agg(pl.len().alias("count")),
        "transition_latency": lambda: cdf_samples(T.vtl_transitions(lf), "reason"),
        "call_latency": lambda: cdf_samples(calls.with_columns(pl.when(~pl.col("latency_is_bound")).then(pl.col("latency_ns")).alias("latency_ns")), "name"),
        "protection_runs": lambda: protection_runs(
            T.protection_pages(lf).join(lf.select(pl.col("time_ns").max().fill_null(0).alias("_t_end")), how="cross"), pl.col("_t_end")
        ),
        "t_end": lambda: lf.select(pl.col("time_ns").max()),
        "intercepts": lambda: T.intercepts(lf).select("time_ns", "gpa", "access"),
    }
    need = dict.fromkeys(t for name in FIGURE_NAMES if name in wanted for t in NEEDS[name])
    return {t: tables[t]() for t in need}
