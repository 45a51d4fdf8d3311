"""``vsmtrace fleet report``: the fleet tables as text, and figures per group and over time."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import polars as pl
from vsmtrace.analysis.fleet import sketch
from vsmtrace.analysis.fleet.compute import FleetTables
from vsmtrace.analysis.report import _table

__all__ = ["format_fleet_report", "per_trace_call_p99", "write_fleet_figures"]

TOP = 15


def _head_per_group(df: pl.DataFrame, n: int) -> pl.DataFrame:
    return df.filter(pl.int_range(pl.len()).over("group") < n)


def format_fleet_report(ft: FleetTables, title: str = "") -> str:
    """The report as text: traces per group, then every table per group."""
    g = ft.grouped
    tr = ft.traces
    out: list[str] = []
    events = int(tr["events"].sum()) if tr.height else 0
    groups = tr["group"].n_unique() if tr.height else 0
    head = f"fleet {title}: " if title else "fleet: "
    head += f"{tr.height} traces, {events} events"
    head += f", grouped by {ft.by} ({groups} groups)" if ft.by else ""
    out += [head, ""]
    if tr.height == 0:
        return "\n".join([*out, "  (no traces)"]) + "\n"
    per = (
        tr.group_by("group")
        .agg(
            pl.len().alias("traces"),
            pl.col("events").sum().alias("events"),
            pl.col("start_time").min().dt.strftime("%Y-%m-%d %H:%M").alias("first"),
            pl.col("start_time").max().dt.strftime("%Y-%m-%d %H:%M").alias("last"),
        )
        .sort("group")
    )
    out.append("traces per group")
    out += _table(per, [("group", "group"), ("traces", "traces"), ("events", "events"), ("first start", "first"), ("last start", "last")], "")

    def section(name: str, title: str, cols: list[tuple[str, str]], empty: str, df: pl.DataFrame | None = None) -> None:
        out.extend(["", title])
        d = g.get(name) if df is None else df
        out.extend(_table(d if d is not None else pl.DataFrame(), cols, empty))

    if "counts" in g:
        c = g["counts"].with_columns(pl.col("events_per_trace").round(1))
        section("counts", "events per kind (total, and mean per trace of the group)",
                [("group", "group"), ("kind", "kind"), ("traces", "traces"), ("events", "events"), ("per trace", "events_per_trace")],
                "no events", c)  # fmt: skip
    lat = [("count", "count"), ("mean", "ns:mean_ns"), ("p50", "ns:p50_ns"), ("p90", "ns:p90_ns"), ("p99", "ns:p99_ns"), ("max", "ns:max_ns")]
    section("transitions", "VTL transitions (entry -> return latency, by entry reason)", [("group", "group"), ("reason", "reason"), *lat],
            "no VTL switches")  # fmt: skip
    section("secure_calls", "secure calls by service code (args[0])", [("group", "group"), ("service", "hex:service"), *lat], "none")
    hc = g.get("hypercalls")
    section("hypercalls", f"top hypercalls (up to {TOP} per group)",
            [("group", "group"), ("code", "hex:code"), ("name", "name"), ("vtl", "vtl"), ("count", "count"), ("failed", "failed"),
             ("p50", "ns:p50_ns"), ("p99", "ns:p99_ns")], "no hypercalls",
            None if hc is None else _head_per_group(hc, TOP))  # fmt: skip
    st = g.get("hypercall_status")
    if st is not None:
        bad = st.filter(pl.col("status").is_not_null() & (pl.col("status") != 0))
        if bad.height:
            section("", "failed hypercall statuses", [("group", "group"), ("name", "name"), ("status", "status_name"), ("count", "count")],
                    "", bad)  # fmt: skip
    section("residency", "VTL residency (all VPs of the group's traces)",
            [("group", "group"), ("vtl", "vtl"), ("stints", "stints"), ("time", "ns:total_ns"), ("share", "pct:share")], "no VP stints")  # fmt: skip
    section("protections", "protection changes", [("group", "group"), ("changes", "changes"), ("pages", "pages_changed")], "none")
    ic = g.get("intercepts")
    section("intercepts", "secure memory intercepts (top 10 pages per group)",
            [("group", "group"), ("page", "hex:page"), ("access", "access"), ("count", "count")], "no intercepts",
            None if ic is None else _head_per_group(ic, 10))  # fmt: skip
    section("interrupts", "interrupts", [("group", "group"), ("vector", "hex:vector"), ("vtl", "vtl"), ("source", "source"), ("count", "count")],
            "no interrupts")  # fmt: skip
    section("exits", "exits", [("group", "group"), ("reason", "exit_reason"), ("vtl", "vtl"), ("count", "count")], "no exits")
    section("errors", "errors (ERROR events and failed guest exits)", [("group", "group"), ("errors", "errors")], "none")
    out += ["", f"(fleet percentiles come from merged log-bucket sketches: within {sketch.ALPHA:.1%} of the exact value of that rank)"]
    return "\n".join(out) + "\n"


def per_trace_call_p99(ft: FleetTables) -> pl.DataFrame:
    """Per trace: its start time, group, secure calls, and its worst VP's VTL-call p99 (exact, from its report)."""
    t = ft.per_trace["transitions"]
    if "reason" not in t.columns:
        return pl.DataFrame(schema={"trace": pl.String, "call_p99_ns": pl.Int64, "calls": pl.Int64})
    calls = t.filter(pl.col("reason") == "call").group_by("trace").agg(
        pl.col("p99_ns").max().alias("call_p99_ns"), pl.col("count").sum().cast(pl.Int64).alias("calls")
    )
    return ft.traces.select("trace", "group", "start_time").join(calls, on="trace", how="inner").sort("start_time")


