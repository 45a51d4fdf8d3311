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
