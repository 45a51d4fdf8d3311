"""Figures from the derived tables (matplotlib, Agg backend, reproducible files).

Each function takes the event LazyFrame from ``load`` and an output path, collects only
the derived table it draws (capped to a fixed number of marks, so a 10-million-event
trace still plots in seconds), and writes PNG or SVG by the path's suffix.
``figure_queries`` and ``draw_figures`` split the same work in two, so ``write_figures``
(and the report, with its own tables) collects every figure's table in one
``collect_all``, where shared subplans (transitions, stints, hypercalls) run once. Output files
are byte-identical for identical traces: no dates or software versions in the
metadata, a fixed SVG hash salt, and no randomness in what is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402
from vsmtrace.analysis import tables as T  # noqa: E402
from vsmtrace.analysis.figure_tables import (  # noqa: E402
    FIGURE_NAMES,
    MAX_POINTS,
    MAX_STINTS,
    cdf_samples,
    figure_queries,
    protection_runs,
    timeline_bars,
)

__all__ = [
    "FIGURES",
    "cdf_samples",
    "draw_figures",
    "figure_queries",
    "hypercall_mix",
    "intercept_scatter",
    "latency_cdf",
    "protection_map",
    "protection_runs",
    "save",
    "timeline_bars",
    "vtl_timeline",
    "write_figures",
]

ENGINE = T.COLLECT_ENGINE
VTL_COLORS = {0: "#4C72B0", 1: "#DD8452", 2: "#55A868"}
ACCESS_MARKERS = {"read": ("o", "#4C72B0"), "write": ("x", "#C44E52"), "execute": ("^", "#55A868")}

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


def _title(ax: plt.Axes, text: str, note: str | None) -> None:
    """The axes title, with a second line when the trace is partial (what the reader must know first)."""
    if note:
        ax.set_title(f"{text}\n({note})", color="#8B0000")
    else:
        ax.set_title(text)


def _page_axis(axis: Any) -> None:
    """Tick labels of a guest-physical page-number axis in hex, as a hypervisor engineer reads them."""
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{int(round(v)):#x}" if v >= 0 else ""))
    axis.set_major_locator(MaxNLocator(nbins=8, integer=True))


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


def vtl_timeline(lf: pl.LazyFrame, path: str | os.PathLike[str], note: str | None = None) -> Path:
    """Which VTL each VP was in over time: one row per VP, one bar per stint, colour = VTL."""
    return _draw_one("vtl_timeline", lf, path, note)


def _vtl_timeline(data: dict[str, pl.DataFrame], path: str | os.PathLike[str], note: str | None) -> Path:
    stints = data["stints"]
    with plt.rc_context(_RC):
        fig, ax = _figure(height=1.4 + 0.5 * max(1, stints["vp"].n_unique() if stints.height else 1))
        if stints.height == 0:
            _empty(ax, "VP stints")
            _title(ax, "VTL timeline per VP", note)
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
            labelled = False
            for vp in vps:
                s = sub.filter(pl.col("vp") == vp)
                if s.height == 0:
                    continue
                bars = list(zip((s["start_ns"] / div).to_list(), ((s["end_ns"] - s["start_ns"]) / div).to_list(), strict=True))
                ax.broken_barh(bars, (vp - 0.4, 0.8), facecolors=VTL_COLORS.get(vtl, "0.5"), label=None if labelled else f"VTL{vtl}")
                labelled = True
        ax.set_yticks(vps, [f"VP {v}" for v in vps])
        ax.set_ylim(max(vps) + 0.6, min(vps) - 0.6)  # VP 0 on top
        ax.set_xlabel(f"time since trace start ({unit})")
        _title(ax, "VTL timeline per VP", note)
        # Outside the axes: inside, the legend covered VP 0's bars.
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
        return save(fig, path)


def hypercall_mix(lf: pl.LazyFrame, path: str | os.PathLike[str], top: int = 20, note: str | None = None) -> Path:
    """How many times each hypercall was made, stacked by calling VTL (top ``top`` names)."""
    return _draw_one("hypercall_mix", lf, path, note, top=top)


def _hypercall_mix(data: dict[str, pl.DataFrame], path: str | os.PathLike[str], note: str | None, top: int = 20) -> Path:
    stats = data["call_mix"]
    with plt.rc_context(_RC):
        if stats.height == 0:
            fig, ax = _figure()
            _empty(ax, "hypercalls")
            _title(ax, "Hypercall mix by calling VTL", note)
            return save(fig, path)
        totals = stats.group_by("name").agg(pl.col("count").sum()).sort(["count", "name"], descending=[True, False]).head(top)
        names = totals["name"].to_list()
        fig, ax = _figure(height=1.4 + 0.3 * len(names))
        left = [0] * len(names)
        for vtl in sorted(stats["vtl"].unique().to_list()):
            sub = dict(stats.filter(pl.col("vtl") == vtl).select("name", "count").iter_rows())
            vals = [sub.get(n, 0) for n in names]
            ax.barh(names, vals, left=left, color=VTL_COLORS.get(vtl, "0.5"), label=f"from VTL{vtl}")
            left = [a + b for a, b in zip(left, vals, strict=True)]
        ax.invert_yaxis()
        ax.set_xlabel("calls (count)")
        _title(ax, "Hypercall mix by calling VTL", note)
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
        return save(fig, path)


#: Series with at most this many samples get a marker per sample (a short step curve is easy to miss).
MARK_SAMPLES = 30


def _cdf(ax: plt.Axes, values: list[int], total: int, label: str) -> None:
    if total == 0:
        return
    n = len(values)
    xs = [x / 1e3 for x in values]
    ys = [(i + 1) / n for i in range(n)]
    # Start the curve at (first value, 0): a one-sample series is then a visible vertical
    # step from 0 to 1 instead of a single invisible point; few samples also get markers.
    (line,) = ax.step([xs[0], *xs], [0.0, *ys], where="post", label=f"{label} (n={total})")
    if total <= MARK_SAMPLES:
        ax.plot(xs, ys, linestyle="none", marker="o", markersize=4, color=line.get_color())


def latency_cdf(lf: pl.LazyFrame, path: str | os.PathLike[str], top: int = 6, note: str | None = None) -> Path:
    """Latency CDFs: VTL transitions (entry → return) per entry reason, and the ``top`` most frequent hypercalls."""
    return _draw_one("latency_cdf", lf, path, note, top=top)


def _latency_cdf(data: dict[str, pl.DataFrame], path: str | os.PathLike[str], note: str | None, top: int = 6) -> Path:
    tr, calls = data["transition_latency"], data["call_latency"]
    with plt.rc_context(_RC):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
        for ax, df, key, what in ((a1, tr, "reason", "VTL transitions"), (a2, calls, "name", "hypercalls")):
            if df.height == 0:
                _empty(ax, f"timed {what}")
                _title(ax, f"{what}: latency CDF", note)
                continue
            for g, total, values in df.sort(["n", key], descending=[True, False]).head(top).select(key, "n", "values").iter_rows():
                _cdf(ax, values, total, str(g))
            ax.set_xscale("log")
            ax.set_xlabel("latency (µs, log scale)")
            ax.set_ylabel("fraction ≤ latency")
            ax.set_ylim(0, 1.02)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
            _title(ax, f"{what}: latency CDF", note)
        return save(fig, path)


def protection_map(lf: pl.LazyFrame, path: str | os.PathLike[str], note: str | None = None) -> Path:
    """VTL protections as guest-physical page × time: each page's mask drawn from its change until the next one."""
    return _draw_one("protection_map", lf, path, note)


