"""Replay errors: a divergence (behaviour changed) or a trace that cannot be replayed."""

from __future__ import annotations

from typing import Any


class ReplayError(Exception):
    """The trace cannot be replayed (missing inputs, unsupported version...); one line for the user."""


class Divergence(BaseException):
    """Replayed emulation differs from the recording: the first differing event and field.

    A BaseException on purpose: the emulation catches ``Exception`` around handlers (a
    handler bug becomes an ERROR event), and a divergence must not be turned into one.
    """

    def __init__(self, seq: int, kind: str, field: str, recorded: Any, replayed: Any) -> None:
        super().__init__(f"event {seq} ({kind}): {field}: recorded {recorded!r}, replayed {replayed!r}")
        self.seq = seq
        self.kind = kind
        self.field = field
        self.recorded = recorded
        self.replayed = replayed
        #: The emulation entry being replayed when the difference showed (its EMULATION event
        #: and entry name); set by the engine, differs from ``seq`` when an emitted event differs.
        self.entry_seq: int | None = None
        self.entry: str | None = None
