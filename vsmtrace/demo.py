"""``vsmtrace demo``: the whole product on the bundled VBS-style guest, in one command.

Build the guest (cached), run it on 2 VPs with recording, replay the trace with
verification, write the report, figures and a Chrome trace, and say where
everything is. Each step prints as it starts, so a user sees progress.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

DEMO_VPS = 2
DEMO_MEMORY_MIB = 128
DEMO_TIMEOUT_S = 300.0
DEFAULT_OUT = Path("vsmtrace-demo")
TRACE_NAME = "demo.arrow"
TRACE_ENV = "VSMTRACE_TRACE"


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


class DemoInterrupted(DemoError):
    """Ctrl-C stopped the demo's guest; the message says what was kept."""


@dataclass
class DemoResult:
    out: Path
    trace: Path
    serial_log: Path
    report: Path
    figures: list[Path]
    chrome: Path
    guest_status: int
    replay_entries: int


def build_demo_guest() -> Path:
    """The bundled demo guest, built with the guest SDK shipped in the package."""
    from vsmtrace.guests.build import GuestBuildError, build_demo
    from vsmtrace.vmm.native import NativeBuildError

    try:
        return build_demo()
    except (GuestBuildError, NativeBuildError) as exc:
        raise DemoError(f"building the demo guest failed: {exc}") from None


class _Tee:
    """Serial output to the terminal (indented) and to a log file."""

    def __init__(self, log: Any, echo: bool) -> None:
        self.log = log
        self.echo = echo
        self.at_line_start = True

    def write(self, data: bytes) -> int:
        self.log.write(data)
        if self.echo:
            text = data.decode(errors="replace")
            out = []
            for ch in text:
                if self.at_line_start:
                    out.append("    | ")
                out.append(ch)
                self.at_line_start = ch == "\n"
            sys.stdout.write("".join(out))
        return len(data)

    def flush(self) -> None:
        self.log.flush()
        if self.echo:
            sys.stdout.flush()


def run_demo(out: Path, *, echo: bool = True, step: Callable[[str], None] | None = None) -> DemoResult:
    """Run every step of the demo into ``out``; raises DemoError with a clear message on failure."""
    from vsmtrace.analysis import load
    from vsmtrace.analysis.chrome import export_chrome
    from vsmtrace.analysis.report import format_report, summarize_with_figures
    from vsmtrace.replayer.engine import VmmReplayer
    from vsmtrace.replayer.engine import format_report as format_replay
    from vsmtrace.session import SetupError, run_machine
    from vsmtrace.vmm.config import MachineConfig
    from vsmtrace.vmm.hyperv.cpuid import HypervPolicy

    say = step or (lambda text: click.echo(text))
    out.mkdir(parents=True, exist_ok=True)
    trace = out / TRACE_NAME
    serial_log = out / "serial.log"
    report_path = out / "report.txt"
    figures_dir = out / "figures"
    chrome = out / "demo.trace.json"

    say("[1/5] building the demo guest (gcc, cached after the first build)")
    kernel = build_demo_guest()

    say(f"[2/5] booting it on {DEMO_VPS} VPs with Hyper-V and VSM, recording to {trace}")
    started = time.monotonic()
    with open(serial_log, "wb") as log:
        tee = _Tee(log, echo)
        config = MachineConfig(
            kernel=kernel,
            smp=DEMO_VPS,
            memory_mib=DEMO_MEMORY_MIB,
            serial_out=tee,  # type: ignore[arg-type]
            timeout_s=DEMO_TIMEOUT_S,
            hyperv=HypervPolicy().with_vsm(),
            vtls=2,
        )
        try:
            status, message = run_machine(config, trace)
        except SetupError as exc:
            raise DemoError(str(exc)) from None
    elapsed = time.monotonic() - started
    if status == 130:
        raise DemoInterrupted(f"interrupted; the trace recorded so far is {trace} ({message})" if message != "interrupted" else f"interrupted; the trace recorded so far is {trace}")
    if status != 1:  # isa-debug-exit(0) → (0 << 1) | 1
        raise DemoError(f"the demo guest did not finish cleanly (status {status}): {message or 'see ' + str(serial_log)}")
    say(f"      guest finished in {elapsed:.1f} s and exited with code 0")

    say("[3/5] replaying the trace offline and verifying every emulation output")
    replayer = VmmReplayer(trace)
    replay = replayer.run(progress=sys.stderr.isatty())
    if replay.divergence is not None:
        raise DemoError("replay diverged:\n" + format_replay(replay))
    say(f"      {format_replay(replay)}")

    say("[4/5] writing the report and figures")
    lf = load(trace)
    summary, figures = summarize_with_figures(lf, figures_dir)
    report_path.write_text(format_report(summary, str(trace)) + "\n")

    say("[5/5] exporting a Chrome/Perfetto timeline")
    export_chrome(lf, chrome)
    return DemoResult(out, trace, serial_log, report_path, list(figures), chrome, status, replay.entries)


def demo_trace(start: Path | None = None, *, record: bool = True) -> Path:
    """The demo trace a notebook should read, without a source checkout.

    ``$VSMTRACE_TRACE`` if set; else the nearest ``demo.arrow`` or
    ``vsmtrace-demo/demo.arrow`` in ``start`` (default: the current directory) or
    a parent folder, which is where `vsmtrace demo` and `vsmtrace notebooks --copy`
    put them; else (``record=True``) the demo is recorded into ``start/vsmtrace-demo``.
    """
    named = os.environ.get(TRACE_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{TRACE_ENV}={named} is not a file")
        return path
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        for candidate in (folder / TRACE_NAME, folder / DEFAULT_OUT / TRACE_NAME):
            if candidate.is_file():
                return candidate
    if not record:
        raise FileNotFoundError(f"no {TRACE_NAME} in {here} or its parents, and {TRACE_ENV} is not set")
    out = here / DEFAULT_OUT
    print(f"no demo trace found: building the demo guest and recording it into {out} (needs gcc and /dev/kvm)")
    return run_demo(out, echo=False, step=lambda _text: None).trace


def print_summary(result: DemoResult) -> None:
    click.echo("")
    click.echo("Done. What vsmtrace produced:")
    click.echo(f"  trace       {result.trace}   (Arrow IPC; `vsmtrace info {result.trace}`)")
    click.echo(f"  serial log  {result.serial_log}")
    click.echo(f"  report      {result.report}")
    click.echo(f"  figures     {', '.join(str(p) for p in result.figures)}")
    click.echo(f"  timeline    {result.chrome}   (open in https://ui.perfetto.dev or chrome://tracing)")
    click.echo("")
    notebooks = result.out / "notebooks"
    steps = [
        (f"cat {result.report}", "VTL transitions, secure calls, intercepts"),
        (f"vsmtrace replay {result.trace} --state 2000", "registers, VSM, SynIC, protections at an event"),
    ]
    if importlib.util.find_spec("jupyterlab") is None:
        steps.append(("pip install 'vsmtrace[notebook]'", "JupyterLab, for the notebooks below"))
    steps += [
        (f"vsmtrace notebooks --copy {notebooks}", "the notebooks that walk through this trace"),
        (f"jupyter lab {notebooks}", f"they find {result.trace.name} in the folder above"),
    ]
    width = max(len(command) for command, _ in steps)
    click.echo("What to open next:")
    for command, why in steps:
        click.echo(f"  {command:<{width}}   # {why}")
