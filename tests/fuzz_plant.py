"""The vsmtrace CLI with one deliberately planted bug, so tests/test_fuzz.py can show the fuzz
campaign catches it: ``python tests/fuzz_plant.py PLANT run ...``.

Plants:

* ``unchecked-output``: the hypercall dispatcher probes and writes output buffers as the
  highest VTL, i.e. VTL1's protections of VTL0 memory are skipped for hypercall output (the
  classic confused deputy).
* ``handler-raises``: HvCallTranslateVirtualAddress raises (a VMM bug behind one call code).
* ``handler-hangs``: HvCallTranslateVirtualAddress never returns (the guest stops making progress).
"""

from __future__ import annotations

import dataclasses
import sys
import time

from vsmtrace.vmm.hyperv import hypercall
from vsmtrace.vmm.hyperv.hvdef import HypercallCode
from vsmtrace.vmm.vp import Access

HIGHEST_VTL = 1


class UncheckedOutput:
    """A partition whose output-side accesses ignore the caller's VTL."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def read_gpa(self, vtl: int, gpa: int, size: int, access: Access = Access.READ) -> bytes:
        if access == Access.WRITE:
            vtl = HIGHEST_VTL
        return self._inner.read_gpa(vtl, gpa, size, access)  # type: ignore[attr-defined]

    def write_gpa(self, vtl: int, gpa: int, data: bytes) -> None:
        self._inner.write_gpa(HIGHEST_VTL, gpa, data)  # type: ignore[attr-defined]


def plant_unchecked_output() -> None:
    init = hypercall.HypercallDispatcher.__init__

    def planted(self, partition, policy, sink) -> None:  # type: ignore[no-untyped-def]
        init(self, UncheckedOutput(partition), policy, sink)

    hypercall.HypercallDispatcher.__init__ = planted  # type: ignore[method-assign]


def plant_translate(behaviour: str) -> None:
    register = hypercall.HypercallDispatcher.register

    def planted(self, spec, *, replace=False) -> None:  # type: ignore[no-untyped-def]
        if spec.code == HypercallCode.HvCallTranslateVirtualAddress:

            def broken(inp):  # type: ignore[no-untyped-def]
                if behaviour == "raise":
                    raise KeyError("planted bug")
                while True:
                    time.sleep(3600)

            spec = dataclasses.replace(spec, handler=broken)
        register(self, spec, replace=replace)

    hypercall.HypercallDispatcher.register = planted  # type: ignore[method-assign]


PLANTS = {
    "unchecked-output": plant_unchecked_output,
    "handler-raises": lambda: plant_translate("raise"),
    "handler-hangs": lambda: plant_translate("hang"),
}

if __name__ == "__main__":
    PLANTS[sys.argv.pop(1)]()
    from vsmtrace.cli import main

    sys.argv[0] = "vsmtrace"
    main()
