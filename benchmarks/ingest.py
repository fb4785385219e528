"""Ingest speed: imgsim's own loop vs imgindex (exact and fast presets) vs the model-only ceiling.

All methods embed the same image files (default: a fixed sample of caltech101-dev), end to end
from files on disk to vectors; model loading is left out of every timing. Rows:

* imgsim: imgsim 0.1.2's ``Vectorizer().vectorize(cv2.imread(path))``, one image at a time, as
  its README shows (needs ``opencv-python-headless``, which the test extra installs);
* imgindex exact / fast: ``Index.sync`` into a new index (read, hash, decode, resize, embed,
  commit to SQLite, save FAISS);
* ceiling exact / fast: the same network and batches on tensors decoded and resized beforehand,
  so only the forward passes are timed;
* pipeline only: exact ingest with the forward pass skipped (zeros stored): what reading,
  decoding, resizing, batching, the copy to the device and storing can deliver on their own.

* imgindex exact with ``--decode device`` (``--device-decode``): JPEGs decoded in batches by
  ``torchvision.io.decode_jpeg`` on the GPU (nvJPEG) and resized there with the same
  OpenCV-exact arithmetic.

It also checks that exact-preset vectors from the batched ingest equal one-by-one vectors (max
abs difference) and compares them with imgsim's (min cosine), and the device-decoded vectors
with the CPU-decoded ones. Run it on a GPU with --device cuda (and --precision bf16);
``--megapixels 1`` turns the images into JPEGs of about one megapixel first. Prints a table;
ratios are against imgsim and against the ceiling of the same preset, measured in the same run.

    python benchmarks/ingest.py [--images DIR] [--count 80] [--rounds 3] [--device auto]
        [--precision fp32|bf16] [--megapixels MP] [--device-decode] [--workers N]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import imgindex
from imgindex.files import walk_images

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = ROOT.parent / "shared" / "datasets" / "caltech101-dev"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--count", type=int, default=80, help="images to use (0: all)")
    parser.add_argument("--rounds", type=int, default=3, help="the median of this many runs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--skip-imgsim", action="store_true")
    parser.add_argument("--workers", type=int, default=None, help="reading threads")
    parser.add_argument(
        "--megapixels", type=float, default=None, help="re-encode the images at this size first"
    )
    parser.add_argument(
        "--aspect",
        default=None,
        help="with --megapixels: crop to this aspect ratio first, e.g. 4:3 (3:4 for portrait "
        "images), like a camera's photos; default: keep each image's own",
    )
    parser.add_argument(
        "--device-decode",
        action="store_true",
        help="add a row decoding JPEGs on the device (nvJPEG on a GPU)",
    )
    parser.add_argument(
        "--crops",
        action="store_true",
        help="use 128 x 256 crops of the images (like the player crops imgsim was made for)",
    )
    args = parser.parse_args()

    paths = sorted(walk_images([args.images]))
    if args.count and args.count < len(paths):
        paths = sorted(random.Random(0).sample(paths, args.count))
    scratch = tempfile.TemporaryDirectory()
    if args.crops:
        paths = make_crops(paths, Path(scratch.name))
    if args.megapixels:
        paths = make_resized(paths, Path(scratch.name), args.megapixels, args.aspect)
    what = "128 x 256 crops of images" if args.crops else "images"
    if args.megapixels:
        what = f"{args.megapixels:g} MP JPEG copies of images"
        if args.aspect:
            what += f" (cropped to {args.aspect}, or its portrait form)"
    print(f"{len(paths)} {what} from {args.images}", file=sys.stderr)

    vectorizers = {
        preset: imgindex.Vectorizer(
            device=args.device,
            preset=preset,
            precision=args.precision,
            batch_size=args.batch_size,
        )
        for preset in ("exact", "fast")
    }
    vectors: dict[str, np.ndarray] = {}
    methods: list[tuple[str, str, Callable[[], float]]] = []
    if not args.skip_imgsim:
        methods.append(
            (
                "imgsim 0.1.2 loop (batch 1, autograd on, fp32)",
                "imgsim",
                imgsim_method(paths, args.device, vectors),
            )
        )
    for preset, vectorizer in vectorizers.items():
        methods.append(
            (
                f"imgindex {preset} (end to end)",
                preset,
                ingest_method(vectorizer, paths, vectors, preset, args.workers),
            )
        )
        methods.append(
            (f"ceiling {preset} (forward passes only)", preset, ceiling_method(vectorizer, paths))
        )

    # What the rest of the pipeline can deliver: exact ingest with the forward pass skipped
    # (reading, decoding, resizing, batching, the copy to the device, storing).
    methods.append(
        (
            "pipeline only (exact, no forward pass)",
            "pipeline",
            ingest_method(
                without_forward(vectorizers["exact"]), paths, {}, "pipeline", args.workers
            ),
        )
    )
    if args.device_decode:
        methods.append(
            (
                "imgindex exact --decode device",
                "exact",
                ingest_method(
                    vectorizers["exact"], paths, vectors, "device-decode", args.workers, "device"
                ),
            )
        )

    # The machine's speed drifts by 10% or more over minutes (shared cores), so the methods take
    # turns, in a rotating order, and each one's median is reported.
    times: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    for round_ in range(args.rounds):
        order = methods[round_ % len(methods) :] + methods[: round_ % len(methods)]
        for name, _, run in order:
            times[name].append(run())
            print(f"round {round_ + 1}: {name}: {times[name][-1]:.1f} s", file=sys.stderr)
    rows = [(name, float(np.median(times[name])), preset) for name, preset, _ in methods]

    exact = vectorizers["exact"]
    same_shape = images_of_one_shape(paths, exact)
    batched = exact.vectorize(same_shape)
    one_by_one = np.stack([exact.vectorize(p) for p in same_shape])
    batch_gap = float(np.abs(batched - one_by_one).max())
    print_table(rows, len(paths), args.rounds)
    print()
    print(
        f"exact, {len(same_shape)} images of one shape in batches of {exact.batch_size} vs one "
        f"by one: max abs difference {batch_gap:.2e}"
    )
    if exact.pad_batches:
        # The ingest's batches mixed shapes (padded); one by one, each image has its own shape.
        sample = paths[:64]
        alone = np.stack([exact.vectorize(p) for p in sample])
        mixed = vectors["exact"][: len(sample)]
        cos = np.diag(imgindex.cosine_similarity(mixed, alone))
        print(
            f"exact, padded mixed-shape batches vs one by one ({len(sample)} images): max abs "
            f"difference {np.abs(mixed - alone).max():.2e}, min cosine {cos.min():.6f}"
        )
    if "imgsim" in vectors:
        for preset in ("exact", "fast"):
            cos = np.diag(imgindex.cosine_similarity(vectors[preset], vectors["imgsim"]))
            print(f"{preset} vs imgsim vectors: min cosine {cos.min():.6f}, mean {cos.mean():.6f}")
    if "device-decode" in vectors:
        a, b = vectors["device-decode"], vectors["exact"]
        cos = np.diag(imgindex.cosine_similarity(a, b))
        print(
            f"exact, JPEGs decoded on the device vs on the CPU: min cosine {cos.min():.6f}, mean "
            f"{cos.mean():.6f}, max abs difference {np.abs(a - b).max():.2e}"
        )
    device = exact.device
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "none"
    precisions = ", ".join(f"{k} {v.precision}" for k, v in vectorizers.items())
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, GPU {gpu}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; device {device}, precision "
        f"{precisions}, batch size {exact.batch_size}"
    )


def make_crops(paths: list[Path], folder: Path) -> list[Path]:
    """A 1:2 upright crop from the middle of each image, scaled to 128 x 256 (JPEG, quality 95)."""
    from PIL import Image

    out = []
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            cw = min(w, h // 2)
            box = ((w - cw) // 2, (h - 2 * cw) // 2, (w + cw) // 2, (h + 2 * cw) // 2)
            target = folder / f"{i:04d}.jpg"
            im.crop(box).resize((128, 256), Image.BICUBIC).save(target, quality=95)
            out.append(target)
    return out


def make_resized(
    paths: list[Path], folder: Path, megapixels: float, aspect: str | None = None
) -> list[Path]:
    """JPEG copies (quality 90) of the images scaled to about ``megapixels``; with ``aspect``
    ("4:3"), centre-cropped to it first (to its portrait form for portrait images)."""
    ratio = None
    if aspect:
        w, h = (float(x) for x in aspect.split(":"))
        ratio = max(w, h) / min(w, h)
    import concurrent.futures as cf

    from PIL import Image

    def convert(item: tuple[int, Path]) -> Path:
        i, path = item
        with Image.open(path) as im:
            im = im.convert("RGB")
            if ratio is not None:
                long, short = max(im.size), min(im.size)
                long, short = min(long, round(short * ratio)), min(short, round(long / ratio))
                w, h = (long, short) if im.width >= im.height else (short, long)
                left, top = (im.width - w) // 2, (im.height - h) // 2
                im = im.crop((left, top, left + w, top + h))
            scale = (megapixels * 1e6 / (im.width * im.height)) ** 0.5
            size = (round(im.width * scale), round(im.height * scale))
            target = folder / f"{i:05d}.jpg"
            im.resize(size, Image.BICUBIC).save(target, quality=90)
            return target

    with cf.ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(convert, enumerate(paths)))


def images_of_one_shape(paths: list[Path], vectorizer: imgindex.Vectorizer) -> list[Path]:
    """Up to 8 of ``paths`` that resize to the same shape (so they share batches)."""
    by_shape: dict[tuple[int, ...], list[Path]] = {}
    for path in paths[:300]:
        by_shape.setdefault(tuple(vectorizer.prepare(path).shape), []).append(path)
    return max(by_shape.values(), key=len)[:8]


def imgsim_method(
    paths: list[Path], device: str, vectors: dict[str, np.ndarray]
) -> Callable[[], float]:
    import cv2
    import imgsim

    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    vectorizer = imgsim.Vectorizer(
        device=device if device.startswith("cuda") else ("cuda" if on_gpu else "cpu")
    )
    vectorizer.vectorize(cv2.imread(str(paths[0])))  # warm up

    def run() -> float:
        started = time.perf_counter()
        out = [np.asarray(vectorizer.vectorize(cv2.imread(str(p)))) for p in paths]
        seconds = time.perf_counter() - started
        vectors["imgsim"] = np.stack(out)
        return seconds

    return run


def ingest_method(
    vectorizer: imgindex.Vectorizer,
    paths: list[Path],
    vectors: dict[str, np.ndarray],
    key: str,
    workers: int | None = None,
    decode: str = "cpu",
) -> Callable[[], float]:
    vectorizer.vectorize(paths[:2])  # warm up

    def run() -> float:
        with (
            tempfile.TemporaryDirectory() as scratch,
            imgindex.Index.create(Path(scratch) / "index", vectorizer=vectorizer) as index,
        ):
            started = time.perf_counter()
            report = index.sync(paths, workers=workers, decode=decode)
            seconds = time.perf_counter() - started
            if report.skipped:
                print(f"skipped: {report.skipped[:3]}", file=sys.stderr)
            vectors[key] = index.vectors([index.find(p).id for p in paths])
            return seconds

    return run


def without_forward(vectorizer: imgindex.Vectorizer) -> imgindex.Vectorizer:
    """A copy of ``vectorizer`` that moves each batch to its device but computes nothing (its
    vectors are zeros)."""
    from imgindex.devices import to_device
    from imgindex.model import PendingVectors
    from imgindex.weights import EMBEDDING_DIM

    stand_in = copy.copy(vectorizer)

    def start_batch(batch: torch.Tensor, sizes: object = None, count: int | None = None) -> object:
        to_device(batch, vectorizer.device)
        rows = len(batch) if count is None else count
        return PendingVectors(torch.zeros(rows, EMBEDDING_DIM, device=vectorizer.device))

    stand_in.start_batch = start_batch  # type: ignore[method-assign]
    return stand_in


def ceiling_method(vectorizer: imgindex.Vectorizer, paths: list[Path]) -> Callable[[], float]:
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 1)) as pool:
        tensors = list(pool.map(vectorizer.prepare, paths))  # decoded and resized beforehand
    vectorizer.embed_tensors(tensors[:2])

    def run() -> float:
        started = time.perf_counter()
        vectorizer.embed_tensors(tensors)  # returns numpy, so the device work is finished
        return time.perf_counter() - started

    return run


def print_table(rows: list[tuple[str, float, str]], n: int, rounds: int) -> None:
    base = next((s for name, s, _ in rows if name.startswith("imgsim")), None)
    ceilings = {preset: s for name, s, preset in rows if name.startswith("ceiling")}
    print(f"\n{n} images, median of {rounds} rounds")
    print(f"{'method':<48}{'seconds':>9}{'images/s':>10}{'vs imgsim':>11}{'vs ceiling':>12}")
    for name, seconds, preset in rows:
        vs_imgsim = f"{base / seconds:.2f}x" if base and preset != "pipeline" else "-"
        vs_ceiling = f"{ceilings[preset] / seconds:.2f}" if preset in ceilings else "-"
        vs_ceiling = vs_ceiling if name.startswith("imgindex") else "-"
        print(f"{name:<48}{seconds:>9.1f}{n / seconds:>10.2f}{vs_imgsim:>11}{vs_ceiling:>12}")


if __name__ == "__main__":
    main()
