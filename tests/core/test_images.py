"""Decoding paths and the tensor transform: torchvision and Pillow give the same pixels, batched equals one
at a time, formats are allowed by the limits given, JPEG 2000 is decoded at reduced size."""

from __future__ import annotations

import io
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.io as tvio
from PIL import Image

import e2vpt.core.images as images_module
from e2vpt.core.backbone import Backbone
from e2vpt.core.images import (
    TRAINING_LIMITS,
    ImageLimits,
    Preprocess,
    apply_orientation,
    build_transform,
    decode_image,
    decode_tensor,
    eval_transform,
    exif_orientation,
    pil_to_tensor,
    read_header,
    scan_image,
)
from e2vpt.dev.images import (
    image_bytes,
    jpeg_scan_bomb,
    photo_jpeg,
    pil_reference_transform,
    png_chunk_flood,
    with_exif,
)
from e2vpt.errors import ImageTooLarge, InvalidImage


def smooth_jpeg(seed: int, size: tuple[int, int] = (64, 48), **save: object) -> bytes:
    g = torch.Generator().manual_seed(seed)
    w, h = size
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(h, w), mode="bilinear")
    img = Image.fromarray((x[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy())
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def exif_jpeg(orientation: int) -> bytes:
    img = Image.open(io.BytesIO(smooth_jpeg(1, (40, 24))))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


CASES = {
    "jpeg": smooth_jpeg(0),
    "jpeg-progressive": smooth_jpeg(0, progressive=True),
    "jpeg-gray": image_bytes(1, (30, 20), "JPEG", "L"),
    "jpeg-cmyk": image_bytes(1, (30, 20), "JPEG", "CMYK"),
    **{f"jpeg-exif{o}": exif_jpeg(o) for o in range(1, 9)},
    "png-rgba": image_bytes(2, (30, 20), "PNG", "RGBA"),
    "png-palette": image_bytes(2, (30, 20), "PNG", "P"),
    "png-16bit": image_bytes(2, (30, 20), "PNG", "I;16"),
    "gif": image_bytes(3, (30, 20), "GIF", "P"),
    "webp": image_bytes(4, (30, 20), "WEBP", "RGB"),
    "bmp": image_bytes(5, (30, 20), "BMP", "RGB"),
    "tiff": image_bytes(6, (30, 20), "TIFF", "RGB"),
    "avif": image_bytes(7, (30, 20), "AVIF", "RGB"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_tensor_equals_pillow(name: str) -> None:
    """The fast path (torchvision for JPEGs) gives exactly Pillow's pixels, EXIF orientation included."""
    data = CASES[name]
    x = decode_tensor(data, ImageLimits())
    assert x.dtype == torch.uint8 and x.shape[0] == 3
    assert torch.equal(x, pil_to_tensor(decode_image(data)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_matches_pillow(orientation: int) -> None:
    """The tensor EXIF rotation (used after nvjpeg, which ignores EXIF) equals Pillow's exif_transpose."""
    data = exif_jpeg(orientation)
    img = Image.open(io.BytesIO(data))
    assert exif_orientation(img) == orientation
    stored = tvio.decode_jpeg(
        torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=tvio.ImageReadMode.RGB
    )
    assert torch.equal(apply_orientation(stored, orientation), pil_to_tensor(decode_image(data)))


def test_scan_knows_the_decoded_size() -> None:
    """`scan_image` reads only the header, yet names exactly the pixels decoding holds (what the engine
    budgets micro-batches with): every format and mode, EXIF rotations (width and height swap, the count
    stays), JPEG 2000 decoded at reduced size with odd sides (ceil)."""
    j2k = {}
    for size in ((512, 384), (513, 385), (37, 1001)):
        buf = io.BytesIO()
        Image.new("RGB", size, (9, 99, 199)).save(buf, "JPEG2000")
        j2k[size] = buf.getvalue()
    cases = [(data, ImageLimits()) for data in CASES.values()]
    cases += [(d, ImageLimits(formats=frozenset({"JPEG2000"}), reduce_pixels=20_000)) for d in j2k.values()]
    for data, limits in cases:
        scanned = scan_image(data, limits)
        x = decode_tensor(data, limits)
        assert scanned.pixels == x.shape[1] * x.shape[2]
        assert scanned.pixels <= limits.max_pixels


def test_a_png_with_a_broken_crc_cannot_kill_the_process() -> None:
    """torchvision's PNG decoder (0.29.2) dies with SIGSEGV on a PNG whose IDAT CRC is wrong, one flipped
    byte: a serving worker decoding it would take every request of its batch down. PNGs are decoded by
    Pillow (typed errors or pixels); run in a child process, so that a crash fails this test, not the run."""
    buf = io.BytesIO()
    Image.new("RGB", (61, 47), (10, 200, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    at = data.find(b"IDAT")
    data[at + 4 + struct.unpack(">I", data[at - 4 : at])[0]] ^= 0xFF  # the chunk's CRC
    code = (
        "import sys; from e2vpt.core.images import ImageLimits, decode_tensor, scan_image\n"
        "from e2vpt.errors import InvalidImage\n"
        "data = sys.stdin.buffer.read()\n"
        "try:\n    print(tuple(decode_tensor(data, ImageLimits()).shape))\n"
        "except InvalidImage as exc:\n    print('InvalidImage', exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], input=bytes(data), capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert run.stdout.decode().strip() == "(3, 47, 61)" or run.stdout.startswith(b"InvalidImage")


def test_jpeg_scan_bombs_are_refused_from_the_header() -> None:
    """A JPEG of more than `max_jpeg_scans` scans is a decoding-time bomb (every scan decoded over the whole
    image: 2,000 scans of a 40 MP image took 9.9 s here): 413 before decoding, on both paths; the limit is
    the caller's (training reads the operator's files without it). Real files pass: progressive (10 scans),
    optimised, with an Exif block; a sequential file with one full scan is not counted at all."""
    bomb = jpeg_scan_bomb((640, 480), scans=200)
    for decode in (lambda d, lim: decode_tensor(d, lim), lambda d, lim: decode_image(d, limits=lim)):
        with pytest.raises(ImageTooLarge, match="210 scans; the limit is 100"):
            decode(bomb, ImageLimits())
        assert tuple(decode_tensor(bomb, ImageLimits(max_jpeg_scans=210)).shape) == (3, 480, 640)
    assert decode_image(bomb, limits=TRAINING_LIMITS).size == (640, 480)
    photo = Image.open(io.BytesIO(photo_jpeg(5)))
    for save in ({"progressive": True}, {"progressive": True, "optimize": True}, {"optimize": True}, {}):
        buf = io.BytesIO()
        photo.save(buf, "JPEG", **save)
        for data in (buf.getvalue(), with_exif(buf.getvalue())):
            header, _ = read_header(data, ImageLimits(max_jpeg_scans=10))
            assert header is not None and header.single_scan == (not save.get("progressive"))
            assert torch.equal(
                decode_tensor(data, ImageLimits(max_jpeg_scans=10)), pil_to_tensor(decode_image(data))
            )
    sequential = io.BytesIO()
    photo.save(sequential, "JPEG")
    data = sequential.getvalue()
    extra = data[:-2] + data[data.rfind(b"\xff\xda") : -2] * 200 + data[-2:]  # the decoders stop after scan 1
    assert read_header(extra, ImageLimits(max_jpeg_scans=1))[0] is not None


@pytest.mark.parametrize(
    "flood",
    [b"\xff" * 1001, b"\xff\x00" * 1001, b"\xff\xfe\x00\x02" * 1001, b"\xff\xfe\x00\x02" + b"\0" * 1001],
    ids=["fill bytes", "escaped FF", "comments", "stray bytes"],
)
def test_jpeg_header_floods_are_refused_before_pillow_walks_them(flood: bytes) -> None:
    """Pillow's JPEG opener takes one Python step per header segment or stray byte (4 MB of fill bytes:
    3.7 s here); past MAX_JPEG_HEADER_SEGMENTS steps the header is refused (413) before Pillow opens it, on
    the plain-JPEG scan's path and Pillow's (CMYK) alike. Real headers, and fill bytes within the limit, pass."""
    for mode in ("RGB", "CMYK"):
        buf = io.BytesIO()
        Image.new(mode, (16, 16)).save(buf, "JPEG")
        data = buf.getvalue()
        for decode in (lambda d: decode_tensor(d, ImageLimits()), lambda d: decode_image(d)):
            with pytest.raises(ImageTooLarge, match="more than 1000 segments or stray bytes"):
                decode(data[:2] + flood + data[2:])
        padded = data[:2] + flood[: len(flood) // 1001 * 990] + data[2:]  # 990 steps
        assert torch.equal(decode_tensor(padded, ImageLimits()), pil_to_tensor(decode_image(data)))


def test_png_chunk_floods_are_refused_before_pillow_walks_them() -> None:
    """Pillow handles every PNG chunk in Python (2.4 MB of empty ancillary chunks: 1.2 s here); a PNG of
    more than MAX_PNG_CHUNKS chunks is refused (413) from a walk of their lengths. At the limit it decodes."""
    limit = images_module.MAX_PNG_CHUNKS  # counted: IHDR, the empty ancillary chunks, IDAT
    for decode in (lambda d: decode_tensor(d, ImageLimits()), lambda d: decode_image(d)):
        with pytest.raises(ImageTooLarge, match=f"PNG has more than {limit} chunks"):
            decode(png_chunk_flood(limit - 1))
    plain = decode_tensor(png_chunk_flood(0), ImageLimits())
    assert torch.equal(decode_tensor(png_chunk_flood(limit - 2), ImageLimits()), plain)


GIF_FLOODS = {  # n steps of Pillow's GIF reader
    "comment blocks": lambda n: b"\x21\xfe\x01a\x00" * (n // 2),  # an extension and its sub-block: 2 steps
    "sub-blocks": lambda n: b"\x21\xfe" + b"\x01a" * n + b"\x00",
    "stray bytes": lambda n: b"\x00" * n,
}


@pytest.mark.parametrize("kind", list(GIF_FLOODS))
def test_gif_header_floods_are_refused_before_pillow_walks_them(kind: str) -> None:
    """Pillow reads a GIF's blocks before its first image in Python, one step per extension, sub-block or
    stray byte; past MAX_GIF_HEADER_BLOCKS steps the file is refused (413). A tenth of that decodes."""
    buf = io.BytesIO()
    Image.new("P", (16, 16), 3).save(buf, "GIF")
    gif = buf.getvalue()
    at = gif.find(b"\x2c")  # the image descriptor
    limit = images_module.MAX_GIF_HEADER_BLOCKS
    for decode in (lambda d: decode_tensor(d, ImageLimits()), lambda d: decode_image(d)):
        with pytest.raises(ImageTooLarge, match=f"GIF has more than {limit} blocks"):
            decode(gif[:at] + GIF_FLOODS[kind](limit + 2) + gif[at:])
    tenth = gif[:at] + GIF_FLOODS[kind](limit // 10) + gif[at:]
    assert torch.equal(decode_tensor(tenth, ImageLimits()), decode_tensor(gif, ImageLimits()))


def test_formats_follow_the_limits() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, "JPEG2000")
    j2k = buf.getvalue()
    with pytest.raises(InvalidImage, match="not a readable image"):  # off by default
        decode_image(j2k)
    assert decode_image(j2k, limits=ImageLimits(formats=frozenset({"JPEG2000"}))).size == (32, 32)
    only_png = ImageLimits(formats=frozenset({"PNG"}))
    with pytest.raises(InvalidImage):
        decode_tensor(CASES["jpeg"], only_png)
    assert decode_tensor(CASES["png-rgba"], only_png).shape == (3, 20, 30)
    assert decode_image(CASES["bmp"], limits=ImageLimits(formats=None)).size == (30, 20)  # any format


def test_jpeg2000_is_decoded_at_reduced_size() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (512, 384), (9, 99, 199)).save(buf, "JPEG2000")
    limits = ImageLimits(formats=frozenset({"JPEG2000"}), reduce_pixels=20_000)
    img = decode_image(buf.getvalue(), limits=limits)
    assert img.size == (128, 96)  # reduce 2: 4x smaller per side, 12,288 <= 20,000 pixels
    assert img.getpixel((5, 5)) == (9, 99, 199)
    with pytest.raises(ImageTooLarge):  # the pixel limit still reads the full header size
        decode_image(buf.getvalue(), limits=ImageLimits(formats=frozenset({"JPEG2000"}), max_pixels=100_000))
    # Pillow refuses reduce 2 of a 513 px side (it expects 128 px, OpenJPEG gives 129): reduce 1 instead
    buf = io.BytesIO()
    Image.new("RGB", (513, 385), (9, 99, 199)).save(buf, "JPEG2000")
    assert decode_image(buf.getvalue(), limits=limits).size == (257, 193)


def test_decoder_exceptions_are_typed() -> None:
    for data in (CASES["avif"][:40], CASES["tiff"][:60], CASES["jpeg"][: len(CASES["jpeg"]) // 2]):
        with pytest.raises(InvalidImage):
            decode_tensor(data, ImageLimits())


def test_env_settings_do_not_change_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits come from the caller: the process's settings are not read here."""
    monkeypatch.setenv("E2VPT_MAX_IMAGE_PIXELS", "10")
    assert decode_image(CASES["jpeg"]).size == (64, 48)


@pytest.mark.parametrize("recipe", ["vtab", "fgvc"])
def test_batch_equals_one_at_a_time_and_pil_input(backbone: Backbone, recipe: str) -> None:
    """Sizes shared by several images (resized together, rows scattered back in order) and sizes of one
    image each (normalised straight into their rows), interleaved: every row as the image alone."""
    prep = eval_transform(backbone.info, recipe)
    names = ("jpeg", "png-rgba", "jpeg-progressive", "gif")
    imgs = [decode_tensor(CASES[n], ImageLimits()) for n in names]
    g = torch.Generator().manual_seed(0)
    own = [torch.randint(0, 256, (3, 20 + i, 30 + 3 * i), dtype=torch.uint8, generator=g) for i in range(4)]
    imgs = [x for pair in zip(imgs, own, strict=True) for x in pair] + imgs[:2]
    batch = prep.batch(imgs)
    assert batch.shape == (len(imgs), 3, *backbone.info.img_size) and batch.dtype == torch.float32
    assert len({tuple(x.shape) for x in imgs}) < len(imgs) - 1  # shared sizes and sizes of their own
    for x, b in zip(imgs, batch, strict=True):
        assert torch.equal(prep(x), b)
    assert torch.equal(prep(decode_image(CASES["jpeg"])), batch[0])


@pytest.mark.parametrize("recipe", ["vtab", "fgvc"])
def test_batch_resizes_large_groups_in_chunks(
    backbone: Backbone, recipe: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same-size images beyond RESIZE_CHUNK_PIXELS are resized a chunk at a time (bounded memory), rows in
    order, each as the image alone; a group within the bound is one call."""
    prep = eval_transform(backbone.info, recipe)
    g = torch.Generator().manual_seed(1)
    imgs = [torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=g) for _ in range(7)]
    imgs.insert(3, torch.randint(0, 256, (3, 21, 17), dtype=torch.uint8, generator=g))
    whole = prep.batch(imgs)
    calls: list[int] = []
    resize = prep._resize
    monkeypatch.setattr(prep, "_resize", lambda x: calls.append(len(x)) or resize(x))
    monkeypatch.setattr(images_module, "RESIZE_CHUNK_PIXELS", 3 * 30 * 40)  # 3 images of 30x40 per call
    chunked = prep.batch(imgs)
    assert sorted(calls) == [1, 1, 3, 3]  # 7 of 30x40 in chunks of 3, 3, 1; the 21x17 alone
    assert torch.equal(chunked, whole)
    for x, row in zip(imgs, chunked, strict=True):
        assert torch.equal(prep(x), row)
    calls.clear()
    monkeypatch.setattr(images_module, "RESIZE_CHUNK_PIXELS", 7 * 30 * 40)
    prep.batch(imgs[:3])
    assert calls == [3]


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, 0, 5, dtype=torch.uint8),
        torch.zeros(3, 5, 0, dtype=torch.uint8),
        torch.zeros(4, 8, 8, dtype=torch.uint8),
        torch.zeros(8, 8, dtype=torch.uint8),
        torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
        torch.zeros(3, 8, 8, dtype=torch.float32),
        torch.zeros(3, 8, 8, dtype=torch.int16),
    ],
    ids=["empty-height", "empty-width", "4-channels", "2-d", "4-d", "float32", "int16"],
)
def test_batch_refuses_odd_tensors(backbone: Backbone, bad: torch.Tensor) -> None:
    """Alone or beside a good image: a clear ValueError, never an arithmetic error from inside."""
    prep = eval_transform(backbone.info)
    good = torch.zeros(3, 8, 8, dtype=torch.uint8)
    for images in ([bad], [good, bad]):
        with pytest.raises(ValueError, match="expected uint8"):
            prep.batch(images)


def test_tensor_transform_is_close_to_the_pillow_transform(backbone: Backbone) -> None:
    """The old PIL recipe (torchvision transforms on PIL images) and the tensor one differ by at most one
    grey level per pixel after resizing (rounding), measured here on a photo-like image."""
    info = backbone.info
    img = decode_image(photo_jpeg(3))
    step = 1 / 255 / min(info.std)
    for recipe in ("vtab", "fgvc"):
        old = pil_reference_transform(info, recipe)(img)
        new = eval_transform(info, recipe)(img)
        assert (old - new).abs().max() <= step + 1e-5


def test_train_recipes(backbone: Backbone) -> None:
    info = backbone.info
    x = decode_tensor(smooth_jpeg(4, (100, 70)), ImageLimits())
    assert torch.equal(build_transform(info, "vtab", train=True)(x), build_transform(info, "vtab")(x))
    torch.manual_seed(0)
    train = Preprocess(info, "fgvc", train=True)
    outs = [train(x) for _ in range(8)]
    assert all(o.shape == (3, *info.img_size) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # random crops / flips


def test_flat_image_normalises_to_mean(backbone: Backbone) -> None:
    info = backbone.info
    x = torch.full((3, 9, 7), 255, dtype=torch.uint8)
    out = Preprocess(info).batch([x])
    expected = (1.0 - torch.tensor(info.mean)) / torch.tensor(info.std)
    assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-6)
    arr = np.full((9, 7, 3), 255, np.uint8)
    assert torch.equal(Preprocess(info)(Image.fromarray(arr)), out[0])
