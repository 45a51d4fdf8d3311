"""MemoryView: a VTL's page permissions as KVM memslots, checked against a page-by-page model.

A protection change can cover tens of thousands of pages, so ``set_pages`` and ``runs`` work
on ranges; these property tests compare what they leave (the memslots KVM is given, the
restricted pages, the count of pages KVM cannot keep from executing, the fast path's
no-execute bitmap) with the meaning of every single page.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from vsmtrace.vmm.backends.hypercall_fastpath import ViewGuard
from vsmtrace.vmm.kvm.system import MemoryRegion
from vsmtrace.vmm.memory import PAGE_SHIFT, RamRange
from vsmtrace.vmm.memory_view import ALL_ACCESS, MemoryView, SlotKind, execute_unenforced, slot_kind
from vsmtrace.vmm.vp import Access

HOST = 0x7F00_0000_0000
#: Two RAM ranges with a gap between them, as a PC's RAM below and above the MMIO hole.
RANGES = [RamRange(0, 40 << PAGE_SHIFT, 0), RamRange(64 << PAGE_SHIFT, 24 << PAGE_SHIFT, 40 << PAGE_SHIFT)]
RAM_PAGES = [p for r in RANGES for p in range(r.gpa >> PAGE_SHIFT, r.end >> PAGE_SHIFT)]


@dataclass
class FakeMemory:
    ranges: list[RamRange] = field(default_factory=lambda: list(RANGES))

    def host_address(self) -> int:
        return HOST

    def is_ram(self, gpa: int, size: int = 1) -> bool:
        return any(r.gpa <= gpa and gpa + size <= r.end for r in self.ranges)


class FakeVm:
    """Holds the memslots as KVM would: a slot of size 0 deletes it."""

    def __init__(self) -> None:
        self.slots: dict[int, MemoryRegion] = {}

    def set_memory_region(self, region: MemoryRegion) -> None:
        if region.size == 0:
            del self.slots[region.slot]
        else:
            assert region.slot not in self.slots, "a slot is replaced without being deleted first"
            self.slots[region.slot] = region


class FakeGuard:
    """A ProtectionGuard over a bytearray bitmap (what the C guard holds), using the real marking code."""

    def __init__(self, pages: int) -> None:
        self.bitmap = bytearray(-(-pages // 8))
        self.marker = ViewGuard.__new__(ViewGuard)
        self.marker.nx, self.marker.nx_pages = self.bitmap, pages
        self.open = False
        self.published: tuple[int, int] | None = None

    def begin(self) -> None:
        assert not self.open
        self.open = True

    def mark(self, first_page: int, count: int, unenforced: bool) -> None:
        assert self.open
        self.marker.mark(first_page, count, unenforced)

    def end(self, restricted: int, unenforced: int) -> None:
        self.open = False
        self.published = (restricted, unenforced)

    def bit(self, page: int) -> bool:
        return bool(self.bitmap[page >> 3] & 1 << (page & 7))


accesses = st.integers(0, int(ALL_ACCESS)).map(Access)
# Ranges inside RAM only (the hypercall checks that before it asks the view), of any length.
changes = st.lists(
    st.tuples(st.sampled_from(range(len(RAM_PAGES))), st.integers(1, 30), accesses).map(
        lambda t: (RAM_PAGES[t[0]], min(t[1], _run_left(RAM_PAGES[t[0]])), t[2])
    ),
    max_size=12,
)


def _run_left(page: int) -> int:
    """RAM pages from ``page`` to the end of its range."""
    return next(r.end >> PAGE_SHIFT for r in RANGES if r.gpa >> PAGE_SHIFT <= page < r.end >> PAGE_SHIFT) - page


@settings(deadline=None, max_examples=300)
@given(changes)
def test_memslots_and_counts_follow_every_page(steps: list[tuple[int, int, Access]]) -> None:
    vm, guard = FakeVm(), FakeGuard(max(RAM_PAGES) + 1)
    view = MemoryView.__new__(MemoryView)
    MemoryView.__init__(view, vm, FakeMemory(), 0)  # type: ignore[arg-type]
    view.guard = guard
    view.apply()
    model = dict.fromkeys(RAM_PAGES, ALL_ACCESS)
    for first, count, allowed in steps:
        view.set_pages(first, count, allowed)
        for page in range(first, first + count):
            model[page] = allowed

    assert view.restricted == {p: a for p, a in model.items() if a != ALL_ACCESS}
    unenforced = sum(execute_unenforced(a) for a in model.values())
    assert view.unenforced_execute == unenforced
    if steps:
        assert guard.published == (len(view.restricted), unenforced)
        for page in {p for first, count, _ in steps for p in range(first, first + count)}:
            assert guard.bit(page) == execute_unenforced(model[page]), page
    # Every page is where its permissions say: in one RAM slot, in one read-only slot, or in none.
    covering: dict[int, MemoryRegion] = {}
    for region in vm.slots.values():
        for page in range(region.guest_phys_addr >> PAGE_SHIFT, (region.guest_phys_addr + region.size) >> PAGE_SHIFT):
            assert page not in covering, f"page {page} is in two memslots"
            covering[page] = region
    for page, allowed in model.items():
        kind, region = slot_kind(allowed), covering.get(page)
        if kind is SlotKind.HOLE:
            assert region is None, f"page {page} ({allowed!r}) must be a hole"
            continue
        assert region is not None, f"page {page} ({allowed!r}) has no memslot"
        assert region.readonly == (kind is SlotKind.READONLY), page
        ram = next(r for r in RANGES if r.gpa >> PAGE_SHIFT <= page < r.end >> PAGE_SHIFT)
        gpa = page << PAGE_SHIFT
        assert region.userspace_addr + (gpa - region.guest_phys_addr) == HOST + ram.offset + (gpa - ram.gpa)
    assert set(covering) <= set(RAM_PAGES)
    # Neighbouring pages of one kind share a slot: a change never leaves more slots than runs of kinds.
    kinds = [(p, slot_kind(model[p])) for p in RAM_PAGES]
    runs = sum(
        1 for i, (p, k) in enumerate(kinds)
        if k is not SlotKind.HOLE and (i == 0 or kinds[i - 1][1] is not k or kinds[i - 1][0] + 1 != p)
    )  # fmt: skip
    assert len(vm.slots) == runs


@settings(deadline=None, max_examples=300)
@given(st.lists(st.tuples(st.integers(0, 70), st.integers(1, 40), st.booleans()), max_size=10))
def test_the_no_execute_bitmap_marks_ranges_as_single_pages(marks: list[tuple[int, int, bool]]) -> None:
    pages = 67  # not a multiple of 8: the last byte is partial, and marks past the end are ignored
    guard, model = FakeGuard(pages), [False] * pages
    for first, count, unenforced in marks:
        guard.begin()
        guard.mark(first, count, unenforced)
        guard.end(0, 0)
        for page in range(first, min(first + count, pages)):
            model[page] = unenforced
    assert [guard.bit(p) for p in range(pages)] == model
    assert not guard.bitmap[-1] >> (pages & 7)  # no bit beyond the last page
