"""Loads the compiled cffi module for <linux/kvm.h>, building it on first use.

The extension is compiled once per source hash into a user cache directory, so
an editable install, a wheel and a fresh CI clone all work without a build step.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

from vmm.kvm import _ffi_build

_lock = threading.Lock()
_module: ModuleType | None = None


class BindingsBuildError(RuntimeError):
    """The cffi extension could not be compiled (no gcc or no kernel headers)."""


def cache_dir() -> Path:
    base = os.environ.get("VSMTRACE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vsmtrace"
    )
    return Path(base)


def _source_hash() -> str:
    h = hashlib.sha256((_ffi_build.CDEF + _ffi_build.SOURCE + sys.version).encode())
    return h.hexdigest()[:16]


def _load_from(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load() -> ModuleType:
    """Return the cffi module (attributes ``ffi`` and ``lib``)."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        name = f"_vsmtrace_kvm_{_source_hash()}"
        build = cache_dir() / "cffi" / name
        found = sorted(build.glob(f"{name}*.so")) if build.exists() else []
        if not found:
            build.mkdir(parents=True, exist_ok=True)
            ffi = _ffi_build.make_ffi(name)
            try:
                so = ffi.compile(tmpdir=str(build), verbose=False)
            except Exception as exc:  # cffi raises VerificationError and friends
                raise BindingsBuildError(
                    f"cannot build the KVM bindings (needs gcc and linux headers): {exc}"
                ) from exc
            found = [Path(so)]
        _module = _load_from(found[0], name)
        _module.lib.vsm_install_kick_handler()
        return _module


def ffi_lib() -> tuple[object, object]:
    mod = load()
    return mod.ffi, mod.lib
