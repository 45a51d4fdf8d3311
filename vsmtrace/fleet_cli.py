"""``vsmtrace fleet``: add traces to a fleet dataset, list it, report on it, diff two groups of it.

Its own module (registered in vsmtrace/cli.py with one line) so the main CLI stays small;
it imports nothing from vsmtrace.cli. Heavy libraries (Polars, Dask) load inside the
commands, so ``vsmtrace --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

__all__ = ["fleet"]


class FleetUsageError(click.ClickException):
    """One line on stderr and exit status 2, like every other vsmtrace error."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"vsmtrace: error: {self.format_message()}", err=True)


def _fail(message: str) -> NoReturn:
    raise FleetUsageError(message)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def _errors(what: str) -> Iterator[None]:
    """Turn what a bad dataset, trace, filter or cluster address raises into one line."""
    import polars as pl
    import pyarrow as pa

    from vsmtrace.analysis.fleet.dataset import FleetError

    try:
        yield
    except FleetError as exc:
        _fail(str(exc))
    except (pa.ArrowException, pl.exceptions.PolarsError, OSError, ValueError, TimeoutError) as exc:
        _fail(f"{what}: {_first_line(exc)}")


def _progress(enabled: bool | None) -> Callable[[int, int], None] | None:
    """A progress callback drawing a tqdm bar on a terminal (stderr), or None."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, unit="trace", file=sys.stderr, leave=False)
        bar["bar"].update(done - bar["bar"].n)
        if done == total:
            bar.pop("bar").close()

    return update


def _cluster_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--scheduler", metavar="ADDRESS", help="Run the per-trace work on this Dask scheduler (tcp://HOST:PORT).")(f)
    f = click.option("--workers", type=click.IntRange(1, 256), help="Run it on a local Dask cluster of N worker processes.")(f)
    f = click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")(f)
    return f


def _check_cluster(scheduler: str | None, workers: int | None) -> None:
    if scheduler and workers:
        _fail("--scheduler and --workers exclude each other (--workers starts a local cluster)")
    if scheduler or workers:
        try:
            import distributed  # noqa: F401
        except ImportError:
            _fail("--scheduler/--workers need Dask: pip install 'vsmtrace[fleet]'")


@click.group()
def fleet() -> None:
    """Analyse many traces as one dataset (Hive-partitioned Parquet; see docs/fleet.md)."""


@fleet.command("add")
@click.argument("dataset", metavar="DATASET")
@click.argument("traces", metavar="TRACE...", nargs=-1, required=True, type=click.Path(path_type=Path))
def add(dataset: str, traces: tuple[Path, ...]) -> None:
    """Add TRACE files to DATASET (created if missing).

    A trace already in the dataset is skipped; each trace is committed atomically.
    """
    from vsmtrace.analysis.fleet.dataset import add_traces

    added = present = 0
    with _errors(f"cannot add to {dataset}"):
        for trace in traces:  # one at a time, so what was added before a bad trace is reported
            for r in add_traces(dataset, [trace]):
                if r.added:
                    added += 1
                    click.echo(f"added   {r.trace}  {r.events:>10} events  {r.source}")
                else:
                    present += 1
                    click.echo(f"present {r.trace}  {r.events:>10} events  {r.source}")
    click.echo(f"{added} trace(s) added, {present} already in {dataset}")


@fleet.command("info")
@click.argument("dataset", metavar="DATASET")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: traces and counts.")
def info(dataset: str, as_json: bool) -> None:
    """List DATASET's traces and counts.

    Also says whether an interrupted add left anything behind (never part of the dataset).
    """
    import polars as pl

    from vsmtrace.analysis.fleet.compute import traces_frame
    from vsmtrace.analysis.fleet.dataset import Dataset

    with _errors(f"cannot read {dataset}"):
        ds = Dataset(dataset)
        entries = ds.traces()
        leftovers, orphans = ds.leftovers(), ds.orphans()
    df = traces_frame(entries)
    if as_json:
        click.echo(json.dumps({"dataset": dataset, "traces": [e.row() for e in entries], "events": int(df["events"].sum()) if df.height else 0,
                               "staging_leftovers": leftovers, "uncommitted": orphans}, default=str))  # fmt: skip
        return
    total = int(df["events"].sum()) if df.height else 0
    click.echo(f"fleet {dataset}: {len(entries)} traces, {total} events")
    if df.height:
        for key in ("config", "date"):
            per = df.group_by(key).agg(pl.len().alias("traces"), pl.col("events").sum().alias("events")).sort(key)
            click.echo(f"by {key}: " + ", ".join(f"{r[key]} ({r['traces']} traces, {r['events']} events)" for r in per.iter_rows(named=True)))
        click.echo("")
        click.echo(f"  {'trace':<16}  {'start (UTC)':<19}  {'events':>10}  {'state':<9}  {'config':<12}  guest")
        for e in sorted(entries, key=lambda e: (str(e.meta.get("start_time")), e.trace)):
            start = (e.meta.get("start_time") or "")[:19].replace("T", " ")
            state = "recovered" if e.meta.get("recovered") else "sealed" if e.meta.get("sealed") else "unsealed"
            click.echo(f"  {e.trace:<16}  {start:<19}  {e.events:>10}  {state:<9}  {e.config:<12}  {e.meta.get('guest_name') or '-'}")
    if leftovers:
        click.echo(f"\n{len(leftovers)} staging directory(ies) of an add that did not finish (not part of the dataset; "
                   "the next `fleet add` removes those whose process is gone)")  # fmt: skip
    if orphans:
        click.echo(f"\n{len(orphans)} trace directory(ies) without commit marker (an interrupted add): ignored by every fleet command")


@fleet.command("report")
@click.argument("dataset", metavar="DATASET")
@click.option("--by", "by", metavar="COLUMN", help="Group traces by this metadata column (config, date, guest_name, guest_sha256, vm_vps, ...).")
@click.option("--where", "where", metavar="FILTER", help="Only traces matching FILTER (COL=V[,COL>=V...]).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("fleet-report"), show_default=True,
              help="Directory for the figures.")
@click.option("--format", "formats", type=click.Choice(["png", "svg"]), multiple=True, default=("png",), show_default=True,
              help="Figure format (repeatable).")
@click.option("--no-figures", is_flag=True, help="Print the text report only.")
@_cluster_options
def report(dataset: str, by: str | None, where: str | None, out_dir: Path, formats: tuple[str, ...], no_figures: bool,
           scheduler: str | None, workers: int | None, progress: bool | None) -> None:  # fmt: skip
    """Tables of all traces, per group of --by, with figures.

    Figures: VTL-call latency per group (merged sketches), per-trace p99 by group, and a
    trend over start time.
    """
    from vsmtrace.analysis.fleet.compute import fleet_tables
    from vsmtrace.analysis.fleet.report import format_fleet_report, write_fleet_figures

    _check_cluster(scheduler, workers)
    with _errors(f"cannot report on {dataset}"):
        ft = fleet_tables(dataset, by=by, where=where, scheduler=scheduler, workers=workers, progress=_progress(progress))
        text = format_fleet_report(ft, dataset)
    paths = []
    if not no_figures:
        with _errors(f"cannot write figures to {out_dir}"):
            paths = write_fleet_figures(ft, out_dir, formats)
    click.echo(text, nl=False)
    if paths:
        click.echo(f"\nfigures in {out_dir}: {', '.join(p.name for p in paths)}")


@fleet.command("diff")
@click.argument("dataset", metavar="DATASET")
@click.option("--a", "filter_a", required=True, metavar="FILTER", help="Traces of side A (COL=V[,COL2>=V2...]).")
@click.option("--b", "filter_b", required=True, metavar="FILTER", help="Traces of side B.")
@click.option("--threshold", type=click.FloatRange(0, None), default=0.1, show_default=True, help="Relative change that counts as moved.")
@_cluster_options
def diff(dataset: str, filter_a: str, filter_b: str, threshold: float, scheduler: str | None, workers: int | None,
         progress: bool | None) -> None:  # fmt: skip
    """What moved between the traces of --a and of --b.

    Counts per trace and latency percentiles, side by side; for two boots of one guest
    image, the first diverging event.
    """
    from vsmtrace.analysis.fleet.diff import diff_fleet, format_fleet_diff

    _check_cluster(scheduler, workers)
    with _errors(f"cannot compare in {dataset}"):
        d = diff_fleet(dataset, filter_a, filter_b, threshold=threshold, scheduler=scheduler, workers=workers, progress=_progress(progress))
        text = format_fleet_diff(d)
    click.echo(text, nl=False)
