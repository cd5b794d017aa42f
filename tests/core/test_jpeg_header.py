"""`scan_jpeg_header` (plain JPEG headers read without Pillow) against Pillow's own verdict: wherever the
scan answers, Pillow opens the same bytes as format JPEG in mode RGB or L with the same size and EXIF
orientation (what `read_header` answered before, through `open_image` + `exif_orientation`); the common
files (JFIF, Exif with or without orientation, ICC, comments, progressive, restart markers, grayscale)
are answered by the scan; the rest (CMYK, MPO, XMP, unusual fields, limits) left to Pillow. Generated
files, hand-built Exif blocks and mutated headers.

`E2VPT_JPEG_HEADER_FUZZ_EXAMPLES` sets the number of mutated files (default 3,000)."""

from __future__ import annotations

import io
import os
import struct
import warnings
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from e2vpt.core.images import (
    ImageLimits,
    JpegHeader,
    decode_tensor,
    exif_orientation,
    is_fast_jpeg,
    open_image,
    read_header,
    scan_jpeg_header,
)
from e2vpt.errors import E2VPTError
from tests.poison import mutate

EXAMPLES = int(os.environ.get("E2VPT_JPEG_HEADER_FUZZ_EXAMPLES", "3000"))
LIMITS = ImageLimits(max_pixels=1_000_000)


def pillow_header(data: bytes, limits: ImageLimits = LIMITS) -> JpegHeader | str:
    """What Pillow says: the header of a JPEG its fast decoders take, or why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = open_image(data, limits)
            if not is_fast_jpeg(img):
                return f"not a plain JPEG: {img.format} {img.mode}"
            return JpegHeader(img.width, img.height, exif_orientation(img))
    except E2VPTError as exc:
        return f"refused: {type(exc).__name__}"


def agree(data: bytes, limits: ImageLimits = LIMITS) -> JpegHeader | None:
    """The scan's answer, checked against Pillow's wherever the scan answers."""
    got = scan_jpeg_header(data, limits)
    if got is not None:
        assert got == pillow_header(data, limits), data[:64]
    return got


def exif_block(entries: list[tuple[int, int, int, bytes]], order: str = "<", extra: bytes = b"") -> bytes:
    """A TIFF first directory: (tag, type, count, 4 value bytes) entries; `extra` appended after it."""
    head = (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(order + "L", 8)
    body = struct.pack(order + "H", len(entries))
    for tag, typ, count, value in entries:
        body += struct.pack(order + "HHL", tag, typ, count) + value.ljust(4, b"\0")
    return head + body + struct.pack(order + "L", 0) + extra


def short(value: int, order: str = "<") -> bytes:
    return struct.pack(order + "H", value)


def jpeg(mode: str = "RGB", size: tuple[int, int] = (40, 30), **params: object) -> bytes:
    g = torch.Generator().manual_seed(sum(size))
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(pixels, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", **params)
    return buf.getvalue()


def orientation_exif(value: int, order: str = "<") -> bytes:
    return b"Exif\0\0" + exif_block([(0x0112, 3, 1, short(value, order))], order)


@cache
def common_files() -> dict[str, bytes]:
    """Files the scan must answer itself (the fast path), each with what Pillow reads."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x011A] = 300.0
    exif[0x0128] = 2
    files = {
        "plain": jpeg(),
        "grayscale": jpeg("L"),
        "progressive": jpeg(progressive=True),
        "optimized": jpeg(optimize=True, quality=50),
        "subsampling 4:4:4": jpeg(subsampling=0),
        "restart markers": jpeg(restart_marker_blocks=2),
        "comment": jpeg(comment=b"hello"),
        "icc profile": jpeg(icc_profile=b"x" * 300),
        "jfif dpi": jpeg(dpi=(300, 300)),
        "exif from Pillow (orientation 6, dpi)": jpeg(exif=exif.tobytes()),
        "exif without orientation": jpeg(exif=b"Exif\0\0" + exif_block([(0x010F, 2, 4, b"abc\0")])),
        "exif big-endian orientation 8": jpeg(exif=orientation_exif(8, ">")),
        "exif orientation 0 (invalid: as stored)": jpeg(exif=orientation_exif(0)),
        "exif orientation 9 (invalid: as stored)": jpeg(exif=orientation_exif(9)),
        "exif and jfif dpi": jpeg(exif=orientation_exif(3), dpi=(72, 72)),
        "large": jpeg(size=(640, 480)),
    }
    for o in range(1, 9):
        files[f"exif orientation {o}"] = jpeg(exif=orientation_exif(o))
    return files


@pytest.mark.parametrize("name", list(common_files()))
def test_common_files_are_scanned_as_pillow_reads_them(name: str) -> None:
    data = common_files()[name]
    assert isinstance(pillow_header(data), JpegHeader)
    assert agree(data) is not None


