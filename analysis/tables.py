"""Derived tables: each takes the event LazyFrame from ``load`` (or a table derived from
it) and returns a LazyFrame, so callers choose when and how to collect.

Every table starts by filtering one or a few kinds and projecting the columns it needs,
which Polars pushes into the scan: a sealed 10-million-event trace is summarised by
streaming over the few columns involved, never by loading it whole. Per-VP pairing
(transitions, stints) works on the filtered rows only, which are a small fraction.

Times are ``time_ns`` (ns since trace start); latencies are in ns. Dictionary columns
(kind, reason, name, ...) come out as plain strings.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
from vsmtrace.vmm.hyperv.hvdef import HV_X64_MSR_RANGE_FIRST, HV_X64_MSR_RANGE_LAST, HvMsr

__all__ = [
    "COLLECT_ENGINE",
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

#: Engine for ``collect``: the streaming engine processes the scan in morsels.
COLLECT_ENGINE = "streaming"

PAGE_SIZE = 4096


def _kind(lf: pl.LazyFrame, *kinds: str) -> pl.LazyFrame:
    return lf.filter(pl.col("kind").is_in(list(kinds)) if len(kinds) > 1 else pl.col("kind") == kinds[0])


def _s(name: str) -> pl.Expr:
    """A dictionary column as a string column (same name)."""
    return pl.col(name).cast(pl.String)


def latency_stats(lf: pl.LazyFrame, by: Sequence[str], col: str = "latency_ns") -> pl.LazyFrame:
    """Count and latency distribution of ``col`` per group: mean, p50, p90, p99, max (ns).

    Percentiles use the nearest-rank value, so they are always latencies that occurred.
    Rows with a null latency count in ``count`` but not in ``measured``.
    """
    c = pl.col(col)
    return (
        lf.group_by(list(by))
        .agg(
            pl.len().alias("count"),
            c.count().alias("measured"),
            c.mean().alias("mean_ns"),
            c.quantile(0.5, "nearest").alias("p50_ns"),
            c.quantile(0.9, "nearest").alias("p90_ns"),
            c.quantile(0.99, "nearest").alias("p99_ns"),
            c.max().alias("max_ns"),
        )
        .sort(list(by), nulls_last=True)
    )


# ----------------------------------------------------------------------------- overview


def event_counts(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Events per kind (kind, events), most frequent first: the shape of a run at a glance."""
    return (  # grouped by the dictionary code, cast to text once per kind (not once per event)
        lf.group_by("kind")
        .agg(pl.len().alias("events"))
        .with_columns(_s("kind"))
        .sort(["events", "kind"], descending=[True, False])
    )


def errors(lf: pl.LazyFrame) -> pl.LazyFrame:
    """ERROR events and non-zero GUEST_EXITs (seq, time_ns, vp, vtl, kind, text, exit_status): what went wrong."""
    return (
        lf.filter((pl.col("kind") == "ERROR") | ((pl.col("kind") == "GUEST_EXIT") & (pl.col("exit_status") != 0)))
        .select("seq", "time_ns", "vp", "vtl", _s("kind"), "text", "exit_status")
        .sort("seq")
    )


# ----------------------------------------------------------------------------- VTL transitions


