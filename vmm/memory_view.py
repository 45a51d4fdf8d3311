"""A VTL's view of guest RAM, expressed as a KVM memslot layout.

Stock KVM has no per-page permissions, so a lower VTL's protections become the
shape of its VM's memslots (docs/vsm.md, "How protections reach KVM"; docs/architecture.md):

* read and write allowed          → RAM slot (KVM runs the guest natively);
* read, no write                  → read-only slot (KVM_CAP_READONLY_MEM: stores exit
  as MMIO, the write intercept);
* no read                         → hole (every access exits; an instruction fetch
  fails, which is the execute intercept).

A readable page must stay readable for everything: instructions, the CPU's own page
walks and descriptor-table loads (which KVM cannot complete from a hole: the guest
would take #PF/#DF and triple-fault) and the VMM's hypercall-buffer reads. Upstream KVM
has no per-page no-execute (KVM_SET_MEMORY_ATTRIBUTES offers only "private"), so on a
readable page a denied execute is not enforced by KVM: allowed reads win. Such pages are
counted in ``unenforced_execute``; the backend reports the limitation once and raises the
execute intercept where it can see the fetch (a lower VTL resuming on such a page).

Only pages that differ from "everything allowed" are stored, so an unprotected
view costs nothing, and a change rebuilds only the slots it touches.
"""

from __future__ import annotations

import enum
import threading
from bisect import bisect_left
from dataclasses import dataclass
from typing import Protocol

from vsmtrace.vmm.kvm.system import MemoryRegion, Vm
from vsmtrace.vmm.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory
from vsmtrace.vmm.vp import Access

ALL_ACCESS = Access.READ | Access.WRITE | Access.EXECUTE
READ_WRITE = Access.READ | Access.WRITE


class SlotKind(enum.Enum):
    RAM = "ram"
    READONLY = "readonly"
    HOLE = "hole"


def slot_kind(allowed: Access) -> SlotKind:
    if allowed & READ_WRITE == READ_WRITE:
        return SlotKind.RAM
    if allowed & Access.READ:
        return SlotKind.READONLY
    return SlotKind.HOLE


def execute_unenforced(allowed: Access) -> bool:
    """A readable page whose denied execute KVM cannot enforce (see the module docstring)."""
    return bool(allowed & Access.READ) and not allowed & Access.EXECUTE


# The two functions above for every value of ``Access``, indexed by its int: one ModifyVtlProtectionMask
# can change tens of thousands of pages, and IntFlag arithmetic costs about a microsecond per operation.
_KIND_OF = [slot_kind(Access(v)) for v in range(int(ALL_ACCESS) + 1)]
_UNENFORCED_OF = [int(execute_unenforced(Access(v))) for v in range(int(ALL_ACCESS) + 1)]


@dataclass(frozen=True)
class Run:
    """Consecutive pages with the same slot kind."""

    first_page: int
    pages: int
    kind: SlotKind

    @property
    def gpa(self) -> int:
        return self.first_page << PAGE_SHIFT

    @property
    def size(self) -> int:
        return self.pages << PAGE_SHIFT


class ProtectionGuard(Protocol):
    """Told around every permission change, for code that reads guest memory outside Python.

    ``begin`` returns once no access that saw the old permissions is still under way (the
    hypercall fast path, vmm/backends/hypercall_fastpath.py, holds its guard while it reads);
    ``end`` publishes how many pages are now restricted, and how many of those KVM cannot
    keep from executing (``unenforced_execute``); ``mark`` tells, for every range of pages
    changed, whether they are now such pages.
    """

    def begin(self) -> None: ...

    def mark(self, first_page: int, count: int, unenforced: bool) -> None: ...

    def end(self, restricted: int, unenforced: int) -> None: ...