def _protection_map(data: dict[str, pl.DataFrame], path: str | os.PathLike[str], note: str | None) -> Path:
    runs = data["protection_runs"]
    t_end = data["t_end"].item() or 0
    with plt.rc_context(_RC):
        fig, ax = _figure(height=5)
        if runs.height == 0:
            _empty(ax, "VTL protection changes")
            _title(ax, "VTL protection map", note)
            return save(fig, path)
        # Full-access pages are the background; what a reader wants to see is where access
        # is restricted, so the y axis spans the restricted pages (with some margin).
        restricted = runs.filter(~pl.col("new_mask").is_in(list(FULL_ACCESS_MASKS)))
        if restricted.height:
            runs = restricted
        if runs.height > MAX_STINTS:
            runs = runs.gather(pl.int_range(0, MAX_STINTS, eager=True) * (runs.height - 1) // (MAX_STINTS - 1))
        div, unit = _time_unit(float(max(t_end, 1)))
        masks = sorted(runs["new_mask"].unique().to_list())
        colors = _mask_colors(masks)
        vtls = sorted(runs["target_vtl"].unique().to_list())
        for m in masks:
            s = runs.filter(pl.col("new_mask") == m)
            x0, x1 = (s["time_ns"] / div).to_numpy(), (s["until_ns"] / div).to_numpy()
            y0 = s["first"].cast(pl.Float64).to_numpy()
            y1 = y0 + s["pages"].cast(pl.Float64).to_numpy()
            # One collection of rectangles per mask: a bar artist each (barh) was 20,000 artists
            # and most of a 10-million-event report's time. A thin white edge keeps two
            # adjacent runs with different masks visibly apart.
            boxes = np.stack([np.column_stack(c) for c in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))], axis=1)
            ax.add_collection(PolyCollection(boxes, facecolors=colors[m], edgecolors="white", linewidths=0.4,
                                             label=f"mask {m:#x} ({_mask_name(m)})"))  # fmt: skip
        ax.set_xlim(0, max(t_end, 1) / div * 1.02)
        lo = float(runs["first"].min())  # type: ignore[arg-type]
        hi = float((runs["first"] + runs["pages"]).max())  # type: ignore[operator]
        margin = max((hi - lo) * 0.1, 4)
        ax.set_ylim(lo - margin, hi + margin)
        _page_axis(ax.yaxis)
        ax.set_xlabel(f"time since trace start ({unit})")
        ax.set_ylabel("guest-physical page number (GPA >> 12)")
        views = ", ".join(f"VTL{v}" for v in vtls)
        _title(ax, f"VTL protection map ({views}'s view): pages with restricted access, by mask" if restricted.height
               else f"VTL protection map ({views}'s view)", note)  # fmt: skip
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False)
        return save(fig, path)


