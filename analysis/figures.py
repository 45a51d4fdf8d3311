"""Figures from the derived tables (matplotlib, Agg backend, reproducible files).

Each function takes the event LazyFrame from ``load`` and an output path, collects only
the derived table it draws (capped to a fixed number of marks, so a 10-million-event
trace still plots in seconds), and writes PNG or SVG by the path's suffix. Output files
are byte-identical for identical traces: no dates or software versions in the
metadata, a fixed SVG hash salt, and no randomness in what is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from vsmtrace.analysis import tables as T  # noqa: E402

__all__ = [
    "FIGURES",
    "hypercall_mix",
    "intercept_scatter",
    "latency_cdf",
    "protection_map",
    "save",
    "vtl_timeline",
    "write_figures",
]

ENGINE = T.COLLECT_ENGINE
VTL_COLORS = {0: "#4C72B0", 1: "#DD8452", 2: "#55A868"}
ACCESS_MARKERS = {"read": ("o", "#4C72B0"), "write": ("x", "#C44E52"), "execute": ("^", "#55A868")}
MAX_STINTS = 20000  # per figure: beyond this, stints are merged per VP into time bins
MAX_POINTS = 50000

_RC = {
    "svg.hashsalt": "vsmtrace",
    "svg.fonttype": "path",
    "font.size": 9,
    "axes.titlesize": 10,
    "figure.dpi": 100,
}


def save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix) without run-dependent metadata."""
    p = Path(path)
    fmt = p.suffix.lstrip(".").lower() or "png"
    if fmt == "svg":
        metadata: dict[str, str | None] = {"Date": None, "Creator": "vsmtrace"}
    elif fmt == "pdf":
        metadata = {"CreationDate": None, "ModDate": None, "Creator": "vsmtrace", "Producer": "vsmtrace"}
    else:
        metadata = {"Software": None}
    with plt.rc_context(_RC):
        fig.savefig(p, format=fmt, metadata=metadata)
    plt.close(fig)
    return p


def _figure(height: float = 4.0, width: float = 9.0) -> tuple[Figure, plt.Axes]:
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    return fig, ax


