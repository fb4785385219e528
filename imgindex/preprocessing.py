"""Turning decoded pixels into the network's input, exactly as imgsim does.

The short side is resized to 350 pixels with OpenCV's bilinear interpolation (reimplemented here
bit for bit, so OpenCV is not needed), the aspect ratio is kept, nothing is cropped, and the RGB
values are scaled to [0, 1] and normalised with the ImageNet mean and standard deviation.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from imgindex.devices import device_constant, to_device
from imgindex.errors import ImageError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become network input. Recorded in every index, so vectors are never mixed."""

    preset: str = "exact"
    short_side: int = 350
    # Let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale (DCT scaling), down to no less
    # than short_side: about twice as fast to decode, but the pixels are no longer OpenCV's.
    jpeg_draft: bool = False
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear-opencv-fixedpoint"
    # Not part of the vectors' identity: a guard against absurd inputs (a 1 x 10000 strip would
    # become 350 x 3,500,000 pixels).
    max_aspect_ratio: float = field(default=20.0, compare=False)

    @property
    def draft_to(self) -> int | None:
        """The short side to ask libjpeg for, or None to decode at full size."""
        return self.short_side if self.jpeg_draft else None

    def describe(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "resize": "short side",
            "short_side": self.short_side,
            "jpeg_draft": self.jpeg_draft,
            "interpolation": self.interpolation,
            "crop": None,
            "color": "RGB",
            "scale": "1/255",
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing; imgsim's rounding (truncation) exactly."""
        scale = self.short_side / min(width, height)
        return (
            int(max(width * scale, self.short_side)),
            int(max(height * scale, self.short_side)),
        )

    def check(self, width: int, height: int, name: str) -> None:
        if width < 1 or height < 1:
            raise ImageError(name, f"image has no pixels ({width} x {height})")
        ratio = max(width, height) / min(width, height)
        if ratio > self.max_aspect_ratio:
            raise ImageError(
                name,
                f"aspect ratio {ratio:.0f}:1 ({width} x {height}) is too extreme to embed "
                f"(limit {self.max_aspect_ratio:.0f}:1)",
            )

    def resize_array(self, rgb: Any, name: str = "<image>") -> Any:
        """H x W x 3 uint8 RGB -> 3 x h x w uint8 with the short side at ``short_side``, of the
        same kind: a numpy array (without torch: what the ONNX runtime embeds) or a tensor."""
        height, width = rgb.shape[:2]
        self.check(width, height, name)
        new_w, new_h = self.target_size(width, height)
        if (new_w, new_h) != (width, height):
            return opencv_bilinear_resize(rgb, new_w, new_h, channels_first=True)
        if isinstance(rgb, np.ndarray):
            return np.ascontiguousarray(rgb.transpose(2, 0, 1))
        return rgb.permute(2, 0, 1).contiguous()

    def normalize_array(self, batch: np.ndarray) -> np.ndarray:
        """N x 3 x h x w uint8 -> float32 network input, the same numbers as :meth:`normalize`
        (the same float32 operations, each correctly rounded)."""
        x = batch.astype(np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, 3, 1, 1)
        return (x - mean) / std

    def resize(self, rgb: np.ndarray | torch.Tensor, name: str = "<image>") -> torch.Tensor:
        """H x W x 3 uint8 RGB (an array, or a tensor on any device) -> 3 x h x w uint8 tensor
        with the short side at ``short_side``."""
        import torch

        resized = self.resize_array(rgb, name)
        return torch.from_numpy(resized) if isinstance(resized, np.ndarray) else resized

    def normalize(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        """N x 3 x h x w uint8 (a tensor, or an array as the onnx runtime prepares it) ->
        float32 network input, a tensor."""
        if isinstance(batch, np.ndarray):
            import torch

            return torch.from_numpy(self.normalize_array(batch))
        return self.standardize(batch.float() / 255.0)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """N x 3 x h x w values in [0, 1] (augmented training views, say) -> network input."""
        mean = device_constant(self.mean, x.device).view(1, 3, 1, 1)
        std = device_constant(self.std, x.device).view(1, 3, 1, 1)
        return (x - mean) / std


PRESETS = {
    # imgsim's preprocessing, reproduced bit for bit: the default.
    "exact": Preprocessing(),
    # 224 pixels on the short side (0.41 times the pixels of 350) and JPEG draft decoding: for
    # users who prefer speed; the benchmarks measure what it costs in retrieval quality.
    "fast": Preprocessing(preset="fast", short_side=224, jpeg_draft=True),
}


def opencv_bilinear_resize(
    pixels: np.ndarray | torch.Tensor, width: int, height: int, channels_first: bool = False
) -> np.ndarray | torch.Tensor:
    """Resize ``H x W x C`` uint8 pixels exactly as OpenCV's ``cv2.resize(..., INTER_LINEAR)``.

    imgsim resizes with OpenCV; reproducing its integer arithmetic bit for bit (checked against
    cv2 on random sizes in tests/test_model.py) keeps imgindex's vectors equal to imgsim's to
    float rounding, where a float or antialiased bilinear resize moves a near-duplicate pair's
    distance by up to 0.8%. OpenCV samples at pixel centres, weights the two neighbours with
    11-bit fixed-point coefficients, and rounds in two stages (the arithmetic of its SIMD path).

    ``pixels`` is a numpy array or a torch tensor (on any device); the result is of the same
    kind, ``height x width x C``, or ``C x height x width`` with ``channels_first``. The
    arithmetic is written once for both: numpy's gathers are 3-5 times faster than torch's
    ``index_select`` on a CPU, and torch runs it where a GPU decoded the pixels.
    """
    src_h, src_w, channels = pixels.shape
    x0, x1, a0, a1 = _opencv_taps(src_w, width, clamp=True)
    y0, y1, b0, b1 = _opencv_taps(src_h, height, clamp=False)
    # Rows are seen as W*C values: the two taps of each output value are gathered as columns
    # (pixel index * C + channel) and weighted by their pixel's coefficients.
    cols0, cols1 = ((x[:, None] * channels + np.arange(channels)).ravel() for x in (x0, x1))
    a0, a1 = np.repeat(a0, channels), np.repeat(a1, channels)
    b0, b1 = b0[:, None], b1[:, None]
    # Each source row is filtered horizontally once, however many output rows use it
    # (upscaling reuses every row about twice), instead of once per output row that reads it.
    rows, which = np.unique(np.concatenate([y0, y1]), return_inverse=True)
    flat = pixels.reshape(src_h, src_w * channels)
    if not isinstance(pixels, np.ndarray):
        import torch

        # Every index and weight goes to the pixels' device in one asynchronous copy.
        parts = [rows, cols0, cols1, which, a0, a1, b0.ravel(), b1.ravel()]
        packed = np.concatenate(parts, dtype=np.int64)
        on_device = to_device(packed, pixels.device).split([len(p) for p in parts])
        rows, cols0, cols1, which = on_device[:4]
        a0, a1, b0, b1 = (t.int() for t in on_device[4:])
        b0, b1 = b0.view(-1, 1), b1.view(-1, 1)

        def take(values: Any, index: Any, axis: int, slot: str) -> Any:
            return values.index_select(axis, index)

        def weigh(values: Any, weights: Any, slot: str) -> Any:
            return values.int() * weights

    else:
        # The intermediate arrays (megabytes each) go to buffers the thread keeps: fresh ones
        # would be page-faulted in on every call, which costs about as much as the arithmetic
        # (benchmarks/reading.py measures the resize).
        scratch = _Scratch.of_this_thread()

        def take(values: Any, index: np.ndarray, axis: int, slot: str) -> Any:
            shape = (len(index), values.shape[1]) if axis == 0 else (values.shape[0], len(index))
            out = scratch.array(slot, shape, values.dtype)
            return np.take(values, index, axis=axis, out=out, mode="clip")

        def weigh(values: Any, weights: np.ndarray, slot: str) -> Any:
            return np.multiply(values, weights, out=scratch.array(slot, values.shape, np.int32))

    picked = take(flat, rows, 0, "rows")
    filtered = weigh(take(picked, cols0, 1, "taps"), a0, "filtered")
    filtered += weigh(take(picked, cols1, 1, "taps"), a1, "product")
    filtered >>= 4
    top = take(filtered, which[:height], 0, "top")
    top *= b0
    top >>= 16
    bottom = take(filtered, which[height:], 0, "bottom")
    bottom *= b1
    bottom >>= 16
    top += bottom
    top += 2
    top >>= 2
    out = top.reshape(height, width, channels)
    if not isinstance(pixels, np.ndarray):
        out = out.permute(2, 0, 1) if channels_first else out
        return out.to(torch.uint8).contiguous()
    # The narrowing cast and the transpose in one pass, into a new array of the thread's own.
    return (out.transpose(2, 0, 1) if channels_first else out).astype(np.uint8, order="C")


class _Scratch:
    """Reusable buffers of one thread, by name, grown to the largest size asked for (up to
    ``keep_bytes`` in all; beyond that, arrays are allocated afresh)."""

    keep_bytes = 32 << 20  # a 12 MP photo needs about 22 MB
    _threads = threading.local()

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    @classmethod
    def of_this_thread(cls) -> _Scratch:
        scratch = getattr(cls._threads, "scratch", None)
        if scratch is None:
            scratch = cls._threads.scratch = cls()
        return scratch

    def array(self, slot: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised array for ``slot``; valid until ``slot`` is asked for again."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.nbytes < nbytes:
            kept = sum(b.nbytes for name, b in self.buffers.items() if name != slot)
            if kept + nbytes > self.keep_bytes:
                return np.empty(shape, dtype)
            buffer = self.buffers[slot] = np.empty(nbytes, np.uint8)
        return buffer[:nbytes].view(dtype).reshape(shape)


def _opencv_taps(
    src: int, dst: int, clamp: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and 11-bit weights of the two taps of each output pixel along one axis.

    Along x, OpenCV moves a tap that falls outside the image onto the edge pixel with full weight
    (``clamp``); along y it keeps the weights and clamps only the row index.
    """
    scale = 1.0 / (dst / src)
    frac = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(frac).astype(np.int64)
    frac = (frac - first).astype(np.float32)
    if clamp:
        low, high = first < 0, first >= src - 1
        frac[low | high] = 0
        first[low] = 0
        first[high] = src - 1
    w0 = np.rint((np.float32(1) - frac) * np.float32(2048)).astype(np.int32)
    return (
        np.clip(first, 0, src - 1),
        np.clip(first + 1, 0, src - 1),
        w0,
        (2048 - w0).astype(np.int32),
    )