def left_to_pillow() -> dict[str, bytes]:
    base = jpeg()
    buf = io.BytesIO()
    Image.open(io.BytesIO(base)).save(buf, "MPO", save_all=True, append_images=[Image.open(io.BytesIO(base))])
    ifd_past_end = b"Exif\0\0II*\0" + struct.pack("<L", 4000)
    value_past_end = b"Exif\0\0" + exif_block(
        [(0x010F, 2, 40, struct.pack("<L", 5000)), (0x0112, 3, 1, short(6))]
    )
    return {
        "cmyk": jpeg("CMYK"),
        "mpo": buf.getvalue(),
        "xmp (may hold the orientation)": jpeg(xmp=b"<x><tiff:Orientation>3</tiff:Orientation></x>"),
        "orientation as LONG": jpeg(exif=b"Exif\0\0" + exif_block([(0x0112, 4, 1, struct.pack("<L", 6))])),
        "orientation as ASCII": jpeg(exif=b"Exif\0\0" + exif_block([(0x0112, 2, 2, b"6\0")])),
        "orientation with two values": jpeg(
            exif=b"Exif\0\0" + exif_block([(0x0112, 3, 2, short(6) + short(3))])
        ),
        "orientation twice": jpeg(exif=b"Exif\0\0" + exif_block([(0x0112, 3, 1, short(6))] * 2)),
        "directory past the block": jpeg(exif=ifd_past_end),
        "a value past the block (Pillow stops there)": jpeg(exif=value_past_end),
        "x resolution as ASCII": jpeg(
            exif=b"Exif\0\0" + exif_block([(0x011A, 2, 4, b"72\0\0"), (0x0128, 3, 1, short(2))])
        ),
        "bigtiff exif": jpeg(exif=b"Exif\0\0II+\0" + bytes(12)),
        "not a tiff": jpeg(exif=b"Exif\0\0XXXX" + bytes(12)),
        "png": _png(),
        "empty": b"",
    }


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", list(left_to_pillow()))
def test_unusual_files_are_left_to_pillow(name: str) -> None:
    data = left_to_pillow()[name]
    assert scan_jpeg_header(data, LIMITS) is None
    header, img = read_header(data, LIMITS) if data else (None, None)
    if img is not None:  # read_header then answers as Pillow does
        assert header == pillow_header(data) or (
            header is None and not isinstance(pillow_header(data), JpegHeader)
        )


def test_limits_are_left_to_pillow() -> None:
    """Over a limit, or JPEG not allowed: Pillow's path raises the typed error, as before."""
    data = common_files()["large"]
    for limits in (
        ImageLimits(max_pixels=640 * 480 - 1),
        ImageLimits(max_bytes=len(data) - 1),
        ImageLimits(formats=frozenset({"PNG"})),
        ImageLimits(formats=None),  # any format: Pillow picks the plugin
    ):
        assert scan_jpeg_header(data, limits) is None
    assert scan_jpeg_header(data, ImageLimits(max_pixels=640 * 480)) == JpegHeader(640, 480, 1)


def test_decode_tensor_is_unchanged_by_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same pixels with the scan and with Pillow reading every header."""
    import e2vpt.core.images as images

    files = {**common_files(), **{k: v for k, v in left_to_pillow().items() if v}}
    with_scan = {
        k: decode_tensor(v, LIMITS) for k, v in files.items() if isinstance(pillow_header(v), JpegHeader)
    }
    monkeypatch.setattr(images, "scan_jpeg_header", lambda data, limits: None)
    for k, x in with_scan.items():
        assert torch.equal(x, decode_tensor(files[k], LIMITS)), k


@st.composite
def mutated_header(draw: st.DrawFn) -> bytes:
    """A common file with 1-4 mutations in its header (up to its scan's first bytes)."""
    data = draw(st.sampled_from(list(common_files().values())))
    return mutate(draw, data, data.find(b"\xff\xda") + 12, header_only=True)


def test_mutated_headers_agree_with_pillow() -> None:
    answered = []

    @given(data=mutated_header())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(data: bytes) -> None:
        answered.append(agree(data) is not None)

    fuzz()
    assert 0 < sum(answered) < len(answered)  # both kinds of answer were exercised


def segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each marker segment before the scan, SOS included (end: its header's end)."""
    out, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        out.append((pos, end))
        if data[pos + 1] == 0xDA:
            break
        pos = end
    return out


def segment_edits(data: bytes) -> list[bytes]:
    """Every segment of a file cut to each length up to 20 bytes (length field kept true, or left
    stale), its length field off by -3..3, dropped, doubled, and stray bytes before it."""
    out = []
    for start, end in segments(data):
        head, seg, tail = data[:start], data[start:end], data[end:]
        body = seg[4:]
        for k in range(min(len(body), 20)):
            out.append(head + seg[:2] + struct.pack(">H", k + 2) + body[:k] + tail)
            out.append(head + seg[:4] + body[:k] + tail)
        length = int.from_bytes(seg[2:4], "big")
        for d in (-3, -2, -1, 1, 2, 3):
            if 0 <= length + d <= 0xFFFF:
                out.append(head + seg[:2] + struct.pack(">H", length + d) + body + tail)
        out += [
            head + tail,
            head + seg + seg + tail,
            head + b"\xff" + seg + tail,
            head + b"\x00" + seg + tail,
        ]
    return out


@pytest.mark.parametrize(
    "name", ["plain", "grayscale", "exif from Pillow (orientation 6, dpi)", "icc profile", "jfif dpi"]
)
def test_segment_edits_agree_with_pillow(name: str) -> None:
    """Each segment cut, mis-sized, dropped or doubled: the scan answers as Pillow or leaves it."""
    edits = segment_edits(common_files()[name])
    answered = [agree(data) is not None for data in edits]
    assert len(edits) > 100 and 0 < sum(answered) < len(edits)
