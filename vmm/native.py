"""Compile-once loading of vsmtrace's cffi extensions (the KVM bindings, the recorder's event store).

Each extension is compiled once per source hash into a user cache directory
(``<cache>/cffi``, see :func:`cache_dir`), so
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


class CacheDirError(NativeBuildError):
    """``$VSMTRACE_CACHE`` names a directory vsmtrace cannot write."""


def _writable_dir(path: Path) -> str | None:
    """None if ``path`` is (or could be made) a writable directory, else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "exists and is not a directory"
    except OSError as exc:
        return exc.strerror or str(exc)
    if not os.access(path, os.W_OK | os.X_OK):
        return "not writable"
    return None


_fallback: Path | None = None


def cache_dir() -> Path:
    """The cache base: ``$VSMTRACE_CACHE``, else ``$XDG_CACHE_HOME/vsmtrace``, else ``~/.cache/vsmtrace``.

    Native modules go to ``<base>/cffi``, guests to ``<base>/guests``. When the default
    location cannot be written (``HOME=/nonexistent``, a read-only home), a per-user
    directory under the system temporary directory is used instead, with a warning that
    names the variable to set; an unwritable ``$VSMTRACE_CACHE`` is an error, since the
    user chose it.
    """
    global _fallback
    chosen = os.environ.get("VSMTRACE_CACHE")
    if chosen:
        path = Path(chosen)
        why = _writable_dir(path)
        if why is not None:
            raise CacheDirError(f"VSMTRACE_CACHE={chosen}: cannot use it as the cache directory: {why}")
        return path
    xdg = os.environ.get("XDG_CACHE_HOME")
    path = Path(xdg if xdg and os.path.isabs(xdg) else os.path.expanduser("~/.cache")) / "vsmtrace"
    why = _writable_dir(path)
    if why is None:
        return path
    if _fallback is None:
        import logging
        import tempfile

        fallback = Path(tempfile.gettempdir()) / f"vsmtrace-cache-{os.getuid()}"
        problem = _writable_dir(fallback)
        if problem is not None:
            raise CacheDirError(f"no writable cache directory: {path}: {why}; {fallback}: {problem}; set VSMTRACE_CACHE")
        logging.getLogger("vsmtrace").warning(
            "cache directory %s: %s; using %s (set VSMTRACE_CACHE or XDG_CACHE_HOME to keep builds across runs)", path, why, fallback
        )
        _fallback = fallback
    return _fallback


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
            try:
                build.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CacheDirError(f"cannot create {build}: {exc.strerror or exc}; set VSMTRACE_CACHE to a writable directory") from None
            try:
                so = make_ffi(name).compile(tmpdir=str(build), verbose=False)
            except Exception as exc:  # cffi raises VerificationError and friends
                raise NativeBuildError(f"cannot build {what} (needs gcc and linux headers): {exc}") from exc
            found = [Path(so)]
        return _load_from(found[0], name)


def extension_loader(prefix: str, build: ModuleType, what: str) -> Callable[[], ModuleType]:
    """A ``load()`` for the cffi extension whose build module ``build`` has ``CDEF``, ``SOURCE`` and
    ``make_ffi``: built and imported by the first call (from any thread), the same module after."""
    lock = threading.Lock()
    loaded: list[ModuleType] = []

    def load() -> ModuleType:
        if not loaded:
            with lock:
                if not loaded:
                    loaded.append(load_extension(prefix, build.CDEF + build.SOURCE, build.make_ffi, what))
        return loaded[0]

    return load
