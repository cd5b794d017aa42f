"""Fuzz of the image decoders (issue 13): mutated files of every format Pillow writes, in every mode it
writes them, through both decoding paths (`decode_image`, `decode_tensor`: Pillow and torchvision) with
every format allowed, and with the serving defaults. Every outcome must be pixels or a typed error
(`InvalidImage` / `ImageTooLarge`): zero untyped exceptions.

`E2VPT_IMAGE_FUZZ_EXAMPLES` sets the number of mutated files (default 3,000; e.g. 100000 nightly)."""

from __future__ import annotations

import contextlib
import io
import os
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from e2vpt.core.images import ImageLimits, decode_image, decode_tensor
from e2vpt.errors import ImageTooLarge, InvalidImage
from tests.poison import mutate

EXAMPLES = int(os.environ.get("E2VPT_IMAGE_FUZZ_EXAMPLES", "3000"))
MODES = ("RGB", "L", "RGBA", "P", "1", "I;16", "CMYK", "LA", "I", "F")
# Small pixel budget: a mutated header may claim any size; decoding stays fast and bounded.
ANY_FORMAT = ImageLimits(max_pixels=1_000_000, formats=None)
SERVING = ImageLimits(max_pixels=1_000_000)


@cache
def seed_files() -> list[tuple[str, str, bytes]]:
    """(format, mode, bytes): a small noise image for every (format, mode) Pillow can write and read."""
    Image.init()
    g = torch.Generator().manual_seed(0)
    rgba = Image.fromarray((torch.rand(19, 27, 4, generator=g) * 255).to(torch.uint8).numpy(), "RGBA")
    out = []
    for fmt in sorted(Image.SAVE):
        for mode in MODES:
            try:
                img = rgba.convert("L").convert(mode) if mode in ("I;16", "I", "F") else rgba.convert(mode)
                buf = io.BytesIO()
                img.save(buf, fmt)
                data = buf.getvalue()
                Image.open(io.BytesIO(data)).load()
            except Exception:
                continue
            out.append((fmt, mode, data))
    return out


def test_seed_corpus_covers_the_formats() -> None:
    formats = {f for f, _, _ in seed_files()}
    assert {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "DDS", "JPEG2000"} <= formats
    for _, _, data in seed_files():  # intact seeds: pixels or a typed refusal, never a crash
        check(data)


def check(data: bytes) -> None:
    for limits in (ANY_FORMAT, SERVING):
        with contextlib.suppress(InvalidImage, ImageTooLarge):
            x = decode_tensor(data, limits)
            assert x.dtype == torch.uint8 and x.dim() == 3 and x.shape[0] == 3
        with contextlib.suppress(InvalidImage, ImageTooLarge):
            assert decode_image(data, limits=limits).mode == "RGB"


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed file mutated; header bytes matter most: half the mutations land in the first 64 bytes."""
    return mutate(draw, draw(st.sampled_from(seed_files()))[2])


@pytest.mark.filterwarnings("ignore")
def test_decoders_never_raise_untyped() -> None:
    @given(data=mutated())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(data: bytes) -> None:
        check(data)

    fuzz()
