"""The AugNet network, its weights, and the preprocessing that travels with them.

AugNet (Chen et al., "AugNet: End-to-End Unsupervised Visual Representation Learning with Image
Augmentation", arXiv:2106.06250) is torchvision's ResNet50 with its classifier replaced by
``Linear(2048, 768)`` and a ``tanh``. The pretrained weights are the ``model.pth`` shipped in the
``imgsim`` 0.1.2 wheel (MIT licence). This module finds that file through the installed
distribution's file list (never importing imgsim, which needs OpenCV), checks its SHA-256, and
loads it with ``torch.load(weights_only=True)`` so that a checkpoint cannot run code.

Preprocessing reproduces imgsim's: the short side is resized to 350 pixels with OpenCV's
bilinear interpolation (reimplemented here bit for bit, so OpenCV is not needed), the aspect
ratio is kept, nothing is cropped, and the RGB values are scaled to [0, 1] and normalised with the
ImageNet mean and standard deviation. Images of different shapes cannot share a batch without
changing their vectors, so batches are formed from images of the same resized shape.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import os
import pickle
import re
import threading
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgindex.decode import (
    DEFAULT_MAX_PIXELS,
    decode_image_bytes,
    pil_to_rgb_array,
    read_image_file,
)
from imgindex.errors import ImageError, WeightsError

if TYPE_CHECKING:
    import torch

MODEL_NAME = "augnet-resnet50-768"
EMBEDDING_DIM = 768
AUGNET_SHA256 = "c2cb3cac82642c5698721bd4c57702c3d2ffab077ee9fc277c60ef7359293add"
WEIGHTS_ENV = "IMGINDEX_WEIGHTS"
INSTALL_HINT = (
    "install the AugNet weights with `pip install --no-deps imgsim==0.1.2`, "
    f"or point --weights / ${WEIGHTS_ENV} at a model.pth"
)


# --------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class Weights:
    """A weights file and its SHA-256. ``is_default`` is True for imgsim's own model.pth."""

    path: Path
    sha256: str
    is_default: bool


def default_weights_path() -> Path:
    """Location of ``imgsim/model.pth`` inside the installed imgsim distribution."""
    try:
        dist = importlib.metadata.distribution("imgsim")
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(f"the AugNet weights are not installed: {INSTALL_HINT}") from None
    for file in dist.files or ():
        if file.name == "model.pth" and file.parent.name == "imgsim":
            return Path(str(dist.locate_file(file)))
    raise WeightsError(f"the imgsim distribution has no imgsim/model.pth: {INSTALL_HINT}")


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(path: str | os.PathLike[str] | None = None) -> Weights:
    """The weights to use: ``path``, else ``$IMGINDEX_WEIGHTS``, else imgsim's model.pth.

    The default weights must match the published checksum; another file is accepted as long as it
    loads into the same network (checked when it is loaded), and its checksum is recorded.
    """
    chosen = path if path is not None else os.environ.get(WEIGHTS_ENV) or None
    if chosen is None:
        resolved = default_weights_path()
        is_default = True
    else:
        resolved = Path(chosen).expanduser()
        is_default = False
    if not resolved.is_file():
        if is_default:
            raise WeightsError(f"{resolved}: weights file not found; {INSTALL_HINT}")
        raise WeightsError(f"{resolved}: weights file not found")
    try:
        sha = sha256_of_file(resolved)
    except OSError as exc:
        raise WeightsError(f"{resolved}: cannot read weights ({exc.strerror or exc})") from None
    if is_default and sha != AUGNET_SHA256:
        raise WeightsError(
            f"{resolved}: SHA-256 is {sha}, expected {AUGNET_SHA256}; the file is damaged or not "
            "imgsim 0.1.2's model.pth (reinstall it with `pip install --force-reinstall --no-deps "
            "imgsim==0.1.2`)"
        )
    return Weights(path=resolved, sha256=sha, is_default=sha == AUGNET_SHA256)


