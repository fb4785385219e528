"""Teaching AugNet a user's own collection, without labels.

AugNet (Chen et al., arXiv:2106.06250) learns from unlabelled pictures alone: augmented views of
one picture are pulled together in the embedding space and views of different pictures pushed
apart. Fine-tuning the stock weights (trained on ImageNet photos) on the user's collection adapts
them to what it looks like: players on a pitch, product shots, scans.

One training step, following one batch from files to weights:

1. ``_Batches`` picks P images; ``ViewSource`` (in DataLoader worker processes) decodes each once
   and cuts K views from it: random crops at several scales and shapes, flips, small rotations
   and JPEG artefacts, as ``P x K`` uint8 crops of ``crop_size`` pixels.
2. ``photometric`` changes colour (brightness, contrast, saturation, hue), turns some views grey,
   blurs, adds noise and drops out patches, on the training device, a whole batch at once (so a
   GPU is never left waiting on CPU image operations).
3. The network embeds the views (bf16 autocast and channels_last on a GPU); ``augnet_loss``
   compares each view with the centre of its own image's views and with the other images'
   centres; AdamW updates the weights.

Checkpoints (``weights.write_checkpoint``) are written atomically, record how they were made, and
load through the same safe loader as the stock weights; the ``.last.pth`` one also holds the
optimizer, so an interrupted run resumes where it stopped. With an evaluation set, mAP is
measured before training and at every checkpoint, and the best weights are kept.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import hashlib
import io
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgindex.ann import available_memory
from imgindex.decode import DEFAULT_MAX_PIXELS, decode_image_bytes, read_file, read_image_file
from imgindex.devices import device_constant, resolve_device
from imgindex.errors import ImageError, ImgIndexError, WeightsError
from imgindex.evaluate import RetrievalScores, evaluate_vectors, require_a_repeated_label
from imgindex.ingest import default_workers
from imgindex.model import Vectorizer
from imgindex.preprocessing import PRESETS
from imgindex.weights import (
    ARCHS,
    EMBEDDING_DIM,
    build_network,
    load_network,
    network_arch,
    read_checkpoint,
    resolve_weights,
    write_checkpoint,
)

if TYPE_CHECKING:
    import torch

LOSSES = ("contrastive", "softmax")


@dataclass(frozen=True)
class TrainOptions:
    """How to train. The defaults fine-tune the stock ResNet50 the way the issue's prototype
    did (48 images x 8 views of 224 pixels per step, AdamW at 2e-4)."""

    arch: str = "resnet50"
    init: str = "stock"  # "stock" (imgsim's weights), "scratch", or a checkpoint path
    images_per_step: int = 48  # P
    views_per_image: int = 8  # K
    crop_size: int = 224
    loss: str = "contrastive"
    temperature: float = 0.1  # softmax form
    margin: float = 1.0  # contrastive form, in RMS-per-dimension units (see augnet_loss)
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20
    # Batch-norm statistics: frozen when fine-tuning (the augmented crops would pull them away
    # from the clean, full images that are embedded later), updated when training from scratch.
    freeze_bn: bool | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ImgIndexError(f"unknown backbone {self.arch!r}; choose: {', '.join(ARCHS)}")
        if self.loss not in LOSSES:
            raise ImgIndexError(f"unknown loss {self.loss!r}; choose: {', '.join(LOSSES)}")
        if self.init == "stock" and self.arch != "resnet50":
            raise ImgIndexError(
                f"the stock weights are a resnet50; train a {self.arch} with --init scratch "
                "(or from a checkpoint of that backbone)"
            )
        if self.images_per_step < 2 or self.views_per_image < 2:
            raise ImgIndexError("a step needs at least 2 images and 2 views of each")
        if self.crop_size < 32:
            raise ImgIndexError("--crop-size must be at least 32 pixels")

    @property
    def bn_frozen(self) -> bool:
        return self.init != "scratch" if self.freeze_bn is None else self.freeze_bn


# What a training step holds in memory on a CPU (fp32): a fixed part (the network, its
# gradients, AdamW's two moments, PyTorch itself) and the activations kept for the backward
# pass, per view and per pixel of its crop: fitted to the peak memory of real steps, which
# benchmarks/train_memory.py measures against this estimate (it overestimates large crops a
# little).
STEP_FIXED_BYTES = 1_100_000_000
STEP_BYTES_PER_VIEW_PIXEL = {"resnet50": 2_400, "resnet34": 900, "resnet18": 600}
# A CPU step may take this share of the memory available; the rest is for the view workers,
# the evaluation set's embedding, and the other programs of the machine.
STEP_MEMORY_SHARE = 0.7
# Step sizes when none are given. On a GPU, the prototype's (48 images x 8 views of 224
# pixels); on a CPU, one that fits a laptop (about 2.5 GB, against 47 GB for the GPU's step;
# what steps cost is measured by benchmarks/train_memory.py and shown in the README).
GPU_STEP = {"images_per_step": 48, "views_per_image": 8, "crop_size": 224}
CPU_STEP = {"images_per_step": 16, "views_per_image": 4, "crop_size": 96}


def step_memory(arch: str, images: int, views_per_image: int, crop_size: int) -> int:
    """Bytes a training step of ``images`` x ``views_per_image`` crops holds on a CPU."""
    pixels = images * views_per_image * crop_size**2
    return STEP_FIXED_BYTES + STEP_BYTES_PER_VIEW_PIXEL[arch] * pixels


def default_step(device: str, arch: str, images: int) -> dict[str, int]:
    """Step sizes for a run on ``device`` when none are given: GPU_STEP on a GPU; on a CPU,
    CPU_STEP with fewer images per step if need be to fit the memory available (never fewer
    than 2; :func:`check_step_memory` then refuses)."""
    if resolve_device(device) != "cpu":
        return dict(GPU_STEP)
    sizes = dict(CPU_STEP)
    budget = STEP_MEMORY_SHARE * available_memory()
    while sizes["images_per_step"] > 2 and budget < step_memory(
        arch, min(sizes["images_per_step"], images), sizes["views_per_image"], sizes["crop_size"]
    ):
        sizes["images_per_step"] //= 2
    return sizes


def check_step_memory(options: TrainOptions, images: int) -> int:
    """Refuse, on a CPU, a step that would not fit in the memory available (it would be
    killed, or swap for hours); returns the bytes the step needs. ``images``: per step."""
    need = step_memory(options.arch, images, options.views_per_image, options.crop_size)
    have = available_memory()
    if need <= STEP_MEMORY_SHARE * have:
        return need
    cpu = CPU_STEP
    fits = step_memory(options.arch, cpu["images_per_step"], cpu["views_per_image"],
                       cpu["crop_size"])  # fmt: skip
    raise ImgIndexError(
        f"a training step of {images} images x {options.views_per_image} views of "
        f"{options.crop_size} pixels needs about {need / 1e9:.1f} GB of memory on a CPU, more "
        f"than this machine can give it ({have / 1e9:.1f} GB available); use fewer images per "
        "step, fewer views or smaller crops, for example --images-per-step "
        f"{cpu['images_per_step']} --views-per-image {cpu['views_per_image']} --crop-size "
        f"{cpu['crop_size']} (about {fits / 1e9:.1f} GB; in Python, the same TrainOptions)"
    )


@dataclass
class TrainProgress:
    """Where a run stands, for progress lines."""

    step: int
    total_steps: int | None
    loss: float
    views_per_second: float
    elapsed: float  # seconds of this run
    lr: float


@dataclass
class EvalResult:
    step: int
    scores: dict[str, RetrievalScores]
    best: bool

    @property
    def mean_average_precision(self) -> float:
        return self.scores["l2"].mean_average_precision

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "best": self.best,
            **{f"mAP_{m}": s.mean_average_precision for m, s in self.scores.items()},
            **{f"recall@10_{m}": s.recall_at.get(10) for m, s in self.scores.items()},
        }


@dataclass
class TrainReport:
    out: Path
    last: Path
    steps: int  # total, including steps of runs this one resumed
    steps_this_run: int
    views_per_second: float  # training steps only (evaluation and checkpoints left out)
    seconds: float
    stopped_by: str  # "steps", "minutes" or "interrupt"
    workers: int = 0  # processes that cut views (0: the main process)
    evaluations: list[EvalResult] = field(default_factory=list)  # this run's
    history: list[dict[str, Any]] = field(default_factory=list)  # every run's, oldest first
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    # Stopped at once (a second Ctrl-C) during a step: that step and those since the last
    # checkpoint were dropped; ``steps`` is what the files hold.
    cut_short: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "last": str(self.last),
            "steps": self.steps,
            "steps_this_run": self.steps_this_run,
            "views_per_second": self.views_per_second,
            "seconds": self.seconds,
            "stopped_by": self.stopped_by,
            "cut_short": self.cut_short,
            "workers": self.workers,
            "evaluations": self.history,
            "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
        }


def last_path(out: Path) -> Path:
    """Where the resumable checkpoint of ``out`` lives: ``ft.pth`` -> ``ft.last.pth``."""
    return out.with_name(out.stem + ".last" + (out.suffix or ".pth"))


def data_fingerprint(paths: Sequence[Path]) -> str:
    """SHA-256 of the sorted (path, size, mtime) of the training files: which collection, in
    which state, a checkpoint learnt from (cheap: no file is read)."""
    digest = hashlib.sha256()
    for path in sorted(os.fsdecode(p) for p in paths):
        try:
            st = os.stat(path)
            digest.update(f"{path}\0{st.st_size}\0{int(st.st_mtime)}\n".encode(errors="replace"))
        except OSError:
            digest.update(f"{path}\0missing\n".encode(errors="replace"))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Views: decoding and geometric augmentation (CPU, in DataLoader workers)


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
    picture, as the rotated picture is). The same pixels to within one level, in two thirds of
    the time (the whole picture was rotated for every rotated view)."""
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
            rgb = decode_image_bytes(data, os.fsdecode(path), self.max_pixels, 2 * self.size)
        except (ImageError, OSError) as exc:
            return i, str(getattr(exc, "reason", exc))
        rng = random.Random(f"{self.seed}/{step}/{i}")
        return i, torch.from_numpy(make_views(rgb, self.views, self.size, rng))