class MemoryView:
    """The memslots of one VTL's KVM VM, kept equal to its page permissions."""

    def __init__(self, vm: Vm, memory: GuestMemory, vtl: int) -> None:
        self.vm = vm
        self.memory = memory
        self.vtl = vtl
        self.lock = threading.RLock()
        self.restricted: dict[int, Access] = {}  # page → allowed (only pages != ALL_ACCESS)
        #: Pages readable but not executable: KVM cannot deny their instruction fetches.
        self.unenforced_execute = 0
        self.slots: dict[Run, int] = {}
        self.next_slot = 0
        self.free_slots: list[int] = []
        self.host = memory.host_address()
        self.guard: ProtectionGuard | None = None

    # -- queries (any thread) --------------------------------------------------------------
    def allowed(self, page: int) -> Access:
        return self.restricted.get(page, ALL_ACCESS)

    def check(self, gpa: int, size: int, access: Access) -> bool:
        """Whether every page of ``[gpa, gpa + size)`` allows ``access`` in this view."""
        if not self.restricted:
            return True
        first, last = gpa >> PAGE_SHIFT, (gpa + max(size, 1) - 1) >> PAGE_SHIFT
        return all(access & ~self.allowed(p) == 0 for p in range(first, last + 1))

    # -- layout ----------------------------------------------------------------------------------
    def runs(self) -> list[Run]:
        """The slot layout the current permissions call for, covering all RAM.

        Consecutive restricted pages of one kind share a run (a hole or a read-only slot);
        unrestricted pages make RAM runs. One pass over the sorted restricted pages.
        """
        out: list[Run] = []
        special = sorted(self.restricted)
        restricted, kind_of = self.restricted, _KIND_OF
        ram = SlotKind.RAM
        for r in self.memory.ranges:
            start, end = r.gpa >> PAGE_SHIFT, r.end >> PAGE_SHIFT
            cursor = start
            run_first, run_pages, run_kind = 0, 0, ram  # the restricted run being extended
            for page in special[bisect_left(special, start) : bisect_left(special, end)]:
                kind = kind_of[restricted[page]]
                if kind is ram:  # restricted, but only its execute: a RAM page like its neighbours
                    continue
                if run_pages and kind is run_kind and run_first + run_pages == page:
                    run_pages += 1
                    cursor = page + 1
                    continue
                if run_pages:
                    out.append(Run(run_first, run_pages, run_kind))
                if page > cursor:
                    out.append(Run(cursor, page - cursor, ram))
                run_first, run_pages, run_kind = page, 1, kind
                cursor = page + 1
            if run_pages:
                out.append(Run(run_first, run_pages, run_kind))
            if cursor < end:
                out.append(Run(cursor, end - cursor, ram))
        return out

    def apply(self) -> None:
        """Make KVM's memslots match :meth:`runs` (only the slots that changed move)."""
        with self.lock:
            wanted = {run for run in self.runs() if run.kind is not SlotKind.HOLE}
            stale = [run for run in self.slots if run not in wanted]
            for run in stale:
                slot = self.slots.pop(run)
                self.vm.set_memory_region(MemoryRegion(slot, run.gpa, 0, 0))
                self.free_slots.append(slot)
            for run in sorted(wanted - set(self.slots), key=lambda r: r.first_page):
                slot = self.free_slots.pop() if self.free_slots else self._new_slot()
                offset = self._ram_offset(run.gpa)
                self.vm.set_memory_region(
                    MemoryRegion(slot, run.gpa, run.size, self.host + offset, readonly=run.kind is SlotKind.READONLY)
                )
                self.slots[run] = slot

    def _new_slot(self) -> int:
        slot = self.next_slot
        self.next_slot += 1
        return slot

    def _ram_offset(self, gpa: int) -> int:
        for r in self.memory.ranges:
            if r.gpa <= gpa < r.end:
                return r.offset + (gpa - r.gpa)
        raise ValueError(f"{gpa:#x} is not RAM")

    def set_pages(self, first_page: int, count: int, allowed: Access) -> None:
        """Change the permissions of ``count`` pages and update the memslots."""
        end = first_page + count
        with self.lock:
            guard = self.guard
            if guard is not None:
                guard.begin()
            try:
                restricted = self.restricted
                # The pages of the range restricted before: found from whichever side is smaller.
                if len(restricted) < count:
                    before = [page for page in restricted if first_page <= page < end]
                else:
                    before = [page for page in range(first_page, end) if page in restricted]
                unenforced_of = _UNENFORCED_OF
                self.unenforced_execute -= sum(unenforced_of[restricted.pop(page)] for page in before)
                if allowed != ALL_ACCESS:
                    restricted.update(dict.fromkeys(range(first_page, end), Access(allowed)))
                    self.unenforced_execute += unenforced_of[allowed] * count
                if guard is not None:
                    guard.mark(first_page, count, bool(unenforced_of[allowed]))
                self.apply()
            finally:
                if guard is not None:
                    guard.end(len(restricted), self.unenforced_execute)

    def is_ram_page(self, page: int) -> bool:
        return self.memory.is_ram(page << PAGE_SHIFT, PAGE_SIZE)
