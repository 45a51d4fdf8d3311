"""``VtlArray[T]``: one instance of some per-VTL state for each VTL of a partition.

VSM makes most Hyper-V state private per VTL (SynIC, timers, hypercall MSR, VP assist
page ...). Holding it in a fixed-length array indexed by VTL number, as OpenVMM does,
keeps "which VTL's copy" explicit at every access and lets the VSM stage grow the
partition from 1 to N VTLs without changing the per-VTL types.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class VtlArray(Generic[T]):
    """Fixed-length array indexed by VTL; elements are built once by ``factory(vtl)``."""

    __slots__ = ("_items",)

    def __init__(self, count: int, factory: Callable[[int], T]) -> None:
        if count < 1:
            raise ValueError("a partition has at least VTL0")
        self._items: tuple[T, ...] = tuple(factory(vtl) for vtl in range(count))

    def __getitem__(self, vtl: int) -> T:
        if not 0 <= vtl < len(self._items):
            raise IndexError(f"VTL{vtl} does not exist (partition has {len(self._items)} VTLs)")
        return self._items[vtl]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def items(self) -> Iterator[tuple[int, T]]:
        """(vtl, element) pairs in VTL order."""
        return iter(enumerate(self._items))

    def __repr__(self) -> str:
        return f"VtlArray({list(self._items)!r})"
