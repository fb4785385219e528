"""Search at scale: every index kind on 1,000,000 AugNet-shaped vectors.

The vectors are synthetic but shaped like real AugNet vectors: each is a real vector of
caltech101-dev (embedded by imgindex, exact preset) plus Gaussian noise with the real vectors'
own covariance scaled by --noise (0.5), clipped to AugNet's tanh range (-1, 1). Queries are
held out (drawn the same way, not indexed). The vectors go into a real index folder (SQLite
rows and vectors, then each kind of FAISS index built from them, as `imgindex build
--index-type` does), and queries run through the Python API of a reader that opens the index
as a query process would (memory-mapped), so latencies include exact re-scoring and row lookup.

Reports, per kind and setting: build time, bytes per vector in memory and on disk, single-query
latency p50/p99, batch throughput, recall@10 against the exact (flat) results, and for the
exact scan its rate in GB/s.

    python benchmarks/scale.py [--n 1000000] [--source-index DIR] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import imgindex
from imgindex.ann import IndexSpec
from imgindex.catalog import NewImage
from imgindex.folder import FAISS_NAME
from imgindex.mirror import Mirror
from imgindex.store import Store

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "caltech-exact"
DATASET = ROOT.parent / "shared" / "datasets" / "caltech101-dev"

KINDS = {
    "flat": IndexSpec("flat"),
    "hnsw": IndexSpec("hnsw", "l2", {"M": 32, "ef_construction": 80}),
    "ivf-flat": IndexSpec("ivf-flat", "l2"),
    "ivf-pq": IndexSpec("ivf-pq", "l2", {"m": 64}),
}
SETTINGS = {
    "flat": [{}],
    "hnsw": [{"ef_search": 64}, {"ef_search": 128}, {"ef_search": 256}],
    "ivf-flat": [{"nprobe": 32}, {"nprobe": 64}, {"nprobe": 128}],
    "ivf-pq": [{"nprobe": 32}, {"nprobe": 64}, {"nprobe": 128}],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries (batch)")
    parser.add_argument("--single", type=int, default=200, help="queries timed one by one")
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--source-index", type=Path, default=CACHE)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args()

    real = real_vectors(args.source_index)
    data = synthetic(real, args.n + args.queries, args.noise, seed=0)
    base, queries = data[: args.n], data[args.n :]
    log(f"{len(real)} real vectors -> {args.n} synthetic + {args.queries} queries")
    shape_check(real, base)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="imgindex-scale-"))
    location = work / "index"
    if location.exists():
        shutil.rmtree(location)
    fingerprint = {"model": "synthetic", "weights_sha256": "0" * 64, "dim": 768,
                   "preprocessing": {"preset": "exact"}}  # fmt: skip
    store = Store.create(location, fingerprint, IndexSpec("flat"))
    store.lock()
    started = time.perf_counter()
    for lo in range(0, args.n, 10_000):
        images = [
            NewImage(Path(f"/synthetic/{i // 1000:04d}/{i:07d}.jpg"), f"{i:064x}", 1, 0.0, 1, 1)
            for i in range(lo, min(args.n, lo + 10_000))
        ]
        store.write_batch(images, base[lo : lo + len(images)])
    log(f"SQLite: {args.n} rows and vectors in {time.perf_counter() - started:.0f} s")

    rows = []
    truth: list[set[int]] | None = None
    for kind in args.kinds.split(","):
        spec = KINDS[kind]
        store.request_index(spec)
        started = time.perf_counter()
        store.save_vector_index(force=True)
        build_seconds = time.perf_counter() - started
        built = store.vector_index
        memory = built.memory_bytes() / args.n
        disk = (location / FAISS_NAME).stat().st_size / args.n
        log(f"{kind}: built {built.spec.describe()} in {build_seconds:.0f} s")
        store.mirror.vector_index = None  # free the writer's copy before the reader measures
        reader, open_seconds, rss = open_reader(location)
        for params in SETTINGS[kind]:
            latencies, found = [], []
            for q in queries[: args.single]:
                t0 = time.perf_counter()
                hits = reader.search_by_vector(q, k=10, **params)
                latencies.append(time.perf_counter() - t0)
                found.append({h.id for h in hits})
            t0 = time.perf_counter()
            batch = reader.search_by_vector(queries, k=10, **params)
            batch_seconds = time.perf_counter() - t0
            batch_sets = [{h.id for h in hits} for hits in batch]
            if kind == "flat":
                truth = batch_sets
            recall = (
                float(np.mean([len(a & b) / 10 for a, b in zip(batch_sets, truth, strict=True)]))
                if truth
                else float("nan")
            )
            p50 = float(np.percentile(latencies, 50))
            row = {
                "kind": kind,
                "setting": ", ".join(f"{k}={v}" for k, v in params.items()) or "exact",
                "build_s": build_seconds,
                "bytes_per_vector_memory": memory,
                "bytes_per_vector_disk": disk,
                "open_s": open_seconds,
                "reader_rss_mb": rss,
                "p50_ms": p50 * 1e3,
                "p99_ms": float(np.percentile(latencies, 99)) * 1e3,
                "batch_qps": len(queries) / batch_seconds,
                "recall_at_10": recall,
            }
            if kind == "flat":
                row["scan_gb_per_s"] = args.n * 768 * 4 / p50 / 1e9
            rows.append(row)
            log(json.dumps(row))
        reader.close()
        store.mirror = Mirror.load(store, mmap=False)
    store.unlock()
    store.close()
    print_table(rows, args)
    if args.workdir is None:
        shutil.rmtree(work)


def real_vectors(source: Path) -> np.ndarray:
    if not (source / "imgindex.db").exists():
        log(f"embedding {DATASET} into {source} (once; about 10 minutes on 2 CPU cores)")
        subprocess.run(
            [sys.executable, "-m", "imgindex", "build", str(DATASET), "--index", str(source)],
            check=True,
        )
    with imgindex.Index.open(source) as index:
        ids = [r.id for r in index.records()]
        return index.vectors(ids)


def synthetic(real: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    """Real vectors plus correlated noise (the real covariance, scaled), in (-1, 1)."""
    rng = np.random.default_rng(seed)
    centred = real - real.mean(0)
    cov = centred.T @ centred / (len(real) - 1)
    factor = np.linalg.cholesky(cov + 1e-6 * np.eye(cov.shape[0])) * noise
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        picks = real[rng.integers(0, len(real), hi - lo)]
        out[lo:hi] = np.clip(
            picks + rng.standard_normal((hi - lo, real.shape[1])) @ factor.T, -0.999, 0.999
        )
    return out


def shape_check(real: np.ndarray, synthetic_vectors: np.ndarray) -> None:
    """Say how the synthetic vectors compare with the real ones (norms, nearest neighbours)."""

    def nn_distance(v: np.ndarray) -> float:
        sample = v[:1000].astype(np.float64)
        d = np.sqrt(
            np.maximum(
                (sample**2).sum(1)[:, None] + (sample**2).sum(1)[None] - 2 * sample @ sample.T, 0
            )
        )
        np.fill_diagonal(d, np.inf)
        return float(np.median(d.min(1)))

    log(
        f"norms: real median {np.median(np.linalg.norm(real, axis=1)):.2f}, synthetic "
        f"{np.median(np.linalg.norm(synthetic_vectors[:10000], axis=1)):.2f}; nearest neighbour "
        f"among 1000: real {nn_distance(real):.2f}, synthetic {nn_distance(synthetic_vectors):.2f}"
    )


def open_reader(location: Path) -> tuple[imgindex.Index, float, float]:
    rss_before = rss_mb()
    t0 = time.perf_counter()
    reader = imgindex.Index.open(location)
    seconds = time.perf_counter() - t0
    for q in np.zeros((3, 768), dtype=np.float32):
        reader.search_by_vector(q, k=10)  # warm up (pages, caches)
    return reader, seconds, rss_mb() - rss_before


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\n{args.n} AugNet-shaped vectors (768-d), {args.queries} held-out queries, recall@10 "
        f"against exact; single-query latency over {args.single} queries, through Index."
        "search_by_vector (exact re-scoring and row lookup included)"
    )
    head = (
        f"{'index':<10}{'setting':<15}{'build s':>8}{'B/vec RAM':>10}{'B/vec disk':>11}"
        f"{'open s':>7}{'p50 ms':>8}{'p99 ms':>8}{'batch q/s':>10}{'recall@10':>10}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['kind']:<10}{r['setting']:<15}{r['build_s']:>8.0f}"
            f"{r['bytes_per_vector_memory']:>10.0f}{r['bytes_per_vector_disk']:>11.0f}"
            f"{r['open_s']:>7.2f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['batch_qps']:>10.1f}"
            f"{r['recall_at_10']:>10.4f}"
        )
    for r in rows:
        if "scan_gb_per_s" in r:
            print(f"exact scan, one query: {r['scan_gb_per_s']:.1f} GB/s of vectors read")
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; SQLite also keeps every vector "
        "(3,072 B plus row) for rebuilds and re-scoring."
    )


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
