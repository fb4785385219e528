"""Reading cost per image: OpenCV (imgsim's imread + resize) vs imgindex's decode and resize.

Ingest reads files in threads while the network embeds; on a GPU the reading threads are what
limits a build (benchmarks/ingest.py), so their cost per image decides how many cores a given
rate needs. This measures it on one thread, for JPEG copies of caltech101-dev photos at several
sizes (``0``: the photos as they are, about 0.1 MP). Rows:

* OpenCV: ``cv2.imread`` + ``cv2.resize`` to the short side 350, as imgsim reads (the baseline);
* imgindex decode: reading, hashing and decoding a file (``decode.read_image_file``: Pillow,
  EXIF orientation, mode conversion);
* imgindex exact: decode + the exact preset's resize (OpenCV's arithmetic, bit for bit);
* imgindex fast: the fast preset (JPEG draft decoding, short side 224).

Prints milliseconds per image, the ratio to OpenCV, and the threads that 2,000 images/s would
need at that cost (perfect scaling assumed).

    python benchmarks/reading.py [--images DIR] [--count 40] [--megapixels 0,1,4,12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import DEFAULT_IMAGES, make_resized

from imgindex.decode import pillow_block_cache, read_image_file
from imgindex.files import walk_images
from imgindex.preprocessing import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--megapixels", default="0,1,4,12")
    parser.add_argument("--rounds", type=int, default=3, help="the median of this many runs")
    args = parser.parse_args()

    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    paths = sorted(walk_images([args.images]))
    paths = sorted(random.Random(0).sample(paths, min(args.count, len(paths))))
    exact, fast = PRESETS["exact"], PRESETS["fast"]

    def opencv(path: Path) -> None:
        pixels = cv2.imread(str(path))
        height, width = pixels.shape[:2]
        cv2.resize(pixels, exact.target_size(width, height), interpolation=cv2.INTER_LINEAR)

    methods: list[tuple[str, Callable[[Path], object]]] = [
        ("OpenCV imread + resize (imgsim)", opencv),
        ("imgindex decode only", read_image_file),
        ("imgindex exact (decode + resize)", lambda p: exact.resize(read_image_file(p).pixels)),
        (
            "imgindex fast (draft decode + resize)",
            lambda p: fast.resize(read_image_file(p, draft_to=fast.draft_to).pixels),
        ),
    ]
    print(
        f"{'images':<22}{'method':<40}{'ms/image':>10}{'vs OpenCV':>11}{'threads for 2,000/s':>21}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        for megapixels in (float(m) for m in args.megapixels.split(",")):
            files = paths
            label = "as they are"
            if megapixels:
                folder = Path(scratch) / f"{megapixels:g}"
                folder.mkdir()
                files = make_resized(paths, folder, megapixels)
                label = f"{megapixels:g} MP JPEG"
            pixels = np.mean([_megapixels(p) for p in files])
            label = f"{label} ({pixels:.2f} MP)"
            times = {name: [] for name, _ in methods}
            for _ in range(args.rounds):  # rounds interleaved, so drift hits every method
                for name, method in methods:
                    cache = name.startswith("imgindex")
                    times[name].append(_seconds_per_image(method, files, cache))
            base = statistics.median(times[methods[0][0]])
            for name, _ in methods:
                seconds = statistics.median(times[name])
                ms, ratio, threads = seconds * 1e3, f"{seconds / base:.2f}x", 2000 * seconds
                print(f"{label:<22}{name:<40}{ms:>10.2f}{ratio:>11}{threads:>21.1f}")
                label = ""
    print(
        f"\n{len(paths)} images per size, median of {args.rounds} rounds, one thread; "
        f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
        f"OpenCV {cv2.__version__}"
    )


def _seconds_per_image(method: Callable[[Path], object], files: list[Path], cache: bool) -> float:
    # imgindex's rows decode as a build does, with Pillow keeping freed image memory for reuse.
    with pillow_block_cache(8) if cache else contextlib.nullcontext():
        for path in files[:3]:
            method(path)  # warm up
        started = time.perf_counter()
        for path in files:
            method(path)
        return (time.perf_counter() - started) / len(files)


def _megapixels(path: Path) -> float:
    from PIL import Image

    with Image.open(path) as im:
        return im.width * im.height / 1e6


if __name__ == "__main__":
    main()
