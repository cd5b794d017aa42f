"""The batched image pipeline: per-item isolation of poison images (through the pipeline and the engine,
real Redis), CPU pipeline = the reference decode + transform, and the GPU decode path on CUDA."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator

import pytest
import torch
from PIL import Image

from e2vpt.config import GPU_DECODE_MIN_PIXELS, Settings
from e2vpt.core.backbone import Backbone
from e2vpt.core.images import (
    MAX_DEVICE_DOWNSCALE,
    RECIPES,
    ImageLimits,
    Preprocess,
    decode_image,
    decode_tensor,
    eval_transform,
    pil_to_tensor,
    read_header,
)
from e2vpt.dev.images import (
    gif_block_flood,
    image_bytes,
    jpeg_header_flood,
    jpeg_scan_bomb,
    photo_jpeg,
    png_chunk_flood,
    png_header_bomb,
    with_exif,
)
from e2vpt.errors import E2VPTError, ImageTooLarge, InvalidImage, InvalidPromptSet
from e2vpt.registry.store import PromptStore
from e2vpt.serving.engine import MultiTaskEngine, RequestItem, Result
from e2vpt.serving.pipeline import ImagePipeline, nvjpeg_decodes
from tests.helpers import make_set, tiny_backbone
from tests.serving_helpers import offline_predict


def j2k_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG2000")
    return buf.getvalue()


def poison_images() -> dict[str, tuple[bytes, type[E2VPTError]]]:
    """Broken inputs of many kinds, each with the typed error it must get."""
    jpeg = image_bytes(1, (50, 40), "JPEG")
    tiff = image_bytes(2, (50, 40), "TIFF")
    bad_tiff = bytearray(tiff)
    bad_tiff[4:8] = struct.pack("<I", len(tiff) - 2)  # first IFD offset past the end
    avif = image_bytes(3, (50, 40), "AVIF")
    assert b"pitm" in avif
    dds = bytearray(image_bytes(4, (32, 32), "DDS"))
    dds[80:84] = struct.pack("<I", 0xB90000)  # pixel format flags
    photo = photo_jpeg(6)
    return {
        "truncated-jpeg": (jpeg[: len(jpeg) // 2], InvalidImage),
        # an interrupted upload of a photo: its header is whole (scanned), so on CUDA only the missing
        # end-of-image marker keeps it from nvjpeg (`nvjpeg_decodes`)
        "truncated-photo": (photo[: len(photo) * 2 // 3], InvalidImage),
        "jpeg-header-only": (jpeg[:200], InvalidImage),
        # these two raised RuntimeError / NotImplementedError from Pillow, untyped, before (issue 13)
        "avif-no-primary-item": (avif.replace(b"pitm", b"\0\0\0\0", 1), InvalidImage),
        "dds-unknown-pixel-format": (bytes(dds), InvalidImage),
        "truncated-avif": (avif[:80], InvalidImage),
        "corrupt-tiff": (bytes(bad_tiff), InvalidImage),
        "garbage": (b"\xff\xd8\xff\xe0garbage", InvalidImage),
        "empty": (b"", InvalidImage),
        "png-bomb": (png_header_bomb(), ImageTooLarge),
        # 210 scans, each decoded over the whole image (photo-sized: nvjpeg's on CUDA, but for its scans)
        "jpeg-scan-bomb": (jpeg_scan_bomb((640, 480)), ImageTooLarge),
        # headers Pillow would walk in Python, one step per fill byte, chunk or comment block
        "jpeg-header-flood": (jpeg_header_flood(2000), ImageTooLarge),
        "png-chunk-flood": (png_chunk_flood(20_001), ImageTooLarge),
        "gif-comment-flood": (gif_block_flood(50_001), ImageTooLarge),
        "jpeg2000-off-by-default": (j2k_bytes(), InvalidImage),
        "ico-not-allowed": (image_bytes(5, (32, 32), "ICO"), InvalidImage),
    }


def rotated_jpeg() -> bytes:
    """A JPEG stored 40x24 with EXIF orientation 6: displayed (and served) 24x40."""
    img = Image.open(io.BytesIO(image_bytes(17, (40, 24), "JPEG")))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def good_images() -> list[bytes]:
    return [
        image_bytes(10, (64, 48), "JPEG"),
        image_bytes(11, (64, 48), "JPEG"),  # same size: one resize group
        image_bytes(12, (41, 33), "PNG", "RGBA"),
        image_bytes(13, (30, 20), "JPEG", "L"),
        image_bytes(14, (35, 25), "WEBP"),
        image_bytes(15, (35, 25), "GIF", "P"),
        image_bytes(16, (35, 25), "JPEG", "CMYK"),
        rotated_jpeg(),  # nvjpeg ignores EXIF: the pipeline rotates
    ]


@pytest.fixture
def pipeline(backbone: Backbone) -> Iterator[ImagePipeline]:
    p = ImagePipeline(backbone.info, ImageLimits(), "cpu", threads=3)
    yield p
    p.close()


def test_poison_images_fail_alone(pipeline: ImagePipeline) -> None:
    poison = poison_images()
    good = good_images()
    batch = [*good[:3], *(d for d, _ in poison.values()), *good[3:]]
    out = pipeline.decode(batch)
    expected_good = good[:3] + good[3:]
    got_good = out[:3] + out[3 + len(poison) :]
    for data, x in zip(expected_good, got_good, strict=True):
        assert isinstance(x, torch.Tensor)
        assert torch.equal(x, pil_to_tensor(decode_image(data)))
    for (name, (_, kind)), x in zip(poison.items(), out[3 : 3 + len(poison)], strict=True):
        assert type(x) is kind, name


def test_transform_equals_the_reference(pipeline: ImagePipeline, backbone: Backbone) -> None:
    data = good_images()
    decoded = pipeline.decode(data)
    recipes = ["vtab", "fgvc", "vtab", "fgvc", "vtab", "vtab", "fgvc", "fgvc"]
    out = pipeline.transform(decoded, recipes)  # type: ignore[arg-type]
    for d, r, x in zip(data, recipes, out, strict=True):
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
        assert torch.equal(x, eval_transform(backbone.info, r)(decode_image(d)))
    mixed = pipeline.transform(decoded[:2], ["vtab", "no-such-recipe"])  # type: ignore[arg-type]
    assert isinstance(mixed[0], torch.Tensor) and isinstance(mixed[1], InvalidPromptSet)


def test_limits_per_call(pipeline: ImagePipeline) -> None:
    big = image_bytes(20, (600, 500), "JPEG")
    j2k = j2k_bytes()
    assert isinstance(pipeline.decode([big])[0], torch.Tensor)
    small = ImageLimits(max_pixels=250_000, formats=frozenset({"JPEG", "JPEG2000"}))
    out = pipeline.decode([big, j2k], small)
    assert isinstance(out[0], ImageTooLarge) and isinstance(out[1], torch.Tensor)


@pytest.mark.integration
@pytest.mark.parametrize("micro_batch", [0, 5])
def test_engine_poison_batch_good_items_all_succeed(
    backbone: Backbone, store: PromptStore, micro_batch: int
) -> None:
    """One batch: good items for four tasks (two recipes) interleaved with every poison image; every good
    item gets the offline model's answer, every poison item its own typed error (also when the batch runs
    as micro-batches of 5, each decoded in the background while the one before runs)."""
    sets = [
        make_set("a", backbone, 3, 1),
        make_set("b", backbone, 5, 2, config={"recipe": "fgvc"}),
        make_set("c", backbone, 4, 3),
        make_set("d", backbone, 6, 4, config={"recipe": "fgvc"}),
    ]
    for ps in sets:
        store.register(ps)
    by_id = {ps.task_id: ps for ps in sets}
    settings = Settings(cache_version_check_ms=0, image_decode_threads=2, engine_micro_batch=micro_batch)
    engine = MultiTaskEngine(backbone, store, settings)
    try:
        items: list[RequestItem] = []
        expect: list[type[E2VPTError] | None] = []
        poison = list(poison_images().values())
        for n, data in enumerate(good_images() * 2):
            items.append(RequestItem("abcd"[n % 4], data))
            expect.append(None)
            if n < len(poison):
                items.append(RequestItem("abcd"[(n + 1) % 4], poison[n][0]))
                expect.append(poison[n][1])
        out = engine.predict(items, top_k=3)
        for item, kind, res in zip(items, expect, out, strict=True):
            if kind is not None:
                assert type(res) is kind
                continue
            assert isinstance(res, Result)
            ref = offline_predict(backbone, by_id[item.task_id], item.image, 3)
            assert [p.label for p in res.predictions] == [label for label, _ in ref]
            assert [p.score for p in res.predictions] == pytest.approx([s for _, s in ref], abs=1e-5)
    finally:
        engine.close()


def test_nvjpeg_takes_only_complete_jpegs_large_enough() -> None:
    """The CUDA engine's routing, checked on any machine: a whole photo goes to nvjpeg; the same photo cut
    anywhere in its data (the header still scans) or followed by extra bytes, and small JPEGs, go to the
    CPU decoders, which refuse the cut ones (the 400 every device gives) and read the others."""
    limits = ImageLimits()
    photo = photo_jpeg(1)
    header, _ = read_header(photo, limits)
    assert header is not None and nvjpeg_decodes(header, photo, GPU_DECODE_MIN_PIXELS)
    assert nvjpeg_decodes(header, memoryview(photo), GPU_DECODE_MIN_PIXELS)  # as the request parser gives it
    assert not nvjpeg_decodes(header, photo, 640 * 480 + 1)  # below the size that pays on the GPU
    for cut in (len(photo) // 2, len(photo) - 2, len(photo) - 1):
        data = photo[:cut]
        header, _ = read_header(data, limits)
        assert header is not None and not nvjpeg_decodes(header, data, GPU_DECODE_MIN_PIXELS), cut
        with pytest.raises(InvalidImage, match="truncated"):
            decode_tensor(data, limits)
    trailing = photo + b"\0" * 16
    header, _ = read_header(trailing, limits)
    assert header is not None and not nvjpeg_decodes(header, trailing, GPU_DECODE_MIN_PIXELS)
    assert torch.equal(decode_tensor(trailing, limits), decode_tensor(photo, limits))
    small = image_bytes(10, (64, 48), "JPEG")
    header, _ = read_header(small, limits)
    assert header is not None and not nvjpeg_decodes(header, small, GPU_DECODE_MIN_PIXELS)


@pytest.mark.cuda
def test_gpu_decode_path() -> None:
    """nvjpeg decodes the batch's JPEGs on the device; the rest come from the thread pool; poison items
    fail alone; on photo-like JPEGs the pixels match the CPU decoders within nvjpeg's IDCT and chroma
    upsampling differences (on pure noise with subsampled chroma those differ by far more: shape only)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from tests.helpers import tiny_backbone

    info = tiny_backbone().info
    pipe = ImagePipeline(info, ImageLimits(), "cuda", threads=2)
    try:
        # >= gpu_min_pixels: nvjpeg (the last one's header, scanned without Pillow, says: rotate 90 degrees)
        photos = [photo_jpeg(1), photo_jpeg(2, (512, 384)), with_exif(photo_jpeg(3, (400, 300)), 6)]
        # small ones, and a photo with bytes after its end: the CPU decoders (libjpeg's pixels, as in training)
        good = [*photos, *good_images(), photo_jpeg(4) + b"\0" * 16]
        poison = [d for d, _ in poison_images().values()]
        out = pipe.decode([*good, *poison])
        for j, (data, x) in enumerate(zip(good, out[: len(good)], strict=True)):
            assert isinstance(x, torch.Tensor)
            ref = decode_tensor(data, ImageLimits())
            assert x.shape == ref.shape  # EXIF orientation applied on the GPU path too
            diff = (x.cpu().int() - ref.int()).abs().float().mean()
            if j < len(photos):
                # nvjpeg's IDCT and chroma upsampling differ from libjpeg's (mean 3.9 grey levels measured
                # on an H200 for a grainy 640x480 photo); a wrong orientation or channel order is far more
                assert x.device.type == "cuda" and diff < 6.0
            else:
                assert diff == 0  # decoded on the CPU: exactly the training pixels
        assert all(isinstance(x, E2VPTError) for x in out[len(good) :])
        xs = pipe.transform(out[: len(good)], ["vtab"] * len(good))  # type: ignore[arg-type]
        assert all(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in xs)
    finally:
        pipe.close()


