"""In-memory stand-ins for the VP interface (vmm/vp.py), shared by the emulation unit tests."""

from __future__ import annotations

from vsmtrace.vmm.vp import CpuMode, Segment, Table


class FakeVp:
    """One VP at every VTL: registers in dicts, XMM in lists, injected exceptions recorded."""

    def __init__(self, index: int, vtl_count: int) -> None:
        self.index = index
        self.regs: list[dict[str, int | Segment | Table]] = [{} for _ in range(vtl_count)]
        self.xmm: list[list[int]] = [[0] * 16 for _ in range(vtl_count)]
        self.modes = [CpuMode.LONG] * vtl_count
        self.cpls = [0] * vtl_count
        self.exceptions: list[tuple[int, int, int | None]] = []
        self.vtl = 0

    @property
    def active_vtl(self) -> int:
        return self.vtl

    def get_register(self, vtl: int, name: str) -> int | Segment | Table:
        default: int | Segment | Table = 0
        if name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr"):
            default = Segment()
        elif name in ("gdtr", "idtr"):
            default = Table()
        return self.regs[vtl].get(name, default)

    def set_register(self, vtl: int, name: str, value: int | Segment | Table) -> None:
        self.regs[vtl][name] = value

    def get_xmm(self, vtl: int, index: int) -> int:
        return self.xmm[vtl][index]

    def set_xmm(self, vtl: int, index: int, value: int) -> None:
        self.xmm[vtl][index] = value

    def cpl(self, vtl: int) -> int:
        return self.cpls[vtl]

    def mode(self, vtl: int) -> CpuMode:
        return self.modes[vtl]

    def inject_exception(self, vtl: int, vector: int, error_code: int | None = None) -> None:
        self.exceptions.append((vtl, vector, error_code))
