"""KVM exit reasons by name (values from <linux/kvm.h> via cffi)."""

from __future__ import annotations

from vsmtrace.vmm.kvm.bindings import ffi_lib

_ffi, _lib = ffi_lib()

EXIT_NAMES: dict[int, str] = {
    getattr(_lib, name): name[len("KVM_EXIT_") :].lower()
    for name in dir(_lib)
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}


def exit_name(reason: int) -> str:
    return EXIT_NAMES.get(reason, f"exit{reason}")

# The exit reasons code outside the run loop compares against (re-execution, the VSM backend).
EXIT_IO: int = _lib.KVM_EXIT_IO
EXIT_MMIO: int = _lib.KVM_EXIT_MMIO
EXIT_RDMSR: int = _lib.KVM_EXIT_X86_RDMSR
EXIT_WRMSR: int = _lib.KVM_EXIT_X86_WRMSR
EXIT_INTERNAL_ERROR: int = _lib.KVM_EXIT_INTERNAL_ERROR
