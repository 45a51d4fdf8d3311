"""The text summary behind ``vsmtrace report``: one screen that says what the guest did."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from vsmtrace.analysis import tables as T

__all__ = ["Summary", "format_report", "summarize", "summarize_with_figures", "summary_from", "summary_queries"]


@dataclass
class Summary:
    """Small collected tables; everything the text report prints (also handy in notebooks)."""

    events: int
    time_span_ns: int
    counts: pl.DataFrame
    transitions: pl.DataFrame  # transition_latency per VP and reason
    secure_calls: pl.DataFrame
    residency: pl.DataFrame
    hypercalls: pl.DataFrame
    hypercall_failures: pl.DataFrame
    intercepts_by_page: pl.DataFrame
    intercepts_by_rip: pl.DataFrame
    protections: pl.DataFrame  # one row: changes, pages touched
    interrupts: pl.DataFrame
    msrs: pl.DataFrame
    exits: pl.DataFrame
    errors: pl.DataFrame


def summarize(lf: pl.LazyFrame, bound_fallback: bool = True) -> Summary:
    """Collect every summary table in one ``collect_all`` so Polars can share the scans."""
    return summary_from(pl.collect_all(summary_queries(lf, bound_fallback), engine=T.COLLECT_ENGINE))


def summarize_with_figures(
    lf: pl.LazyFrame,
    out_dir: str | os.PathLike[str],
    formats: Sequence[str] = ("png",),
    note: str | None = None,
    on_figure: Callable[[str], object] | None = None,
) -> tuple[Summary, list[Path]]:
    """``summarize`` and ``figures.write_figures`` from one ``collect_all`` (what ``vsmtrace report`` does).

    The figures draw transitions, stints and hypercalls the summary also derives: collected
    together, those run once instead of twice. The collect runs on a worker thread while
    matplotlib is imported (Polars releases the GIL). ``on_figure`` as in ``write_figures``.
    """
    from vsmtrace.analysis.figure_tables import figure_queries

    sq = summary_queries(lf)
    fq = figure_queries(lf)
    with ThreadPoolExecutor(max_workers=1) as pool:
        collected = pool.submit(pl.collect_all, [*sq, *fq.values()], engine=T.COLLECT_ENGINE)
        from vsmtrace.analysis.figures import draw_figures  # matplotlib: only when figures are wanted

        dfs = collected.result()
    figures = dict(zip(fq, dfs[len(sq):], strict=True))
    return summary_from(dfs[: len(sq)]), draw_figures(figures, out_dir, formats, note, on_figure)


def summary_queries(lf: pl.LazyFrame, bound_fallback: bool = True) -> list[pl.LazyFrame]:
    """The queries behind ``summarize``, for callers that collect them with queries of their own
    (one ``collect_all``, so shared subplans run once); ``summary_from`` turns the results into a Summary."""
    tr = T.vtl_transitions(lf)
    calls = T.hypercalls(lf, bound_fallback=bound_fallback)
    ic = T.intercepts(lf)
    prot = T.protection_changes(lf).select(
        pl.len().alias("changes"), pl.col("pages").sum().alias("pages_changed"), pl.col("target_vtl").n_unique().alias("target_vtls")
    )
    queries = [
        lf.select(pl.len().alias("n"), (pl.col("time_ns").max() - pl.col("time_ns").min()).alias("span")),
        T.event_counts(lf),
        T.transition_latency(tr),
        T.secure_calls(tr),
        T.vtl_residency(T.vtl_stints(lf)),
        T.hypercall_stats(calls),
        T.hypercall_status(calls).filter(pl.col("status").is_not_null() & (pl.col("status") != 0)),
        T.intercept_stats(ic).head(10),
        T.intercept_stats(ic, by=("rip", "access")).head(10),
        prot,
        T.interrupts(lf),
        T.msr_mix(lf),
        T.exits(lf),
        T.errors(lf).head(20),
    ]
    return queries


def summary_from(dfs: list[pl.DataFrame]) -> Summary:
    """The Summary from the collected ``summary_queries`` (in their order)."""
    head = dfs[0].row(0, named=True)
    return Summary(int(head["n"]), int(head["span"] or 0), *dfs[1:14])


def _ns(v: float | int | None) -> str:
    """A duration in the unit that keeps it short."""
    if v is None:
        return "-"
    v = float(v)
    for div, unit in ((1e9, "s"), (1e6, "ms"), (1e3, "us")):
        if abs(v) >= div:
            return f"{v / div:.3g} {unit}"
    return f"{v:.0f} ns"


def _table(df: pl.DataFrame, cols: list[tuple[str, str]], empty: str) -> list[str]:
    """Plain aligned text columns: (header, formatted values) per column."""
    if df.height == 0:
        return [f"  ({empty})"]
    cells = [[h for h, _ in cols]]
    for row in df.iter_rows(named=True):
        cells.append([_fmt(row, key) for _, key in cols])
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    left = [i == 0 or df.schema.get(key.rpartition(":")[2]) == pl.String for i, (_, key) in enumerate(cols)]
    return ["  " + "  ".join(c.ljust(w) if lj else c.rjust(w) for c, w, lj in zip(r, widths, left, strict=True)).rstrip() for r in cells]


def _fmt(row: dict, key: str) -> str:
    kind, _, name = key.partition(":")
    if not name:
        kind, name = "", kind
    v = row.get(name)
    if v is None:
        return "-"
    if kind == "ns":
        return _ns(v)
    if kind == "hex":
        return f"{int(v):#x}"
    if kind == "pct":
        return f"{100 * float(v):.1f}%"
    return str(v)


def format_report(s: Summary, title: str = "", note: str | None = None) -> str:
    """The report as text (what ``vsmtrace report`` prints); ``note`` says e.g. that the trace is partial."""
    out: list[str] = []
    if title:
        out.append(f"trace {title}")
    if note:
        out.append(f"note: {note}: every figure below covers only the events recorded before the cut")
    out.append(f"events {s.events}, time span {_ns(s.time_span_ns)}")
    out.append("")
    out.append("events per kind")
    out += _table(s.counts, [("kind", "kind"), ("events", "events")], "no events")
    out.append("")
    out.append("VTL transitions (entry -> return latency, per VP and entry reason)")
    out += _table(s.transitions, [("vp", "vp"), ("reason", "reason"), ("count", "count"), ("returned", "measured"), ("mean", "ns:mean_ns"),
                                  ("p50", "ns:p50_ns"), ("p99", "ns:p99_ns"), ("max", "ns:max_ns")], "no VTL switches")  # fmt: skip
    if s.secure_calls.height and s.secure_calls["service"].null_count() < s.secure_calls.height:
        out.append("")
        out.append("secure calls by service code (args[0])")
        out += _table(s.secure_calls, [("service", "hex:service"), ("count", "count"), ("mean", "ns:mean_ns"), ("p50", "ns:p50_ns"),
                                       ("p99", "ns:p99_ns")], "none")  # fmt: skip
    out.append("")
    out.append("VTL residency")
    out += _table(s.residency, [("vp", "vp"), ("vtl", "vtl"), ("stints", "stints"), ("time", "ns:total_ns"), ("share", "pct:share"),
                                ("mean stint", "ns:mean_ns")], "no VP stints")  # fmt: skip
    out.append("")
    out.append("top hypercalls")
    bounded = s.hypercalls.height and int(s.hypercalls["bounded"].sum() or 0) > 0
    out += _table(s.hypercalls.head(15), [("code", "hex:code"), ("name", "name"), ("vtl", "vtl"), ("count", "count"), ("failed", "failed"),
                                          ("p50", "ns:p50_ns"), ("p99", "ns:p99_ns")], "no hypercalls")  # fmt: skip
    if bounded:
        out.append("  (some latencies are upper bounds: the trace has no duration_ns for them)")
    if s.hypercall_failures.height:
        out.append("  failed statuses:")
        out += _table(s.hypercall_failures, [("name", "name"), ("status", "status_name"), ("count", "count")], "")
    out.append("")
    p = s.protections.row(0, named=True) if s.protections.height else {"changes": 0}
    out.append(f"protection changes {p['changes']}" + (f", {p['pages_changed']} pages changed" if p["changes"] else ""))
    out.append("")
    out.append("secure memory intercepts (top pages)")
    out += _table(s.intercepts_by_page, [("page", "hex:page"), ("access", "access"), ("count", "count"), ("rips", "rips")], "no intercepts")
    if s.intercepts_by_rip.height:
        out.append("  top RIPs:")
        out += _table(s.intercepts_by_rip, [("rip", "hex:rip"), ("access", "access"), ("count", "count"), ("pages", "pages")], "")
    out.append("")
    out.append("interrupts")
    out += _table(s.interrupts, [("vector", "hex:vector"), ("vtl", "vtl"), ("source", "source"), ("count", "count")], "no interrupts")
    out.append("")
    out.append("MSRs (Hyper-V synthetic first)")
    msrs = s.msrs.sort(["synthetic", "count"], descending=True, maintain_order=True).head(20)
    out += _table(msrs, [("msr", "hex:msr"), ("name", "name"), ("reads", "reads"), ("writes", "writes"), ("faults", "faults")],
                  "no MSR accesses")  # fmt: skip
    out.append("")
    out.append("exits")
    out += _table(s.exits, [("reason", "exit_reason"), ("vtl", "vtl"), ("count", "count")], "no exits")
    out.append("")
    out.append("errors")
    out += _table(s.errors, [("seq", "seq"), ("vp", "vp"), ("vtl", "vtl"), ("kind", "kind"), ("message", "text"), ("status", "exit_status")], "none")
    return "\n".join(out) + "\n"
