"""The CPU runtimes against each other: embedding speed (exact and fast presets: torch, ONNX fp32,
ONNX INT8 for fast) and what INT8 costs in retrieval quality on a labelled collection.

    python benchmarks/int8.py [--dataset DIR] [--speed-images 200]

Speed: images/s of ``Vectorizer.vectorize`` over the first --speed-images files (reading,
decoding, resizing and the network, one process, batch size as the Vectorizer chooses), after a
warm-up; "model only" runs the network alone on the same inputs, prepared beforehand. Quality:
mAP and recall@10 (l2) of every image of the dataset against the others, fast fp32 against fast
INT8, and the cosine between their vectors. Ratios are within this run; CPU flags are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import cpu_flags

from imgindex.evaluate import evaluate_vectors
from imgindex.files import walk_images
from imgindex.model import Vectorizer

DEFAULT_DATASET = Path(__file__).resolve().parent.parent.parent / "shared/datasets/caltech101-dev"
CONFIGS = [  # (name, preset, precision, runtime)
    ("exact, torch fp32", "exact", "fp32", "torch"),
    ("exact, onnx fp32", "exact", "fp32", "onnx"),
    ("fast, torch (its default precision)", "fast", None, "torch"),
    ("fast, onnx fp32", "fast", "fp32", "onnx"),
    ("fast, onnx int8", "fast", "int8", "onnx"),
]


def speed(vectorizer: Vectorizer, paths: list[Path]) -> tuple[float, float]:
    vectorizer.vectorize(paths[:2])
    started = time.perf_counter()
    vectorizer.vectorize(paths)
    pipeline = len(paths) / (time.perf_counter() - started)
    prepared = [vectorizer.prepare(p) for p in paths]
    started = time.perf_counter()
    vectorizer.embed_tensors(prepared)
    return pipeline, len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--speed-images", type=int, default=200)
    args = parser.parse_args()
    paths = list(walk_images([args.dataset]))
    labels = [p.parent.name for p in paths]
    subset = paths[:: max(1, len(paths) // args.speed_images)][: args.speed_images]
    rows, vectors = [], {}
    for name, preset, precision, runtime in CONFIGS:
        vectorizer = Vectorizer(device="cpu", preset=preset, precision=precision, runtime=runtime)
        pipeline, model = speed(vectorizer, subset)
        rows.append((name, vectorizer.precision, pipeline, model))
        print(f"  {name}: {pipeline:.1f} images/s ({model:.1f} model only)", file=sys.stderr)
        if preset == "fast" and runtime == "onnx":
            vectors[precision] = vectorizer.vectorize(paths)
    print(f"CPU: {os.cpu_count()} cores, {cpu_flags()}; {len(subset)} images for speed")
    base = {preset: rows[0 if preset == "exact" else 3] for preset in ("exact", "fast")}
    print(f"{'runtime':<38}{'precision':>10}{'images/s':>10}{'model only':>12}{'ratio':>8}")
    for name, precision, pipeline, model in rows:
        ref = base["exact" if name.startswith("exact") else "fast"]
        print(f"{name:<38}{precision:>10}{pipeline:>10.1f}{model:>12.1f}{pipeline / ref[2]:>7.2f}x")
    print("(ratio: against torch fp32 for exact, onnx fp32 for fast)")
    fp32, int8 = vectors["fp32"], vectors["int8"]
    cos = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    print(f"\n{len(paths)} images, {len(set(labels))} labels; int8 vs fp32 vectors: cosine min "
          f"{cos.min():.4f}, median {np.median(cos):.4f}, mean {cos.mean():.4f}")  # fmt: skip
    print(f"{'fast preset':<14}{'mAP l2':>9}{'recall@10':>11}{'mAP cosine':>12}")
    for name, v in (("fp32", fp32), ("int8", int8)):
        l2 = evaluate_vectors(v, labels, None, "l2", (1, 5, 10))
        cosine = evaluate_vectors(v, labels, None, "cosine", (1, 5, 10))
        print(f"{name:<14}{l2.mean_average_precision:>9.4f}{l2.recall_at[10]:>11.4f}"
              f"{cosine.mean_average_precision:>12.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
