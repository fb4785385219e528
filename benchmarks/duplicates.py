"""Near-duplicates: what the default thresholds mean on real photos, and how the search scales.

Part 1 (real AugNet, exact preset): --photos originals from caltech101-dev and, for each, a
copy resized to half size, a copy recompressed as JPEG quality 40, and a copy cropped to its
central 90%. Prints the distance (and cosine similarity) between each original and its copies,
and between each original and the nearest *other* caltech101-dev photo (all 1,568), then how
many copies and how many different photos `imgindex duplicates` would join at the thresholds.

Part 2: `Index.duplicates` on N AugNet-shaped vectors (see benchmarks/scale.py) with 1% planted
near-copies, for the exact flat index (blockwise self-join) and for HNSW (16 neighbours per
image): time, groups found, and the peak memory numpy allocates during the search (tracemalloc;
FAISS's own structures are not counted), at several N.

    python benchmarks/duplicates.py [--photos 100] [--sizes 25000,50000,100000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

import imgindex
from imgindex.ann import IndexSpec
from imgindex.catalog import NewImage
from imgindex.files import walk_images
from imgindex.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import CACHE, DATASET, real_vectors, synthetic

TRANSFORMS = ("resized 50%", "JPEG quality 40", "cropped to 90%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=100)
    parser.add_argument("--sizes", default="25000,50000,100000")
    parser.add_argument("--l2", type=float, default=None, help="l2 threshold to evaluate")
    parser.add_argument("--cosine", type=float, default=None, help="cosine threshold")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(scale_child(*args.child.split(":"))))
        return
    from imgindex.cli import DUPLICATE_THRESHOLDS

    thresholds = {
        "l2": args.l2 if args.l2 is not None else DUPLICATE_THRESHOLDS["l2"],
        "cosine": args.cosine if args.cosine is not None else DUPLICATE_THRESHOLDS["cosine"],
    }
    meaning(args.photos, thresholds)
    print()
    print(
        f"{'N':>8}  {'index':<6}{'seconds':>9}{'groups':>8}{'planted found':>15}{'peak RSS MB':>13}"
    )
    for n in [int(s) for s in args.sizes.split(",")]:
        for kind in ("flat", "hnsw"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", f"{n}:{kind}:{thresholds['l2']}"],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{n:>8}  {kind:<6}{r['seconds']:>9.1f}{r['groups']:>8}"
                f"{r['planted_found']:>10}/{r['planted']:<4}{r['peak_mb']:>9.0f}"
            )


def meaning(count: int, thresholds: dict[str, float]) -> None:
    from PIL import Image

    paths = sorted(random.Random(1).sample(sorted(walk_images([DATASET])), count))
    vectorizer = imgindex.Vectorizer(device="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        copies: dict[str, list[Path]] = {t: [] for t in TRANSFORMS}
        for i, path in enumerate(paths):
            im = Image.open(path).convert("RGB")
            w, h = im.size
            half = Path(scratch) / f"{i}-half.jpg"
            im.resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR).save(half, quality=90)
            low = Path(scratch) / f"{i}-q40.jpg"
            im.save(low, quality=40)
            crop = Path(scratch) / f"{i}-crop.jpg"
            im.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(crop, quality=90)
            for t, p in zip(TRANSFORMS, (half, low, crop), strict=True):
                copies[t].append(p)
        originals = vectorizer.vectorize(paths)
        transformed = {t: vectorizer.vectorize(ps) for t, ps in copies.items()}
    with imgindex.Index.open(CACHE) as index:
        records = index.records()
        all_vectors = index.vectors([r.id for r in records])
        all_paths = [r.path for r in records]
    others_l2, others_cos, closest = [], [], []
    for path, vector in zip(paths, originals, strict=True):
        mask = np.array([p != str(path) for p in all_paths])
        distances = imgindex.distance(vector, all_vectors[mask])
        others_l2.append(distances.min())
        others_cos.append(imgindex.cosine_similarity(vector, all_vectors[mask]).max())
        closest.append(
            (distances.min(), str(path), np.asarray(all_paths)[mask][distances.argmin()])
        )
    pairs = {f"original vs {t}": transformed[t] for t in TRANSFORMS}
    l2 = {name: np.diag(imgindex.distance(originals, v)) for name, v in pairs.items()}
    cos = {name: np.diag(imgindex.cosine_similarity(originals, v)) for name, v in pairs.items()}
    l2["original vs nearest other photo"] = np.array(others_l2)
    cos["original vs nearest other photo"] = np.array(others_cos)
    print(f"Part 1: {count} caltech101-dev photos, real AugNet vectors (exact preset)")
    print(f"{'pair':<36}{'L2 median':>10}{'L2 p90':>8}{'cos median':>11}{'cos p10':>9}")
    for name in l2:
        print(
            f"{name:<36}{np.median(l2[name]):>10.2f}{np.percentile(l2[name], 90):>8.2f}"
            f"{np.median(cos[name]):>11.4f}{np.percentile(cos[name], 10):>9.4f}"
        )
    print("\nShare of pairs joined at each threshold (the default marked *):")
    names = list(l2)
    print(f"{'threshold':<16}" + "".join(f"{n.replace('original vs ', ''):>18}" for n in names))
    for t in (2.0, 3.0, 4.0, 5.0, 6.0, 8.0):
        mark = "*" if t == thresholds["l2"] else " "
        print(f"{mark}L2 <= {t:<9g}" + "".join(f"{(l2[n] <= t).mean():>18.0%}" for n in names))
    for t in (0.95, 0.96, 0.97, 0.98, 0.99):
        mark = "*" if t == thresholds["cosine"] else " "
        print(f"{mark}cos >= {t:<8g}" + "".join(f"{(cos[n] >= t).mean():>18.0%}" for n in names))
    print("\nThe originals closest to another caltech101-dev photo:")
    for distance, a, b in sorted(closest)[:5]:
        a_name, b_name = (f"{Path(p).parent.name}/{Path(p).name}" for p in (a, b))
        print(f"  {distance:6.2f}  {a_name}  ~  {b_name}")


def scale_child(n_text: str, kind: str, threshold_text: str) -> dict:
    n, threshold = int(n_text), float(threshold_text)
    real = real_vectors(CACHE)
    vectors = synthetic(real, n, 0.5, seed=n)
    rng = np.random.default_rng(1)
    planted = n // 100
    sources = rng.choice(n // 2, planted, replace=False)
    targets = n // 2 + np.arange(planted)
    vectors[targets] = vectors[sources] + rng.normal(0, 0.02, (planted, vectors.shape[1])).astype(
        np.float32
    )
    with tempfile.TemporaryDirectory() as scratch:
        fingerprint = {"model": "synthetic", "weights_sha256": "0" * 64, "dim": 768,
                       "preprocessing": {"preset": "exact"}}  # fmt: skip
        spec = IndexSpec("flat") if kind == "flat" else IndexSpec("hnsw", "l2")
        store = Store.create(Path(scratch) / "i", fingerprint, spec)
        store.lock()
        for lo in range(0, n, 10_000):
            images = [
                NewImage(Path(f"/s/{i}.jpg"), f"{i:064x}", 1, 0.0, 1, 1)
                for i in range(lo, min(n, lo + 10_000))
            ]
            store.write_batch(images, vectors[lo : lo + len(images)])
        store.save_vector_index()
        store.unlock()
        del vectors
        index = imgindex.Index(store)
        tracemalloc.start()
        started = time.perf_counter()
        groups = index.duplicates(threshold)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        group_of = {i: number for number, g in enumerate(groups) for i in g.ids}
        # Ids are given in insertion order from 1, so vector i has id i + 1.
        hits = sum(
            group_of.get(int(s) + 1, -1) == group_of.get(int(t) + 1, -2)
            for s, t in zip(sources, targets, strict=True)
        )
        store.close()
    return {
        "seconds": seconds,
        "groups": len(groups),
        "planted": planted,
        "planted_found": int(hits),
        "peak_mb": peak / 2**20,
    }


if __name__ == "__main__":
    main()
