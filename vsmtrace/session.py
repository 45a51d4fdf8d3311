"""Build, boot and run one machine, recording it if asked: what ``vsmtrace run`` and the demo share."""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vsmtrace.vmm.config import MachineConfig

log = logging.getLogger("vsmtrace")


class SetupError(Exception):
    """The machine could not be set up from this input (a one-line message for the user)."""


_heap_frozen = False


def freeze_startup_heap() -> None:
    """Put every object alive now (imported modules, the booted machine) out of the cyclic GC's reach.

    They live as long as the process, yet every full collection would walk them again (the
    imported pyarrow, polars and click alone are hundreds of thousands of objects), and the
    run loop's short-lived tuples and records trigger collections all the time: ~5% of the
    CPU of a VTL round-trip run (docs/benchmarks.md, issue 18, fifth session). Once per
    process, so what a later machine leaves behind (a guest reboot) stays collectable.
    """
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.freeze()


def import_arrow_without_numpy() -> None:
    """Import pyarrow without letting it import NumPy: for a process that records and does nothing else.

    pyarrow imports NumPy when it is installed, only to offer conversions a recording
    never makes: ~45 ms of the ~110 ms a recording's Arrow import costs on the development
    host (docs/benchmarks.md, issue 18, eighth session). pyarrow then runs as it does where
    NumPy is not installed; NumPy itself stays importable by anything that wants it later.
    Does nothing if either is loaded already (their state is then not ours to choose).
    """
    if "pyarrow" in sys.modules or "numpy" in sys.modules or not _arrow_runs_without_numpy():
        return
    sys.modules["numpy"] = None  # type: ignore[assignment]  # Python's way to make an import fail
    try:
        # Every pyarrow module a recording loads: each one imports NumPy if it can when first loaded.
        import pyarrow.ipc  # noqa: F401

        import vsmtrace.recorder.compute  # noqa: F401  # pyarrow's compute core
    finally:
        if sys.modules.get("numpy", 0) is None:
            del sys.modules["numpy"]


#: pyarrow 18.0 made NumPy optional; older ones fail to import without it.
ARROW_WITHOUT_NUMPY_SINCE = 18


def _arrow_runs_without_numpy() -> bool:
    """Whether the installed pyarrow is one that imports without NumPy, told by its dist-info name.

    Asking ``importlib.metadata`` would cost 15-20 ms, a third of what is saved; when the
    version cannot be told, the answer is no (pyarrow then imports as usual).
    """
    import importlib.util

    spec = importlib.util.find_spec("pyarrow")
    if spec is None or not spec.submodule_search_locations:
        return False
    site = Path(next(iter(spec.submodule_search_locations))).parent
    for info in site.glob("pyarrow-*.dist-info"):
        major = info.name[len("pyarrow-") :].split(".")[0]
        return major.isdigit() and int(major) >= ARROW_WITHOUT_NUMPY_SINCE
    return False


def run_machine(config: MachineConfig, record_path: Path | None) -> tuple[int, str]:
    """Build, boot and run a machine (recording if asked); ``SetupError`` (one line) for bad input.

    Ctrl-C never raises in here (``interrupts.deferred``): it asks the machine to stop,
    and the trace is closed and sealed in order however many signals follow, except a
    third one while sealing, which leaves the complete stream for `vsmtrace seal`.
    """
    from vsmtrace import interrupts
    from vsmtrace.vmm.native import NativeBuildError

    try:  # importing the VMM builds its native modules on first use
        from vsmtrace.recorder.errors import TraceError
        from vsmtrace.vmm.builder import build_machine
        from vsmtrace.vmm.kvm.system import KvmError, KvmUnavailable
        from vsmtrace.vmm.loader.elf import LoaderError
        from vsmtrace.vmm.stops import EXIT_INTERRUPTED, EXIT_TIMEOUT
        from vsmtrace.vmm.trace_metadata import machine_metadata
        from vsmtrace.vmm.verbose import VerboseSink, verbose_enabled
    except NativeBuildError as exc:
        raise SetupError(str(exc)) from None

    holder: dict[str, Any] = {"machine": None, "sealing": False}
    first = interrupts.count()

    def on_sigint(n: int) -> None:
        machine = holder["machine"]
        if machine is not None:
            machine.interrupt()
        if holder["sealing"] and n - first >= 3:
            raise KeyboardInterrupt  # abandon sealing: the complete stream stays at record_path

    writer = None
    timeout = config.timeout_s
    deadline = None if timeout is None else time.monotonic() + timeout
    with interrupts.deferred(on_sigint):
        while True:
            try:
                machine = holder["machine"] = build_machine(config)
                if interrupts.count() > first:
                    machine.interrupt()
                if record_path is not None:
                    # Imported only when recording: Arrow is most of a recording's start-up (import_arrow_without_numpy).
                    from vsmtrace.recorder.writer import TraceWriter

                    writer = TraceWriter(record_path, machine_metadata(machine))
                    machine.sink = writer
                if verbose_enabled():
                    machine.sink = VerboseSink(machine.sink)
                machine.boot()
            except (KvmUnavailable, LoaderError, ValueError, TraceError, NativeBuildError) as exc:
                if writer is not None:
                    writer.close()
                raise SetupError(str(exc)) from None
            except KvmError as exc:
                if writer is not None:
                    writer.close()
                raise SetupError(f"KVM refused to set up the guest: {exc}") from None
            freeze_startup_heap()
            status = machine.run()
            message = machine.stop_message
            if isinstance(machine.sink, VerboseSink):
                machine.sink.close_log()
            if not machine.rebooting:
                break
            # The guest reset and this run reboots (QEMU's default; never while recording, see
            # Machine.request_reset): a fresh machine boots the same kernel, within what is left
            # of --timeout, so nothing of the old boot survives into the new one.
            machine.close()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return EXIT_TIMEOUT, f"guest still running after --timeout {timeout:g} s"
                config = dataclasses.replace(config, timeout_s=left)
        if writer is None:
            return status, message
        holder["sealing"] = True
        try:
            writer.close()
        except KeyboardInterrupt:
            interrupts.quiet()
            return EXIT_INTERRUPTED, (
                f"interrupted while sealing the trace: {record_path} is left as an unsealed stream "
                f"(every complete batch readable); `vsmtrace seal {record_path}` seals it"
            )
    if writer.error is not None:
        message = f"{message}; recording stopped early: {writer.error}" if message else f"recording stopped early: {writer.error}"
        status = status or 1
    if writer.seal_error is not None:
        note = f"{writer.seal_error}; `vsmtrace seal {record_path}` seals it"
        message = f"{message}; {note}" if message else note
        if status == 0:
            log.warning("%s", note)
    return status, message
