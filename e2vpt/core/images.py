"""Image decoding and the preprocessing recipes: the one home for both (training, evaluation, serving).

Decoding turns untrusted bytes into RGB pixels: JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF (the formats of
`ImageLimits.formats`), grayscale, CMYK, palette and alpha (composited on white), EXIF orientation applied.
The header is read first (Pillow's lazy `Image.open`, restricted to the allowed formats): oversized images
(pixel limit, decompression bombs) raise `ImageTooLarge` (413) before their pixels are decoded; anything
unreadable, and any exception at all from an image library, raises `InvalidImage` (400) for that image only.

- `decode_image` -> an RGB `PIL.Image` (the reference path; training reads files with it).
- `decode_tensor` -> uint8 [3, H, W]: baseline RGB/grayscale JPEGs through torchvision's decoder
  (bit-identical to Pillow's, measured), everything else through `decode_image`. In two steps:
  `scan_image` (header read and checked, the decoded size known) then `decode_scanned`.
- `Preprocess` is a recipe's transform as tensor ops on any device (resize in uint8 with antialiasing,
  crop, normalise), per image or batched; training, evaluation and serving (CPU and GPU) all use it, so a
  task is served the pixels it was trained on.

JPEG 2000 is off by default (a 540 KB file can decode to 1.4 GB); allowed, it is decoded at a reduced
resolution (`reduce_pixels`). Limits come from the caller (`ImageLimits.from_settings` in the engine,
`TRAINING_LIMITS` for training): this module reads no settings.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torchvision.io as tvio
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps, JpegImagePlugin, TiffImagePlugin
from torchvision.transforms import InterpolationMode

from e2vpt.config import Settings
from e2vpt.core.backbone import BackboneInfo
from e2vpt.errors import ImageTooLarge, InvalidImage, InvalidPromptSet

# torchvision 0.29 warns on every decode that its decoders move to torchcodec; they are what we use.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
Image.init()  # every plugin registered, so `Image.OPEN` names them all

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Formats whose decoders can decode at a reduced resolution (Pillow's `reduce` before `load`).
REDUCIBLE_FORMATS = frozenset({"JPEG2000"})
# JPEG modes torchvision decodes exactly as Pillow does (CMYK, YCCK: Pillow, whose conversion we keep).
# Only JPEGs: torchvision's PNG decoder would be 1.2-1.8x faster than Pillow with the same pixels, but it
# kills the process (SIGSEGV) on a PNG whose image data fails its CRC (torchvision 0.29.2, one flipped
# byte; `test_a_png_with_a_broken_crc_cannot_kill_the_process`): untrusted PNGs stay with Pillow.
_FAST_JPEG_MODES = ("RGB", "L")


def _default(name: str) -> Any:
    return Settings.model_fields[name].default


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be: encoded size, decoded pixels, formats (Pillow format names; None: any that
    Pillow opens) and the pixel budget of reduced-size decoding for `REDUCIBLE_FORMATS`."""

    max_bytes: int = _default("max_image_bytes")
    max_pixels: int = _default("max_image_pixels")
    formats: frozenset[str] | None = frozenset(_default("image_formats"))
    reduce_pixels: int = _default("image_reduce_pixels")
    max_jpeg_scans: int = _default("max_jpeg_scans")

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            formats=frozenset(f.upper() for f in settings.image_formats),
            reduce_pixels=settings.image_reduce_pixels,
            max_jpeg_scans=settings.max_jpeg_scans,
        )


# Training reads the operator's own files: any format Pillow opens, no byte limit, Pillow's bomb guard.
TRAINING_LIMITS = ImageLimits(max_bytes=2**62, max_pixels=2**62, formats=None, max_jpeg_scans=2**62)


def _describe(formats: frozenset[str] | None) -> str:
    return "any format Pillow opens" if formats is None else ", ".join(sorted(formats))


