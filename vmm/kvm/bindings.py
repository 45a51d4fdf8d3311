"""Loads the compiled cffi module for <linux/kvm.h>, building it on first use (see vmm.native)."""

from __future__ import annotations

import threading
from types import ModuleType

from vsmtrace.vmm.kvm import _ffi_build
from vsmtrace.vmm.native import load_extension

_lock = threading.Lock()
_module: ModuleType | None = None


def load() -> ModuleType:
    """Return the cffi module (attributes ``ffi`` and ``lib``)."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            mod = load_extension("_vsmtrace_kvm", _ffi_build.CDEF + _ffi_build.SOURCE, _ffi_build.make_ffi, "the KVM bindings")
            mod.lib.vsm_install_kick_handler()
            _module = mod
        return _module


def ffi_lib() -> tuple[object, object]:
    mod = load()
    return mod.ffi, mod.lib