def vtl_switches(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Raw VTL_SWITCH rows: seq, time_ns, vp, rip, from_vtl, to_vtl, reason, args."""
    return _kind(lf, "VTL_SWITCH").select("seq", "time_ns", "vp", "rip", "from_vtl", "to_vtl", _s("reason"), "args").sort("seq")


def vtl_transitions(lf: pl.LazyFrame) -> pl.LazyFrame:
    """One row per entry into a higher VTL, paired with the switch that left it again.

    An entry (``to_vtl > from_vtl``: reason call, interrupt or intercept) into VTL n on a VP
    is paired with the next switch on that VP that leaves VTL n downwards (normally
    reason "return"). Entries into VTL n cannot nest (VTL n is either running or
    suspended below a higher VTL), so "next exit of VTL n on this VP" is the match.
    Columns: vp, from_vtl, to_vtl, reason (entry reason), call_seq, call_time_ns, rip,
    args and arg0..arg3 (the caller's registers, null if not recorded), return_seq,
    return_time_ns, return_reason, latency_ns (return - entry; null if the VTL never
    returned before the trace ended).
    """
    sw = (
        vtl_switches(lf)
        .with_columns(
            pl.max_horizontal("from_vtl", "to_vtl").alias("_upper"),
            (pl.col("to_vtl") > pl.col("from_vtl")).alias("_entry"),
        )
        .with_columns(
            [pl.col(c).shift(-1).over(["vp", "_upper"]).alias(f"_next_{c}") for c in ("_entry", "seq", "time_ns", "reason")]
        )
    )
    returned = pl.col("_next__entry").eq(False)
    return sw.filter(pl.col("_entry")).select(
        "vp",
        "from_vtl",
        "to_vtl",
        "reason",
        pl.col("seq").alias("call_seq"),
        pl.col("time_ns").alias("call_time_ns"),
        "rip",
        "args",
        *[pl.col("args").list.get(i, null_on_oob=True).alias(f"arg{i}") for i in range(4)],
        pl.when(returned).then(pl.col("_next_seq")).alias("return_seq"),
        pl.when(returned).then(pl.col("_next_time_ns")).alias("return_time_ns"),
        pl.when(returned).then(pl.col("_next_reason")).alias("return_reason"),
        pl.when(returned).then(pl.col("_next_time_ns") - pl.col("time_ns")).alias("latency_ns"),
    )


def transition_latency(transitions: pl.LazyFrame, by: Sequence[str] = ("vp", "reason")) -> pl.LazyFrame:
    """Latency (entry → return) of VTL transitions per ``by`` (default: per VP and entry reason)."""
    return latency_stats(transitions, by)


def secure_calls(transitions: pl.LazyFrame, service_arg: int = 0, by: Sequence[str] = ()) -> pl.LazyFrame:
    """Secure calls (reason "call") grouped by service code = ``arg{service_arg}``, with latency stats.

    Which register carries the service code is the guest's convention; the default is the
    first captured argument (RCX). ``by`` adds grouping columns (e.g. ``("vp",)``).
    """
    return latency_stats(
        transitions.filter(pl.col("reason") == "call").with_columns(pl.col(f"arg{service_arg}").alias("service")),
        ["service", *by],
    )


# ----------------------------------------------------------------------------- residency


def vtl_stints(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Every stint: a stretch of time one VP spent in one VTL.

    Stints are delimited per VP by VP_START (begins the first stint, in the row's VTL),
    each VTL_SWITCH (ends one stint and begins one in ``to_vtl``) and VP_STOP (ends the
    last). A VP without VP_START begins at its first event (in the VTL its first switch
    leaves); a stint still open at the end of the trace ends at the VP's last event and
    has ``end_reason`` "trace-end". Columns: vp, vtl, start_seq, start_ns, end_ns,
    duration_ns, start_reason (VP_START → "start", first event → "trace-start", else the
    switch reason), end_reason (switch reason, "stop", or "trace-end").
    """
    bounds = (
        _kind(lf, "VP_START", "VTL_SWITCH", "VP_STOP")
        .select("seq", "time_ns", "vp", "vtl", _s("kind"), "to_vtl", "from_vtl", _s("reason"))
        .with_columns(pl.lit(1, pl.Int8).alias("_order"))
    )
    per_vp = lf.group_by("vp").agg(
        pl.col("seq").min().alias("_first_seq"),
        pl.col("time_ns").min().alias("_first_ns"),
        pl.col("time_ns").max().alias("_last_ns"),
        pl.col("vtl").min().alias("_any_vtl"),
    )
    first = pl.col("seq").arg_min()
    first_bound = bounds.group_by("vp").agg(pl.col("kind").get(first).alias("_k0"), pl.col("from_vtl").get(first).alias("_from0"))
    pseudo = (
        per_vp.join(first_bound, on="vp", how="left")
        .filter(pl.col("_k0").is_null() | (pl.col("_k0") != "VP_START"))
        .select(
            pl.col("_first_seq").alias("seq"),
            pl.col("_first_ns").alias("time_ns"),
            "vp",
            pl.coalesce("_from0", "_any_vtl").alias("vtl"),
            pl.lit("FIRST").alias("kind"),
            pl.lit(None, pl.UInt8).alias("to_vtl"),
            pl.lit(None, pl.UInt8).alias("from_vtl"),
            pl.lit(None, pl.String).alias("reason"),
            pl.lit(0, pl.Int8).alias("_order"),
        )
    )
    # Sorted by VP then seq, the next boundary on the same VP is the next row if its vp matches
    # (cheaper than three per-VP windows); the rows stay in that order, the order of the result.
    same_vp = pl.col("vp").shift(-1) == pl.col("vp")
    allb = (
        pl.concat([pseudo, bounds], how="vertical_relaxed")
        .sort(["vp", "seq", "_order"])
        .with_columns(
            pl.when(pl.col("kind") == "VTL_SWITCH")
            .then(pl.col("to_vtl"))
            .when(pl.col("kind").is_in(["VP_START", "FIRST"]))
            .then(pl.col("vtl"))
            .alias("_stint_vtl"),
            pl.when(same_vp).then(pl.col("time_ns").shift(-1)).alias("_next_ns"),
            pl.when(same_vp).then(pl.col("kind").shift(-1)).alias("_next_kind"),
            pl.when(same_vp).then(pl.col("reason").shift(-1)).alias("_next_reason"),
        )
        .join(per_vp.select("vp", "_last_ns"), on="vp", how="left", maintain_order="left")
    )
    start_reason = (
        pl.when(pl.col("kind") == "VP_START").then(pl.lit("start")).when(pl.col("kind") == "FIRST").then(pl.lit("trace-start")).otherwise(pl.col("reason"))
    )
    end_reason = (
        pl.when(pl.col("_next_kind").is_null())
        .then(pl.lit("trace-end"))
        .when(pl.col("_next_kind") == "VP_STOP")
        .then(pl.lit("stop"))
        .otherwise(pl.col("_next_reason"))
    )
    end_ns = pl.coalesce("_next_ns", "_last_ns")
    return (
        allb.filter(pl.col("_stint_vtl").is_not_null())
        .select(
            "vp",
            pl.col("_stint_vtl").cast(pl.UInt8).alias("vtl"),
            pl.col("seq").alias("start_seq"),
            pl.col("time_ns").alias("start_ns"),
            end_ns.alias("end_ns"),
            (end_ns - pl.col("time_ns")).alias("duration_ns"),
            start_reason.alias("start_reason"),
            end_reason.alias("end_reason"),
        )
    )


def vtl_residency(stints: pl.LazyFrame) -> pl.LazyFrame:
    """Time each VP spent in each VTL: vp, vtl, stints, total_ns, share (of the VP's time), mean_ns, max_ns."""
    return (
        stints.group_by("vp", "vtl")
        .agg(
            pl.len().alias("stints"),
            pl.col("duration_ns").sum().alias("total_ns"),
            pl.col("duration_ns").mean().alias("mean_ns"),
            pl.col("duration_ns").max().alias("max_ns"),
        )
        .with_columns((pl.col("total_ns") / pl.col("total_ns").sum().over("vp")).alias("share"))
        .select("vp", "vtl", "stints", "total_ns", "share", "mean_ns", "max_ns")
        .sort("vp", "vtl")
    )


# ----------------------------------------------------------------------------- hypercalls


def hypercalls(lf: pl.LazyFrame, bound_fallback: bool = True) -> pl.LazyFrame:
    """One row per hypercall with its latency.

    ``latency_ns`` is the recorded ``duration_ns`` (the VMM's service time). Where that is
    null (older traces, calls the VMM did not time) and ``bound_fallback`` is set, it is
    the time since the previous event on the same VP instead: the HYPERCALL event is
    stamped when the call completes, so that gap is an *upper bound* on the service
    time; ``latency_is_bound`` marks those rows. Costs one extra pass over (seq, vp,
    time_ns) of all events.
    Columns: seq, time_ns, vp, vtl, rip, code, name, status, status_name, fast,
    rep_count, reps_done, latency_ns, latency_is_bound.
    """
    if bound_fallback:
        # The previous event on the VP: one shift per VP in seq order over all events, before the
        # kind filter (an as-of join of the calls against every event cost 1.5x the whole table).
        src = lf.with_columns((pl.col("time_ns") - pl.col("time_ns").shift(1).over("vp", order_by="seq")).alias("_gap"))
    else:
        src = lf.with_columns(pl.lit(None, pl.Int64).alias("_gap"))
    calls = (
        _kind(src, "HYPERCALL")
        .select(
            "seq", "time_ns", "vp", "vtl", "rip", "code", _s("name"), "status", _s("status_name"), "fast",
            "rep_count", "reps_done", "duration_ns", "_gap",
        )  # fmt: skip
        .sort("seq")
    )
    return calls.select(
        "seq", "time_ns", "vp", "vtl", "rip", "code", "name", "status", "status_name", "fast", "rep_count", "reps_done",
        pl.coalesce("duration_ns", "_gap").alias("latency_ns"),
        (pl.col("duration_ns").is_null() & pl.col("_gap").is_not_null()).alias("latency_is_bound"),
    )  # fmt: skip


def hypercall_stats(calls: pl.LazyFrame, by: Sequence[str] = ("code", "name", "vtl")) -> pl.LazyFrame:
    """Per ``by`` (default code, name and calling VTL): count, failures, latency percentiles.

    ``failed`` counts calls whose status is set and not HV_STATUS_SUCCESS (0); VTL
    call/return and #UD'd calls have no status and never count as failed.
    """
    failed = (pl.col("status").is_not_null() & (pl.col("status") != 0)).sum().alias("failed")
    stats = latency_stats(calls, by)
    extra = calls.group_by(list(by)).agg(failed, pl.col("latency_is_bound").sum().alias("bounded"))
    return stats.join(extra, on=list(by), how="left", nulls_equal=True).sort(["count", *by], descending=[True] + [False] * len(by))


def hypercall_status(calls: pl.LazyFrame) -> pl.LazyFrame:
    """Status distribution: code, name, status, status_name, count (status null = no result written)."""
    return calls.group_by("code", "name", "status", "status_name").agg(pl.len().alias("count")).sort(
        ["code", "status"], nulls_last=True
    )


# ----------------------------------------------------------------------------- intercepts


def intercepts(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Secure memory intercepts: seq, time_ns, vp, vtl, rip, access, gpa, gva, page (= gpa >> 12)."""
    return (
        _kind(lf, "INTERCEPT")
        .select("seq", "time_ns", "vp", "vtl", "rip", _s("access"), "gpa", "gva")
        .with_columns((pl.col("gpa") // PAGE_SIZE).alias("page"))
        .sort("seq")
    )


def intercept_stats(icpts: pl.LazyFrame, by: Sequence[str] = ("page", "access")) -> pl.LazyFrame:
    """Intercepts grouped by ``by`` (page and access type by default; ``("rip", "access")`` for
    the faulting code): count, distinct RIPs, distinct pages, first and last time."""
    return (
        icpts.group_by(list(by))
        .agg(
            pl.len().alias("count"),
            pl.col("rip").n_unique().alias("rips"),
            pl.col("page").n_unique().alias("pages"),
            pl.col("time_ns").min().alias("first_ns"),
            pl.col("time_ns").max().alias("last_ns"),
        )
        .sort(["count", *by], descending=[True] + [False] * len(by))
    )


# ----------------------------------------------------------------------------- protections


def protection_changes(lf: pl.LazyFrame) -> pl.LazyFrame:
    """PROTECTION events: seq, time_ns, vp, vtl (the VTL that changed it), rip, target_vtl,
    gpa_start, gpa_end (exclusive), pages, old_mask (as recorded), new_mask."""
    return (
        _kind(lf, "PROTECTION")
        .select("seq", "time_ns", "vp", "vtl", "rip", "target_vtl", "gpa_start", "pages", "old_mask", "new_mask")
        .with_columns((pl.col("gpa_start") + (pl.col("pages") * PAGE_SIZE)).alias("gpa_end"))
        .select("seq", "time_ns", "vp", "vtl", "rip", "target_vtl", "gpa_start", "gpa_end", "pages", "old_mask", "new_mask")
        .sort("seq")
    )


def protection_pages(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Per-page protection history (the protection map over time), one row per page per change.

    Columns: target_vtl, page (GPA >> 12), seq, time_ns, new_mask, prev_mask (the mask this
    page had before, derived from earlier changes; null before its first change, when
    it had whatever the VTL's default was), until_ns (time of the page's next change,
    null if none). Multi-page changes are split into their pages.
    """
    return (
        protection_changes(lf)
        .select(
            "target_vtl",
            pl.int_ranges(pl.col("gpa_start") // PAGE_SIZE, (pl.col("gpa_start") // PAGE_SIZE) + pl.col("pages"), dtype=pl.UInt64).alias("page"),
            "seq",
            "time_ns",
            "new_mask",
        )
        .explode("page")
        .sort(["target_vtl", "page", "seq"])
        .with_columns(
            pl.col("new_mask").shift(1).over(["target_vtl", "page"]).alias("prev_mask"),
            pl.col("time_ns").shift(-1).over(["target_vtl", "page"]).alias("until_ns"),
        )
        .select("target_vtl", "page", "seq", "time_ns", "new_mask", "prev_mask", "until_ns")
    )


def protection_map(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Pages per mask over time: after change ``seq``, ``pages`` pages of ``target_vtl``'s view have ``mask``.

    A step function per (target_vtl, mask), one row each time a change moves pages into or
    out of that mask. Only pages some change touched are counted (untouched pages keep
    the default, full access, and are not in the trace). Columns: seq, time_ns,
    target_vtl, mask, delta, pages.
    """
    pp = protection_pages(lf)
    plus = pp.select("seq", "time_ns", "target_vtl", pl.col("new_mask").alias("mask"), pl.lit(1, pl.Int64).alias("d"))
    minus = pp.filter(pl.col("prev_mask").is_not_null()).select(
        "seq", "time_ns", "target_vtl", pl.col("prev_mask").alias("mask"), pl.lit(-1, pl.Int64).alias("d")
    )
    return (
        pl.concat([plus, minus])
        .group_by("seq", "time_ns", "target_vtl", "mask")
        .agg(pl.col("d").sum().alias("delta"))
        .filter(pl.col("delta") != 0)
        .sort(["target_vtl", "mask", "seq"])
        .with_columns(pl.col("delta").cum_sum().over(["target_vtl", "mask"]).alias("pages"))
        .sort(["seq", "target_vtl", "mask"])
    )


# ----------------------------------------------------------------------------- interrupts and exits


def interrupts(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Interrupts injected per vector, VTL and source: vector, vtl, source, count, first_ns, last_ns."""
    return (
        _kind(lf, "INTERRUPT")
        .select("time_ns", "vtl", "vector", _s("source"))
        .group_by("vector", "vtl", "source")
        .agg(pl.len().alias("count"), pl.col("time_ns").min().alias("first_ns"), pl.col("time_ns").max().alias("last_ns"))
        .sort(["vector", "vtl", "source"], nulls_last=True)
    )


def msr_mix(lf: pl.LazyFrame) -> pl.LazyFrame:
    """MSR accesses per MSR: msr, name (Hyper-V synthetic MSRs by TLFS name, else null), synthetic,
    count, reads, writes, faults (most accessed first)."""
    names = pl.DataFrame(
        {"msr": [int(m) for m in HvMsr], "name": [m.name.removeprefix("HV_X64_MSR_") for m in HvMsr]},
        schema={"msr": pl.UInt32, "name": pl.String},
    ).lazy()
    return (
        _kind(lf, "MSR")
        .select(pl.col("msr").cast(pl.UInt32), "is_write", "fault")
        .group_by("msr")
        .agg(
            (~pl.col("is_write")).sum().alias("reads"),
            pl.col("is_write").sum().alias("writes"),
            pl.col("fault").fill_null(False).sum().alias("faults"),
        )
        .join(names, on="msr", how="left")
        .with_columns(pl.col("msr").is_between(HV_X64_MSR_RANGE_FIRST, HV_X64_MSR_RANGE_LAST).alias("synthetic"))
        .with_columns((pl.col("reads") + pl.col("writes")).alias("count"))
        .sort(["count", "msr"], descending=[True, False])
        .select("msr", "name", "synthetic", "count", "reads", "writes", "faults")
    )


def exits(lf: pl.LazyFrame) -> pl.LazyFrame:
    """VM exits per reason and VTL: exit_reason, vtl, count (most frequent first)."""
    return (
        _kind(lf, "EXIT")
        .select("vtl", _s("exit_reason"))
        .group_by("exit_reason", "vtl")
        .agg(pl.len().alias("count"))
        .sort(["count", "exit_reason", "vtl"], descending=[True, False, False], nulls_last=True)
    )