def open_image(data: bytes | bytearray | memoryview | None, limits: ImageLimits) -> Image.Image:
    """The lazily opened image (header read, pixels not decoded), checked against `limits`."""
    if data is None or len(data) == 0:
        raise InvalidImage("empty image: the request carried no image bytes")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    # headers Pillow would walk step by step in Python, bounded first (where the format is allowed at all)
    allowed = limits.formats or frozenset({"JPEG", "PNG", "GIF"})
    if data[:3] == b"\xff\xd8\xff" and {"JPEG", "MPO"} & allowed:
        check_jpeg_header_length(data)
    elif data[:8] == _PNG_SIGNATURE and "PNG" in allowed:
        check_png_chunks(data)
    elif data[:6] in (b"GIF87a", b"GIF89a") and "GIF" in allowed:
        check_gif_header_length(data)
    # Pillow's opener ids (an MPO file is opened by the JPEG opener, then reports format "MPO")
    formats = None if limits.formats is None else [f for f in sorted(limits.formats) if f in Image.OPEN]
    try:
        img = Image.open(io.BytesIO(bytes(data)), formats=formats)
        width, height = img.size
        if limits.formats is not None and img.format not in limits.formats:
            raise InvalidImage(f"{img.format} images are not accepted ({_describe(limits.formats)} are)")
    except InvalidImage:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {exc}") from exc
    except Exception as exc:  # Pillow's plugins raise anything on hostile headers
        raise InvalidImage(
            f"not a readable image ({_describe(limits.formats)} expected): {type(exc).__name__}"
        ) from exc
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )
    if img.format in ("JPEG", "MPO"):
        check_jpeg_scans(data, limits)
    return img


def check_png_chunks(data: bytes | bytearray | memoryview) -> None:
    """`ImageTooLarge` for a PNG of more than `MAX_PNG_CHUNKS` chunks before its end (a walk of the chunk
    lengths: a few microseconds for real files, bounded for floods)."""
    n, pos = len(data), len(_PNG_SIGNATURE)
    for _ in range(MAX_PNG_CHUNKS):
        if pos + 8 > n or data[pos + 4 : pos + 8] == b"IEND":
            return
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    if pos + 8 <= n and data[pos + 4 : pos + 8] != b"IEND":
        raise ImageTooLarge(f"PNG has more than {MAX_PNG_CHUNKS} chunks")


def check_gif_header_length(data: bytes | bytearray | memoryview) -> None:
    """`ImageTooLarge` for a GIF whose first image comes after more than `MAX_GIF_HEADER_BLOCKS` steps of
    Pillow's reader (`GifImageFile._seek`): an extension's introducer and each of its sub-blocks, or a stray
    byte, one step each; the walk stops where Pillow's does (image descriptor, trailer, end of data)."""
    n = len(data)
    pos = 13 + (3 << ((data[10] & 7) + 1) if n > 10 and data[10] & 0x80 else 0)
    steps = 0
    while pos < n and data[pos] not in (0x2C, 0x3B):
        if data[pos] == 0x21:  # an extension: introducer and label, then sub-blocks up to an empty one
            pos += 2
            while pos < n and data[pos]:
                steps += 1
                pos += 1 + data[pos]
        pos += 1
        steps += 1
        if steps > MAX_GIF_HEADER_BLOCKS:
            raise ImageTooLarge(f"GIF has more than {MAX_GIF_HEADER_BLOCKS} blocks before its first image")


def check_jpeg_header_length(data: bytes | bytearray | memoryview) -> None:
    """`ImageTooLarge` for bytes that Pillow's JPEG opener would read in more than
    `MAX_JPEG_HEADER_SEGMENTS` steps before the first scan: its loop (`JpegImageFile._open`) followed step
    by step, a segment with a length in one step, a fill byte (0xFF), an escaped 0xFF or a stray byte each
    in one, and stopped where Pillow stops (start of scan, end of data, a byte it refuses)."""
    n, pos, steps, at_ff = len(data), 3, 0, True  # after the FF D8 FF signature; its last FF starts a marker
    while pos < n:
        steps += 1
        if steps > MAX_JPEG_HEADER_SEGMENTS:
            raise ImageTooLarge(
                f"JPEG header has more than {MAX_JPEG_HEADER_SEGMENTS} segments or stray bytes"
            )
        if not at_ff:  # a stray byte: Pillow reads the next one
            at_ff, pos = data[pos] == 0xFF, pos + 1
            continue
        marker = 0xFF00 | data[pos]
        pos += 1
        if marker in JpegImagePlugin.MARKER:
            if marker == 0xFFDA:
                return
            if JpegImagePlugin.MARKER[marker][2] is not None:  # a segment: its length, then its bytes
                if pos + 2 > n:
                    return
                pos += int.from_bytes(data[pos : pos + 2], "big")
            if pos >= n:
                return
            at_ff, pos = data[pos] == 0xFF, pos + 1
        elif marker == 0xFF00:  # an escaped 0xFF: Pillow reads on
            if pos >= n:
                return
            at_ff, pos = data[pos] == 0xFF, pos + 1
        elif marker != 0xFFFF:  # Pillow refuses it ("no marker found"); a fill byte (FF FF) reads on
            return


