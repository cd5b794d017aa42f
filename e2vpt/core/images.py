"""Image decoding and the preprocessing recipes: the one home for both (training, evaluation, serving).

Decoding turns untrusted bytes into RGB pixels: JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF (the formats of
`ImageLimits.formats`), grayscale, CMYK, palette and alpha (composited on white), EXIF orientation applied.
The header is read first (Pillow's lazy `Image.open`, restricted to the allowed formats): oversized images
(pixel limit, decompression bombs) raise `ImageTooLarge` (413) before their pixels are decoded; anything
unreadable, and any exception at all from an image library, raises `InvalidImage` (400) for that image only.

- `decode_image` -> an RGB `PIL.Image` (the reference path; training reads files with it).
- `decode_tensor` -> uint8 [3, H, W]: baseline RGB/grayscale JPEGs through torchvision's decoder
  (bit-identical to Pillow's, measured), everything else through `decode_image`.
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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.io as tvio
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
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

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            formats=frozenset(f.upper() for f in settings.image_formats),
            reduce_pixels=settings.image_reduce_pixels,
        )


# Training reads the operator's own files: any format Pillow opens, no byte limit, Pillow's bomb guard.
TRAINING_LIMITS = ImageLimits(max_bytes=2**62, max_pixels=2**62, formats=None)


def _describe(formats: frozenset[str] | None) -> str:
    return "any format Pillow opens" if formats is None else ", ".join(sorted(formats))


def open_image(data: bytes | bytearray | memoryview | None, limits: ImageLimits) -> Image.Image:
    """The lazily opened image (header read, pixels not decoded), checked against `limits`."""
    if data is None or len(data) == 0:
        raise InvalidImage("empty image: the request carried no image bytes")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
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
    return img


def _reduce_factor(width: int, height: int, budget: int) -> int:
    """Smallest r with ceil(w / 2^r) * ceil(h / 2^r) <= budget."""
    r = 0
    while math.ceil(width / 2**r) * math.ceil(height / 2**r) > budget and 2**r < max(width, height):
        r += 1
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
        limits = ImageLimits(
            max_bytes=max_bytes if max_bytes is not None else limits.max_bytes,
            max_pixels=max_pixels if max_pixels is not None else limits.max_pixels,
            formats=limits.formats,
            reduce_pixels=limits.reduce_pixels,
        )
    return _load(open_image(data, limits), limits)


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


def decode_tensor(data: bytes | bytearray | memoryview | None, limits: ImageLimits) -> torch.Tensor:
    """Untrusted bytes -> uint8 [3, H, W] on the CPU; same pixels as `decode_image`."""
    img = open_image(data, limits)
    assert data is not None
    if is_fast_jpeg(img):
        try:
            x = tvio.decode_jpeg(as_uint8_tensor(data), mode=tvio.ImageReadMode.RGB)
            return apply_orientation(x, exif_orientation(img)).contiguous()
        except Exception:  # anything torchvision refuses, Pillow decides (and types the error)
            pass
    return pil_to_tensor(_load(img, limits))


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
        """uint8 [3, H, W] images of any sizes, all on one device -> float32 [B, 3, h, w] there."""
        if not images:
            raise ValueError("no images")
        device = images[0].device
        out = torch.empty((len(images), 3, *self.size), dtype=torch.float32, device=device)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(images):
            if x.dtype != torch.uint8 or x.dim() != 3 or x.shape[0] != 3:
                raise ValueError(f"expected uint8 [3, H, W], got {x.dtype} {tuple(x.shape)}")
            groups.setdefault(tuple(x.shape), []).append(i)
        for idx in groups.values():
            x = images[idx[0]][None] if len(idx) == 1 else torch.stack([images[i] for i in idx])
            out[idx] = self._normalize(self._crop(self._resize(x)))
        return out

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.resize_to:
            return x
        return TF.resize(x, list(self.resize_to), interpolation=self.interpolation, antialias=True)

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

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self._stats:  # mean/std copied to a device once
            self._stats[x.device] = (self._mean.to(x.device), self._std.to(x.device))
        mean, std = self._stats[x.device]
        return (x.float() / 255.0 - mean) / std


def build_transform(
    info: BackboneInfo, recipe: str = "vtab", *, train: bool = False
) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
    """The recipe's transform (see `Preprocess`): train augments (fgvc), eval is deterministic."""
    return Preprocess(info, recipe, train=train)


def eval_transform(info: BackboneInfo, recipe: str = "vtab") -> Preprocess:
    """The eval transform of a recipe: what evaluation, serving and the offline reference all use."""
    return Preprocess(info, recipe, train=False)
