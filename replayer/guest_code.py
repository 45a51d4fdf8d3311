"""What the guest image's code can tell a re-execution divergence: whether it read the raw TSC.

RDTSC and RDTSCP never exit under KVM, so a guest that lets their values reach its
registers or memory cannot be re-executed exactly (docs/reexecute.md, "The TSC"). When
re-execution diverges, finding such an instruction in the code that was running turns
"gprs.rax differs" into a reason. The image is decoded statically (iced-x86, linear
sweep of every executable ELF segment); "running" means the functions (ELF symbols) of
the diverging exit's RIP, of the previous exit's RIP and of every return address on
the stack: the test runtime links RDTSC into every guest (SMP bring-up, the reference
TSC page), so an image-wide search would blame guests that never execute it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

#: ELF program header flag: the segment is executable.
PF_X = 0x1
#: ELF class of a 64-bit image (EI_CLASS); 32-bit images are decoded as 32-bit code.
ELFCLASS64_BITS = 64
ELFCLASS32_BITS = 32
#: ELF symbol type of code.
STT_FUNC = "STT_FUNC"
#: At most this many sites are named in a message.
SITES_SHOWN = 3
#: Lengths of the call instructions a return address can follow (call rel32, call reg, call [mem] forms).
CALL_LENGTHS = (2, 3, 4, 5, 6, 7)
#: Bytes of stack above RSP searched for return addresses.
STACK_SCAN_BYTES = 4096
#: Stack slots are 8 bytes.
SLOT_BYTES = 8


@dataclass(frozen=True)
class TscRead:
    """One RDTSC/RDTSCP instruction in the guest image."""

    address: int
    mnemonic: str
    symbol: str | None

    def describe(self) -> str:
        where = f" in {self.symbol}" if self.symbol else ""
        return f"{self.mnemonic} at {self.address:#x}{where}"


@dataclass
class GuestCode:
    """The executable segments, function symbols and TSC reads of one guest image."""

    bits: int
    segments: list[tuple[int, bytes]]  # (vaddr, bytes) of each executable PT_LOAD
    functions: list[tuple[int, int, str]]  # (start, size, name), sorted
    reads: list[TscRead]

    @classmethod
    def load(cls, image: Path) -> GuestCode | None:
        """Decode ``image``; None if it is not an ELF file or iced-x86/pyelftools are missing."""
        try:
            import iced_x86
            from elftools.common.exceptions import ELFError
            from elftools.elf.elffile import ELFFile
        except ImportError:
            return None
        wanted = {iced_x86.Mnemonic.RDTSC: "rdtsc", iced_x86.Mnemonic.RDTSCP: "rdtscp"}
        try:
            with image.open("rb") as f:
                elf = ELFFile(f)
                bits = ELFCLASS64_BITS if elf.elfclass == ELFCLASS64_BITS else ELFCLASS32_BITS
                segments = [(seg["p_vaddr"], seg.data()) for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD" and seg["p_flags"] & PF_X]
                functions = _functions(elf)
        except (OSError, ELFError):
            return None
        found: list[tuple[int, str]] = []
        for vaddr, data in segments:
            found += [(insn.ip, wanted[insn.mnemonic]) for insn in iced_x86.Decoder(bits, data, ip=vaddr) if insn.mnemonic in wanted]
        reads = [TscRead(address, mnemonic, _symbol_at(functions, address)) for address, mnemonic in sorted(found)]
        return cls(bits, segments, functions, reads)

    def _bytes_at(self, address: int, length: int) -> bytes | None:
        for vaddr, data in self.segments:
            if vaddr <= address and address + length <= vaddr + len(data):
                return data[address - vaddr : address - vaddr + length]
        return None

    def is_return_address(self, value: int) -> bool:
        """Does ``value`` point right after a call instruction in the image's code?"""
        import iced_x86

        for length in CALL_LENGTHS:
            code = self._bytes_at(value - length, length)
            if code is None:
                continue
            insn = iced_x86.Decoder(self.bits, code, ip=value - length).decode()
            if insn.len == length and insn.flow_control in (iced_x86.FlowControl.CALL, iced_x86.FlowControl.INDIRECT_CALL):
                return True
        return False

    def running_functions(self, rips: list[int], stack: bytes) -> set[str]:
        """Functions of ``rips`` and of every return address in ``stack`` (guest memory from RSP up)."""
        names = {_symbol_at(self.functions, rip) for rip in rips}
        for offset in range(0, len(stack) - SLOT_BYTES + 1, SLOT_BYTES):
            value = int.from_bytes(stack[offset : offset + SLOT_BYTES], "little")
            if self.is_return_address(value):
                names.add(_symbol_at(self.functions, value))
        names.discard(None)
        return names  # type: ignore[return-value]

    def tsc_cause(self, rips: list[int], stack: bytes) -> str | None:
        """Why re-execution diverged if a running function reads the raw TSC, else None."""
        running = self.running_functions(rips, stack)
        sites = [r for r in self.reads if r.symbol in running]
        if not sites:
            return None
        shown = ", ".join(s.describe() for s in sites[:SITES_SHOWN])
        more = f" and {len(sites) - SITES_SHOWN} more" if len(sites) > SITES_SHOWN else ""
        return (
            f"RDTSC: the code that was running reads the raw TSC ({shown}{more}); RDTSC does not exit, so its value "
            "differs on every run and cannot be re-executed (docs/reexecute.md, \"The TSC\")"
        )


def _functions(elf: object) -> list[tuple[int, int, str]]:
    """(start, size, name) of every function symbol, sorted by start."""
    from elftools.elf.sections import SymbolTableSection

    out: list[tuple[int, int, str]] = []
    for section in elf.iter_sections():  # type: ignore[attr-defined]
        if isinstance(section, SymbolTableSection):
            out += [(s["st_value"], s["st_size"], s.name) for s in section.iter_symbols() if s["st_info"]["type"] == STT_FUNC and s.name]
    return sorted(out)


def _symbol_at(symbols: list[tuple[int, int, str]], address: int) -> str | None:
    i = bisect.bisect_right(symbols, (address, float("inf"), "")) - 1
    if i >= 0:
        start, size, name = symbols[i]
        if start <= address < start + max(size, 1):
            return name
    return None
