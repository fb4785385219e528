"""Formats against each other: decode time of a 12 MP picture, and how well the vectors of one
picture saved in each format agree.

    python benchmarks/formats.py [--dataset DIR] [--photos 20] [--repeat 3]

1. Decode: one 4000 x 3000 picture (a caltech101-dev photo enlarged, with fine noise so that
   codecs have detail to keep) saved as JPEG (quality 92), PNG, WebP, HEIC, AVIF and JPEG XL
   (quality 90), and as a DNG (the same picture as an RGGB mosaic) with and without a 1024 x
   768 preview; the median of --repeat decodes (bytes in memory -> upright RGB, as a build
   does), and the ratio to JPEG.
2. Agreement: --photos photos of the dataset saved losslessly (PNG) and in each lossy format
   at quality 95; the cosine between the AugNet vector (exact preset) of each file and of its
   PNG: the minimum and the median.

Ratios are within this run; the CPU's flags are printed with it.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from startup import cpu_flags

from imgindex import formats
from imgindex.decode import decode_photo
from imgindex.files import walk_images
from imgindex.model import Vectorizer
from tests.dng import write_dng

DEFAULT_DATASET = Path(__file__).resolve().parent.parent.parent / "shared/datasets/caltech101-dev"
LOSSY = {"JPEG": "jpg", "WEBP": "webp", "HEIF": "heic", "AVIF": "avif", "JXL": "jxl"}


def big_picture(source: Path) -> Image.Image:
    rng = np.random.default_rng(0)
    enlarged = np.asarray(Image.open(source).convert("RGB").resize((4000, 3000), Image.BICUBIC))
    noisy = enlarged.astype(np.int16) + rng.integers(-6, 7, enlarged.shape, dtype=np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def encoded(picture: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **({} if fmt == "PNG" else {"quality": quality}))
    return buffer.getvalue()


def decode_times(picture: Image.Image, repeat: int, work: Path) -> list[tuple[str, int, float]]:
    files = {fmt: encoded(picture, fmt, 92 if fmt == "JPEG" else 90)
             for fmt in ("JPEG", "PNG", "WEBP", "HEIF", "AVIF", "JXL")}  # fmt: skip
    for name, preview in (("DNG, preview used", 1024), ("DNG, demosaiced", None)):
        files[name] = write_dng(work / "big.dng", 4000, 3000, preview=preview).read_bytes()
    rows = []
    for name, data in files.items():
        suffix = ".dng" if name.startswith("DNG") else "." + LOSSY.get(name, name.lower())
        decode_photo(data, "x" + suffix, 100_000_000)  # warm-up
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            decode_photo(
                data, "x" + suffix, 100_000_000, min_side=350 if "preview" in name else 4000
            )
            times.append(time.perf_counter() - started)
        rows.append((name, len(data), statistics.median(times)))
    return rows


def agreement(paths: list[Path]) -> dict[str, tuple[float, float]]:
    vectorizer = Vectorizer(device="cpu")
    cosines: dict[str, list[float]] = {fmt: [] for fmt in LOSSY}
    for path in paths:
        picture = Image.open(path).convert("RGB")
        reference = vectorizer.vectorize(encoded(picture, "PNG", 0))
        for fmt in LOSSY:
            v = vectorizer.vectorize(encoded(picture, fmt, 95))
            cosines[fmt].append(
                float(v @ reference / np.linalg.norm(v) / np.linalg.norm(reference))
            )
    return {fmt: (min(c), statistics.median(c)) for fmt, c in cosines.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    formats.register_installed()
    print(f"CPU: {cpu_flags()}")
    paths = sorted(walk_images([args.dataset]))
    paths = paths[:: max(1, len(paths) // args.photos)][: args.photos]
    with tempfile.TemporaryDirectory() as tmp:
        rows = decode_times(big_picture(paths[0]), args.repeat, Path(tmp))
    base = rows[0][2]
    print("\nDecoding one 12 MP picture (4000 x 3000), median of", args.repeat, "\n")
    print("| format | file MB | decode s | vs JPEG |")
    print("| --- | --- | --- | --- |")
    for name, size, seconds in rows:
        print(f"| {name} | {size / 1e6:.1f} | {seconds:.3f} | {seconds / base:.2f}x |")
    print(f"\nVectors of {len(paths)} photos, each format at quality 95 against its PNG\n")
    print("| format | min cosine | median cosine |")
    print("| --- | --- | --- |")
    for fmt, (low, mid) in agreement(paths).items():
        print(f"| {fmt} | {low:.5f} | {mid:.5f} |")


if __name__ == "__main__":
    main()