# Backbones a network can have (torchvision ResNets); imgsim's weights are the resnet50 one. The
# smaller two are for training from scratch on modest hardware, as in the AugNet repository.
ARCHS = {"resnet50": 2048, "resnet34": 512, "resnet18": 512}
CHECKPOINT_FORMAT = "imgindex-augnet-checkpoint"


def build_network(arch: str = "resnet50") -> torch.nn.Module:
    """An untrained AugNet: a ResNet whose ``fc`` is ``Linear(features, 768)``, then tanh."""
    import torch
    import torchvision.models

    if arch not in ARCHS:
        raise WeightsError(f"unknown backbone {arch!r}; choose one of: {', '.join(ARCHS)}")
    backbone = getattr(torchvision.models, arch)(weights=None)
    backbone.fc = torch.nn.Linear(ARCHS[arch], EMBEDDING_DIM)
    return torch.nn.Sequential(backbone, torch.nn.Tanh())


def state_digest(state: dict[str, torch.Tensor], meta_json: str) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and values, and the metadata: what a
    checkpoint records about itself, so that a changed value is noticed when it is loaded."""
    import torch

    digest = hashlib.sha256(meta_json.encode())
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """What a weights file holds: the network's state, its backbone, and how it was made."""

    state: dict[str, Any]
    arch: str
    meta: dict[str, Any]  # empty for imgsim's model.pth
    training: dict[str, Any] | None  # optimizer and progress, in a resumable checkpoint


def read_checkpoint(path: Path) -> Checkpoint:
    """Load imgsim's model.pth or an imgindex checkpoint, safely (``weights_only=True``: a file
    cannot run code), checking an imgindex checkpoint's recorded digest."""
    import json

    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # (PyTorch's own message suggests loading it unsafely: not a suggestion to pass on.)
        if "global" not in str(exc).lower():  # not a pickle of known things at all
            raise WeightsError(
                f"{path}: not a PyTorch checkpoint (its contents are not a saved state dict; "
                "a damaged or unrelated file?)"
            ) from None
        raise WeightsError(
            f"{path}: not a loadable PyTorch state dict: it holds objects other than tensors "
            "and settings, which could run code when loaded; refused"
        ) from None
    except Exception as exc:
        raise WeightsError(
            f"{path}: not a loadable PyTorch state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT:
        meta_json = raw.get("meta")
        state = raw.get("state_dict")
        if not isinstance(meta_json, str) or not isinstance(state, dict):
            raise WeightsError(f"{path}: an imgindex checkpoint without state or metadata")
        if state_digest(state, meta_json) != raw.get("digest"):
            raise WeightsError(
                f"{path}: the weights do not match the checkpoint's recorded digest; the file "
                "was damaged or modified after it was written"
            )
        meta = json.loads(meta_json)
        return Checkpoint(state, str(meta.get("arch", "resnet50")), meta, raw.get("training"))
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(raw).__name__}")
    # imgsim's checkpoint was saved from nn.DataParallel ("module." prefixes) around a module whose
    # ResNet is called "pre"; our Sequential names it "0".
    renamed = {}
    for key, value in raw.items():
        key = key.removeprefix("module.")
        if key.startswith("pre."):
            key = "0." + key[len("pre.") :]
        renamed[key] = value
    return Checkpoint(renamed, "resnet50", {}, None)


