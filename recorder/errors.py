"""Recorder exceptions: one hierarchy so the CLI and the VMM can catch them precisely."""

from __future__ import annotations


class TraceError(Exception):
    """A trace cannot be written (unwritable destination, disk full, bad metadata)."""


class TraceFormatError(TraceError):
    """A file is not a readable vsmtrace trace; the message is one line and names the problem."""
