"""The Ray engine against the local one on this machine, and what one driver can commit.

    python benchmarks/ray_engine.py [--dataset DIR] [--images 200] [--driver-files 20000]

1. The same --images photos (spread over the dataset's folders) built into a new index by the
   local engine, then by the Ray engine with 1 and 2 actors (a local Ray cluster on this
   machine, started by each build). images/s is measured as a difference, so that start-up
   (loading the network; for Ray, starting the cluster and its actors) cancels out: the same
   build of --small of the photos is timed too, and images/s = (images - small) / (wall -
   wall of small). "wall" is the whole build of all the photos, start-up included. The ratios
   are against the local engine: the cost (or gain) of going through Ray here.
2. The driver alone: --driver-files small files planned and committed with vectors made up in
   the driver instead of by a cluster (so no reading, no network): walking, planning, checking
   each result, SQLite transactions and the FAISS index. Its images/s bounds how fast a cluster
   one driver can keep up with.

Ratios are within this run; the CPU's flags are printed with it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import cpu_flags

from imgindex import Index, distributed
from imgindex.files import walk_images

DEFAULT_DATASET = Path(__file__).resolve().parent.parent.parent / "shared/datasets/caltech101-dev"


def sample(dataset: Path, count: int, into: Path) -> Path:
    paths = sorted(walk_images([dataset]))
    chosen = paths[:: max(1, len(paths) // count)][:count]
    for path in chosen:
        target = into / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return into


def timed_build(root: Path, work: Path, engine: str, actors: int | None) -> tuple[int, float]:
    index_path = work / f"index-{engine}-{actors}"
    with Index.open(index_path, create=True, device="cpu") as index:
        started = time.perf_counter()
        report = index.sync(root, engine=engine, ray_actors=actors)
        wall = time.perf_counter() - started
        assert index.check().ok
    shutil.rmtree(index_path)
    return report.embedded, wall


def one_engine(roots: tuple[Path, Path], work: Path, engine: str, actors: int | None) -> dict:
    small, small_wall = timed_build(roots[0], work, engine, actors)
    embedded, wall = timed_build(roots[1], work, engine, actors)
    return {"embedded": embedded, "rate": (embedded - small) / (wall - small_wall), "wall": wall}


def made_up_results(self: distributed.RayBuild, paths: list[Path], known: list[str] | None):
    """What a cluster would send back for ``paths``, made up: unit vectors, one content each."""
    rng = np.random.default_rng(0)
    dim = self.spec.expected["dim"]
    for start in range(0, len(paths), 256):
        chunk = paths[start : start + 256]
        raw = [os.fsencode(p) for p in chunk]
        stats = [os.stat(p) for p in chunk]
        vectors = rng.standard_normal((len(chunk), dim), dtype=np.float32)
        yield {
            "path": np.array(raw, dtype=object),
            "sha256": np.array([hashlib.sha256(r).hexdigest() for r in raw]),
            "size": np.array([s.st_size for s in stats]),
            "mtime": np.array([s.st_mtime for s in stats]),
            "width": np.full(len(chunk), 640),
            "height": np.full(len(chunk), 480),
            "reason": np.array([""] * len(chunk)),
            "photo": np.array([""] * len(chunk)),
            "st_size": np.full(len(chunk), -1),
            "st_mtime": np.zeros(len(chunk)),
            "st_ctime": np.zeros(len(chunk)),
            "vector": vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
            "embedded": np.ones(len(chunk), dtype=bool),
            "actor": np.array(["made up"] * len(chunk)),
            "weights_sha256": np.array([self.spec.expected["weights_sha256"]] * len(chunk)),
        }


def driver_rate(work: Path, files: int) -> tuple[float, float]:
    """images/s of the driver alone over ``files`` new files, and of a re-run finding them all
    unchanged (planning only): a Ray build whose results are made up in the driver."""
    root = work / "many"
    for i in range(files):
        folder = root / f"{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(i.to_bytes(4, "little"))
    rates = []
    real = distributed.RayBuild.results
    distributed.RayBuild.results = made_up_results  # type: ignore[method-assign]
    try:
        with Index.open(work / "index-driver", create=True, device="cpu") as index:
            for _ in range(2):
                started = time.perf_counter()
                report = index.sync(root, engine="ray")
                rates.append(files / (time.perf_counter() - started))
                assert report.added + report.unchanged == files, report.as_dict()
            assert index.check().ok
    finally:
        distributed.RayBuild.results = real  # type: ignore[method-assign]
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--small", type=int, default=16)
    parser.add_argument("--driver-files", type=int, default=20_000)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(f"CPU: {cpu_flags()}; {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = sample(args.dataset, args.images, work / "photos")
        small = sample(root, args.small, work / "small")
        roots = (small, root)
        timed_build(root, work, "local", None)  # warm-up: the ONNX export, the file cache
        rows = [
            ("local engine", one_engine(roots, work, "local", None)),
            ("Ray engine, 1 actor", one_engine(roots, work, "ray", 1)),
            ("Ray engine, 2 actors", one_engine(roots, work, "ray", 2)),
        ]
        base = rows[0][1]["rate"]
        print(f"\n{args.images} photos of {args.dataset.name}, exact preset, a new index each:\n")
        print("| engine | images | images/s | vs local | wall s (with start-up) |")
        print("| --- | --- | --- | --- | --- |")
        for name, row in rows:
            print(f"| {name} | {row['embedded']} | {row['rate']:.2f} | "
                  f"{row['rate'] / base:.2f}x | {row['wall']:.1f} |")  # fmt: skip
        new, unchanged = driver_rate(work, args.driver_files)
        print(f"\nThe driver alone, {args.driver_files:,} files, vectors made up (no cluster):\n")
        print("| driver work | images/s |")
        print("| --- | --- |")
        print(f"| plan, check and commit new images | {new:,.0f} |")
        print(f"| plan a re-run (all unchanged) | {unchanged:,.0f} |")


if __name__ == "__main__":
    main()
