"""Ctrl-C (SIGINT) for the command line: exit status 130 and one line, whatever the timing.

Python's own handler raises ``KeyboardInterrupt`` at every signal, so a second
Ctrl-C (or the two signals ``timeout -s INT`` and an impatient user send) lands in
the middle of whatever cleanup the first one started: a trace left unsealed, a
traceback, click's ``Aborted!`` and status 1. Here:

* by default the *first* SIGINT raises ``KeyboardInterrupt`` (the command stops
  where it is; the CLI group turns it into ``vsmtrace: interrupted``, status 130)
  and later ones are only counted, so cleanup runs to its end (if Python swallowed
  that ``KeyboardInterrupt``, see :func:`_unraisable`, the next one raises again);
* inside :func:`deferred` no signal raises: each one calls a callback that only
  sets flags (what a signal handler may safely do), and the code that owns the
  work (``vsmtrace run``'s machine) polls them and stops in order.

This module imports only ``signal``, ``contextlib`` and built-in modules: ``python -m
vsmtrace`` installs the handler before loading anything else.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C


class _State:
    count = 0  # SIGINTs received since install()
    callback: Callable[[int], None] | None = None  # set inside deferred(), or by quiet()
    handled = False  # a SIGINT was acted on (raised, or given to a callback): later ones are only counted
    swallowed = False  # ... but Python swallowed the KeyboardInterrupt raised (see _unraisable)
    raised = False  # a KeyboardInterrupt was raised for a Ctrl-C (see interrupted())
    previous_unraisablehook: Callable[[Any], object] | None = None


def _handler(signum: int, frame: object) -> None:
    _State.count += 1
    # This signal's number, kept locally: a second SIGINT can run this handler again, nested,
    # as soon as the signal.signal call below returns, and the callback must see each number once.
    n = _State.count
    # A native library may have swapped in its own (one-shot) handler while this signal was
    # on its way, leaving SIG_DFL behind: take SIGINT back at once, so the next Ctrl-C (two
    # usually come a few ms apart) reaches Python instead of killing the process.
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN if _State.callback is _ignore else _handler)
    except (ValueError, TypeError):
        pass
    callback = _State.callback
    if callback is not None:
        _State.handled = True
        callback(n)
        return
    # Decided on a flag set just before raising, not on "n == 1": a nested run (above) that
    # raised first leaves it set, and one whose KeyboardInterrupt Python swallowed clears it.
    if not _State.handled:
        _State.handled = _State.raised = True
        _State.swallowed = False
        raise KeyboardInterrupt


def _unraisable(unraisable: Any) -> None:
    """``sys.unraisablehook`` while our handler is installed: our swallowed KeyboardInterrupt is not lost.

    A signal handler's exception is raised in whatever Python code runs at that moment;
    in a weakref callback, ``__del__`` or a GC callback (importlib's module locks have
    one, so it happens during start-up imports) Python can only report it ("Exception
    ignored in ...") and goes on, and the later Ctrl-Cs were only counted: ``vsmtrace
    run`` did not stop. Now the next SIGINT raises again, and :func:`raise_swallowed`
    (the CLI calls it before each command) raises this one.
    """
    if issubclass(unraisable.exc_type, KeyboardInterrupt) and _State.callback is None and installed():
        _State.handled = False
        _State.swallowed = True
        return
    previous = _State.previous_unraisablehook or sys.__unraisablehook__
    previous(unraisable)


def raise_swallowed() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C that Python swallowed (see :func:`_unraisable`), if any."""
    if _State.swallowed and _State.callback is None:
        _State.handled = _State.raised = True
        _State.swallowed = False
        raise KeyboardInterrupt


def install() -> None:
    """Take over SIGINT, and keep native libraries from taking it while they import (see :class:`_HeldBackImports`).

    Only the main thread of the main interpreter can; elsewhere a no-op.
    """
    try:
        signal.signal(signal.SIGINT, _handler)
    except ValueError:
        return
    if sys.unraisablehook is not _unraisable:
        _State.previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _unraisable
    _guard_imports()


def reset() -> None:
    """Forget quiet(), deferred callbacks and the last Ctrl-C (the CLI run in-process, e.g. by tests, is over)."""
    _State.callback = None
    _State.handled = _State.swallowed = _State.raised = False


def installed() -> bool:
    return signal.getsignal(signal.SIGINT) is _handler


def count() -> int:
    """SIGINTs received so far."""
    return _State.count


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` stands for the user's Ctrl-C: a KeyboardInterrupt, or anything raised once one was.

    The handler raises in whatever code runs, and Python's own machinery can turn the
    KeyboardInterrupt into another exception on its way: 3.11 re-raises it from
    ``__set_name__`` (dataclass fields call it, vsmtrace's imports build many) as a
    RuntimeError, and when it lands while an import builds an ImportError's message,
    the import raises TypeError("expected a message argument") and the interrupt is
    gone from the chain. Whatever fails after a Ctrl-C raised, the command was interrupted.
    """
    return isinstance(exc, KeyboardInterrupt) or _State.raised


def _ignore(n: int) -> None:
    return None


def quiet() -> None:
    """Ignore SIGINT from now on: the process is on its way out with status 130.

    Ignored rather than counted: Python's finalization puts SIG_DFL back for every
    signal that has a Python handler, so a second Ctrl-C arriving while the
    interpreter shuts down would otherwise kill it (status -2 instead of 130).
    """
    _State.callback = _ignore
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: the callback alone keeps it quiet
        pass
    _forget_escaped_interrupt()


def _forget_escaped_interrupt() -> None:
    """Clear CPython's note that a KeyboardInterrupt went unhandled: the exit status is ours to give.

    When a KeyboardInterrupt leaves code that ``exec``/``eval`` ran from a string, CPython
    sets a process-wide "unhandled KeyboardInterrupt" flag, even if the exception is caught
    further up; ``python -m`` checks it after finalization and, if set, puts SIG_DFL back and
    kills itself with SIGINT: status -2 instead of our 130. dataclasses build every
    ``__init__``/``__repr__``/``__eq__`` with ``exec`` of a string, so a Ctrl-C while
    vsmtrace imports lands there in a few percent of start-ups. CPython clears that flag at
    the start of every string ``exec`` (for this very reason: a stale one must not kill a
    later run); an empty one, after the interrupt is handled, clears it with no other effect.
    """
    exec("")


@contextmanager
def deferred(callback: Callable[[int], None]) -> Iterator[None]:
    """Within the block a SIGINT calls ``callback(count)`` instead of raising.

    The callback runs in the main thread between two bytecodes of whatever it was
    doing, so it must only set flags; it may raise ``KeyboardInterrupt`` itself to
    abandon work that is safe to abandon.
    """
    if not installed():
        install()
    previous = _State.callback
    _State.callback = callback
    try:
        yield
    finally:
        _State.callback = previous


def reclaim() -> None:
    """Re-install the current Python-level SIGINT handler at the OS level.

    A native library may have put its own in place (Polars does when imported); this
    makes Python's, and so ours, the one the kernel calls again.
    """
    current = signal.getsignal(signal.SIGINT)
    if current is None:
        return
    try:
        signal.signal(signal.SIGINT, current)
    except (ValueError, TypeError):
        pass


#: Modules that install a native SIGINT handler while they import (Polars: a one-shot one that
#: leaves SIG_DFL behind once a signal came, so a second Ctrl-C would kill the process).
HANDLER_SWAPPING_MODULES = frozenset({"polars"})


class _HeldBackImports:
    """A ``sys.meta_path`` finder that imports :data:`HANDLER_SWAPPING_MODULES` with SIGINT held back.

    It finds nothing itself: it asks the finders after it for the module's spec and wraps
    the loader, so the module body runs with SIGINT blocked in the importing thread and
    :func:`reclaim` runs after it; a Ctrl-C that came meanwhile is delivered then, to
    Python's handler. Guarding the import wherever it happens (rather than importing
    Polars up front in the CLI) means a command that never uses Polars (``vsmtrace run``,
    with or without ``--record``) never pays for loading it: 0.18 s on the development host.
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in HANDLER_SWAPPING_MODULES:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HeldBackLoader(spec.loader)
        return spec


class _HeldBackLoader:
    """The module's own loader, with its body run under :func:`_sigint_held`."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:  # resource readers and the like: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with _sigint_held():
            self._loader.exec_module(module)


@contextmanager
def _sigint_held() -> Iterator[None]:
    """SIGINT blocked in this thread within the block, then :func:`reclaim` and the old mask back."""
    try:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    except (AttributeError, OSError, ValueError):
        held = None
    try:
        yield
    finally:
        reclaim()
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _guard_imports() -> None:
    if not any(isinstance(finder, _HeldBackImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HeldBackImports())
