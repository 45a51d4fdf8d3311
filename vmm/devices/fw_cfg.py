"""QEMU's fw_cfg interface (selector port 0x510, data port 0x511), traditional mode.

Guests written for QEMU read the signature, RAM size, CPU count and named files
from here. No DMA interface (the ID item says so).
"""

from __future__ import annotations

import struct
import threading

FW_CFG_SELECTOR_PORT = 0x510
FW_CFG_DATA_PORT = 0x511
FW_CFG_PORT_COUNT = 2

FW_CFG_SIGNATURE = 0x0000
FW_CFG_ID = 0x0001
FW_CFG_RAM_SIZE = 0x0003
FW_CFG_NB_CPUS = 0x0005
FW_CFG_MAX_CPUS = 0x000F
FW_CFG_CMDLINE_SIZE = 0x0014
FW_CFG_CMDLINE_DATA = 0x0015
FW_CFG_FILE_DIR = 0x0019
FW_CFG_FILE_FIRST = 0x0020

FW_CFG_ID_TRADITIONAL = 0x1
FW_CFG_MAX_FILE_NAME = 56
SIGNATURE = b"QEMU"


class FwCfg:
    """Items addressed by a 16-bit selector; each read returns the next byte."""

    def __init__(self, ram_size: int, cpus: int, cmdline: str = "") -> None:
        self.lock = threading.Lock()
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: SIGNATURE,
            FW_CFG_ID: struct.pack("<I", FW_CFG_ID_TRADITIONAL),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NB_CPUS: struct.pack("<H", cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", cpus),
            FW_CFG_CMDLINE_SIZE: struct.pack("<I", len(cmdline) + 1),
            FW_CFG_CMDLINE_DATA: cmdline.encode() + b"\0",
        }
        self.files: list[tuple[str, int]] = []
        self._rebuild_dir()
        self.selected = FW_CFG_SIGNATURE
        self.offset = 0

    def add_file(self, name: str, data: bytes) -> int:
        """Publish ``data`` under ``name``; returns its selector."""
        if len(name.encode()) >= FW_CFG_MAX_FILE_NAME:
            raise ValueError(f"fw_cfg file name too long: {name}")
        selector = FW_CFG_FILE_FIRST + len(self.files)
        self.items[selector] = bytes(data)
        self.files.append((name, selector))
        self._rebuild_dir()
        return selector

    def _rebuild_dir(self) -> None:
        out = bytearray(struct.pack(">I", len(self.files)))
        for name, sel in self.files:
            out += struct.pack(">IHH", len(self.items[sel]), sel, 0)
            out += name.encode().ljust(FW_CFG_MAX_FILE_NAME, b"\0")
        self.items[FW_CFG_FILE_DIR] = bytes(out)

    def pio_read(self, port: int, size: int) -> int:
        if port == FW_CFG_SELECTOR_PORT:
            return 0
        with self.lock:
            data = self.items.get(self.selected, b"")
            value = 0
            for i in range(size):
                b = data[self.offset] if self.offset < len(data) else 0
                self.offset += 1
                value |= b << (8 * i)
            return value

    def pio_write(self, port: int, size: int, value: int) -> None:
        if port == FW_CFG_SELECTOR_PORT:
            with self.lock:
                self.selected = value & 0xFFFF
                self.offset = 0
