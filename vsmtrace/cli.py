"""The ``vsmtrace`` command line: the only module that wires vmm, recorder, replayer and analysis."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import NoReturn

import click

from vsmtrace import __version__
from vsmtrace.guest_cli import guest
from vsmtrace.notebooks_cli import notebooks


class UserError(click.ClickException):
    """A one-line error for the user; exit status 2, never a traceback."""

    exit_code = 2

    def show(self, file=None) -> None:  # type: ignore[no-untyped-def]
        click.echo(f"vsmtrace: error: {self.format_message()}", err=True)


def fail(message: str) -> NoReturn:
    raise UserError(message)


class CliGroup(click.Group):
    """Turns click's usage errors (bad option values, missing arguments) into one `vsmtrace: error:` line.

    Click would print the usage text and a hint; users and scripts get the same
    one-line form, status 2, as every other vsmtrace error instead.
    """

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[no-untyped-def]
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise UserError(exc.format_message()) from None

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise UserError(exc.format_message()) from None


@click.group(cls=CliGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vsmtrace")
@click.option("-v", "--verbose", is_flag=True, help="Log what the VMM does (warnings are always shown).")
def main(verbose: bool) -> None:
    """Record, replay and analyse Hyper-V VSM behaviour of a guest under KVM."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="vsmtrace: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def hyperv_policy(enabled: bool, disable: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """The Hyper-V policy the run options ask for (one-line error for an unknown feature)."""
    from vsmtrace.vmm.hyperv.cpuid import HypervPolicy

    if not enabled:
        return HypervPolicy.disabled()
    if "list" in disable:
        click.echo("Hyper-V features that --hv-disable can hide:")
        for name in sorted(HypervPolicy.SWITCHES):
            click.echo(f"  {name}")
        sys.exit(0)
    try:
        return HypervPolicy.from_switches(list(disable))
    except ValueError as exc:
        fail(str(exc))


@main.command()
@click.argument("kernel", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--smp", type=click.IntRange(1, 64), default=1, show_default=True, help="Number of virtual processors.")
@click.option("--memory", "memory_mib", type=click.IntRange(2, None), default=256, show_default=True, help="Guest RAM in MiB.")
@click.option("--append", "cmdline", default="", help="Kernel command line (Multiboot).")
@click.option("--initrd", "initrds", multiple=True, type=click.Path(dir_okay=False, path_type=Path), help="A Multiboot module (repeatable).")
@click.option("--serial", "serial_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the serial console here instead of stdout.")
@click.option("--serial-input", type=click.Choice(["auto", "stdin", "none"]), default="auto", show_default=True, help="Feed stdin to the UART: auto = when stdin is a terminal.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), help="Stop the guest after this many seconds (exit status 124).")
@click.option("--hyperv/--no-hyperv", default=True, show_default=True, help="Offer the Hyper-V interface (CPUID 0x40000000+, synthetic MSRs, hypercalls).")
@click.option("--record", "record_path", type=click.Path(dir_okay=False, path_type=Path), help="Record every event into this Arrow trace.")
@click.option("--vsm/--no-vsm", default=True, show_default=True, help="Offer Virtual Secure Mode (VTL0 and VTL1; needs --hyperv).")
@click.option("--hv-disable", "hv_disable", multiple=True, metavar="FEATURE", help="Hide one Hyper-V feature (repeatable; e.g. xmm-input, stimers, synic, pv-ipi). `--hv-disable list` lists them.")
@click.option("--deterministic", is_flag=True, help="Virtual time advanced at exits, timers fired at exits, every exit recorded: a trace `vsmtrace replay --reexecute` can re-run (needs --smp 1).")
@click.option("--kvm-device", "kvm_device", default="/dev/kvm", envvar="VSMTRACE_KVM_DEVICE", hidden=True, help="KVM device node (tests point it elsewhere).")
def run(
    kernel: Path,
    smp: int,
    memory_mib: int,
    cmdline: str,
    initrds: tuple[Path, ...],
    serial_path: Path | None,
    serial_input: str,
    timeout_s: float | None,
    hyperv: bool,
    vsm: bool,
    hv_disable: tuple[str, ...],
    kvm_device: str,
    record_path: Path | None,
    deterministic: bool = False,
) -> None:
    """Boot KERNEL (Multiboot v1 or raw 64-bit ELF) like `qemu -kernel`, and exit with the guest's status."""
    from vsmtrace.vmm.config import MachineConfig

    # Ctrl-C must stop the guest even when our parent started us with SIGINT ignored
    # (a background job of a non-interactive shell): Machine.run turns it into status 130.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    policy = hyperv_policy(hyperv, hv_disable)
    vsm = vsm and hyperv
    if vsm:
        policy = policy.with_vsm()
    if not kernel.exists():
        fail(f"kernel {kernel} does not exist")
    if deterministic and smp != 1:
        fail(f"--deterministic needs --smp 1 (got {smp}): with several VPs, their interleaving is not decided at exits")
    if deterministic:
        kernel = kernel.resolve()  # the loader puts the path in the command line: re-execution must see the same bytes
    for path in initrds:
        if not path.exists():
            fail(f"module {path} does not exist")
    serial_out = sys.stdout.buffer
    if serial_path is not None:
        try:
            serial_out = open(serial_path, "wb")  # noqa: SIM115 - closed at exit
        except OSError as exc:
            fail(f"cannot write serial output to {serial_path}: {exc.strerror}")
    config = MachineConfig(
        kernel=kernel,
        smp=smp,
        memory_mib=memory_mib,
        cmdline=cmdline,
        initrds=list(initrds),
        serial_out=serial_out,
        serial_in_interactive=serial_input == "stdin" or (serial_input == "auto" and sys.stdin is not None and sys.stdin.isatty()),
        timeout_s=timeout_s,
        hyperv=policy,
        vtls=2 if vsm else 1,
        kvm_device=kvm_device,
        deterministic=deterministic,
    )
    from vsmtrace.session import SetupError, run_machine

    try:
        status, message = run_machine(config, record_path)
    except SetupError as exc:
        fail(str(exc))
    if message and status != 0:
        click.echo(f"vsmtrace: {message}", err=True)
    serial_out.flush()
    sys.exit(status)


@main.command()
@click.argument("trace_path", metavar="TRACE", type=click.Path(path_type=Path))
def info(trace_path: Path) -> None:
    """Summarise TRACE: metadata, events per kind, time span, size, sealed or recovered."""
    import pyarrow as pa

    from vsmtrace.recorder.errors import TraceError
    from vsmtrace.recorder.info import format_info, summarize

    try:
        summary = summarize(trace_path)
    except TraceError as exc:
        fail(str(exc))
    except (pa.ArrowException, OSError, ValueError) as exc:  # never a pyarrow traceback
        fail(f"{trace_path}: unreadable trace: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    click.echo(format_info(summary))


# ----------------------------------------------------------------------------- analysis (report, export, diff)


def _load_trace(trace_path: Path):  # type: ignore[no-untyped-def]
    """Open TRACE for analysis; any reason it is not a readable trace is one user error line."""
    import pyarrow as pa

    from vsmtrace.analysis import load
    from vsmtrace.recorder.errors import TraceError

    try:
        return load(trace_path)
    except TraceError as exc:
        fail(str(exc))
    except (pa.ArrowException, OSError, ValueError) as exc:
        fail(f"{trace_path}: unreadable trace: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def _analysis_errors():  # type: ignore[no-untyped-def]
    """Exceptions a damaged trace can raise once queries run (reported as one line, not a traceback)."""
    import polars as pl
    import pyarrow as pa

    return (pa.ArrowException, OSError, ValueError, pl.exceptions.PolarsError)


@main.command()
@click.argument("trace_path", metavar="TRACE", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("report"), show_default=True,
              help="Directory for the figures.")
@click.option("--format", "formats", type=click.Choice(["png", "svg"]), multiple=True, default=("png",), show_default=True,
              help="Figure format (repeatable).")
@click.option("--no-figures", is_flag=True, help="Print the text summary only.")
def report(trace_path: Path, out_dir: Path, formats: tuple[str, ...], no_figures: bool) -> None:
    """Print a summary of TRACE (events, VTL transitions, residency, hypercalls, intercepts, errors) and write figures."""
    from vsmtrace.analysis.figures import write_figures
    from vsmtrace.analysis.report import format_report, summarize

    lf = _load_trace(trace_path)
    try:
        text = format_report(summarize(lf), str(trace_path))
        paths = [] if no_figures else write_figures(lf, out_dir, formats)
    except _analysis_errors() as exc:
        fail(f"{trace_path}: cannot analyse: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    click.echo(text, nl=False)
    if paths:
        click.echo(f"\nfigures in {out_dir}: {', '.join(p.name for p in paths)}")


@main.command()
@click.argument("trace_path", metavar="TRACE", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["chrome"]), default="chrome", show_default=True, help="Output format.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path), help="Output file (default: TRACE.json).")
def export(trace_path: Path, fmt: str, output: Path | None) -> None:
    """Export TRACE as Chrome trace-event JSON (Perfetto, chrome://tracing): a track per VP, a slice per VTL stint."""
    from vsmtrace.analysis.chrome import export_chrome

    lf = _load_trace(trace_path)
    out = output or trace_path.with_name(trace_path.name + ".json")
    try:
        n = export_chrome(lf, out)
    except _analysis_errors() as exc:
        fail(f"{trace_path}: cannot export to {out}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    click.echo(f"wrote {n} trace events to {out}")


@main.command()
@click.argument("trace_a", metavar="A", type=click.Path(path_type=Path))
@click.argument("trace_b", metavar="B", type=click.Path(path_type=Path))
@click.option("--ignore", "ignore", multiple=True, help="Also ignore this column when looking for the divergence (repeatable).")
def diff(trace_a: Path, trace_b: Path, ignore: tuple[str, ...]) -> None:
    """Compare traces A and B (counts, latencies) and name the first event where they diverge; exit 1 if they do."""
    from vsmtrace.analysis.diff import NONDETERMINISTIC, diff_traces, format_diff

    la, lb = _load_trace(trace_a), _load_trace(trace_b)
    try:
        d = diff_traces(la, lb, ignore=(*NONDETERMINISTIC, *ignore))
    except _analysis_errors() as exc:
        fail(f"cannot compare {trace_a} and {trace_b}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    click.echo(format_diff(d, str(trace_a), str(trace_b)), nl=False)
    sys.exit(0 if d.divergence is None else 1)


@main.command()
@click.argument("trace_path", metavar="TRACE", type=click.Path(path_type=Path))
@click.option("--state", "state_seq", type=click.IntRange(min=0), metavar="SEQ", help="Print the reconstructed state right after event SEQ.")
@click.option("--json", "as_json", is_flag=True, help="With --state: print the state as JSON.")
@click.option("--break-at", type=click.IntRange(min=0), metavar="SEQ", help="Stop in the debugger (pdb) before the emulation entry that produced event SEQ.")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar (default: when stderr is a terminal).")
@click.option("--reexecute", is_flag=True, help="Re-run the guest itself under KVM from its image, feeding recorded inputs back at each exit and checking every exit (needs a --deterministic trace).")
@click.option("--dump-memory", "dump_specs", multiple=True, metavar="SEQ:GPA:LEN[:FILE]", help="With --reexecute: write LEN bytes of guest memory at GPA right after event SEQ (repeatable).")
def replay(
    trace_path: Path,
    state_seq: int | None,
    as_json: bool,
    break_at: int | None,
    progress: bool | None,
    reexecute: bool = False,
    dump_specs: tuple[str, ...] = (),
) -> None:
    """Replay TRACE's Hyper-V/VSM emulation offline and verify every output bit for bit.

    With --reexecute, re-run the guest under KVM instead (see docs/reexecute.md).
    Exit status 0 when the replay reproduces the trace, 1 on a divergence (the
    first differing event and field are printed), 2 when the trace cannot be replayed.
    """
    if reexecute:
        if state_seq is not None or break_at is not None:
            fail("--state and --break-at belong to VMM replay, not --reexecute (use --dump-memory)")
        reexecute_trace(trace_path, dump_specs)
        return
    if dump_specs:
        fail("--dump-memory needs --reexecute")
    from vsmtrace.replayer.engine import VmmReplayer, format_report, to_json
    from vsmtrace.replayer.errors import Divergence, ReplayError

    try:
        replayer = VmmReplayer(trace_path, break_at=break_at)
    except ReplayError as exc:
        fail(str(exc))
    if progress is None:
        progress = sys.stderr.isatty()
    if state_seq is not None:
        try:
            state = replayer.state_at(state_seq)
        except Divergence as div:
            click.echo(f"vsmtrace: replay diverged before event {state_seq}: {div}", err=True)
            sys.exit(1)
        except ReplayError as exc:
            fail(str(exc))
        click.echo(to_json(state.to_dict()) if as_json else state.format_text())
        return
    try:
        report = replayer.run(progress=progress)
    except ReplayError as exc:
        fail(str(exc))
    click.echo(format_report(report))
    sys.exit(0 if report.divergence is None else 1)


def reexecute_trace(trace_path: Path, dump_specs: tuple[str, ...]) -> NoReturn:
    """``vsmtrace replay --reexecute``: one-line errors for traces that cannot be re-executed."""
    from vsmtrace.replayer.errors import ReplayError
    from vsmtrace.replayer.reexecute import MemoryDump, Reexecutor, format_report
    from vsmtrace.vmm.kvm.system import KvmError, KvmUnavailable
    from vsmtrace.vmm.loader.elf import LoaderError

    try:
        dumps = [MemoryDump.parse(spec, Path.cwd()) for spec in dump_specs]
    except ValueError as exc:
        fail(str(exc))
    try:
        report = Reexecutor(trace_path, dumps=dumps).run()
    except (ReplayError, KvmUnavailable, LoaderError) as exc:
        fail(str(exc))
    except KvmError as exc:
        fail(f"KVM refused to set up the guest: {exc}")
    except OSError as exc:
        fail(f"cannot re-execute {trace_path}: {exc}")
    click.echo(format_report(report))
    sys.exit(0 if report.divergence is None else 1)


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("vsmtrace-demo"), show_default=True, help="Directory for the trace, report and figures.")
@click.option("--quiet", is_flag=True, help="Do not echo the guest's serial console.")
def demo(out_dir: Path, quiet: bool) -> None:
    """Build the bundled VBS-style guest, record it on 2 VPs, replay it, and write the report."""
    from vsmtrace.demo import DemoError, print_summary, run_demo

    try:
        result = run_demo(out_dir, echo=not quiet)
    except DemoError as exc:
        fail(str(exc))
    print_summary(result)


main.add_command(guest)
main.add_command(notebooks)

if __name__ == "__main__":
    main()