class _Batches:
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


def _collate(items: list[tuple[int, Any]]) -> tuple[Any, list[tuple[int, str]]]:
    import torch

    good = [views for _, views in items if not isinstance(views, str)]
    failed = [(i, views) for i, views in items if isinstance(views, str)]
    return (torch.stack(good) if good else None), failed


# ---------------------------------------------------------------------------------------------
# Photometric augmentation (on the training device, batched)


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


# ---------------------------------------------------------------------------------------------
# The objective


def augnet_loss(
    embeddings: torch.Tensor,
    images: int,
    kind: str = "contrastive",
    temperature: float = 0.1,
    margin: float = 1.0,
) -> torch.Tensor:
    """AugNet's objective for ``images x views`` embeddings (rows grouped by image).

    Each image's centre is the mean of its views' embeddings. ``contrastive``: the squared
    distance of every view to its own centre, plus a squared hinge on its distance to every
    other image's centre, which should be at least ``margin`` (distances are divided by
    sqrt(768), the root-mean-square difference per dimension, in which the stock weights put
    nearest neighbours of Caltech-101 photos 0.63 apart and a typical pair 1.12). ``softmax``:
    cross-entropy of each view's cosine similarities to all centres, divided by ``temperature``,
    with its own image as the class (an instance-discrimination form).
    """
    import torch
    import torch.nn.functional as F

    e = embeddings.float()
    views = e.shape[0] // images
    centres = e.view(images, views, -1).mean(1)
    own = torch.arange(images, device=e.device).repeat_interleave(views)
    if kind == "softmax":
        logits = F.normalize(e, dim=1) @ F.normalize(centres, dim=1).T / temperature
        return F.cross_entropy(logits, own)
    squared = torch.cdist(e, centres).pow(2) / e.shape[1]
    pull = squared.gather(1, own.view(-1, 1)).mean()
    # Every (view, other image's centre) pair, by a mask rather than by selecting them
    # (squared[others] would make the CPU wait for the GPU to count them).
    others = torch.ones_like(squared)
    others[torch.arange(len(own), device=e.device), own] = 0
    distance = squared.clamp_min(1e-12).sqrt()
    push = (F.relu(margin - distance).pow(2) * others).sum() / (len(own) * (images - 1))
    return pull + push


