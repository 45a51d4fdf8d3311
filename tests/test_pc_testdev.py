"""QEMU's pc-testdev: unit tests (no KVM) and the pc_testdev guest, whose expectations were checked on QEMU 7.2."""

from __future__ import annotations

import re

import pytest
from vsmtrace.vmm.devices.pc_testdev import IOMEM_SIZE, PcTestdev


def make() -> tuple[PcTestdev, list[tuple[str, int, bool]]]:
    calls: list[tuple[str, int, bool]] = []
    dev = PcTestdev(lambda irq, lvl: calls.append(("isa", irq, lvl)), lambda pin, lvl: calls.append(("gsi", pin, lvl)))
    return dev, calls


def test_scratch_register_partial_and_byte_alias() -> None:
    dev, _ = make()
    dev.pio_write(0xE0, 4, 0x11223344)
    assert [dev.pio_read(0xE0 + i, 1) for i in range(4)] == [0x44, 0x33, 0x22, 0x11]
    assert dev.pio_read(0xE2, 2) == 0x1122
    assert dev.pio_read(0xE8, 4) == 0x11223344
    dev.pio_write(0xE2, 1, 0xAA)
    dev.pio_write(0xE9, 1, 0xBB)
    assert dev.pio_read(0xE0, 4) == 0x11AABB44
    dev.pio_write(0xE1, 2, 0xCCDD)  # unaligned: ignored
    assert dev.pio_read(0xE0, 4) == 0x11AABB44
    assert dev.pio_read(0xE1, 2) == 0 and dev.pio_read(0xE2, 4) == 0  # unaligned reads: 0, as QEMU
    assert dev.pio_read(0xE4, 4) == 0  # flush page reads 0
    dev.pio_write(0xE4, 4, 0x1000)
    assert dev.pio_read(0xE0, 4) == 0x11AABB44


def test_irq_lines() -> None:
    dev, calls = make()
    dev.pio_write(0x2000 + 14, 1, 1)
    dev.pio_write(0x2000 + 14, 1, 0)
    dev.pio_write(0x2000 + 20, 1, 7)
    assert calls == [("isa", 14, True), ("isa", 14, False), ("gsi", 20, True)]
    assert dev.pio_read(0x2000, 1) == 0


def test_iomem() -> None:
    dev, _ = make()
    assert dev.mmio_read(0x100, 4) == 0
    dev.mmio_write(8, 8, 0x0102030405060708)
    assert dev.mmio_read(8, 8) == 0x0102030405060708
    assert dev.mmio_read(9, 4) == 0x04050607
    assert dev.mmio_read(15, 1) == 0x01
    dev.mmio_write(IOMEM_SIZE - 2, 4, 0xFFFFFFFF)  # clipped at the end of the page
    assert dev.mmio_read(IOMEM_SIZE - 2, 2) == 0xFFFF


@pytest.mark.kvm
def test_pc_testdev_guest(kvm, guest, vsmtrace) -> None:  # type: ignore[no-untyped-def]
    r = vsmtrace(["run", "--smp", "2", "--timeout", "60", str(guest("pc_testdev"))], timeout=120)
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert not fails, fails
    assert r.status == 1, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("scratch_dword", "scratch_byte_alias", "unaligned_ignored", "flush_page_reads_0", "irq0_is_pin2",
                 "isa_lines_to_pins", "iomem_qword", "iomem_unaligned", "iomem_from_other_cpu"):  # fmt: skip
        assert re.search(rf"^ok {name}$", r.stdout, re.M), name