def check_jpeg_scans(data: bytes | bytearray | memoryview, limits: ImageLimits) -> None:
    """`ImageTooLarge` for a JPEG of more than `limits.max_jpeg_scans` scans (start-of-scan markers, which
    entropy-coded data cannot contain; an Exif thumbnail's count too): a decoding-time bomb. About 1 us per
    KB, so `read_header` skips it for files whose first scan holds every component (`JpegHeader.single_scan`:
    the decoders stop there)."""
    raw = data if isinstance(data, bytes | bytearray) else bytes(data)
    scans = raw.count(b"\xff\xda")
    if scans > limits.max_jpeg_scans:
        raise ImageTooLarge(
            f"JPEG has {scans} scans; the limit is {limits.max_jpeg_scans} (each scan is decoded over the whole "
            "image: a decoding-time bomb)"
        )


def _pillow_reduces(side: int, r: int) -> bool:
    """Whether Pillow decodes a side at reduce factor r: it expects round(side / 2^r) pixels where OpenJPEG
    gives ceil(side / 2^r), and refuses the image ("broken data stream") where they differ (Pillow 13; a
    513 px side at r = 2: 128 against 129). r = 1 always agrees."""
    return (side + (1 << r >> 1)) >> r == -(-side >> r)


def _reduce_factor(width: int, height: int, budget: int) -> int:
    """Smallest r with ceil(w / 2^r) * ceil(h / 2^r) <= budget, lowered to the largest r below it that
    Pillow decodes (`_pillow_reduces`): then over the budget, by at most 4^(r - 1)."""
    r = 0
    while math.ceil(width / 2**r) * math.ceil(height / 2**r) > budget and 2**r < max(width, height):
        r += 1
    while r > 1 and not (_pillow_reduces(width, r) and _pillow_reduces(height, r)):
        r -= 1
    return r


def _load(img: Image.Image, limits: ImageLimits) -> Image.Image:
    """Decode the pixels of an opened image -> RGB (reduced size for reducible formats)."""
    try:
        if img.format in REDUCIBLE_FORMATS:
            img.reduce = _reduce_factor(*img.size, limits.reduce_pixels)  # type: ignore[method-assign,assignment]
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {exc}") from exc
    except Exception as exc:  # truncated / corrupt streams; any image library failure is this image's own
        raise InvalidImage(f"corrupt image: {type(exc).__name__}: {exc}"[:300]) from exc


