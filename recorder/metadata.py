"""Trace metadata: what a reader needs to know where a trace came from.

Stored as one JSON object in the Arrow schema metadata (key ``vsmtrace``), so it
travels with every copy of the file and is readable without scanning events.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vsmtrace.recorder.errors import TraceError
from vsmtrace.recorder.schema import SCHEMA_VERSION

import vsmtrace

#: Keys the caller may supply; anything else is kept under ``extra`` so it is not lost.
CALLER_KEYS = ("command_line", "guest_image", "vm_config", "kvm_capabilities")


def guest_image_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Name, size and SHA-256 of a guest image, so a trace names exactly what ran."""
    p = Path(path)
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"name": p.name, "path": str(p.resolve()), "size": p.stat().st_size, "sha256": h.hexdigest()}


def build_metadata(caller: Mapping[str, Any] | None, start_monotonic_ns: int) -> dict[str, Any]:
    """Merge caller-supplied metadata with what the recorder knows itself; must be JSON-serialisable."""
    caller = dict(caller or {})
    u = os.uname()
    md: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "vsmtrace_version": vsmtrace.__version__,
        "command_line": list(sys.argv),
        "guest_image": None,
        "vm_config": {},
        "kvm_capabilities": {},
        "host": {"sysname": u.sysname, "nodename": u.nodename, "release": u.release, "version": u.version, "machine": u.machine},
        "python": sys.version.split()[0],
        "start_time_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds"),
        "start_unix_ns": time.time_ns(),
        "start_monotonic_ns": start_monotonic_ns,
        "clock": "CLOCK_MONOTONIC",
    }
    image = caller.get("guest_image")
    if isinstance(image, str | os.PathLike):
        try:
            caller["guest_image"] = guest_image_info(image)
        except OSError as e:
            raise TraceError(f"cannot hash guest image {image}: {e.strerror or e}") from None
    for key in CALLER_KEYS:
        if key in caller:
            md[key] = caller.pop(key)
    if caller:
        md["extra"] = caller
    try:
        json.dumps(md)
    except (TypeError, ValueError) as e:
        raise TraceError(f"trace metadata is not JSON-serialisable: {e}") from None
    return md
