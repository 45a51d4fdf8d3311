"""The ``vsmtrace`` command line: the only module that wires vmm, recorder, replayer and analysis."""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import click

from vsmtrace import fleet_cli
from vsmtrace.guest_cli import guest
from vsmtrace.notebooks_cli import notebooks

EXIT_USAGE = 2  # bad input: one `vsmtrace: error:` line
EXIT_INTERNAL = 6
EXIT_INTERRUPTED_STATUS = 130  # vsmtrace.interrupts.EXIT_INTERRUPTED  # a vsmtrace bug (same status `run` gives a VMM internal error)
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of our output went away (`vsmtrace info T | head -1`)

log = logging.getLogger("vsmtrace")


class UserError(click.ClickException):
    """A one-line error for the user; exit status 2, never a traceback."""

    exit_code = EXIT_USAGE

    def show(self, file=None) -> None:  # type: ignore[no-untyped-def]
        click.echo(f"vsmtrace: error: {self.format_message()}", err=True)


def fail(message: str) -> NoReturn:
    raise UserError(message)


class Interrupted(Exception):
    """Ctrl-C reached a command: `vsmtrace: interrupted`, status 130 (an Exception, so click leaves it alone)."""


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        configure_logging(True)


def verbose_option() -> click.Option:
    """``-v/--verbose`` as an option of every command, so `vsmtrace run K -v` works like `vsmtrace -v run K`."""
    return click.Option(
        ["-v", "--verbose"], is_flag=True, expose_value=False, is_eager=True, callback=_set_verbose,
        help="Log what the VMM does: VP starts and stops, VTL switches, protection changes, intercepts (rate-limited).",
    )  # fmt: skip


