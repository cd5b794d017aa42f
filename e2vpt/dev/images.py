"""Deterministic test images for tests, benchmarks and the demo: noise in any Pillow format, a PNG bomb, a
JPEG scan bomb, header floods."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import torch
from PIL import Image

from e2vpt.core.backbone import BackboneInfo


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


def photo_jpeg(seed: int, size: tuple[int, int] = (640, 480), quality: int = 90) -> bytes:
    """A deterministic photo-like JPEG (smooth colour fields plus fine grain): realistic file sizes
    (a 640x480 one is ~50-100 KB, where noise would be ~500 KB) for benchmarks and parity checks."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, generator=g), size=(h, w), mode="bicubic")
    grain = torch.randn(1, 3, h, w, generator=g) * 0.03
    arr = ((base + grain).clamp(0, 1)[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def jpeg_scan_bomb(size: tuple[int, int] = (64, 48), scans: int = 200) -> bytes:
    """A valid progressive JPEG with `scans` extra scans of a few bytes each, every one of which the
    decoders run over the whole image (a decoding-time bomb): an AC scan of the luma whose only Huffman
    code, one bit long, is a run of 16384-32767 empty blocks, so ~16 bits cover 32767 blocks."""
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 60, 200)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    blocks = -(-size[0] // 8) * -(-size[1] // 8)  # luma blocks: a one-component scan covers them all
    table = bytes([0x11, 1] + [0] * 15 + [0xE0])  # AC table 1: one code of length 1 -> EOB run, 14 bits
    dht = b"\xff\xc4" + struct.pack(">H", 2 + len(table)) + table
    bits = ""
    for _ in range(max(1, -(-blocks // 32767))):
        bits += "0" + format(32767 - 16384, "014b")  # a run longer than what is left ends the scan too
    bits += "1" * (-len(bits) % 8)
    entropy = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")
    header = bytes([1, 1, 0x01, 1, 63, 0])  # component 1 (tables 0 / 1), Ss 1, Se 63, Ah 0, Al 0
    scan = b"\xff\xda" + struct.pack(">H", 2 + len(header)) + header + entropy
    return data[:-2] + dht + scan * scans + data[-2:]


def _small(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (16, 16), 3 if mode == "P" else (120, 60, 200)).save(buf, fmt)
    return buf.getvalue()


def jpeg_header_flood(fill: int = 4_000_000) -> bytes:
    """A 16x16 JPEG with `fill` 0xFF fill bytes before its first segment: Pillow's opener takes one Python
    step per byte (4 MB: 3.7 s here, `bench_hostile_images.py`); the header check refuses more than 1,000."""
    data = _small("JPEG")
    return data[:2] + b"\xff" * fill + data[2:]


def png_chunk_flood(chunks: int = 200_000) -> bytes:
    """A 16x16 PNG with `chunks` empty ancillary chunks after its header (IHDR), each one a Python step
    of Pillow's reader (`MAX_PNG_CHUNKS` bounds them)."""
    data = _small("PNG")
    empty = struct.pack(">I", 0) + b"abCd" + struct.pack(">I", zlib.crc32(b"abCd"))
    return data[:33] + empty * chunks + data[33:]


def gif_block_flood(blocks: int = 200_000) -> bytes:
    """A 16x16 GIF with `blocks` one-byte comment extensions before its image, two Python steps each of
    Pillow's reader (`MAX_GIF_HEADER_BLOCKS` bounds them)."""
    data = _small("GIF", "P")
    at = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # after the global colour table
    return data[:at] + b"\x21\xfe\x01a\x00" * blocks + data[at:]


def with_exif(data: bytes, orientation: int = 6) -> bytes:
    """A JPEG with an Exif block (this orientation, 300 dpi) after its start marker, as a phone writes one."""
    exif = Image.Exif()
    exif[0x0112], exif[0x011A], exif[0x0128] = orientation, 300.0, 2
    block = exif.tobytes()
    return data[:2] + b"\xff\xe1" + (len(block) + 2).to_bytes(2, "big") + block + data[2:]


def pil_reference_transform(
    info: BackboneInfo, recipe: str = "vtab"
) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform as the project ran it before the tensor `Preprocess` (torchvision transforms on
    PIL images): kept only to measure train/serve parity against it (benchmarks/parity_images.py, tests)."""
    import torchvision.transforms as T

    size = tuple(info.img_size)
    resize = size if recipe == "vtab" else tuple(round(s * 256 / 224) for s in size)
    steps: list[Callable] = [T.Resize(resize, interpolation=T.InterpolationMode(info.interpolation))]
    if recipe == "fgvc":
        steps.append(T.CenterCrop(size))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(info.mean, info.std)])
