"""``VtlArray[T]``: one instance of something that exists once per VTL of a partition.

VSM makes most state private per VTL: on the machine side each VP has a vCPU, a
local APIC, a register file and a CPUID table per VTL, and the partition a KVM VM
and a memory view per VTL; in the emulation the SynIC, timers, hypercall MSR and VP
assist page are per VTL. Holding each in a fixed-length array indexed by VTL number
(as OpenVMM does) keeps "which VTL's copy" explicit at every access, and the walks
VSM needs ("every VTL above this one, highest first") are named instead of written
as ``range(top, vtl, -1)`` loops.

It is a tuple: indexing costs what a tuple's does (the run loop reads these per exit).
VTL numbers are never negative; an index past the last VTL raises IndexError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class VtlArray(tuple[T, ...]):
    """Fixed-length array indexed by VTL: ``VtlArray(count, factory)`` builds ``factory(vtl)`` for each VTL.

    ``VtlArray(items)`` wraps existing per-VTL values (VTL 0 first).
    """

    __slots__ = ()

    def __new__(cls, count: int | Iterable[T], factory: Callable[[int], T] | None = None) -> VtlArray[T]:
        items = tuple(factory(vtl) for vtl in range(count)) if factory is not None else tuple(count)  # type: ignore[arg-type]
        if not items:
            raise ValueError("a partition has at least VTL0")
        return super().__new__(cls, items)

    def items(self) -> Iterator[tuple[int, T]]:
        """(vtl, element) pairs in VTL order."""
        return enumerate(self)

    def higher(self, vtl: int, top: int | None = None) -> Iterator[tuple[int, T]]:
        """(vtl, element) of every VTL above ``vtl`` up to ``top`` (default: the highest), highest first."""
        last = len(self) - 1 if top is None else top
        for v in range(last, vtl, -1):
            yield v, self[v]

    def lower(self, vtl: int) -> Iterator[tuple[int, T]]:
        """(vtl, element) of every VTL below ``vtl``, VTL0 first."""
        for v in range(vtl):
            yield v, self[v]

    def __repr__(self) -> str:
        return f"VtlArray({list(self)!r})"