def write_fleet_figures(ft: FleetTables, out_dir: str | os.PathLike[str], formats: Sequence[str] = ("png",)) -> list[Path]:
    """Per-group latency distributions (CDF from the merged sketches, box of per-trace p99) and a trend over start time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from vsmtrace.analysis.figures import _RC, save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    per = per_trace_call_p99(ft)
    groups = sorted(ft.traces["group"].unique().to_list()) if ft.traces.height else []
    with plt.rc_context(_RC):
        # 1. VTL-call latency distribution per group, from the merged sketches.
        fig, ax = plt.subplots(figsize=(9, 4))
        bkt = ft.sketches.get("transitions")
        drawn = 0
        if bkt is not None:
            calls = bkt.filter(pl.col("reason") == "call")
            for gname in groups:
                sub = calls.filter(pl.col("group") == gname).sort("bucket")
                if sub.height == 0:
                    continue
                xs = [sketch.representative(b) / 1e3 for b in sub["bucket"].to_list()]
                n = sub["n"].cum_sum()
                ax.step(xs, (n / n[-1]).to_list(), where="post", label=f"{gname} ({int(n[-1])} calls)")
                drawn += 1
        if drawn:
            ax.set_xscale("log")
            ax.set_xlabel("VTL call latency, entry to return (us, log scale)")
            ax.set_ylabel("fraction of calls")
            ax.legend(fontsize=7, loc="lower right")
        else:
            ax.text(0.5, 0.5, "no VTL calls in this fleet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"VTL call latency per group{' (' + ft.by + ')' if ft.by else ''}")
        fig.tight_layout()
        paths += [save(fig, out / f"fleet_call_latency_cdf.{fmt}") for fmt in formats]
        plt.close(fig)

        # 2. Per-trace VTL-call p99 per group (one box per group).
        fig, ax = plt.subplots(figsize=(9, 4))
        data = [(gname, per.filter(pl.col("group") == gname)["call_p99_ns"].drop_nulls().to_list()) for gname in groups]
        data = [(gname, [v / 1e3 for v in vals]) for gname, vals in data if vals]
        if data:
            ax.boxplot([v for _, v in data], showfliers=True)
            ax.set_xticks(range(1, len(data) + 1), [gname[:24] for gname, _ in data], rotation=30, ha="right", fontsize=7)
            ax.set_ylabel("per-trace VTL call p99 (us, worst VP)")
        else:
            ax.text(0.5, 0.5, "no VTL calls in this fleet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("VTL call tail per trace, by group")
        fig.tight_layout()
        paths += [save(fig, out / f"fleet_call_p99_by_group.{fmt}") for fmt in formats]
        plt.close(fig)

        # 3. Trend over start time: per-trace p99 and secure calls.
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
        if per.height:
            for gname in groups:
                sub = per.filter(pl.col("group") == gname)
                if sub.height:
                    a1.plot(sub["start_time"].to_list(), (sub["call_p99_ns"] / 1e3).to_list(), "o", ms=3, label=gname[:24])
                    a2.plot(sub["start_time"].to_list(), sub["calls"].to_list(), "o", ms=3)
            a1.set_ylabel("VTL call p99 (us)")
            a2.set_ylabel("secure calls per trace")
            a2.set_xlabel("trace start time (UTC)")
            if len(groups) <= 12:
                a1.legend(fontsize=7, loc="upper left")
            fig.autofmt_xdate()
        else:
            a1.text(0.5, 0.5, "no VTL calls in this fleet", ha="center", va="center", transform=a1.transAxes)
        a1.set_title("trend over start time")
        fig.tight_layout()
        paths += [save(fig, out / f"fleet_trend.{fmt}") for fmt in formats]
        plt.close(fig)
    return paths