# ---------------------------------------------------------------------------------------------
# Evaluation during training


class EvalSet:
    """Labelled images for measuring retrieval quality while training, prepared once (exact
    preprocessing, as imgindex embeds them) and kept in memory."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[str],
        groups: Sequence[str | None] | None = None,
        threads: int | None = None,
    ):
        preprocessing = PRESETS["exact"]

        def prepare(path: Path) -> Any:
            try:
                return preprocessing.resize(read_image_file(path).pixels, os.fsdecode(path))
            except (ImageError, OSError):
                return None

        with cf.ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            tensors = list(pool.map(prepare, paths))
        keep = [i for i, t in enumerate(tensors) if t is not None]
        if len(keep) < 2:
            raise ImgIndexError("the evaluation set needs at least two readable labelled images")
        require_a_repeated_label([labels[i] for i in keep])
        self.tensors = [tensors[i] for i in keep]
        self.labels = [labels[i] for i in keep]
        self.groups = [groups[i] for i in keep] if groups else None
        self.unreadable = len(paths) - len(keep)

    def __len__(self) -> int:
        return len(self.tensors)

    def embed(self, network: torch.nn.Module, device: str, bf16: bool) -> Any:
        """Vectors of the evaluation images by ``network`` as it is now, the way imgindex
        embeds them (exact preprocessing, batches by shape)."""
        import torch

        vectorizer = Vectorizer.around(network, device, "bf16" if bf16 else "fp32")
        was_training = network.training
        network.eval()
        # cuDNN's autotuner would re-tune for every one of the many image shapes: off here.
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False
        try:
            return vectorizer.embed_tensors(self.tensors)
        finally:
            torch.backends.cudnn.benchmark = benchmark
            network.train(was_training)

    def score(self, network: torch.nn.Module, device: str, bf16: bool) -> dict[str, Any]:
        vectors = self.embed(network, device, bf16)
        return {
            metric: evaluate_vectors(vectors, self.labels, self.groups, metric, (1, 5, 10))
            for metric in ("l2", "cosine")
        }


def _memory(device: str) -> Any:
    import torch

    return torch.channels_last if device.startswith("cuda") else torch.contiguous_format


# ---------------------------------------------------------------------------------------------
# Training


def _start_network(options: TrainOptions) -> tuple[torch.nn.Module, str | None]:
    """The network to start from and the SHA-256 of the weights it came from (None: scratch)."""
    if options.init == "scratch":
        return build_network(options.arch), None
    if options.init != "stock" and not os.path.exists(options.init):
        raise ImgIndexError(
            f"--init {options.init}: no such checkpoint (give stock, scratch or a weights file)"
        )
    weights = resolve_weights(None if options.init == "stock" else options.init)
    network = load_network(weights)
    if network_arch(network) != options.arch:
        raise WeightsError(
            f"{weights.path}: a {network_arch(network)} checkpoint, but --arch is {options.arch}"
        )
    return network, weights.sha256


def train(
    images: Sequence[Path],
    out: Path,
    options: TrainOptions = TrainOptions(),
    *,
    steps: int | None = None,
    minutes: float | None = None,
    eval_set: EvalSet | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    checkpoint_minutes: float = 2.0,
    checkpoint_every: int | None = None,
    on_progress: Callable[[TrainProgress], None] | None = None,
    on_eval: Callable[[EvalResult], None] | None = None,
    on_unreadable: Callable[[str, str], None] | None = None,
    stop: Callable[[], bool] | None = None,
    on_interrupt: Callable[[], None] | None = None,
) -> TrainReport:
    """Train AugNet on ``images`` until ``steps`` steps in all (counting resumed ones) or
    ``minutes`` of this run, writing ``out`` (the best weights with ``eval_set``, else the
    latest) and its resumable ``.last.pth`` at every checkpoint and at the end. An existing
    ``out`` is only replaced with ``resume`` or ``overwrite``.

    Ctrl-C (SIGINT, when called from the main thread) stops after the step under way, which is
    then saved, so a resumed run goes on exactly where this one stopped; ``on_interrupt`` is
    called when it arrives. A second Ctrl-C stops at once and keeps the last checkpoint: a step
    cut short would leave the network half-updated. So does a KeyboardInterrupt from elsewhere
    that arrives during a step."""
    import torch

    if steps is None and minutes is None:
        raise ImgIndexError("give a budget: steps or minutes")
    images = sorted(Path(p) for p in images)
    if len(images) < 2:
        raise ImgIndexError(f"training needs at least two images, found {len(images)}")
    device = resolve_device(device)
    on_gpu = device.startswith("cuda")
    bf16 = precision == "bf16" or (
        precision == "auto" and on_gpu and torch.cuda.is_bf16_supported()
    )
    last = last_path(out)
    if not resume and not overwrite and (out.exists() or last.exists()):
        raise ImgIndexError(
            f"{out if out.exists() else last} exists: resume that run (--resume) or start over "
            "and replace it (--force)"
        )

    state = _resume_state(last, resume)
    if state is not None:
        options = state["options"]
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
    options = TrainOptions(**{**asdict(options), "seed": seed})
    if not on_gpu:
        check_step_memory(options, min(options.images_per_step, len(images)))
    torch.manual_seed(seed)

    if state is not None:
        network = build_network(options.arch)
        network.load_state_dict(state["checkpoint"].state)
        base_sha = state["meta"].get("base_weights_sha256")
    else:
        network, base_sha = _start_network(options)
    network = network.to(device).to(memory_format=_memory(device))
    _training_mode(network, options.bn_frozen)
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=options.lr, weight_decay=options.weight_decay
    )
    start_step = 0
    history: list[dict[str, Any]] = []
    best = -1.0
    if state is not None:
        optimizer.load_state_dict(state["training"]["optimizer"])
        start_step = int(state["training"]["step"])
        history = list(state["meta"].get("eval", []))
        best = float(state["training"].get("best", -1.0))
    # Batches drawn from the sampler; each step's views are cut from its batch's position, so a
    # resumed run goes on from there (batches without two readable images are skipped).
    drawn = int(state["training"].get("batches", start_step)) if state is not None else 0
    # Restored when training ends: the caller's process may embed images of many shapes next.
    saved_flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # one input shape for the whole run
        torch.backends.cuda.matmul.allow_tf32 = True

    per_step = min(options.images_per_step, len(images))
    source = ViewSource(images, options.views_per_image, options.crop_size, seed)
    workers = _default_workers(device) if workers is None else workers
    batch_bytes = per_step * options.views_per_image * options.crop_size**2 * 3
    workers = _fit_shared_memory(workers, batch_bytes)
    loader = torch.utils.data.DataLoader(
        source,
        batch_sampler=_Batches(len(images), per_step, seed, drawn),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=on_gpu,
        prefetch_factor=2 if workers else None,
        persistent_workers=bool(workers),
        worker_init_fn=_ignore_interrupts,  # Ctrl-C reaches them too; the loop decides
    )
    generator = torch.Generator(device=device)
    fingerprint = data_fingerprint(images)

    def meta(step: int) -> dict[str, Any]:
        import imgindex

        return {
            "arch": options.arch,
            "dim": EMBEDDING_DIM,
            "model": f"augnet-{options.arch}-{EMBEDDING_DIM}",
            "init": options.init,
            "base_weights_sha256": base_sha,
            "steps": step,
            "views_seen": step * per_step * options.views_per_image,
            "data": {"images": len(images), "fingerprint": fingerprint},
            "preprocessing": PRESETS["exact"].describe(),
            "options": asdict(options),
            "augmentation": AUGMENTATIONS,
            "eval": history,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "imgindex": imgindex.__version__,
            "torch": torch.__version__,
        }

    evaluations: list[EvalResult] = []

    def evaluate(step: int) -> bool:
        nonlocal best
        if eval_set is None:
            return False
        scores = eval_set.score(network, device, bf16)
        _training_mode(network, options.bn_frozen)
        is_best = scores["l2"].mean_average_precision > best
        if is_best:
            best = scores["l2"].mean_average_precision
        result = EvalResult(step, scores, is_best)
        evaluations.append(result)
        history.append(result.as_dict())
        if on_eval:
            on_eval(result)
        return is_best

    saved_step: int | None = None  # the step the checkpoint files of this run hold

    def save(step: int, improved: bool) -> None:
        nonlocal saved_step
        saved_step = step
        training = {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "best": best,
            "batches": drawn,  # the sampler's position: ahead of step by the batches skipped
        }
        write_checkpoint(last, network, meta(step), training)
        if eval_set is None or improved:
            write_checkpoint(out, network, meta(step))

    if state is None:
        improved = evaluate(0)
        if improved:
            write_checkpoint(out, network, meta(0))

    unreadable: dict[str, str] = {}
    step = start_step
    stopped_by = "steps"
    paused = 0.0  # seconds spent evaluating and writing checkpoints
    views_done = 0
    # Reading the loss waits for the device; on a GPU, only every few steps, so the CPU queues
    # the next step's work while the GPU computes this one.
    sync_every = 1 if device == "cpu" else 10
    started = last_checkpoint = time.monotonic()
    steps_since_checkpoint = 0
    batches = iter(loader)
    interrupted = _Interrupts(on_interrupt)
    in_step = False
    try:
        interrupted.install()
        while True:
            if steps is not None and step >= steps:
                stopped_by = "steps"
                break
            elapsed = time.monotonic() - started
            if minutes is not None and elapsed >= minutes * 60:
                stopped_by = "minutes"
                break
            if interrupted.requested or (stop is not None and stop()):
                stopped_by = "interrupt"
                break
            views, failed = next(batches)
            drawn += 1
            for i, reason in failed:
                name = os.fsdecode(images[i])
                if name not in unreadable:
                    unreadable[name] = reason
                    if on_unreadable:
                        on_unreadable(name, reason)
            if views is None or len(views) < 2:
                if len(unreadable) > len(images) - 2:
                    raise ImgIndexError(
                        f"fewer than two of the {len(images)} training images can be read "
                        f"(first: {next(iter(unreadable))}: {next(iter(unreadable.values()))})"
                    )
                continue
            count = len(views)
            # Workers hand over K x S x S x 3 crops: as N x 3 x S x S they are channels_last.
            x = views.to(device, non_blocking=True).flatten(0, 1).permute(0, 3, 1, 2)
            progress = _progress(step, steps, elapsed, minutes)
            lr = options.lr * min(1.0, (step + 1) / options.warmup_steps) * _cosine(progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Seeded per step, so a resumed run makes the same views as an uninterrupted one.
            generator.manual_seed(seed * 1_000_003 + step)
            in_step = True
            loss = train_step(network, optimizer, x, count, options, generator, bf16)
            views_done += count * options.views_per_image
            step += 1
            in_step = False
            steps_since_checkpoint += 1
            if step % sync_every == 0:
                loss_value = float(loss.detach())
                if on_progress:
                    now = time.monotonic()
                    rate = views_done / max(now - started - paused, 1e-9)
                    on_progress(TrainProgress(step, steps, loss_value, rate, now - started, lr))
            due = time.monotonic() - last_checkpoint >= checkpoint_minutes * 60
            if due or (checkpoint_every and steps_since_checkpoint >= checkpoint_every):
                pause = time.monotonic()
                save(step, evaluate(step))
                last_checkpoint = time.monotonic()
                paused += last_checkpoint - pause
                steps_since_checkpoint = 0
    except KeyboardInterrupt:
        stopped_by = "interrupt"
        cut_short = in_step
    else:
        cut_short = False
    finally:
        interrupted.uninstall()
        del batches
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = saved_flags
    if on_gpu:
        torch.cuda.synchronize()
    train_seconds = time.monotonic() - started - paused
    if cut_short:
        step = saved_step if saved_step is not None else start_step  # what the files hold
    elif stopped_by == "interrupt":
        save(step, False)  # what was learnt stays; no evaluation on the way out
    elif steps_since_checkpoint or not last.exists():
        save(step, evaluate(step))
    return TrainReport(
        out=out,
        last=last,
        steps=step,
        steps_this_run=step - start_step,
        views_per_second=views_done / train_seconds if train_seconds else 0.0,
        seconds=time.monotonic() - started,
        stopped_by=stopped_by,
        workers=workers,
        evaluations=evaluations,
        history=history,
        unreadable=sorted(unreadable.items()),
        cut_short=cut_short,
    )


class _Interrupts:
    """While installed (main thread only), the first SIGINT asks the training loop to stop
    after its step; the second raises KeyboardInterrupt as usual."""

    def __init__(self, on_interrupt: Callable[[], None] | None):
        self.requested = False
        self.on_interrupt = on_interrupt
        self.previous: Any = None

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.on_interrupt is not None:
            self.on_interrupt()


def _ignore_interrupts(worker_id: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_step(
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    views: torch.Tensor,
    images: int,
    options: TrainOptions,
    generator: torch.Generator,
    bf16: bool,
) -> torch.Tensor:
    """One step on ``views`` (``images x K`` uint8 crops on the training device, grouped by
    image): photometric augmentation, forward pass, AugNet's loss, update. Returns the loss,
    not yet read (reading it waits for the device)."""
    import torch

    device = views.device
    inputs = (
        PRESETS["exact"]
        .standardize(photometric(views, generator))
        .contiguous(memory_format=_memory(str(device)))
    )
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        embeddings = network(inputs)
    loss = augnet_loss(embeddings, images, options.loss, options.temperature, options.margin)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def _resume_state(last: Path, resume: bool) -> dict[str, Any] | None:
    if not resume:
        return None
    if not last.exists():
        raise ImgIndexError(f"{last}: no checkpoint to resume from (run without --resume)")
    checkpoint = read_checkpoint(last)
    training = checkpoint.training
    if not isinstance(training, dict) or not {"optimizer", "step"} <= training.keys():
        raise ImgIndexError(f"{last}: not a resumable checkpoint (it holds no optimizer state)")
    if training["step"] != checkpoint.meta.get("steps"):
        # The metadata is covered by the checkpoint's digest, the training state is not.
        raise ImgIndexError(
            f"{last}: its training state says step {training['step']}, its metadata "
            f"{checkpoint.meta.get('steps')}: the file was changed; resume from another copy "
            "or start over (--force)"
        )
    saved = dict(checkpoint.meta.get("options", {}))
    known = set(TrainOptions.__dataclass_fields__)
    return {
        "checkpoint": checkpoint,
        "meta": checkpoint.meta,
        "training": checkpoint.training,
        "options": TrainOptions(**{k: v for k, v in saved.items() if k in known}),
    }


def _training_mode(network: torch.nn.Module, bn_frozen: bool) -> None:
    import torch

    network.train()
    if bn_frozen:
        for module in network.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def _fit_shared_memory(workers: int, batch_bytes: int, folder: str = "/dev/shm") -> int:
    """As many workers as the shared memory can carry batches for (each has 2 in flight, plus
    one being copied out). Containers often give /dev/shm only 64 MB, where 14 workers of 58 MB
    batches would crash the run with a bus error minutes in; fewer workers only slow it."""
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return workers
    fitting = int(free * 0.8) // (3 * batch_bytes)
    if workers > fitting:
        if fitting < 1:
            return 0  # views are cut in the main process, which needs no shared memory
        return fitting
    return workers


def _default_workers(device: str) -> int:
    """Worker processes cutting views: as many as a build's reading threads (none on a CPU,
    where the network keeps the cores busy; most of them beside a GPU), and at least 2 then."""
    readers = default_workers(device)
    return max(2, readers) if readers else 0


def _progress(step: int, steps: int | None, elapsed: float, minutes: float | None) -> float:
    fractions = []
    if steps:
        fractions.append(step / steps)
    if minutes:
        fractions.append(elapsed / (minutes * 60))
    return min(1.0, max(fractions)) if fractions else 0.0


def _cosine(progress: float) -> float:
    """Cosine decay of the learning rate to a tenth over the budget."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