def configure_logging(verbose: bool) -> None:
    """Warnings always; with -v every vsmtrace debug message too (third-party libraries stay at warning)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="vsmtrace: %(levelname)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.DEBUG if verbose else logging.NOTSET)


def _with_verbose(cmd: click.Command) -> click.Command:
    """Give ``cmd`` (and, for a group, every command in it) the -v option, once."""
    if not any(p.name == "verbose" for p in cmd.params):
        cmd.params.append(verbose_option())
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            _with_verbose(sub)
    return cmd


def _interrupted() -> int:
    """Ctrl-C stopped the command: SIGINT ignored from now on, one line, status 130."""
    from vsmtrace import interrupts

    interrupts.quiet()
    click.echo("vsmtrace: interrupted", err=True)
    return interrupts.EXIT_INTERRUPTED


class CliGroup(click.Group):
    """The top-level group: the one place that decides how every command fails and stops.

    Whatever command runs (including those other modules register), the user sees
    one `vsmtrace: ...` line and a meaningful status, never a traceback:
    click's usage errors become `vsmtrace: error:` lines (status 2); Ctrl-C is
    `vsmtrace: interrupted` (status 130, see ``vsmtrace.interrupts``); a closed
    output pipe ends quietly (141); an unexpected ``OSError`` names the file
    (status 2); anything else is a vsmtrace bug: one line and status 6 (the
    traceback with -v).
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[no-untyped-def,override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        import signal

        from vsmtrace import interrupts

        # Called with explicit args (tests, a program embedding the CLI): give the caller its
        # Ctrl-C handling back afterwards. The `vsmtrace` script keeps ours until exit.
        previous = signal.getsignal(signal.SIGINT) if args is not None else None
        interrupts.install()
        status = 0
        try:
            try:
                rv = super().main(args, prog_name or "vsmtrace", complete_var, standalone_mode=False, **extra)
                status = rv if isinstance(rv, int) else 0
            finally:
                _flush_stdout()
        except SystemExit as exc:
            status = _exit_status(exc.code)
        except click.ClickException as exc:
            exc.show()
            status = exc.exit_code
        except (Interrupted, click.Abort, KeyboardInterrupt, EOFError):
            status = _interrupted()
        except BrokenPipeError:
            status = _broken_pipe()
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                status = _broken_pipe()
            else:
                click.echo(f"vsmtrace: error: {describe_os_error(exc)}", err=True)
                status = EXIT_USAGE
        except Exception as exc:  # a vsmtrace bug: still one line, and the details with -v
            if interrupts.interrupted(exc):  # Ctrl-C, which Python turned into another exception on its way
                log.debug("interrupted; the KeyboardInterrupt came out as", exc_info=True)
                status = _interrupted()
            else:
                log.debug("internal error", exc_info=True)
                click.echo(f"vsmtrace: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)", err=True)
                status = EXIT_INTERNAL
        if previous is not None:
            interrupts.reset()
            signal.signal(signal.SIGINT, previous)
        else:
            # The command is over; the interpreter's teardown puts SIG_DFL back, and a Ctrl-C
            # during it would turn the status into "killed by SIGINT". Nothing is left to stop.
            interrupts.quiet()
        sys.exit(status)

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[no-untyped-def]
        if not args and parent is None:  # bare `vsmtrace`: the help, as `vsmtrace --help` prints it
            args = ["--help"]
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise UserError(exc.format_message()) from None
        except KeyboardInterrupt:
            raise Interrupted from None

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        from vsmtrace import interrupts

        try:
            interrupts.raise_swallowed()  # a Ctrl-C during the imports that Python swallowed
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise UserError(exc.format_message()) from None
        except KeyboardInterrupt:  # before click turns it into Abort (and prints an empty line)
            raise Interrupted from None

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        return None if cmd is None else _with_verbose(cmd)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list with each command's whole first sentence (click cuts it at 45 characters)."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is None or cmd.hidden:
                continue
            rows.append((name, cmd.short_help or first_sentence(cmd.help or "")))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def first_sentence(text: str) -> str:
    """The first sentence of a help text (up to the first '. ' or the end of its first paragraph)."""
    para = " ".join(text.strip().split("\n\n")[0].split())
    cut = para.find(". ")
    return para if cut < 0 else para[: cut + 1]


def describe_os_error(exc: OSError) -> str:
    """``PATH: reason`` for an OSError, in words."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{exc.filename}: {reason}" if exc.filename else reason


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError):
        pass


def _broken_pipe() -> int:
    """Whoever read our output is gone: say nothing more (Python would complain at exit otherwise)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    click.echo(str(code), err=True)
    return 1


@click.group(cls=CliGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vsmtrace", prog_name="vsmtrace")
@click.option("-v", "--verbose", is_flag=True, help="Log what the VMM does (warnings are always shown); also accepted after the command.")
def main(verbose: bool) -> None:
    """Record, replay and analyse Hyper-V VSM behaviour of a guest under KVM.

    Every command prints one `vsmtrace: error: ...` line and exits with status 2
    on bad input, and exits with status 130 on Ctrl-C. `vsmtrace COMMAND --help`
    describes each command.
    """
    configure_logging(verbose)


def list_hv_features() -> NoReturn:
    """``--hv-disable list``: the feature names, no kernel needed."""
    from vsmtrace.vmm.hyperv.cpuid import HypervPolicy

    click.echo("Hyper-V features that --hv-disable can hide:")
    for name in sorted(HypervPolicy.SWITCHES):
        click.echo(f"  {name}")
    sys.exit(0)


def hyperv_policy(enabled: bool, disable: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """The Hyper-V policy the run options ask for (one-line error for an unknown feature)."""
    from vsmtrace.vmm.hyperv.cpuid import HypervPolicy

    if not enabled:
        return HypervPolicy.disabled()
    try:
        return HypervPolicy.from_switches(list(disable))
    except ValueError as exc:
        fail(str(exc))


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (by inode when both exist, else by resolved path)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_new_output(path: Path, *, force: bool, inputs: dict[str, Path | None], what: str) -> None:
    """Refuse to write ``path`` over one of the command's inputs (ever) or over an existing file (without --force)."""
    for name, source in inputs.items():
        if source is not None and (same_file(path, source) or path.resolve() == source.resolve()):
            fail(f"{what} {path} is the {name}: refusing to overwrite an input")
    if path.is_dir():
        fail(f"{what} {path} is a directory")
    if path.exists() and not force:
        fail(f"{what} {path} already exists: refusing to overwrite it (use --force to replace it)")


def check_out_dir(out_dir: Path, what: str) -> None:
    """Create ``out_dir`` if needed and prove it writable now, before any long work (one line if not)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        fail(f"cannot write {what} to {out_dir}: it exists and is not a directory")
    except OSError as exc:
        fail(f"cannot write {what} to {out_dir}: {exc.strerror or exc}")
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        fail(f"cannot write {what} to {out_dir}: {exc.strerror or exc}")


RUN_EPILOG = """\b
Exit status:
  (V << 1) | 1   the guest wrote V to isa-debug-exit (port 0xf4): 1 = V 0
  0              the guest shut down
  2              bad input (one `vsmtrace: error:` line on stderr)
  4              the guest faulted: a triple fault that was not rebooted, an
                 instruction KVM cannot emulate, a Hyper-V crash report,
                 halted for good
  6              a vsmtrace internal error
  8              the guest asked for a reset and was not rebooted
                 (--no-reboot, a recording, --deterministic)
  124            --timeout expired
  130            interrupted (Ctrl-C / SIGINT); a --record trace is sealed
                 first (a third Ctrl-C abandons sealing: `vsmtrace seal TRACE`)

A guest reset (port 0xCF9, 0x92, the keyboard controller, a triple fault, the
Hyper-V reset MSR) reboots the guest from its entry state, as QEMU does;
--no-reboot ends the run instead.
"""


@main.command(epilog=RUN_EPILOG)
@click.argument("kernel", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--smp", type=click.IntRange(1, 64), default=1, show_default=True, help="Number of virtual processors.")
@click.option("--memory", "memory_mib", type=click.IntRange(2, None), default=256, show_default=True, help="Guest RAM in MiB.")
@click.option("--append", "cmdline", default="", help="Kernel command line (Multiboot).")
@click.option("--initrd", "initrds", multiple=True, type=click.Path(dir_okay=False, path_type=Path), help="A Multiboot module (repeatable).")
@click.option("--serial", "serial_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the serial console here instead of stdout.")
@click.option("--serial-input", type=click.Choice(["auto", "stdin", "none"]), default="auto", show_default=True, help="Feed stdin to the UART: auto = when stdin is a terminal.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), help="Stop the guest after this many seconds (exit status 124).")
@click.option("--hyperv/--no-hyperv", default=True, show_default=True, help="Offer the Hyper-V interface (CPUID 0x40000000+, synthetic MSRs, hypercalls).")
@click.option("--record", "record_path", type=click.Path(dir_okay=False, path_type=Path), help="Record every event into this Arrow trace (refuses an existing file unless --force).")
@click.option("--force", is_flag=True, help="With --record: replace an existing file.")
@click.option("--vsm/--no-vsm", default=True, show_default=True, help="Offer Virtual Secure Mode (VTL0 and VTL1; needs --hyperv).")
@click.option("--hv-disable", "hv_disable", multiple=True, metavar="FEATURE", help="Hide one Hyper-V feature (repeatable; e.g. xmm-input, stimers, synic, pv-ipi). `--hv-disable list` lists them.")
@click.option("--reboot/--no-reboot", default=True, show_default=True, help="A guest reset (port 0xCF9, 0x92, the keyboard controller, a triple fault, the Hyper-V reset MSR) reboots the guest, as QEMU does; --no-reboot ends the run instead (exit status 8; 4 for a triple fault). Recording and --deterministic runs always end at a reset.")
@click.option("--deterministic", is_flag=True, help="Virtual time advanced at exits, timers fired at exits, every exit recorded: a trace `vsmtrace replay --reexecute` can re-run (needs --smp 1).")
@click.option("--fast-paths/--no-fast-paths", "fast_paths", default=True, show_default=True, help="Answer some exits in C without Python: port-0x80 writes, fixed synthetic MSR reads, NotifyLongSpinWait, GetVpIndexFromApicId, VTL call and fast VTL return; while recording only the VTL switches, which C records (docs/architecture.md). --no-fast-paths sends every exit through Python.")
@click.option("--kvm-device", "kvm_device", default="/dev/kvm", envvar="VSMTRACE_KVM_DEVICE", hidden=True, help="KVM device node (tests point it elsewhere).")
def run(
    kernel: Path | None,
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
    force: bool = False,
    deterministic: bool = False,
    reboot: bool = True,
    fast_paths: bool = True,
) -> None:
    """Boot KERNEL (Multiboot v1 or raw 64-bit ELF) like `qemu -kernel`, and exit with the guest's status."""
    if "list" in hv_disable:
        list_hv_features()
    if kernel is None:
        fail("Missing argument 'KERNEL'.")
    from vsmtrace.vmm.config import MachineConfig

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
    inputs: dict[str, Path | None] = {"kernel": kernel, **{f"module {m}": m for m in initrds}}
    if record_path is not None:
        check_new_output(record_path, force=force, inputs={**inputs, "serial output": serial_path}, what="trace")
    serial_out = sys.stdout.buffer
    if serial_path is not None:
        check_new_output(serial_path, force=True, inputs=inputs, what="serial output")
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
        no_reboot=not reboot,
        fast_paths=fast_paths,
    )
    from vsmtrace.session import SetupError, import_arrow_without_numpy, run_machine

    if record_path is not None:
        import_arrow_without_numpy()  # this process records and exits: nothing in it converts to NumPy
    try:
        status, message = run_machine(config, record_path)
    except SetupError as exc:
        fail(str(exc))
    if status == EXIT_INTERRUPTED_STATUS:
        from vsmtrace import interrupts

        interrupts.quiet()  # on the way out: a second Ctrl-C now must not turn 130 into "killed by SIGINT"
    if message and status != 0:
        click.echo(f"vsmtrace: {message}", err=True)
    serial_out.flush()
    sys.exit(status)


@main.command()
@click.argument("trace_path", metavar="TRACE", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print every field and the metadata as one JSON object.")
def info(trace_path: Path, as_json: bool) -> None:
    """Summarise TRACE: metadata, events per kind, time span, size, and whether it is sealed or recovered.

    An unsealed trace (a killed recording) is readable here and by every vsmtrace
    command; `vsmtrace seal TRACE` makes it a sealed file that Polars, pyarrow and
    pandas open too.
    """
    from vsmtrace.recorder.info import format_info, info_json, summarize

    summary = _trace_call(trace_path, summarize)
    click.echo(info_json(summary) if as_json else format_info(summary))


@main.command()
@click.argument("trace_path", metavar="TRACE", type=click.Path(path_type=Path))
def seal(trace_path: Path) -> None:
    """Seal TRACE in place: a killed or interrupted recording becomes a sealed Arrow IPC file.

    Keeps every complete batch of events and drops a torn tail (a batch cut short
    when the recording was killed), saying how much. Sealing a sealed trace does
    nothing. The rewrite is atomic: the trace is never left half-written.
    """
    from vsmtrace.recorder.seal import format_seal
    from vsmtrace.recorder.seal import seal as seal_file

    if trace_path.exists() and not os.access(trace_path.parent, os.W_OK):
        fail(f"cannot seal {trace_path}: its directory {trace_path.parent} is not writable (sealing rewrites the file next to it)")
    result = _trace_call(trace_path, seal_file, action="seal")
    click.echo(format_seal(result))


# ----------------------------------------------------------------------------- analysis (report, export, diff)


def _trace_call(trace_path: Path, fn, *args, action: str = "read"):  # type: ignore[no-untyped-def]
    """``fn(trace_path, ...)``; any reason TRACE is not a readable trace is one user error line."""
    import pyarrow as pa

    from vsmtrace.recorder.errors import TraceError

    try:
        return fn(trace_path, *args)
    except TraceError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot {action} {trace_path}: {describe_os_error(exc)}")
    except (pa.ArrowException, ValueError) as exc:
        fail(f"{trace_path}: unreadable trace: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def _open_trace(trace_path: Path):  # type: ignore[no-untyped-def]
    """Open TRACE (validated against its schema version) and a LazyFrame over it."""
    from vsmtrace.analysis import load
    from vsmtrace.recorder.reader import open_trace

    trace = _trace_call(trace_path, open_trace)
    return trace, _trace_call(trace, load)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _analysis_errors():  # type: ignore[no-untyped-def]
    """Exceptions a damaged trace can raise once queries run (reported as one line, not a traceback)."""
    import polars as pl
    import pyarrow as pa

    return (pa.ArrowException, ValueError, pl.exceptions.PolarsError)


def _partial_note(trace) -> str | None:  # type: ignore[no-untyped-def]
    reason = trace.partial
    return None if reason is None else f"partial trace: {reason}"


progress_option = click.option(
    "--progress/--no-progress", default=None, help="Show a progress bar on stderr (default: when stderr is a terminal)."
)


@main.command()
@click.argument("trace_path", metavar="TRACE", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("report"), show_default=True,
              help="Directory for the figures.")
@click.option("--format", "formats", type=click.Choice(["png", "svg"]), multiple=True, default=("png",), show_default=True,
              help="Figure format (repeatable).")
@click.option("--no-figures", is_flag=True, help="Print the text summary only.")
@progress_option
def report(trace_path: Path, out_dir: Path, formats: tuple[str, ...], no_figures: bool, progress: bool | None) -> None:
    """Print a summary of TRACE (events, VTL transitions, residency, hypercalls, intercepts, errors) and write figures.

    A partial trace (a killed recording, torn or recovered) is said to be partial in
    the text and in every figure's title.
    """
    from vsmtrace.analysis.figure_tables import FIGURE_NAMES  # no matplotlib yet: it loads during the collect
    from vsmtrace.analysis.report import format_report, summarize, summarize_with_figures
    from vsmtrace.progress import Steps, wanted

    trace, lf = _open_trace(trace_path)
    if not no_figures:
        check_out_dir(out_dir, "figures")
    note = _partial_note(trace)
    steps = 1 + (0 if no_figures else len(FIGURE_NAMES) * len(formats))
    try:
        with Steps("report", steps, wanted(progress)) as bar:
            bar.step("summary tables")
            if no_figures:
                summary, paths = summarize(lf), []
            else:  # one collect_all for both: the figures' tables share the summary's scans
                summary, paths = summarize_with_figures(lf, out_dir, formats, note=note, on_figure=bar.step)
            text = format_report(summary, str(trace_path), note=note)
    except OSError as exc:
        fail(f"cannot write figures to {out_dir}: {describe_os_error(exc)}")
    except _analysis_errors() as exc:
        fail(f"{trace_path}: cannot analyse: {_first_line(exc)}")
    click.echo(text, nl=False)
    if paths:
        click.echo(f"\nfigures in {out_dir}: {', '.join(p.name for p in paths)}")


EXPORT_SUFFIX = {"chrome": ".json", "parquet": ".parquet"}


@main.command()
@click.argument("trace_path", metavar="TRACE", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["chrome", "parquet"]), default="chrome", show_default=True,
              help="chrome: Chrome trace-event JSON (Perfetto); parquet: the events as one Parquet file, same columns and metadata.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (default: TRACE.json, or TRACE.parquet).")
@click.option("--force", is_flag=True, help="Replace an existing output file (never the input trace).")
@progress_option
def export(trace_path: Path, fmt: str, output: Path | None, force: bool, progress: bool | None) -> None:
    """Export TRACE as Chrome trace-event JSON (a track per VP, a slice per VTL stint) or as Parquet.

    Refuses to write over the input trace, and over an existing file unless --force.
    """
    from vsmtrace.progress import counting, wanted

    trace, lf = _open_trace(trace_path)
    out = output or trace_path.with_name(trace_path.name + EXPORT_SUFFIX[fmt])
    check_new_output(out, force=force, inputs={"input trace": trace_path}, what="output")
    note = _partial_note(trace)
    try:
        if fmt == "parquet":
            from vsmtrace.recorder.parquet import export_parquet

            with counting("export", wanted(progress), "event", total=None) as bar:
                n = export_parquet(trace, out, on_batch=bar.update)
            what = f"{n} events"
        else:
            from vsmtrace.analysis.chrome import export_chrome

            with counting("export", wanted(progress), "event") as bar:
                n = export_chrome(lf, out, on_events=bar.update)
            what = f"{n} trace events"
    except OSError as exc:
        fail(f"cannot write {out}: {describe_os_error(exc)}")
    except _analysis_errors() as exc:
        fail(f"{trace_path}: cannot export to {out}: {_first_line(exc)}")
    click.echo(f"wrote {what} to {out}" + (f" ({note})" if note else ""))


@main.command()
@click.argument("trace_a", metavar="A", type=click.Path(path_type=Path))
@click.argument("trace_b", metavar="B", type=click.Path(path_type=Path))
@click.option("--ignore", "ignore", multiple=True, metavar="COLUMN",
              help="Also ignore this column when looking for the divergence (repeatable; a trace column name).")
@progress_option
def diff(trace_a: Path, trace_b: Path, ignore: tuple[str, ...], progress: bool | None) -> None:
    """Compare traces A and B (counts, latencies) and name the first event where they diverge; exit 1 if they do."""
    from vsmtrace.analysis.diff import NONDETERMINISTIC, diff_traces, format_diff
    from vsmtrace.progress import counting, wanted
    from vsmtrace.recorder.schema import COLUMN_BY_NAME

    unknown = [c for c in ignore if c not in COLUMN_BY_NAME]
    if unknown:
        fail(f"--ignore: no trace column named {', '.join(repr(c) for c in unknown)} (columns: docs/trace-format.md, or `vsmtrace info --json`)")
    ta, _ = _open_trace(trace_a)
    tb, _ = _open_trace(trace_b)
    try:
        with counting("diff", wanted(progress), "event") as bar:
            d = diff_traces(ta, tb, ignore=(*NONDETERMINISTIC, *ignore), on_rows=bar.update)  # traces: compared batch by batch
    except _analysis_errors() as exc:
        fail(f"cannot compare {trace_a} and {trace_b}: {_first_line(exc)}")
    notes = [f"{name}: {n}" for name, n in ((trace_a, _partial_note(ta)), (trace_b, _partial_note(tb))) if n]
    click.echo(format_diff(d, str(trace_a), str(trace_b), notes=notes), nl=False)
    sys.exit(0 if d.divergence is None else 1)


REPLAY_EPILOG = """\b
Exit status: 0 the replay reproduces the trace; 1 a divergence (the first
differing event and field are printed); 2 the trace cannot be replayed;
130 interrupted.

\b
Workflow for a VSM bug (docs/replay.md, shipped with the source):
  vsmtrace replay T                  find the first divergence
  vsmtrace replay T --state SEQ      registers, VSM, SynIC, protections after SEQ
  vsmtrace replay T --break-at SEQ   pdb before the emulation entry of SEQ
                                     (or the next entry after SEQ)
  vsmtrace replay T --reexecute      re-run the guest itself (--deterministic traces)
"""


@main.command(epilog=REPLAY_EPILOG)
@click.argument("trace_path", metavar="TRACE", type=click.Path(path_type=Path))
@click.option("--state", "state_seq", type=click.IntRange(min=0), metavar="SEQ", help="Print the reconstructed state right after event SEQ.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (the replay report, or the --state) as JSON.")
@click.option("--break-at", type=click.IntRange(min=0), metavar="SEQ",
              help="Stop in the debugger (pdb) before the emulation entry that produced event SEQ (or the next entry after SEQ).")
@progress_option
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

    With --reexecute, re-run the guest under KVM instead (docs/reexecute.md).
    """
    from vsmtrace.progress import Steps, wanted

    if reexecute:
        if state_seq is not None or break_at is not None or as_json:
            fail("--state, --json and --break-at belong to VMM replay, not --reexecute (use --dump-memory)")
        reexecute_trace(trace_path, dump_specs)
        return
    if dump_specs:
        fail("--dump-memory needs --reexecute")
    from vsmtrace.replayer.engine import VmmReplayer, format_report, report_dict, to_json
    from vsmtrace.replayer.errors import Divergence, ReplayError

    show = wanted(progress)
    try:
        with Steps("replay", 1, show) as bar:
            bar.step(f"loading {trace_path.name}")
            replayer = VmmReplayer(trace_path, break_at=break_at)
    except ReplayError as exc:
        fail(str(exc))
    if break_at is not None:
        _resolve_break(replayer, break_at)
    if state_seq is not None:
        last = replayer.last_seq
        if state_seq > last:
            cut = f"; the recording was cut short ({replayer.trace.partial})" if replayer.torn else ""
            fail(f"{trace_path}: no event {state_seq}: the trace ends at event {last}{cut}")
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
        report = replayer.run(progress=show)
    except ReplayError as exc:
        fail(str(exc))
    click.echo(to_json(report_dict(report)) if as_json else format_report(report))
    sys.exit(0 if report.divergence is None else 1)


def _resolve_break(replayer, seq: int) -> None:  # type: ignore[no-untyped-def]
    """Make --break-at SEQ stop somewhere: SEQ's own entry, else the next entry after SEQ (said), else fail."""
    if replayer.break_entries:
        return
    last = replayer.last_seq
    path = replayer.path
    if seq > last:
        fail(f"--break-at {seq}: {path} ends at event {last}")
    later = [e for e in replayer.entries if e.seq >= seq]
    if not later:
        before = [e.seq for e in replayer.entries if e.seq < seq][-3:]
        fail(f"--break-at {seq}: no emulation entry at or after event {seq} in {path}"
             + (f" (the last ones are at events {', '.join(map(str, before))})" if before else " (the trace has none)"))  # fmt: skip
    target = min(later, key=lambda e: e.seq)
    kind = replayer.row(seq)["kind"] if replayer.seq_is_row or seq <= last else "?"
    click.echo(
        f"vsmtrace: event {seq} ({kind}) did not come from the emulation; stopping at the next emulation entry, "
        f"event {target.seq} ({target.entry})",
        err=True,
    )
    replayer.break_entries = {target.seq}


def reexecute_trace(trace_path: Path, dump_specs: tuple[str, ...]) -> NoReturn:
    """``vsmtrace replay --reexecute``: one-line errors for traces that cannot be re-executed."""
    from vsmtrace.vmm.native import NativeBuildError

    try:  # importing the VMM builds its native modules on first use
        from vsmtrace.replayer.errors import ReplayError
        from vsmtrace.replayer.reexecute import MemoryDump, Reexecutor, format_report
        from vsmtrace.vmm.kvm.system import KvmError, KvmUnavailable
        from vsmtrace.vmm.loader.elf import LoaderError
    except NativeBuildError as exc:
        fail(str(exc))

    try:
        dumps = [MemoryDump.parse(spec, Path.cwd()) for spec in dump_specs]
    except ValueError as exc:
        fail(str(exc))
    try:
        report = Reexecutor(trace_path, dumps=dumps).run()
    except (ReplayError, KvmUnavailable, LoaderError, NativeBuildError) as exc:
        fail(str(exc))
    except KvmError as exc:
        fail(f"KVM refused to set up the guest: {exc}")
    except OSError as exc:
        fail(f"cannot re-execute {trace_path}: {describe_os_error(exc)}")
    click.echo(format_report(report))
    sys.exit(0 if report.divergence is None else 1)


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("vsmtrace-demo"), show_default=True, help="Directory for the trace, report and figures.")
@click.option("--quiet", is_flag=True, help="Do not echo the guest's serial console.")
def demo(out_dir: Path, quiet: bool) -> None:
    """Build the bundled VBS-style guest, record it on 2 VPs, replay it, and write the report.

    Needs gcc (to build the guest, cached after the first time) and a usable
    /dev/kvm. Writes the trace, serial log, report, figures and a Chrome timeline
    into --out, replacing what an earlier demo left there.
    """
    from vsmtrace.demo import DemoError, DemoInterrupted, print_summary, run_demo

    check_out_dir(out_dir, "the demo's results")
    try:
        result = run_demo(out_dir, echo=not quiet)
    except DemoInterrupted as exc:
        click.echo(f"vsmtrace: {exc}", err=True)
        sys.exit(130)
    except DemoError as exc:
        fail(str(exc))
    print_summary(result)


main.add_command(guest)
main.add_command(notebooks)
main.add_command(fleet_cli.fleet)

if __name__ == "__main__":
    main()
