"""Progress bars for the long commands (report, export, diff, replay): tqdm on stderr, only on a terminal.

One policy for every command: ``--progress/--no-progress`` decides, and by default a
bar shows when stderr is a terminal, so pipes, files and CI logs stay clean. Work that
has no natural count (a Polars query) shows as named steps of one bar, so a user sees
which part of a 30-second report is running and for how long.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def wanted(flag: bool | None) -> bool:
    """The --progress/--no-progress choice, or whether stderr is a terminal."""
    if flag is not None:
        return flag
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Steps:
    """A bar over named steps: ``with Steps("report", 3, on) as s: s.step("tables"); ...``."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=not enabled, file=sys.stderr,
                        bar_format="{desc}: {n_fmt}/{total_fmt} {postfix} [{elapsed}]")  # fmt: skip
        self._started = False

    def step(self, label: str) -> None:
        """Start step ``label`` (the previous one is done)."""
        if self._started:
            self.bar.update(1)
        self._started = True
        self.bar.set_postfix_str(label, refresh=True)

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def counting(desc: str, enabled: bool, unit: str, total: int | None = None) -> Any:
    """A tqdm bar to ``update(n)`` by hand (disabled: a no-op with the same interface)."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False, disable=not enabled, file=sys.stderr)


def iterate(items: Iterable[T], desc: str, enabled: bool, unit: str, total: int | None = None) -> Iterator[T]:
    """``items`` with a bar (or without one)."""
    if not enabled:
        return iter(items)
    return iter(tqdm(items, desc=desc, unit=unit, total=total, leave=False, file=sys.stderr))
