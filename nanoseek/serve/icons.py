"""The web app's icons, drawn here (no binary files in the repository): a blue disc with a
white ring and dot on white, as PNG at any size."""

from __future__ import annotations

import functools
import struct
import zlib


@functools.lru_cache(maxsize=4)
def png_icon(size: int) -> bytes:
    c = (size - 1) / 2
    rows = []
    for y in range(size):
        row = bytearray([0])  # filter: none
        for x in range(size):
            d = ((x - c) ** 2 + (y - c) ** 2) ** 0.5 / (size / 2)
            if d > 0.96:
                px = (255, 255, 255)
            elif 0.52 < d < 0.66 or d < 0.2:
                px = (255, 255, 255)
            else:
                px = (37, 99, 235)
            row += bytes(px)
        rows.append(bytes(row))
    raw = zlib.compress(b"".join(rows), 9)

    def block(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + block(b"IHDR", header) + block(b"IDAT", raw) + block(b"IEND", b"")
