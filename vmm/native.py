"""Compile-once loading of vsmtrace's cffi extensions (the KVM bindings, the recorder's event store).

Each extension is compiled once per source hash into a user cache directory
(``$VSMTRACE_CACHE``, else ``$XDG_CACHE_HOME/vsmtrace`` or ``~/.cache/vsmtrace``), so
an editable install, a wheel and a fresh CI clone all work without a build step.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import cffi

_lock = threading.Lock()
HASH_CHARS = 16


class NativeBuildError(RuntimeError):
    """A cffi extension could not be compiled (no gcc, or missing headers)."""


def cache_dir() -> Path:
    base = os.environ.get("VSMTRACE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vsmtrace"
    )
    return Path(base)


def _load_from(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_extension(prefix: str, source: str, make_ffi: Callable[[str], cffi.FFI], what: str) -> ModuleType:
    """Build (first time) and import the cffi module ``make_ffi(name)``; ``source`` keys the cache.

    The module is named ``{prefix}_{hash of source and Python version}``, so a changed
    C source or interpreter gets a fresh build next to the old one.
    """
    digest = hashlib.sha256((source + sys.version).encode()).hexdigest()[:HASH_CHARS]
    name = f"{prefix}_{digest}"
    with _lock:
        build = cache_dir() / "cffi" / name
        found = sorted(build.glob(f"{name}*.so")) if build.exists() else []
        if not found:
            build.mkdir(parents=True, exist_ok=True)
            try:
                so = make_ffi(name).compile(tmpdir=str(build), verbose=False)
            except Exception as exc:  # cffi raises VerificationError and friends
                raise NativeBuildError(f"cannot build {what} (needs gcc and linux headers): {exc}") from exc
            found = [Path(so)]
        return _load_from(found[0], name)
