"""Image decoding and the preprocessing recipes: the one home for both (training, evaluation, serving).

`decode_image` turns untrusted bytes into an RGB PIL image: JPEG, PNG, WebP, GIF, BMP, TIFF, grayscale,
palette and alpha (composited on white), EXIF orientation applied. Oversized images (pixel limit, and
decompression bombs) raise `ImageTooLarge` (413) before their pixels are decoded; anything unreadable
raises `InvalidImage` (400).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence

import torch
import torchvision.transforms as T
from PIL import Image, ImageOps, UnidentifiedImageError

from e2vpt.config import get_settings
from e2vpt.core.backbone import BackboneInfo
from e2vpt.errors import ImageTooLarge, InvalidImage, InvalidPromptSet

# PIL's own bomb guard is process-global; we check our (configurable) limit from the header ourselves and
# keep PIL's guard as a second line (it raises DecompressionBombError above 2x its limit).
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def decode_image(
    data: bytes | bytearray | memoryview | None,
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> Image.Image:
    """Untrusted encoded bytes -> RGB `PIL.Image` (EXIF rotation applied, alpha composited on white)."""
    settings = get_settings()
    max_pixels = max_pixels if max_pixels is not None else settings.max_image_pixels
    max_bytes = max_bytes if max_bytes is not None else settings.max_image_bytes
    if data is None or len(data) == 0:
        raise InvalidImage("empty image: the request carried no image bytes")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)))  # reads the header only
            width, height = img.size
            if width <= 0 or height <= 0:
                raise InvalidImage(f"image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage("not a readable image (JPEG, PNG, WebP, GIF, BMP or TIFF expected)") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated / corrupt streams
        raise InvalidImage(f"corrupt image: {exc}") from exc
    return to_rgb(img)


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


def _interpolation(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(name)
    except ValueError:
        return T.InterpolationMode.BICUBIC


def build_transform(
    info: BackboneInfo, recipe: str = "vtab", *, train: bool = False
) -> Callable[[Image.Image], torch.Tensor]:
    """The recipe's transform at the backbone's input size, normalised with its pretrained mean/std.

    vtab: resize to the input size, no augmentation (train and eval alike).
    fgvc: resize to 256/224 of the input size, then random crop + horizontal flip (train) or centre
    crop (eval) to the input size (256 / 224 for a 224 backbone).
    """
    if recipe not in RECIPES:
        raise InvalidPromptSet(f"unknown transform recipe {recipe!r}; expected one of {RECIPES}")
    size = tuple(info.img_size)
    interp = _interpolation(info.interpolation)
    norm = [T.ToTensor(), T.Normalize(info.mean, info.std)]
    if recipe == "vtab":
        return T.Compose([T.Resize(size, interpolation=interp), *norm])
    resize = tuple(round(s * 256 / 224) for s in size)
    if train:
        return T.Compose(
            [T.Resize(resize, interpolation=interp), T.RandomCrop(size), T.RandomHorizontalFlip(), *norm]
        )
    return T.Compose([T.Resize(resize, interpolation=interp), T.CenterCrop(size), *norm])


def eval_transform(info: BackboneInfo, recipe: str = "vtab") -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform of a recipe: what evaluation, serving and the offline reference all use."""
    return build_transform(info, recipe, train=False)


def images_to_batch(
    images: Sequence[Image.Image], transform: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor:
    """[B, C, H, W] float32 tensor of transformed images."""
    return torch.stack([transform(img) for img in images])