def _empty(ax: plt.Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this trace", ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _time_unit(span_ns: float) -> tuple[float, str]:
    """A divisor and label so the time axis reads in s, ms or µs."""
    if span_ns >= 5e9:
        return 1e9, "s"
    if span_ns >= 5e6:
        return 1e6, "ms"
    return 1e3, "µs"


def vtl_timeline(lf: pl.LazyFrame, path: str | os.PathLike[str]) -> Path:
    """Which VTL each VP was in over time: one row per VP, one bar per stint, colour = VTL."""
    stints = T.vtl_stints(lf).collect(engine=ENGINE)
    with plt.rc_context(_RC):
        fig, ax = _figure(height=1.2 + 0.5 * max(1, stints["vp"].n_unique() if stints.height else 1))
        if stints.height == 0:
            _empty(ax, "VP stints")
            return save(fig, path)
        span = float(stints["end_ns"].max() - stints["start_ns"].min())  # type: ignore[operator]
        div, unit = _time_unit(span)
        if stints.height > MAX_STINTS:
            # Too many stints to draw one by one: one bar per (VP, time bin), coloured by the highest VTL entered in it.
            width = max(1, int(span / (MAX_STINTS / max(1, stints["vp"].n_unique()))))
            stints = (
                stints.with_columns((pl.col("start_ns") // width).alias("_bin"))
                .group_by("vp", "_bin")
                .agg(pl.col("vtl").max(), pl.col("start_ns").min(), pl.col("end_ns").max())
                .sort("vp", "_bin")
            )
        vps = sorted(stints["vp"].unique().to_list())
        for vtl in sorted(stints["vtl"].unique().to_list()):
            sub = stints.filter(pl.col("vtl") == vtl)
            for vp in vps:
                s = sub.filter(pl.col("vp") == vp)
                if s.height == 0:
                    continue
                bars = list(zip((s["start_ns"] / div).to_list(), ((s["end_ns"] - s["start_ns"]) / div).to_list(), strict=True))
                ax.broken_barh(bars, (vp - 0.4, 0.8), facecolors=VTL_COLORS.get(vtl, "0.5"), label=f"VTL{vtl}" if vp == vps[0] else None)
        ax.set_yticks(vps, [f"VP {v}" for v in vps])
        ax.invert_yaxis()
        ax.set_xlabel(f"time since trace start ({unit})")
        ax.set_title("VTL timeline per VP")
        ax.legend(loc="upper right", fontsize=8, ncols=3)
        return save(fig, path)


def hypercall_mix(lf: pl.LazyFrame, path: str | os.PathLike[str], top: int = 20) -> Path:
    """How many times each hypercall was made, stacked by calling VTL (top ``top`` names)."""
    stats = T.hypercall_stats(T.hypercalls(lf, bound_fallback=False), by=("name", "vtl")).collect(engine=ENGINE)
    with plt.rc_context(_RC):
        if stats.height == 0:
            fig, ax = _figure()
            _empty(ax, "hypercalls")
            return save(fig, path)
        totals = stats.group_by("name").agg(pl.col("count").sum()).sort(["count", "name"], descending=[True, False]).head(top)
        names = totals["name"].to_list()
        fig, ax = _figure(height=1.2 + 0.3 * len(names))
        left = [0] * len(names)
        for vtl in sorted(stats["vtl"].unique().to_list()):
            sub = dict(stats.filter(pl.col("vtl") == vtl).select("name", "count").iter_rows())
            vals = [sub.get(n, 0) for n in names]
            ax.barh(names, vals, left=left, color=VTL_COLORS.get(vtl, "0.5"), label=f"from VTL{vtl}")
            left = [a + b for a, b in zip(left, vals, strict=True)]
        ax.invert_yaxis()
        ax.set_xlabel("calls (count)")
        ax.set_title("Hypercall mix by calling VTL")
        ax.legend(loc="lower right", fontsize=8)
        return save(fig, path)


def _cdf(ax: plt.Axes, values: pl.Series, label: str) -> None:
    v = values.drop_nulls().sort()
    if v.len() == 0:
        return
    if v.len() > MAX_POINTS:  # evenly spaced order statistics keep the curve exact at this resolution
        idx = pl.int_range(0, MAX_POINTS, eager=True) * (v.len() - 1) // (MAX_POINTS - 1)
        v = v.gather(idx)
    n = v.len()
    y = [(i + 1) / n for i in range(n)]
    ax.step((v / 1e3).to_list(), y, where="post", label=f"{label} (n={values.drop_nulls().len()})")


def latency_cdf(lf: pl.LazyFrame, path: str | os.PathLike[str], top: int = 6) -> Path:
    """Latency CDFs: VTL transitions (entry → return) per entry reason, and the ``top`` most frequent hypercalls."""
    tr = T.vtl_transitions(lf).select("reason", "latency_ns").collect(engine=ENGINE)
    calls = T.hypercalls(lf, bound_fallback=False).select("name", "latency_ns").collect(engine=ENGINE)
    with plt.rc_context(_RC):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
        for ax, df, key, what in ((a1, tr, "reason", "VTL transitions"), (a2, calls, "name", "hypercalls")):
            df = df.filter(pl.col("latency_ns").is_not_null() & (pl.col("latency_ns") > 0))
            if df.height == 0:
                _empty(ax, f"timed {what}")
                continue
            groups = df.group_by(key).len().sort(["len", key], descending=[True, False]).head(top)[key].to_list()
            for g in groups:
                _cdf(ax, df.filter(pl.col(key) == g)["latency_ns"], str(g))
            ax.set_xscale("log")
            ax.set_xlabel("latency (µs, log scale)")
            ax.set_ylabel("fraction ≤ latency")
            ax.set_ylim(0, 1.02)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
            ax.set_title(f"{what}: latency CDF")
        return save(fig, path)


def protection_map(lf: pl.LazyFrame, path: str | os.PathLike[str]) -> Path:
    """VTL protections as GPA × time: each page's mask drawn from its change until the next one."""
    pp = T.protection_pages(lf).collect(engine=ENGINE)
    t_end = lf.select(pl.col("time_ns").max()).collect(engine=ENGINE).item() or 0
    with plt.rc_context(_RC):
        fig, ax = _figure(height=5)
        if pp.height == 0:
            _empty(ax, "VTL protection changes")
            return save(fig, path)
        # One bar per run of consecutive pages that share a mask and a lifetime: enabling
        # protections touches every page of RAM at once, and a bar per page would be
        # tens of thousands of artists.
        keys = ["new_mask", "time_ns", "until_ns"]
        runs = (
            pp.with_columns(pl.col("until_ns").fill_null(t_end))
            .sort([*keys, "page"])
            .with_columns((pl.col("page") - pl.int_range(pl.len()).over(keys)).alias("run"))
            .group_by([*keys, "run"])
            .agg(pl.col("page").min().alias("first"), pl.len().alias("pages"))
            .sort([*keys, "first"])
        )
        # Full-access pages are the background; what a reader wants to see is where access
        # is restricted, so the y axis spans the restricted pages (with some margin).
        restricted = runs.filter(~pl.col("new_mask").is_in(list(FULL_ACCESS_MASKS)))
        if restricted.height:
            runs = restricted
        if runs.height > MAX_STINTS:
            runs = runs.gather(pl.int_range(0, MAX_STINTS, eager=True) * (runs.height - 1) // (MAX_STINTS - 1))
        div, unit = _time_unit(float(max(t_end, 1)))
        masks = sorted(runs["new_mask"].unique().to_list())
        cmap = plt.get_cmap("viridis", max(2, len(masks)))
        page_mib = 4096 / (1 << 20)
        for i, m in enumerate(masks):
            s = runs.filter(pl.col("new_mask") == m)
            x0 = (s["time_ns"] / div).to_list()
            w = ((s["until_ns"] - s["time_ns"]) / div).to_list()
            y = (s["first"].cast(pl.Float64) * page_mib).to_list()
            h = (s["pages"].cast(pl.Float64) * page_mib).to_list()
            ax.barh(y, w, left=x0, height=h, align="edge", color=cmap(i), label=f"mask {m:#x} ({_mask_name(m)})", linewidth=0)
        lo = float(runs["first"].min()) * page_mib  # type: ignore[arg-type]
        hi = float((runs["first"] + runs["pages"]).max()) * page_mib  # type: ignore[operator]
        margin = max((hi - lo) * 0.1, 4 * page_mib)
        ax.set_ylim(lo - margin, hi + margin)
        ax.set_xlabel(f"time since trace start ({unit})")
        ax.set_ylabel("guest-physical address (MiB)")
        ax.set_title("VTL protection map: pages with restricted access, by mask" if restricted.height else "VTL protection map")
        ax.legend(fontsize=7, loc="upper right")
        return save(fig, path)


#: HV_MAP_GPA masks that allow everything (with and without user-execute).
FULL_ACCESS_MASKS = (0x7, 0xF)


def _mask_name(mask: int) -> str:
    parts = [c for bit, c in ((1, "R"), (2, "W"), (4, "X"), (8, "UX")) if mask & bit]
    return "".join(parts) if parts else "none"


def intercept_scatter(lf: pl.LazyFrame, path: str | os.PathLike[str]) -> Path:
    """Secure memory intercepts: time × GPA, marker per access type."""
    ic = T.intercepts(lf).select("time_ns", "gpa", "access").collect(engine=ENGINE)
    with plt.rc_context(_RC):
        fig, ax = _figure(height=4.5)
        if ic.height == 0:
            _empty(ax, "secure memory intercepts")
            return save(fig, path)
        if ic.height > MAX_POINTS:
            ic = ic.gather(pl.int_range(0, MAX_POINTS, eager=True) * (ic.height - 1) // (MAX_POINTS - 1))
        div, unit = _time_unit(float(ic["time_ns"].max() or 1))  # type: ignore[arg-type]
        for access in sorted(ic["access"].drop_nulls().unique().to_list()):
            s = ic.filter(pl.col("access") == access)
            marker, color = ACCESS_MARKERS.get(access, (".", "0.3"))
            ax.scatter((s["time_ns"] / div).to_list(), (s["gpa"].cast(pl.Float64) / (1 << 20)).to_list(), s=10, marker=marker,
                       color=color, label=f"{access} ({s.height})", linewidths=0.8)  # fmt: skip
        ax.set_xlabel(f"time since trace start ({unit})")
        ax.set_ylabel("guest-physical address (MiB)")
        ax.set_title("Secure memory intercepts")
        ax.legend(fontsize=8, loc="upper right")
        return save(fig, path)


FIGURES = {
    "vtl_timeline": vtl_timeline,
    "hypercall_mix": hypercall_mix,
    "latency_cdf": latency_cdf,
    "protection_map": protection_map,
    "intercept_scatter": intercept_scatter,
}


def write_figures(lf: pl.LazyFrame, out_dir: str | os.PathLike[str], formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write every figure into ``out_dir`` as ``<name>.<fmt>``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [fn(lf, out / f"{name}.{fmt}") for name, fn in FIGURES.items() for fmt in formats]
