"""Views of a picture for training AugNet: what "the same picture" means to the network.

Two halves, placed where each runs best:

* geometric, on the CPU in DataLoader worker processes: :class:`ViewSource` decodes an image once
  and :func:`make_views` cuts K views from it (random crops at several scales and shapes, flips,
  small rotations, JPEG artefacts), as ``K x S x S x 3`` uint8 crops; :class:`Batches` picks
  the images of each step;
* photometric, on the training device, a whole batch at once (so a GPU never waits on CPU image
  operations): :func:`photometric` changes colour, turns some views grey, blurs, adds noise and
  drops out patches.

Randomness comes from (seed, step, image), so a run is reproducible whatever worker does what,
and a resumed run makes the same views as an uninterrupted one.
"""

from __future__ import annotations

import io
import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgindex.decode import DEFAULT_MAX_PIXELS, decode_image_bytes, read_file
from imgindex.devices import device_constant
from imgindex.errors import ImageError

if TYPE_CHECKING:
    import torch

AUGMENTATIONS = [
    "random resized crop, 20-100% of the area, aspect 3:4-4:3",
    "horizontal flip (p 0.5)",
    "rotation up to 20 degrees (p 0.25)",
    "JPEG artefacts, quality 20-80 (p 0.2)",
    "colour jitter: brightness, contrast, saturation 0.6-1.4, hue +-0.05 turn (p 0.8)",
    "greyscale (p 0.2)",
    "Gaussian blur, sigma 0.1-2 (p 0.3)",
    "Gaussian noise, sigma 0.01-0.08 (p 0.2)",
    "dropped-out patch, 2-15% of the area (p 0.3)",
]
_MEAN_RGB = (124, 116, 104)  # ImageNet mean: the fill for rotated-in corners


def make_views(rgb: np.ndarray, k: int, size: int, rng: random.Random) -> np.ndarray:
    """``k`` geometrically augmented ``size x size`` crops of one RGB image (``k x S x S x 3``)."""
    from PIL import Image

    image = Image.fromarray(rgb)
    width, height = image.size
    out = np.empty((k, size, size, 3), dtype=np.uint8)
    for view in range(k):
        angle = rng.uniform(-20, 20) if rng.random() < 0.25 else None
        box = _random_box(width, height, rng)
        if angle is None:
            crop = image.resize((size, size), Image.BILINEAR, box=box)
        else:
            crop = _rotated_crop(image, angle, box, size)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < 0.2:
            buffer = io.BytesIO()
            crop.save(buffer, format="JPEG", quality=rng.randint(20, 80))
            buffer.seek(0)
            crop = Image.open(buffer).convert("RGB")
        out[view] = np.asarray(crop)
    return out


def _rotated_crop(image: Any, angle: float, box: tuple[int, int, int, int], size: int) -> Any:
    """``image.rotate(angle, ...).resize((size, size), box=box)``, rotating only the part of the
    picture the crop reads: its box, widened by the resize filter's reach (clipped to the
    picture, as the rotated picture is): the same pixels to within one level, at a cost that
    grows with the crop rather than with the picture."""
    from PIL import Image

    x0, y0, x1, y1 = box
    width, height = image.size
    reach = math.ceil(max((x1 - x0) / size, (y1 - y0) / size, 1.0)) + 1
    left, top = max(0, x0 - reach), max(0, y0 - reach)
    right, bottom = min(width, x1 + reach), min(height, y1 + reach)
    # Pillow's rotation about the centre, as the map from output to input pixels (the
    # coefficients rounded as Image.rotate rounds them), moved to the region's corner.
    theta = -math.radians(angle % 360.0)
    a, b = round(math.cos(theta), 15), round(math.sin(theta), 15)
    d, e = round(-math.sin(theta), 15), round(math.cos(theta), 15)
    cx, cy = width / 2, height / 2
    c = a * (left - cx) + b * (top - cy) + cx
    f = d * (left - cx) + e * (top - cy) + cy
    region = image.transform(
        (right - left, bottom - top),
        Image.AFFINE,
        (a, b, c, d, e, f),
        resample=Image.BILINEAR,
        fillcolor=_MEAN_RGB,
    )
    return region.resize(
        (size, size), Image.BILINEAR, box=(x0 - left, y0 - top, x1 - left, y1 - top)
    )


def _random_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.2, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
            return x0, y0, x0 + w, y0 + h
    side = min(width, height)  # a central square, when no random box fitted
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