#: HV_MAP_GPA masks that allow everything (with and without user-execute).
FULL_ACCESS_MASKS = (0x7, 0xF)

#: Distinct colours for masks (tab10 order): neighbouring masks never share a shade.
_MASK_PALETTE = ("#C44E52", "#4C72B0", "#DD8452", "#55A868", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD")


def _mask_colors(masks: list[int]) -> dict[int, str]:
    """A fixed colour per mask value (no access is always red), so figures of different traces agree."""
    return {m: _MASK_PALETTE[m % len(_MASK_PALETTE)] for m in masks}


def _mask_name(mask: int) -> str:
    parts = [c for bit, c in ((1, "R"), (2, "W"), (4, "X"), (8, "UX")) if mask & bit]
    return "".join(parts) if parts else "none"


def intercept_scatter(lf: pl.LazyFrame, path: str | os.PathLike[str], note: str | None = None) -> Path:
    """Secure memory intercepts: time × guest-physical page, marker per access type."""
    return _draw_one("intercept_scatter", lf, path, note)


def _intercept_scatter(data: dict[str, pl.DataFrame], path: str | os.PathLike[str], note: str | None) -> Path:
    ic = data["intercepts"]
    with plt.rc_context(_RC):
        fig, ax = _figure(height=4.5)
        if ic.height == 0:
            _empty(ax, "secure memory intercepts")
            _title(ax, "Secure memory intercepts", note)
            return save(fig, path)
        if ic.height > MAX_POINTS:
            ic = ic.gather(pl.int_range(0, MAX_POINTS, eager=True) * (ic.height - 1) // (MAX_POINTS - 1))
        div, unit = _time_unit(float(ic["time_ns"].max() or 1))  # type: ignore[arg-type]
        for access in sorted(ic["access"].drop_nulls().unique().to_list()):
            s = ic.filter(pl.col("access") == access)
            marker, color = ACCESS_MARKERS.get(access, (".", "0.3"))
            ax.scatter((s["time_ns"] / div).to_numpy(), (s["gpa"] // 4096).cast(pl.Float64).to_numpy(), s=14, marker=marker,
                       color=color, label=f"{access} ({s.height})", linewidths=0.8)  # fmt: skip
        pages = (ic["gpa"] // 4096).cast(pl.Float64)
        lo, hi = float(pages.min()), float(pages.max())  # type: ignore[arg-type]
        pad = max((hi - lo) * 0.1, 2)
        ax.set_ylim(lo - pad, hi + pad)
        _page_axis(ax.yaxis)
        ax.set_xlabel(f"time since trace start ({unit})")
        ax.set_ylabel("guest-physical page number (GPA >> 12)")
        _title(ax, "Secure memory intercepts", note)
        # Outside the axes: inside, a point could hide under it.
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
        return save(fig, path)


#: Every figure by name (the order of FIGURE_NAMES).
FIGURES = {
    "vtl_timeline": vtl_timeline,
    "hypercall_mix": hypercall_mix,
    "latency_cdf": latency_cdf,
    "protection_map": protection_map,
    "intercept_scatter": intercept_scatter,
}


_DRAW: dict[str, Callable[..., Path]] = {
    "vtl_timeline": _vtl_timeline,
    "hypercall_mix": _hypercall_mix,
    "latency_cdf": _latency_cdf,
    "protection_map": _protection_map,
    "intercept_scatter": _intercept_scatter,
}


def draw_figures(
    data: dict[str, pl.DataFrame],
    out_dir: str | os.PathLike[str],
    formats: Sequence[str] = ("png",),
    note: str | None = None,
    on_figure: Callable[[str], object] | None = None,
) -> list[Path]:
    """Draw every figure from the collected ``figure_queries`` into ``out_dir`` as ``<name>.<fmt>``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in FIGURE_NAMES:
        for fmt in formats:
            if on_figure is not None:
                on_figure(f"{name}.{fmt}")
            paths.append(_DRAW[name](data, out / f"{name}.{fmt}", note))
    return paths


def _draw_one(name: str, lf: pl.LazyFrame, path: str | os.PathLike[str], note: str | None, **kw: Any) -> Path:
    qs = figure_queries(lf, [name])
    data = dict(zip(qs, pl.collect_all(list(qs.values()), engine=ENGINE), strict=True))
    return _DRAW[name](data, path, note, **kw)


def write_figures(
    lf: pl.LazyFrame,
    out_dir: str | os.PathLike[str],
    formats: Sequence[str] = ("png",),
    note: str | None = None,
    on_figure: Callable[[str], object] | None = None,
) -> list[Path]:
    """Write every figure into ``out_dir`` as ``<name>.<fmt>``; returns the paths written.

    ``note`` (e.g. that the trace is partial) goes into every title; ``on_figure(name)`` is
    called before each figure is drawn (progress). The figures' tables are collected in one
    ``collect_all`` first.
    """
    qs = figure_queries(lf)
    data = dict(zip(qs, pl.collect_all(list(qs.values()), engine=ENGINE), strict=True))
    return draw_figures(data, out_dir, formats, note, on_figure)