def write_checkpoint(
    path: Path,
    network: torch.nn.Module,
    meta: dict[str, Any],
    training: dict[str, Any] | None = None,
) -> None:
    """Save ``network`` (with ``meta``, and ``training`` state for resuming) atomically: to a
    temporary file, flushed to disk, then renamed over ``path``."""
    import json

    import torch

    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
             for k, v in network.state_dict().items()}  # fmt: skip
    meta_json = json.dumps(meta, sort_keys=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "meta": meta_json,
        "state_dict": state,
        "digest": state_digest(state, meta_json),
    }
    if training is not None:
        payload["training"] = training
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def load_network(weights: Weights) -> torch.nn.Module:
    """AugNet with ``weights`` loaded, in eval mode, on the CPU."""
    checkpoint = read_checkpoint(weights.path)
    network = build_network(checkpoint.arch)
    try:
        network.load_state_dict(checkpoint.state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise WeightsError(
            f"{weights.path}: not an AugNet {checkpoint.arch}-768 checkpoint ({detail[:300]})"
        ) from None
    refuse_non_finite(network, weights.path)
    return network.eval()


def refuse_non_finite(network: torch.nn.Module, path: Path) -> None:
    """Refuse a network whose weights hold NaN or infinite numbers (a training run that
    diverged): every vector it gave would be NaN, and NaN distances order nothing."""
    import torch

    for name, tensor in network.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightsError(
                f"{path}: the weights hold NaN or infinite numbers ({name}); a training run "
                "that diverged? Refused: use an earlier checkpoint"
            )


class PaddedForward:
    """AugNet on a batch of images of different sizes, zero-padded to one shape, with the same
    result for each image as a forward pass at its own size.

    On a GPU every new input shape costs cuDNN a new execution plan for each of ResNet50's 53
    convolutions (about 20 ms a shape, and its plan cache of 10,000 entries thrashes on a
    collection of many aspect ratios: 130 images/s on an H100 where one shape runs 2,500). So
    images are padded to a few shapes (multiples of ``BUCKET`` pixels) and the padding is kept
    exactly zero wherever a convolution could see it: a convolution's own zero padding then looks
    the same as the padded area, and valid outputs are unchanged. Only the inputs of 3x3 and
    7x7 convolutions and of the max-pool need it (1x1 convolutions read a single position; after
    a ReLU, zeros pool like max-pool's -inf padding), and the average pool divides by the valid
    area.
    """

    BUCKET = 32

    def __init__(self, network: torch.nn.Module):
        self.backbone = network[0]
        self.head = network[1]

    @classmethod
    def bucket_shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The padded shape of a ``3 x h x w`` image."""
        b = cls.BUCKET
        return (shape[0], -(-shape[1] // b) * b, -(-shape[2] // b) * b)

    def __call__(self, x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """``x``: normalised ``N x 3 x H x W`` batch; ``sizes``: ``N x 2`` valid (h, w)."""
        import torch

        net = self.backbone
        x = _zero_outside(x, sizes)
        x = net.relu(net.bn1(net.conv1(x)))
        sizes = _conv_size(sizes, 7, 2, 3)
        x = net.maxpool(_zero_outside(x, sizes))
        sizes = _conv_size(sizes, 3, 2, 1)
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                x, sizes = _block(block, x, sizes)
        x = _zero_outside(x, sizes)
        area = (sizes[:, 0] * sizes[:, 1]).to(x.dtype).view(-1, 1)
        pooled = x.sum((2, 3)) / area
        return self.head(net.fc(torch.flatten(pooled, 1)))


def _is_augnet(network: Any) -> bool:
    """Whether ``network`` has the ResNet structure PaddedForward knows (a test stand-in may
    not)."""
    import torch

    return (
        isinstance(network, torch.nn.Sequential)
        and len(network) == 2
        and hasattr(network[0], "layer4")
    )


def _conv_size(sizes: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    return (sizes + 2 * padding - kernel) // stride + 1


def _zero_outside(x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    import torch

    rows = torch.arange(x.shape[2], device=x.device).view(1, -1) < sizes[:, :1]
    cols = torch.arange(x.shape[3], device=x.device).view(1, -1) < sizes[:, 1:]
    return x * (rows[:, None, :, None] & cols[:, None, None, :]).to(x.dtype)


def _block(block: Any, x: torch.Tensor, sizes: torch.Tensor) -> tuple[Any, Any]:
    """One torchvision residual block (Bottleneck or BasicBlock) with zeros kept where its
    3x3 convolutions look."""
    identity = x if block.downsample is None else block.downsample(x)
    if hasattr(block, "conv3"):  # Bottleneck: 1x1, 3x3 (strided), 1x1
        out = block.relu(block.bn1(block.conv1(x)))
        out = _zero_outside(out, sizes)
        stride = block.conv2.stride[0]
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:  # BasicBlock: 3x3 (strided), 3x3
        stride = block.conv1.stride[0]
        out = block.relu(block.bn1(block.conv1(_zero_outside(x, sizes))))
        out = block.bn2(block.conv2(_zero_outside(out, _conv_size(sizes, 3, stride, 1))))
    return block.relu(out + identity), _conv_size(sizes, 3, stride, 1)


def network_arch(network: torch.nn.Module) -> str:
    """The backbone of an AugNet network, read off its structure."""
    backbone = network[0]
    if backbone.fc.in_features == ARCHS["resnet50"]:
        return "resnet50"
    return "resnet34" if len(backbone.layer1) == 3 else "resnet18"


def device_constant(values: tuple[Any, ...], device: Any, dtype: Any = None) -> torch.Tensor:
    """A small constant tensor on ``device``, made once and kept. ``torch.tensor(values,
    device="cuda")`` copies from pageable memory, which makes the CPU wait for all the work the
    GPU has queued; done per batch, that keeps the CPU from preparing the next batch meanwhile."""
    import torch

    return _device_constant(values, str(torch.device(device)), dtype)


@functools.lru_cache(maxsize=64)
def _device_constant(values: tuple[Any, ...], device: str, dtype: Any) -> torch.Tensor:
    import torch

    # A normal tensor even when first asked for under inference_mode: training uses it too.
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype).to(device)


def to_device(array: np.ndarray | torch.Tensor, device: Any) -> torch.Tensor:
    """``array`` copied to ``device`` without making the CPU wait for the GPU's queued work: from
    pinned memory, asynchronously (PyTorch keeps the pinned block until the copy is done)."""
    import torch

    tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# Preprocessing


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

    def resize(self, rgb: np.ndarray | torch.Tensor, name: str = "<image>") -> torch.Tensor:
        """H x W x 3 uint8 RGB (an array, or a tensor on any device) -> 3 x h x w uint8 tensor
        with the short side at ``short_side``."""
        import torch

        height, width = rgb.shape[:2]
        self.check(width, height, name)
        new_w, new_h = self.target_size(width, height)
        if (new_w, new_h) != (width, height):
            rgb = opencv_bilinear_resize(rgb, new_w, new_h, channels_first=True)
        elif isinstance(rgb, torch.Tensor):
            rgb = rgb.permute(2, 0, 1).contiguous()
        else:
            rgb = np.ascontiguousarray(rgb.transpose(2, 0, 1))
        return rgb if isinstance(rgb, torch.Tensor) else torch.from_numpy(rgb)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """N x 3 x h x w uint8 -> float32 network input."""
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
PRECISIONS = ("fp32", "bf16")


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
    # (upscaling reuses every row about twice): 3-5 times faster than filtering per output row.
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
        # are page-faulted in on every call, which took longer than the arithmetic (a 1 MP
        # photo: 7.0 ms, 3.6 with the buffers, on one core of the 2-core test machine).
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


# --------------------------------------------------------------------------------------------
# Vectorizer


DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not DEVICE_NAME.fullmatch(device):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WeightsError(f"device {device!r} was asked for, but PyTorch sees no CUDA GPU")
    return device


def default_precision(preset: str, device: str) -> str:
    """fp32 for the exact preset (its promise is imgsim's vectors); for the fast preset, bf16
    where the hardware computes it natively (a CUDA GPU, or a CPU with AVX512-BF16 / AMX),
    which moves the vectors by a cosine of about 5e-5 (measured on caltech101-dev)."""
    import torch

    if preset == "exact":
        return "fp32"
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


class Vectorizer:
    """Turns images into AugNet vectors; a drop-in for ``imgsim.Vectorizer``.

    ``vectorize(x)`` takes an image path, a PIL image, a uint8 ``H x W x 3`` array (BGR unless
    ``channels="rgb"``), or a list / ``N x H x W x 3`` array of those. One image gives a float32
    vector of 768 numbers, a batch gives an ``N x 768`` matrix. Batches give the same vectors as
    one-by-one calls. ``pad_batches`` (default: on GPUs) lets images of different sizes share a
    batch, padded, with unchanged vectors (:class:`PaddedForward`).
    """

    model_name = MODEL_NAME

    def __init__(
        self,
        device: str = "auto",
        weights: str | os.PathLike[str] | None = None,
        batch_size: int | None = None,
        max_pixels: int | None = None,
        preset: str = "exact",
        precision: str | None = None,
        pad_batches: bool | None = None,
    ):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        if precision not in (*PRECISIONS, None, "auto"):
            raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16 or auto")
        self.device = resolve_device(device)
        # On a CPU, batches larger than 2 run no faster (measured in benchmarks/ingest.py, 2
        # cores); a GPU wants many images at once.
        default_batch = 2 if self.device == "cpu" else 64
        self.batch_size = max(1, int(batch_size or default_batch))
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.preprocessing = PRESETS[preset]
        self.precision = (
            precision if precision in PRECISIONS else default_precision(preset, self.device)
        )
        self.weights = self._resolve_weights(weights)
        # Padded batches by default on GPUs, where each new input shape is expensive (see
        # PaddedForward); CPUs run exact shapes, each as fast as it comes.
        self.pad_batches = self.device != "cpu" if pad_batches is None else pad_batches
        network = self._build_network().eval()
        self._padded = None
        if self.pad_batches and _is_augnet(network):
            self.network, self._input_format = self._optimize(network, script=False)
            self._padded = PaddedForward(self.network)
        else:
            self.network, self._input_format = self._optimize(network)

    @classmethod
    def around(
        cls, network: torch.nn.Module, device: str, precision: str = "fp32", batch_size: int = 64
    ) -> Vectorizer:
        """A Vectorizer embedding with ``network`` as it is (one being trained, say) on
        ``device``: exact preprocessing, no weights file, padded batches on a GPU as usual."""
        import torch

        self = cls.__new__(cls)
        self.device = device
        self.batch_size = batch_size
        self.max_pixels = DEFAULT_MAX_PIXELS
        self.preprocessing = PRESETS["exact"]
        self.precision = precision
        self.weights = Weights(path=Path("<in memory>"), sha256="", is_default=False)
        self.pad_batches = device != "cpu" and _is_augnet(network)
        self.network = network
        self._padded = PaddedForward(network) if self.pad_batches else None
        on_gpu = device != "cpu"
        self._input_format = torch.channels_last if on_gpu else torch.contiguous_format
        return self

    def _optimize(self, network: torch.nn.Module, script: bool = True) -> tuple[Any, Any]:
        """The network prepared for fast inference on this device, and the memory format its
        input should have. Either way the vectors move by less than 1e-5.

        On a CPU in fp32, TorchScript freezing folds batch norm into the convolutions and runs
        them in oneDNN's own layout (about 1.1x eager channels_last and 1.4x imgsim on the 2-core
        test machine, benchmarks/ingest.py). Elsewhere, and should scripting fail, channels_last
        lets oneDNN / cuDNN pick their fastest kernels.
        """
        import torch

        network = network.to(self.device)
        if script and self.device == "cpu" and self.precision == "fp32":
            try:
                # TorchScript is deprecated in favour of torch.compile, which would compile
                # anew for every image shape; the warning says nothing the user can act on.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    frozen = torch.jit.freeze(torch.jit.script(network))
                    return torch.jit.optimize_for_inference(frozen), torch.contiguous_format
            except Exception:  # an older or newer TorchScript: eager is fine too
                pass
        return network.to(memory_format=torch.channels_last), torch.channels_last

    # Overridden by a test stand-in; see tests/conftest.py. A class method: an index checks an
    # existing index's weights with it before deciding whether the model is needed at all.
    @classmethod
    def _resolve_weights(cls, weights: str | os.PathLike[str] | None) -> Weights:
        return resolve_weights(weights)

    def _build_network(self) -> torch.nn.Module:
        network = load_network(self.weights)
        self.model_name = f"augnet-{network_arch(network)}-{EMBEDDING_DIM}"
        return network

    @property
    def dim(self) -> int:
        return EMBEDDING_DIM

    def fingerprint(self) -> dict[str, Any]:
        """What an index records about the vectors it holds; two vectorizers with equal
        fingerprints produce comparable vectors."""
        return {
            "model": self.model_name,
            "weights_sha256": self.weights.sha256,
            "dim": self.dim,
            "preprocessing": self.preprocessing.describe(),
        }

    # -- public API -------------------------------------------------------------------------

    def vectorize(self, images: Any, channels: str = "bgr") -> np.ndarray:
        """Vector(s) for one image or a batch; see the class docstring."""
        single, items = _split_batch(images)
        vectors = self.vectorize_many(items, channels=channels)
        return vectors[0] if single else vectors

    def vectorize_many(self, images: Iterable[Any], channels: str = "bgr") -> np.ndarray:
        """``N x 768`` float32 vectors for an iterable of single images."""
        if channels.lower() not in ("bgr", "rgb"):
            raise ValueError(f"channels must be 'bgr' or 'rgb', not {channels!r}")
        chunks = []
        pending: list[torch.Tensor] = []
        for item in images:
            pending.append(self.prepare(item, channels))
            # Bounded memory for long lists; chunking never changes a vector.
            if len(pending) >= 8 * self.batch_size:
                chunks.append(self.embed_tensors(pending))
                pending = []
        if pending or not chunks:
            chunks.append(self.embed_tensors(pending))
        return np.concatenate(chunks)

    def prepare(self, image: Any, channels: str = "bgr") -> torch.Tensor:
        """One image -> its resized ``3 x h x w`` uint8 tensor (the network's input before
        normalisation)."""
        rgb, name = self._to_rgb(image, channels)
        return self.preprocessing.resize(rgb, name)

    def group_key(self, tensor: torch.Tensor) -> tuple[int, ...]:
        """Images with equal keys can share a batch: equal shapes, or on a GPU, equal padded
        shapes (see :class:`PaddedForward`)."""
        shape = tuple(tensor.shape)
        return PaddedForward.bucket_shape(shape) if self._padded is not None else shape

    def embed_group(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        """Embed prepared tensors that share a :meth:`group_key`, in one batch."""
        return self.start_group(tensors).result()

    def start_group(self, tensors: Sequence[torch.Tensor]) -> PendingVectors:
        """Start embedding prepared tensors that share a :meth:`group_key`, in one batch; on a
        GPU this returns before the vectors are computed, so the caller can prepare the next
        batch (or store the last one) meanwhile."""
        import torch

        if self._padded is None:
            return self.start_batch(torch.stack(list(tensors)))
        # The batch is padded too, to a power of two (at most the batch size): cuDNN's plans
        # depend on the batch size as well as the image shape. It is assembled in pinned memory,
        # from which it is copied to the GPU asynchronously.
        rows = max(min(1 << (len(tensors) - 1).bit_length(), self.batch_size), len(tensors))
        _, height, width = self.group_key(tensors[0])
        first = tensors[0]
        on_gpu = self.device != "cpu" and first.device.type == "cpu"
        shape = (rows, 3, height, width)
        batch = torch.zeros(shape, dtype=first.dtype, device=first.device, pin_memory=on_gpu)
        sizes = np.ones((rows, 2), dtype=np.int64)
        for i, t in enumerate(tensors):
            batch[i, :, : t.shape[1], : t.shape[2]] = t
            sizes[i] = t.shape[1:]
        return self.start_batch(batch, sizes, count=len(tensors))

    def embed_tensors(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        """Embed prepared tensors of any mix of shapes; batches are formed per group key. On a
        GPU, each batch is started before the previous one's vectors are collected."""
        out = np.empty((len(tensors), self.dim), dtype=np.float32)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, t in enumerate(tensors):
            groups[self.group_key(t)].append(i)
        chunks = [
            indices[start : start + self.batch_size]
            for indices in groups.values()
            for start in range(0, len(indices), self.batch_size)
        ]
        previous: tuple[list[int], PendingVectors] | None = None
        for chunk in chunks:
            pending = self.start_group([tensors[i] for i in chunk])
            if previous is not None:
                out[previous[0]] = previous[1].result()
            previous = chunk, pending
        if previous is not None:
            out[previous[0]] = previous[1].result()
        return out

    def embed_batch(self, batch: torch.Tensor, sizes: Any = None) -> np.ndarray:
        """``N x 3 x h x w`` uint8 tensor (one shape) -> ``N x 768`` float32 vectors. With
        ``sizes`` (``N x 2``), each image is only its top-left ``h x w`` (the rest is padding)."""
        return self.start_batch(batch, sizes).result()

    def start_batch(
        self, batch: torch.Tensor, sizes: Any = None, count: int | None = None
    ) -> PendingVectors:
        """:meth:`embed_batch`, started: the vectors of the first ``count`` images (default:
        all) come from the returned object's ``result()``. Nothing on the way makes the CPU wait
        for the GPU (no synchronous copies), so the GPU can still be busy with earlier batches."""
        import torch

        with torch.inference_mode():
            batch = to_device(batch, self.device)  # no-op if decoded there
            x = self.preprocessing.normalize(batch).contiguous(memory_format=self._input_format)
            with torch.autocast(
                device_type=torch.device(self.device).type,
                dtype=torch.bfloat16,
                enabled=self.precision == "bf16",
            ):
                if sizes is not None:
                    vectors = self._padded(x, to_device(torch.as_tensor(sizes), self.device))
                else:
                    vectors = self.network(x)
            return PendingVectors(vectors[:count].float())

    # -- input handling ---------------------------------------------------------------------

    def _to_rgb(self, image: Any, channels: str) -> tuple[np.ndarray, str]:
        from PIL import Image

        if isinstance(image, (str, os.PathLike)):
            name = os.fsdecode(image)
            pixels = read_image_file(image, self.max_pixels, self.preprocessing.draft_to).pixels
            return pixels, name
        if isinstance(image, Image.Image):
            name = getattr(image, "filename", "") or "<PIL image>"
            return pil_to_rgb_array(image, name), name
        if isinstance(image, (bytes, bytearray, memoryview)):  # an encoded file, as read
            data = bytes(image)
            pixels = decode_image_bytes(
                data, "<bytes>", self.max_pixels, self.preprocessing.draft_to
            )
            return pixels, "<bytes>"
        if isinstance(image, np.ndarray):
            return _array_to_rgb(image, channels), "<array>"
        raise TypeError(
            "expected an image path, encoded image bytes, a PIL image or a uint8 numpy array, "
            f"got {type(image).__name__}"
        )


class PendingVectors:
    """Vectors being computed: ``result()`` waits for them and returns them as ``N x 768``
    float32 numpy. From a GPU they come back through pinned memory, copied asynchronously
    behind the forward pass; a CUDA event says when they have arrived."""

    def __init__(self, vectors: torch.Tensor):
        import torch

        self._event = None
        if vectors.device.type == "cuda":
            host = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
            host.copy_(vectors, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            vectors = host
        self._vectors = vectors

    def result(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._vectors.numpy()


def _split_batch(images: Any) -> tuple[bool, list[Any]]:
    """(is_single, items): a batch is a list/tuple or an N x H x W x C array."""
    if isinstance(images, (list, tuple)):
        return False, list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return False, list(images)
    return True, [images]


def _array_to_rgb(array: np.ndarray, channels: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ImageError(
            "<array>", f"pixels must be uint8 (0-255), got {array.dtype}; convert the array first"
        )
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(
            "<array>",
            "expected shape H x W x 3 (or H x W, H x W x 4), got "
            + " x ".join(map(str, array.shape)),
        )
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    rgb = array[:, :, :3]
    return rgb[:, :, ::-1] if channels.lower() == "bgr" else rgb