class ViewSource:
    """A map-style dataset: ``(step, i)`` -> K views of image ``i`` (or the reason it failed).
    Randomness comes from (seed, step, i), so a run is reproducible whatever worker does what."""

    def __init__(
        self,
        paths: Sequence[Path],
        views: int,
        size: int,
        seed: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.paths = list(paths)
        self.views = views
        self.size = size
        self.seed = seed
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        import torch

        step, i = key
        path = self.paths[i]
        try:
            data, _ = read_file(path)
            # Decode large JPEGs at reduced size: crops of 20% of the area still keep full detail.
            rgb = decode_image_bytes(
                data, os.fsdecode(path), self.max_pixels, 2 * self.size, 2 * self.size
            )
        except (ImageError, OSError) as exc:
            return i, str(getattr(exc, "reason", exc))
        rng = random.Random(f"{self.seed}/{step}/{i}")
        return i, torch.from_numpy(make_views(rgb, self.views, self.size, rng))


class Batches:
    """Batch sampler: P distinct images per step, in a fresh random order each epoch; yields
    ``(step, i)`` keys from ``start`` on, forever."""

    def __init__(self, n: int, per_step: int, seed: int, start: int = 0):
        self.n, self.per_step, self.seed, self.start = n, min(per_step, n), seed, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_epoch = self.n // self.per_step
        step = self.start
        while True:
            epoch, offset = divmod(step, per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            chunk = order[offset * self.per_step : (offset + 1) * self.per_step]
            yield [(step, int(i)) for i in chunk]
            step += 1


def collate(items: list[tuple[int, Any]]) -> tuple[Any, list[tuple[int, str]]]:
    import torch

    good = [views for _, views in items if not isinstance(views, str)]
    failed = [(i, views) for i, views in items if isinstance(views, str)]
    return (torch.stack(good) if good else None), failed


# -- photometric augmentation (on the training device, batched) ------------------------------


def photometric(views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``N x 3 x S x S`` uint8 views -> augmented float views in [0, 1], per-view random."""
    import torch
    import torch.nn.functional as F

    x = views.float().div_(255.0)
    n, device = x.shape[0], x.device

    def chance(p: float) -> torch.Tensor:
        return (torch.rand(n, device=device, generator=generator) < p).view(n, 1, 1, 1)

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(n, device=device, generator=generator)).view(
            n, 1, 1, 1
        )

    # Constants are made once per device (device_constant): a torch.tensor(..., device=) here
    # would make the CPU wait for the GPU every step, and no batch could be queued ahead.
    luma_weights = device_constant(_YIQ[0], device).view(1, 3, 1, 1)

    def luma(t: torch.Tensor) -> torch.Tensor:
        return (t * luma_weights).sum(1, keepdim=True)

    # Colour jitter: brightness, contrast, saturation, then hue (a rotation in YIQ space).
    jitter = chance(0.8)
    jittered = x * uniform(0.6, 1.4)
    mean = luma(jittered).mean((2, 3), keepdim=True)
    jittered = (jittered - mean) * uniform(0.6, 1.4) + mean
    grey = luma(jittered)
    jittered = (jittered - grey) * uniform(0.6, 1.4) + grey
    jittered = _rotate_hue(jittered.clamp_(0, 1), uniform(-0.05, 0.05).view(n) * 2 * math.pi)
    x = torch.where(jitter, jittered, x).clamp_(0, 1)
    x = torch.where(chance(0.2), luma(x).expand_as(x), x)

    # Gaussian blur with a per-view sigma: one separable 9-tap kernel per view.
    sigma = uniform(0.1, 2.0).view(n, 1)
    taps = torch.arange(-4, 5, device=device, dtype=x.dtype).view(1, 9)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (3N, 9)
    flat = x.reshape(1, 3 * n, *x.shape[2:])
    blurred = F.conv2d(
        F.pad(flat, (4, 4, 0, 0), mode="reflect"), kernel.view(3 * n, 1, 1, 9), groups=3 * n
    )
    blurred = F.conv2d(
        F.pad(blurred, (0, 0, 4, 4), mode="reflect"), kernel.view(3 * n, 1, 9, 1), groups=3 * n
    )
    x = torch.where(chance(0.3), blurred.view_as(x), x)

    noise = torch.randn(x.shape, device=device, generator=generator) * uniform(0.01, 0.08)
    x = torch.where(chance(0.2), (x + noise).clamp_(0, 1), x)

    # One dropped-out patch of random size, shape and flat colour.
    size = x.shape[-1]
    area = uniform(0.02, 0.15).view(n)
    aspect = torch.exp(uniform(math.log(0.3), math.log(3.3)).view(n))
    h = (torch.sqrt(area * aspect) * size).clamp(1, size)
    w = (torch.sqrt(area / aspect) * size).clamp(1, size)
    y0 = torch.rand(n, device=device, generator=generator) * (size - h)
    x0 = torch.rand(n, device=device, generator=generator) * (size - w)
    grid = torch.arange(size, device=device, dtype=x.dtype)
    rows = (grid.view(1, -1) >= y0.view(-1, 1)) & (grid.view(1, -1) < (y0 + h).view(-1, 1))
    cols = (grid.view(1, -1) >= x0.view(-1, 1)) & (grid.view(1, -1) < (x0 + w).view(-1, 1))
    patch = (rows.view(n, 1, size, 1) & cols.view(n, 1, 1, size)) & chance(0.3)
    fill = torch.rand(n, 3, 1, 1, device=device, generator=generator)
    return torch.where(patch, fill.expand_as(x), x)


# RGB -> YIQ (NTSC) and back: hue turns about the luma axis Y.
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_YIQ_INVERSE = tuple(tuple(float(v) for v in row) for row in np.linalg.inv(np.array(_YIQ)))


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    import torch

    to_yiq = device_constant(_YIQ, x.device, x.dtype)
    from_yiq = device_constant(_YIQ_INVERSE, x.device, x.dtype)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(len(angle), 3, 3, device=x.device, dtype=x.dtype)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    return torch.einsum("nij,njhw->nihw", from_yiq @ rotation @ to_yiq, x)
