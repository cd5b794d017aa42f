"""Deterministic test images for tests, benchmarks and the demo: noise in any Pillow format, a PNG bomb."""

from __future__ import annotations

import io
import struct
import zlib

import torch
from PIL import Image


def image_bytes(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A deterministic random-noise image in `fmt` and `mode`."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    arr = (torch.rand(h, w, 4, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr, "RGBA").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def png_header_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's signature)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