def decode_image(
    data: bytes | bytearray | memoryview | None,
    *,
    limits: ImageLimits | None = None,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> Image.Image:
    """Untrusted encoded bytes -> RGB `PIL.Image` (EXIF rotation applied, alpha composited on white).
    `max_pixels` / `max_bytes` override those of `limits` (default `ImageLimits()`)."""
    limits = limits or ImageLimits()
    if max_pixels is not None or max_bytes is not None:
        limits = replace(
            limits,
            max_bytes=max_bytes if max_bytes is not None else limits.max_bytes,
            max_pixels=max_pixels if max_pixels is not None else limits.max_pixels,
        )
    return _load(open_image(data, limits), limits)


@dataclass(frozen=True)
class JpegHeader:
    """What the fast JPEG decoders need of a header: size and EXIF orientation (1-8); `single_scan`: a
    sequential file whose first scan holds every component (no more scans are decoded)."""

    width: int
    height: int
    orientation: int = 1
    single_scan: bool = field(default=False, compare=False)  # what the scan saw, beyond Pillow's answer


# Markers Pillow skips without reading them (DHT, DAC, DRI, EXP, COM) or reads below (APPn, SOF0-2, DQT).
# Any other marker, or bytes between segments, goes to Pillow (it knows them all).
_SKIPPED_MARKERS = frozenset({0xC4, 0xCC, 0xDD, 0xDF, 0xFE})
# Segments (and fill or stray bytes) a JPEG header may have before its first scan (real files: under 30; an
# ICC profile split into 64 KB pieces: up to 256 within `max_image_bytes`). Pillow's `open` walks them in
# Python, one step per segment or stray byte: 16 MB of 4-byte comments took it 5.6 s here, 4 MB of 0xFF fill
# bytes 3.7 s; such files are refused first (413), in about a millisecond (`check_jpeg_header_length`).
MAX_JPEG_HEADER_SEGMENTS = 1000
# Chunks a PNG may have (Pillow handles each in Python, about 6 us: 2.4 MB of empty ancillary chunks took it
# 1.2 s here). Real files: a few ancillary chunks and image data in 8-64 KB chunks (2,000 or fewer within
# `max_image_bytes`); an animated PNG adds two per frame.
MAX_PNG_CHUNKS = 20_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Blocks, data sub-blocks and stray bytes a GIF may have before its first image (Pillow reads each in Python;
# 1 MB of comment blocks took it 0.18 s). An XMP packet is written as one sub-block per byte or
# so: real files have a few thousand.
MAX_GIF_HEADER_BLOCKS = 100_000
_SEGMENT = struct.Struct(">BBH")
# APP segments that Pillow parses: (marker, prefix, the shortest one its parser survives). XMP (it may
# hold the orientation), MPF (it may make the file an MPO) and Photoshop blocks are left to Pillow.
_APP_MIN_LENGTH = (
    (0xE0, b"JFIF", 7),
    (0xE2, b"ICC_PROFILE\0", 14),
    (0xEE, b"Adobe", 7),
    (0xE1, b"http://ns.adobe.com/xap/1.0/\x00", 2**32),
    (0xE2, b"MPF\0", 2**32),
    (0xED, b"Photoshop 3.0\x00", 2**32),
)
# TIFF field type -> bytes per value, as Pillow's Exif reader knows them (it skips other types)
_TIFF_UNITS = {t: size for t, (size, _) in TiffImagePlugin.ImageFileDirectory_v2._load_dispatch.items()}
_ORIENTATION, _X_RESOLUTION, _RESOLUTION_UNIT = 0x0112, 0x011A, 0x0128
_SHORT, _RATIONAL = 3, 5


def scan_jpeg_header(data: bytes | bytearray | memoryview, limits: ImageLimits) -> JpegHeader | None:
    """The header of a plain JPEG read without Pillow (a few microseconds where Pillow's `open` and
    `getexif` take 40-175 us an image, serially, on the GPU path), or None: then Pillow reads it.

    Not None only where Pillow would open the bytes as format JPEG in mode RGB or L (`is_fast_jpeg`)
    with this size and EXIF orientation, within `limits`: 8-bit baseline, extended or progressive DCT,
    1 or 3 components; the segments Pillow parses are checked as Pillow checks them (SOF, DQT, JFIF,
    ICC, Adobe, the Exif block's first directory). Anything unusual (MPO, XMP, several Exif blocks,
    other markers, stray bytes, over a limit) is None, and Pillow decides as before; tests hold the two
    to the same answers on generated and fuzzed files."""
    n = len(data)
    if n < 4 or n > limits.max_bytes or limits.formats is None or "JPEG" not in limits.formats:
        return None
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, size, exif, dpi, sof = 2, None, None, False, b""
    for _ in range(MAX_JPEG_HEADER_SEGMENTS + 1):
        if pos + 4 > n:
            return None
        ff, marker, length = _SEGMENT.unpack_from(data, pos)
        end = pos + 2 + length
        if ff != 0xFF or length < 2 or end > n:
            return None
        if marker == 0xDA:  # start of scan: the header is complete
            break
        if marker in (0xC0, 0xC1, 0xC2):
            seg = bytes(data[pos + 4 : end])
            if size is not None or len(seg) < 6 or (len(seg) - 6) % 3 or seg[0] != 8 or seg[5] not in (1, 3):
                return None
            size = (int.from_bytes(seg[3:5], "big"), int.from_bytes(seg[1:3], "big"))
            sof = bytes([marker, seg[5]])
        elif marker == 0xDB:
            at = pos + 4
            while at < end:  # Pillow's check: whole 8- or 16-bit tables
                at += 1 + 64 * (1 if data[at] < 16 else 2)
            if at > end:
                return None
        elif 0xE0 <= marker <= 0xEF:
            head = bytes(data[pos + 4 : min(end, pos + 36)])
            if any(marker == m and head.startswith(p) and length - 2 < k for m, p, k in _APP_MIN_LENGTH):
                return None
            if marker == 0xE0 and head.startswith(b"JFIF"):
                dpi = dpi or (length >= 14 and head[7] in (1, 2))  # then Pillow reads no dpi from Exif
            elif marker == 0xE1 and head.startswith(b"Exif\0\0"):
                if exif is not None:  # Pillow joins several: rare, Pillow reads them
                    return None
                exif = bytes(data[pos + 10 : end])
        elif marker not in _SKIPPED_MARKERS:
            return None
        pos = end
    else:  # a flood of segments: Pillow's path refuses it (`check_jpeg_header_length`)
        return None
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    pixels = size[0] * size[1]
    if pixels > limits.max_pixels or (Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS):
        return None
    orientation = 1 if exif is None else _scan_exif_orientation(exif, read_dpi=not dpi)
    single_scan = sof[0] != 0xC2 and length > 2 and data[pos + 4] == sof[1]  # sequential, one full scan
    return None if orientation is None else JpegHeader(*size, orientation, single_scan)


def _scan_exif_orientation(tiff: bytes, *, read_dpi: bool) -> int | None:
    """The orientation in an Exif block's first directory (`tiff`: the block after "Exif\\0\\0") as
    Pillow's `getexif` reads it, or None where Pillow could read it otherwise or fail `open` on it: a
    directory or value past the block's end (Pillow stops reading there), an unusual orientation field,
    and, when Pillow reads the dpi from Exif (`read_dpi`), unusual resolution fields."""
    if len(tiff) < 8 or tiff.startswith(b"Exif\0\0"):
        return None
    order = {b"II*\0": "<", b"MM\0*": ">"}.get(tiff[:4])
    if order is None:
        return None
    (ifd,) = struct.unpack_from(order + "L", tiff, 4)
    if ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    if ifd + 2 + 12 * count > len(tiff):
        return None
    entry = struct.Struct(order + "HHL4s")
    found: dict[int, tuple[int, int, bytes]] = {}
    for i in range(count):
        tag, typ, values, raw = entry.unpack_from(tiff, ifd + 2 + 12 * i)
        unit = _TIFF_UNITS.get(typ)
        if unit is None:  # Pillow skips fields of unknown types
            continue
        if unit * values > 4 and struct.unpack_from(order + "L", raw)[0] + unit * values > len(tiff):
            return None
        if tag in (_ORIENTATION, _X_RESOLUTION, _RESOLUTION_UNIT):
            if tag in found:
                return None
            found[tag] = (typ, values, raw)
    for tag, want in ((_X_RESOLUTION, _RATIONAL), (_RESOLUTION_UNIT, _SHORT)):
        if read_dpi and tag in found and found[tag][:2] != (want, 1):
            return None
    if _ORIENTATION not in found:
        return 1
    typ, values, raw = found[_ORIENTATION]
    if (typ, values) != (_SHORT, 1):
        return None
    (value,) = struct.unpack_from(order + "H", raw)
    return value if 1 <= value <= 8 else 1


def is_fast_jpeg(img: Image.Image) -> bool:
    """An opened image that torchvision's JPEG decoders (CPU and nvjpeg) can take."""
    return img.format == "JPEG" and img.mode in _FAST_JPEG_MODES


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 (as stored) when absent or unreadable."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # a corrupt EXIF block: Pillow's exif_transpose would not rotate either
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def apply_orientation(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """[..., H, W] pixels as stored -> as displayed (what `ImageOps.exif_transpose` does), on any device.
    torchvision applies EXIF orientation only on the CPU, so the nvjpeg path needs this."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-2, -1)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))
    if orientation == 7:
        return x.flip(-2, -1).transpose(-2, -1)
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))
    return x


def as_uint8_tensor(data: bytes | bytearray | memoryview) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W]."""
    return TF.pil_to_tensor(to_rgb(img))


def read_header(
    data: bytes | bytearray | memoryview | None, limits: ImageLimits
) -> tuple[JpegHeader | None, Image.Image | None]:
    """(header, None) for a plain JPEG, scanned without Pillow (`scan_jpeg_header`); otherwise Pillow
    opens it, raising `open_image`'s typed errors: (its header if torchvision's JPEG decoders take it
    (`is_fast_jpeg`), else None; the opened image)."""
    header = scan_jpeg_header(data, limits) if data is not None else None
    if header is not None:
        if not header.single_scan:
            assert data is not None
            check_jpeg_scans(data, limits)
        return header, None
    img = open_image(data, limits)
    return (JpegHeader(img.width, img.height, exif_orientation(img)) if is_fast_jpeg(img) else None), img


@dataclass(frozen=True)
class Scanned:
    """An image whose header was read and checked (`scan_image`): what decoding it needs, and how many
    pixels decoding it will hold (width x height, after any reduced-size decoding). It keeps no Pillow
    image: one that decoding loads would hold its pixels as long as the scan is kept (a batch's scans live
    through the whole batch), so `decode_scanned` opens the bytes again (10-45 us for 640x480, 0.2-2% of
    its decode: `benchmarks/bench_images.py`, "reopen" rows)."""

    data: bytes | bytearray | memoryview
    jpeg: JpegHeader | None  # torchvision's JPEG decoders take it
    pixels: int


def scan_image(data: bytes | bytearray | memoryview | None, limits: ImageLimits) -> Scanned:
    """`read_header` (its typed errors), kept for `decode_scanned`."""
    header, img = read_header(data, limits)
    assert data is not None
    if header is not None:
        return Scanned(data, header, header.width * header.height)
    assert img is not None
    r = _reduce_factor(*img.size, limits.reduce_pixels) if img.format in REDUCIBLE_FORMATS else 0
    pixels = math.ceil(img.width / 2**r) * math.ceil(img.height / 2**r)
    return Scanned(data, None, pixels)


def decode_scanned(scanned: Scanned, limits: ImageLimits) -> torch.Tensor:
    """A scanned image -> uint8 [3, H, W] on the CPU; same pixels as `decode_image`."""
    if scanned.jpeg is not None:
        try:
            x = tvio.decode_jpeg(as_uint8_tensor(scanned.data), mode=tvio.ImageReadMode.RGB)
            return apply_orientation(x, scanned.jpeg.orientation).contiguous()
        except Exception:  # anything torchvision refuses, Pillow decides (and types the error)
            pass
    return pil_to_tensor(_load(open_image(scanned.data, limits), limits))


def decode_tensor(data: bytes | bytearray | memoryview | None, limits: ImageLimits) -> torch.Tensor:
    """Untrusted bytes -> uint8 [3, H, W] on the CPU; same pixels as `decode_image`."""
    return decode_scanned(scan_image(data, limits), limits)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels become white (what a viewer shows)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "I;16" or img.mode == "I":  # 16/32-bit grayscale: scale to 8 bit
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB") if img.mode != "RGB" else img


# Preprocessing recipes (method.md section 7). A prompt set records the recipe it was trained with
# (`config["recipe"]`), and serving applies that recipe's eval transform, so train and serve see the same pixels.
RECIPES = ("vtab", "fgvc")
# The largest downscale factor (input / output size, per axis) resized on a GPU. CUDA's antialiased resize
# keeps a tile's filter weights in 48 KB of shared memory, 4f + 1 bicubic taps per axis for a factor f: by
# its source (UpSampleBilinear2d.cu), past f = 47 both ways, or a panorama of 21000 x 1300 px (27 MP, within
# the default limits; f = 94 by 5.8 for 224 px), the block height it computes falls to 0, which it then
# divides by; larger factors still overflow the shared memory (RuntimeError). Images past this factor are
# resized on the CPU instead, as in training (the same pixels).
MAX_DEVICE_DOWNSCALE = 32
# Input pixels resized in one call (`Preprocess.batch`): 2**25 is 400 MB of float32 RGB; 64 images of 640x480
# (20 MP) stay one call.
RESIZE_CHUNK_PIXELS = 2**25


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        return InterpolationMode.BICUBIC


class Preprocess:
    """A recipe's transform as tensor ops on any device, at the backbone's input size, normalised with
    its pretrained mean/std. Takes uint8 [3, H, W] tensors (or PIL images); returns float32 [3, h, w].

    vtab: resize to the input size, no augmentation (train and eval alike).
    fgvc: resize to 256/224 of the input size, then random crop + horizontal flip (train) or centre
    crop (eval) to the input size (256 / 224 for a 224 backbone).

    The resize runs on uint8 pixels with antialiasing (the backbone's interpolation, bicubic by default)
    and rounds back to uint8, as Pillow does; `batch` resizes images of one size together and gives the
    same pixels as one image at a time.
    """

    def __init__(self, info: BackboneInfo, recipe: str = "vtab", *, train: bool = False) -> None:
        if recipe not in RECIPES:
            raise InvalidPromptSet(f"unknown transform recipe {recipe!r}; expected one of {RECIPES}")
        self.recipe, self.train = recipe, train
        self.size = (int(info.img_size[0]), int(info.img_size[1]))
        self.resize_to = self.size if recipe == "vtab" else tuple(round(s * 256 / 224) for s in self.size)
        self.interpolation = _interpolation(info.interpolation)
        self._mean = torch.tensor(info.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32).view(3, 1, 1)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        x = pil_to_tensor(img) if isinstance(img, Image.Image) else img
        return self.batch([x])[0]

    def batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 [3, H, W] images of any sizes, all on one device -> float32 [B, 3, h, w] there.

        Images of one size are resized together, at most `RESIZE_CHUNK_PIXELS` input pixels per call (the
        resize works in float32: 64 phone photos of 12 MP would take 9 GB at once); an image resized alone
        is normalised straight into its row of the output (on a GPU, where kernel launches per image count,
        3 besides its resize)."""
        if not images:
            raise ValueError("no images")
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(images):
            if x.dtype != torch.uint8 or x.dim() != 3 or x.shape[0] != 3 or x[0].numel() == 0:
                raise ValueError(f"expected uint8 [3, H, W] with H, W > 0, got {x.dtype} {tuple(x.shape)}")
            groups.setdefault(tuple(x.shape), []).append(i)
        chunks = []
        for (_, h, w), idx in groups.items():
            n = max(1, RESIZE_CHUNK_PIXELS // (h * w))
            chunks += [idx[k : k + n] for k in range(0, len(idx), n)]
        if len(chunks) == 1:  # one resize call: in order, no copy into place
            x = images[0][None] if len(images) == 1 else torch.stack(list(images))
            return self._normalize(self._crop(self._resize(x)))
        out = torch.empty((len(images), 3, *self.size), dtype=torch.float32, device=images[0].device)
        for idx in chunks:
            if len(idx) == 1:
                i = idx[0]
                self._normalize(self._crop(self._resize(images[i][None])), out=out[i : i + 1])
            else:
                x = self._normalize(self._crop(self._resize(torch.stack([images[i] for i in idx]))))
                out.index_copy_(0, torch.tensor(idx, device=out.device), x)
        return out

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.resize_to:
            return x
        if x.device.type != "cpu" and self.resizes_on_host(x.shape[-2], x.shape[-1]):
            return self._resize(x.cpu()).to(x.device)
        return TF.resize(x, list(self.resize_to), interpolation=self.interpolation, antialias=True)

    def resizes_on_host(self, height: int, width: int) -> bool:
        """Whether an image of this size is resized on the CPU even on a GPU (`MAX_DEVICE_DOWNSCALE`)."""
        return max(height / self.resize_to[0], width / self.resize_to[1]) > MAX_DEVICE_DOWNSCALE

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.size
        if tuple(x.shape[-2:]) == self.size:
            return x
        if not self.train:
            return TF.center_crop(x, [h, w])
        rows = []  # each image its own crop and flip
        H, W = x.shape[-2:]
        for img in x:
            top = int(torch.randint(0, H - h + 1, ()).item())
            left = int(torch.randint(0, W - w + 1, ()).item())
            crop = img[:, top : top + h, left : left + w]
            rows.append(crop.flip(-1) if torch.rand(()) < 0.5 else crop)
        return torch.stack(rows)

    def _normalize(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 -> (x / 255 - mean) / std in float32 (into `out` when given): one float32 result, updated
        in place."""
        if x.device not in self._stats:  # mean/std copied to a device once
            self._stats[x.device] = (self._mean.to(x.device), self._std.to(x.device))
        mean, std = self._stats[x.device]
        return torch.div(x, 255.0, out=out).sub_(mean).div_(std)


def build_transform(
    info: BackboneInfo, recipe: str = "vtab", *, train: bool = False
) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
    """The recipe's transform (see `Preprocess`): train augments (fgvc), eval is deterministic."""
    return Preprocess(info, recipe, train=train)


def eval_transform(info: BackboneInfo, recipe: str = "vtab") -> Preprocess:
    """The eval transform of a recipe: what evaluation, serving and the offline reference all use."""
    return Preprocess(info, recipe, train=False)
