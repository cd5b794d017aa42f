"""`ImagePipeline`: a batch of encoded images -> one normalised input tensor per item, in batches.

scan(): every header is read and checked first (format allowed, bytes, pixels, bombs; plain JPEGs
scanned without Pillow, `scan_image`), so the caller knows each image's decoded size before any pixel is
decoded (the engine bounds the pixels a micro-batch holds with it).

decode(): scanned images (or bytes, scanned first) -> pixels. On a CUDA engine, complete JPEGs of at least
`gpu_min_pixels` (`nvjpeg_decodes`) are decoded on the GPU in one call (torchvision's nvjpeg `decode_jpeg`
on a list; EXIF orientation, which torchvision applies only on the CPU, then applied as tensor ops); every
other image, and every image on a CPU engine, is decoded in a pool of threads (torchvision's JPEG decoder,
Pillow for the rest: torchvision's PNG decoder can crash the process, `e2vpt.core.images`). An image that a fast decoder refuses falls back to Pillow on its own, so
one corrupt file fails its own item only (typed, `InvalidImage` / `ImageTooLarge`).

transform(): each item's recipe (`Preprocess`, the transform training used) as tensor ops where the
pixels are: batched per recipe and input size on the GPU; per image in the thread pool on the CPU.
Same tensor code on any device; only the nvjpeg call needs CUDA.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch
import torchvision.io as tvio

from e2vpt.config import GPU_DECODE_MIN_PIXELS
from e2vpt.core.backbone import BackboneInfo
from e2vpt.core.images import (
    ImageLimits,
    JpegHeader,
    Preprocess,
    Scanned,
    apply_orientation,
    as_uint8_tensor,
    decode_scanned,
    scan_image,
)
from e2vpt.errors import E2VPTError, InvalidImage

log = logging.getLogger(__name__)

T = TypeVar("T")
Decoded = torch.Tensor | E2VPTError
Scan = Scanned | E2VPTError
JPEG_EOI = b"\xff\xd9"


def nvjpeg_decodes(header: JpegHeader, data: bytes | bytearray | memoryview, min_pixels: int) -> bool:
    """Whether a CUDA engine decodes this plain JPEG (its header scanned by `scan_image`) with nvjpeg: at
    least `min_pixels` (smaller ones get libjpeg's pixels, what training saw), and its data ends with the
    end-of-image marker. A truncated upload is refused by libjpeg (Pillow's "image file is truncated": a 400
    on the CPU engine), while a hardware decoder may decode what is there and answer: so it never reaches
    nvjpeg, and gets the same 400 on every device. Complete files with bytes after the marker take the CPU
    path too (rare; Pillow reads them)."""
    return header.width * header.height >= min_pixels and data[-2:] == JPEG_EOI


def _own(fn: Callable[..., T], *args: Any) -> T | E2VPTError:
    """fn(*args), or its failure as this item's own typed error (an untyped one logged: InvalidImage)."""
    try:
        return fn(*args)
    except E2VPTError as exc:
        return exc
    except Exception as exc:
        log.warning("image decoding raised %s", type(exc).__name__, exc_info=exc)
        return InvalidImage(f"unreadable image: {type(exc).__name__}")


class ImagePipeline:
    def __init__(
        self,
        info: BackboneInfo,
        limits: ImageLimits | None = None,
        device: torch.device | str = "cpu",
        *,
        threads: int = 0,
        gpu_decode: bool = True,
        gpu_min_pixels: int = GPU_DECODE_MIN_PIXELS,
    ) -> None:
        self.info = info
        self.limits = limits or ImageLimits()
        self.device = torch.device(device)
        self.gpu_decode = gpu_decode and self.device.type == "cuda"
        # smaller JPEGs are decoded on the CPU: libjpeg's pixels (what training saw), at little cost
        self.gpu_min_pixels = gpu_min_pixels
        self.threads = threads if threads > 0 else min(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="e2vpt-images")
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="e2vpt-decode-ahead")
        self._recipes: dict[str, Preprocess] = {}

    def close(self) -> None:
        self._ahead.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def preprocess(self, recipe: str) -> Preprocess:
        """The eval transform of a recipe (built once)."""
        if recipe not in self._recipes:
            self._recipes[recipe] = Preprocess(self.info, recipe, train=False)
        return self._recipes[recipe]

    def _map(
        self, fn: Callable[..., Decoded], args: list[tuple[Any, ...]]
    ) -> list[Decoded | Future[Decoded]]:
        """Submitted to the pool (results later), or run here when a pool would only add overhead."""
        if len(args) <= 1 or self.threads == 1:
            return [fn(*a) for a in args]
        return [self._pool.submit(fn, *a) for a in args]

    # ------------------------------------------------------------------ decode
    def scan(self, images: Sequence[bytes], limits: ImageLimits | None = None) -> list[Scan]:
        """Each image's header read and checked against `limits` (default: the pipeline's): what decoding
        it needs and its decoded size, or its typed error. Cheap: no pixel is decoded."""
        limits = limits or self.limits
        return [_own(scan_image, data, limits) for data in images]

    def decode(self, images: Sequence[bytes | Scan], limits: ImageLimits | None = None) -> list[Decoded]:
        """uint8 [3, H, W] per image (on the engine's device for GPU-decoded ones), or its typed error.
        `images`: encoded bytes, or what `scan` made of them (with the same `limits`: this call's, default
        the pipeline's)."""
        limits = limits or self.limits
        out: list[Decoded | None] = [None] * len(images)
        gpu: list[tuple[int, Scanned]] = []
        cpu: list[tuple[int, Scanned]] = []
        for i, image in enumerate(images):
            scanned = image if isinstance(image, Scanned | E2VPTError) else _own(scan_image, image, limits)
            if isinstance(scanned, E2VPTError):
                out[i] = scanned
            elif (
                self.gpu_decode
                and scanned.jpeg is not None
                and nvjpeg_decodes(scanned.jpeg, scanned.data, self.gpu_min_pixels)
            ):
                gpu.append((i, scanned))
            else:
                cpu.append((i, scanned))
        futures = self._map(_own, [(decode_scanned, s, limits) for _, s in cpu])
        if gpu:
            decoded = self._decode_gpu([s.data for _, s in gpu])
            for (i, s), x in zip(gpu, decoded, strict=True):
                assert s.jpeg is not None
                # nvjpeg refused it: the CPU decoders (and Pillow's verdict) decide
                out[i] = (
                    apply_orientation(x, s.jpeg.orientation)
                    if x is not None
                    else _own(decode_scanned, s, limits)
                )
        for (i, _), x in zip(cpu, futures, strict=True):
            out[i] = x.result() if isinstance(x, Future) else x
        return self._fill(out)

    def decode_ahead(
        self, images: Sequence[bytes | Scan], limits: ImageLimits | None = None
    ) -> Future[list[Decoded]]:
        """`decode` in a background thread (one at a time), while the caller works on something else."""
        return self._ahead.submit(self.decode, images, limits)

    @staticmethod
    def _fill(out: list[Decoded | None]) -> list[Decoded]:
        return [x if x is not None else InvalidImage("image not decoded") for x in out]

    def _decode_gpu(self, images: Sequence[bytes | bytearray | memoryview]) -> list[torch.Tensor | None]:
        """nvjpeg on a list; if the batch call fails, image by image (None: this image failed)."""
        tensors = [as_uint8_tensor(d) for d in images]
        kw = {"mode": tvio.ImageReadMode.RGB, "device": self.device}  # EXIF: applied by the caller
        try:
            return list(tvio.decode_jpeg(tensors, **kw))
        except Exception:
            pass
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(tvio.decode_jpeg(t, **kw))
            except Exception:
                out.append(None)
        return out

    # ------------------------------------------------------------------ transform
    def transform(self, images: Sequence[torch.Tensor], recipes: Sequence[str]) -> list[Decoded]:
        """float32 [3, h, w] on the engine's device per image (its recipe's eval transform), or an error."""
        out: list[Decoded | None] = [None] * len(images)
        by_recipe: dict[str, list[int]] = {}
        for i, r in enumerate(recipes):
            by_recipe.setdefault(r, []).append(i)
        for recipe, idx in by_recipe.items():
            try:
                prep = self.preprocess(recipe)
            except E2VPTError as exc:  # an unknown recipe (validation refuses them at registration)
                for i in idx:
                    out[i] = exc
                continue
            if self.device.type == "cuda":
                xs = [images[i].to(self.device, non_blocking=True) for i in idx]
                try:
                    batch = prep.batch(xs)
                    for j, i in enumerate(idx):
                        out[i] = batch[j]
                    continue
                except Exception:  # find the item that fails, alone
                    pass
                for i, x in zip(idx, xs, strict=True):
                    out[i] = self._transform_one(prep, x)
            else:
                results = self._map(self._transform_one, [(prep, images[i]) for i in idx])
                for i, x in zip(idx, results, strict=True):
                    out[i] = x.result() if isinstance(x, Future) else x
        return self._fill(out)

    def _transform_one(self, prep: Preprocess, x: torch.Tensor) -> Decoded:
        try:
            return prep.batch([x.to(self.device)])[0]
        except Exception as exc:  # unexpected: a 500 for this item alone
            log.exception("transforming an image failed")
            return E2VPTError(f"image transform failed: {type(exc).__name__}")
