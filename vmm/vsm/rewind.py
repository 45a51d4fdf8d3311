"""Finding and undoing the instruction behind a denied memory access.

A secure memory intercept must leave the lower VTL *at* the faulting
instruction with no architectural effect (TLFS; docs/vsm.md). KVM does not make
that easy:

* a denied **read** (hole) exits before the instruction completes: RIP is at the
  instruction, and the pending read must be completed and then discarded;
* a denied **write** (read-only slot or hole) exits after KVM has retired the
  instruction: RIP and the registers it changed have moved on.

For writes this module searches backwards from RIP for the instruction that
wrote the intercepted address (decoding with iced-x86 and checking the
effective address against the exit's GPA through the guest's own page tables),
and computes the register values it had before. Known limit: arithmetic flags
changed by a read-modify-write (``add [m], r``) cannot be recovered; they are
recomputed when the instruction re-executes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import iced_x86
from vsmtrace.vmm.vp import CpuMode

MAX_INSN = 15
RFLAGS_DF = 1 << 10
RFLAGS_RF = 1 << 16  # KVM sets it while a rep string instruction is part-way through
WRITE_ACCESSES = frozenset(
    {iced_x86.OpAccess.WRITE, iced_x86.OpAccess.READ_WRITE, iced_x86.OpAccess.COND_WRITE, iced_x86.OpAccess.READ_COND_WRITE}
)
READ_ACCESSES = frozenset(
    {iced_x86.OpAccess.READ, iced_x86.OpAccess.READ_WRITE, iced_x86.OpAccess.COND_READ, iced_x86.OpAccess.READ_COND_WRITE}
)

_REGISTER_NAMES = {
    iced_x86.Register.RAX: "rax", iced_x86.Register.RBX: "rbx", iced_x86.Register.RCX: "rcx",
    iced_x86.Register.RDX: "rdx", iced_x86.Register.RSI: "rsi", iced_x86.Register.RDI: "rdi",
    iced_x86.Register.RSP: "rsp", iced_x86.Register.RBP: "rbp", iced_x86.Register.R8: "r8",
    iced_x86.Register.R9: "r9", iced_x86.Register.R10: "r10", iced_x86.Register.R11: "r11",
    iced_x86.Register.R12: "r12", iced_x86.Register.R13: "r13", iced_x86.Register.R14: "r14",
    iced_x86.Register.R15: "r15", iced_x86.Register.RIP: "rip",
    iced_x86.Register.EAX: "rax", iced_x86.Register.EBX: "rbx", iced_x86.Register.ECX: "rcx",
    iced_x86.Register.EDX: "rdx", iced_x86.Register.ESI: "rsi", iced_x86.Register.EDI: "rdi",
    iced_x86.Register.ESP: "rsp", iced_x86.Register.EBP: "rbp", iced_x86.Register.EIP: "rip",
}  # fmt: skip


@dataclass
class Located:
    """The instruction behind an access, and the registers it had before executing."""

    rip: int  # linear address of the instruction (= RIP in flat segments)
    length: int
    bytes: bytes
    text: str
    gva: int  # linear address it accessed
    before: dict[str, int] = field(default_factory=dict)  # registers to restore (name → value)
    string_move_size: int = 0  # element size if this is a movs (its destination may need restoring)


def _bitness(mode: CpuMode) -> int:
    return {CpuMode.LONG: 64, CpuMode.REAL: 16}.get(mode, 32)


def register_name(reg: int) -> str | None:
    name = _REGISTER_NAMES.get(reg)
    if name is not None:
        return name
    full = iced_x86.RegisterExt.full_register(reg)
    return _REGISTER_NAMES.get(full)


def _format(insn: iced_x86.Instruction) -> str:
    return iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL).format(insn)


def effective_address(insn: iced_x86.Instruction, mem: iced_x86.UsedMemory, regs: dict[str, int], seg_base: int) -> int | None:
    addr = mem.displacement
    if mem.base != iced_x86.Register.NONE:
        name = register_name(mem.base)
        if name is None:
            return None
        addr += insn.next_ip if name == "rip" else regs[name]
    if mem.index != iced_x86.Register.NONE:
        name = register_name(mem.index)
        if name is None:
            return None
        addr += regs[name] * mem.scale
    mask = (1 << (8 * _address_bytes(mem))) - 1
    return ((addr & mask) + seg_base) & 0xFFFFFFFFFFFFFFFF


def _address_bytes(mem: iced_x86.UsedMemory) -> int:
    return {iced_x86.CodeSize.CODE16: 2, iced_x86.CodeSize.CODE32: 4}.get(mem.address_size, 8)


def _mem_size(insn: iced_x86.Instruction) -> int:
    return max(int(iced_x86.MemorySizeExt.size(insn.memory_size)), 1)


STRING_STORES = frozenset(
    getattr(iced_x86.Mnemonic, m) for m in ("MOVSB", "MOVSW", "MOVSD", "MOVSQ", "STOSB", "STOSW", "STOSD", "STOSQ")
)
STRING_MOVES = frozenset(getattr(iced_x86.Mnemonic, m) for m in ("MOVSB", "MOVSW", "MOVSD", "MOVSQ"))


def locate_write(
    rip: int,
    regs: dict[str, int],
    mode: CpuMode,
    read_code: Callable[[int, int], bytes],
    translate: Callable[[int], int | None],
    gpa: int,
    seg_bases: dict[str, int],
    size: int = 0,
) -> Located | None:
    """Find the retired instruction that wrote ``gpa``; ``regs`` are the post-instruction GPRs.

    Several byte sequences ending at RIP may decode to a store to the same address
    (``48 89 37`` and its suffix ``89 37``); the store width must then match the
    exit's access ``size``, and among equals the longest decoding wins.

    ``read_code(linear, n)`` returns up to ``n`` bytes at a linear address (fewer if
    unmapped); ``translate(linear)`` gives its GPA or None.
    """
    bitness = _bitness(mode)
    # A rep string store still in progress: RIP stays on the instruction.
    here = _decode_at(read_code, rip, bitness)
    if here is not None and here.is_string_instruction and (here.has_rep_prefix or here.has_repne_prefix):
        found = _check_string(here, regs, translate, gpa, seg_bases, rep=True)
        if found is not None:
            return found
    best: Located | None = None
    for length in range(1, MAX_INSN + 1):
        start = rip - length
        insn = _decode_at(read_code, start, bitness)
        if insn is None or insn.len != length:
            continue
        if insn.is_string_instruction:
            found = _check_string(insn, regs, translate, gpa, seg_bases, rep=insn.has_rep_prefix)
            if found is not None and (not size or _mem_size(insn) == size):
                found.before["rip"] = start
                best = found
            continue
        before = dict(regs)
        if insn.stack_pointer_increment:
            before["rsp"] = regs["rsp"] - insn.stack_pointer_increment
        info = iced_x86.InstructionInfoFactory().info(insn)
        for mem in info.used_memory():
            if mem.access not in WRITE_ACCESSES:
                continue
            seg = _segment_base(mem.segment, seg_bases)
            linear = effective_address(insn, mem, before, seg)  # push/call: iced gives [pre-RSP - size]
            if linear is None:
                continue
            width = int(iced_x86.MemorySizeExt.size(mem.memory_size))
            if translate(linear) == gpa and (not size or width == size):
                located = Located(start, length, read_code(start, length), _format(insn), linear, {"rip": start})
                if insn.stack_pointer_increment:
                    located.before["rsp"] = before["rsp"]
                best = located
                break
    return best


def _check_string(
    insn: iced_x86.Instruction,
    regs: dict[str, int],
    translate: Callable[[int], int | None],
    gpa: int,
    seg_bases: dict[str, int],
    *,
    rep: bool,
) -> Located | None:
    """movs/stos: one element went to [RDI - delta]; undo RDI/RSI (and RCX for rep)."""
    if insn.mnemonic not in STRING_STORES:
        return None
    size = _mem_size(insn)
    delta = -size if regs.get("rflags", 0) & RFLAGS_DF else size
    rdi = (regs["rdi"] - delta) & 0xFFFFFFFFFFFFFFFF
    linear = (rdi + seg_bases.get("es", 0)) & 0xFFFFFFFFFFFFFFFF
    if translate(linear) != gpa:
        return None
    before = {"rdi": rdi, "rip": insn.ip, "rflags": regs.get("rflags", 0) & ~RFLAGS_RF}
    if insn.mnemonic in STRING_MOVES:
        before["rsi"] = (regs["rsi"] - delta) & 0xFFFFFFFFFFFFFFFF
    if rep:
        before["rcx"] = regs["rcx"] + 1
    return Located(insn.ip, insn.len, b"", _format(insn), linear, before)


def _segment_base(segment: int, bases: dict[str, int]) -> int:
    if segment == iced_x86.Register.FS:
        return bases.get("fs", 0)
    if segment == iced_x86.Register.GS:
        return bases.get("gs", 0)
    return 0


def _decode_at(read_code: Callable[[int, int], bytes], linear: int, bitness: int) -> iced_x86.Instruction | None:
    code = read_code(linear, MAX_INSN)
    if not code:
        return None
    insn = iced_x86.Decoder(bitness, code, ip=linear).decode()
    if insn.code == iced_x86.Code.INVALID:
        return None
    return insn


def decode_at(read_code: Callable[[int, int], bytes], linear: int, mode: CpuMode) -> Located | None:
    """The instruction at ``linear`` (for denied reads and fetches, where RIP has not moved)."""
    insn = _decode_at(read_code, linear, _bitness(mode))
    if insn is None:
        return None
    located = Located(linear, insn.len, read_code(linear, insn.len), _format(insn), 0, {})
    if insn.mnemonic in STRING_MOVES:
        located.string_move_size = _mem_size(insn)
    return located


def read_target(
    insn_at: Located, regs: dict[str, int], mode: CpuMode, read_code: Callable[[int, int], bytes], seg_bases: dict[str, int]
) -> int | None:
    """The linear address a (not yet executed) instruction reads, for the intercept's GVA."""
    insn = _decode_at(read_code, insn_at.rip, _bitness(mode))
    if insn is None:
        return None
    info = iced_x86.InstructionInfoFactory().info(insn)
    for mem in info.used_memory():
        if mem.access in READ_ACCESSES:
            return effective_address(insn, mem, regs, _segment_base(mem.segment, seg_bases))
    return None