def test_extreme_downscales_are_resized_on_the_host() -> None:
    """Past MAX_DEVICE_DOWNSCALE (per axis, against the recipe's resize size) a GPU resizes on the CPU."""
    info = tiny_backbone(img_size=224, patch_size=16).info
    vtab, fgvc = Preprocess(info, "vtab"), Preprocess(info, "fgvc")  # resize to 224 / to 256, then crop
    limit = MAX_DEVICE_DOWNSCALE * 224
    assert not vtab.resizes_on_host(480, 640) and not vtab.resizes_on_host(limit, limit)
    assert vtab.resizes_on_host(1300, 21000) and vtab.resizes_on_host(limit + 1, 10)
    assert vtab.resizes_on_host(10, limit + 1) and not fgvc.resizes_on_host(10, limit + 1)


@pytest.mark.cuda
def test_gpu_transform_of_extreme_downscales_equals_the_cpu() -> None:
    """A panorama whose downscale CUDA's antialiased resize cannot take (21000 x 1300 to 224 px) is resized
    on the CPU inside a GPU batch, beside images resized on the device: every row as on the CPU (the
    panorama's exactly: the CPU's resize; the others within the device resize's rounding)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    info = tiny_backbone(img_size=224, patch_size=16).info
    g = torch.Generator().manual_seed(0)
    sizes = [(1300, 21000), (480, 640), (8000, 300), (1300, 21000)]
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    for recipe in RECIPES:
        prep = Preprocess(info, recipe)
        cpu = prep.batch(imgs)
        gpu = prep.batch([x.cuda() for x in imgs]).cpu()
        for j, (h, w) in enumerate(sizes):
            if prep.resizes_on_host(h, w):
                assert torch.allclose(gpu[j], cpu[j], atol=1e-6), (recipe, h, w)
            else:  # resized on the device: its rounding differs from the CPU's on a few pixels
                assert (gpu[j] - cpu[j]).abs().mean() < 0.02, (recipe, h, w)


@pytest.mark.cuda
@pytest.mark.integration
@pytest.mark.parametrize("micro_batch", [0, 3])
def test_engine_on_cuda_answers_like_the_cpu_engine(
    backbone: Backbone, store: PromptStore, micro_batch: int
) -> None:
    """The engine end to end on CUDA in fp32 (nvjpeg for the large JPEGs, in a background thread when
    micro-batched; the CPU decoders for the rest): every poison item gets its own error, every good item
    the CPU engine's classes with each score within 0.02 (nvjpeg's pixels are <= 1 grey level off at
    640x480, the device's resize rounds a few pixels the other way)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sets = [make_set("a", backbone, 3, 1), make_set("b", backbone, 5, 2, config={"recipe": "fgvc"})]
    for ps in sets:
        store.register(ps)
    photos = [photo_jpeg(i) for i in range(4)]
    items = [RequestItem("ab"[n % 2], data) for n, data in enumerate([*photos, *good_images()])]
    poison = list(poison_images().values())
    items += [RequestItem("ab"[n % 2], data) for n, (data, _) in enumerate(poison)]
    base = {"cache_version_check_ms": 0, "serving_dtype": "float32", "engine_micro_batch": micro_batch}
    cpu = MultiTaskEngine(backbone, store, Settings(**base))
    gpu = MultiTaskEngine(tiny_backbone(device="cuda"), store, Settings(device="cuda", **base))
    try:
        assert gpu.images.gpu_decode
        want, got = cpu.predict(items, top_k=5), gpu.predict(items, top_k=5)
    finally:
        cpu.close()
        gpu.close()
    for n, (w, g) in enumerate(zip(want, got, strict=True)):
        if n >= len(photos) + len(good_images()):
            assert type(g) is poison[n - len(photos) - len(good_images())][1]
            continue
        assert isinstance(w, Result) and isinstance(g, Result)
        scores = {p.label: p.score for p in g.predictions}
        assert set(scores) == {p.label for p in w.predictions}
        assert all(abs(scores[p.label] - p.score) < 0.02 for p in w.predictions), (n, w, g)
