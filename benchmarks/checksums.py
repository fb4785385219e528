"""What the checksums cost: the FAISS file's CRC-32, checked whenever an index is opened, and
each stored vector's, checked whenever vectors are read from SQLite (a rebuild of the FAISS
index, reconciling, re-scoring from SQLite).

Builds a flat index of --n random 768-number vectors in a temporary folder, then times, each the
median of --rounds: opening it as a query process does (memory-mapped, the file's CRC-32
checked), the CRC-32 of the file alone, rebuilding the FAISS index from SQLite (every vector's
CRC-32 checked), and the checks alone. The ratio is the share of each operation the checks take.

    python benchmarks/checksums.py [--n 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from imgindex.ann import IndexSpec
from imgindex.atomic import FileDigest
from imgindex.catalog import NewImage
from imgindex.folder import FAISS_NAME
from imgindex.mirror import build_from
from imgindex.store import Store

FINGERPRINT = {"model": "m", "weights_sha256": "0" * 64, "dim": 768, "preprocessing": {}}


def timed(fn, rounds: int) -> float:
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "idx"
        store = Store.create(folder, FINGERPRINT)
        store.lock()
        for start in range(0, args.n, 20_000):
            count = min(20_000, args.n - start)
            images = [NewImage(Path(f"/p/{i}.jpg"), f"{i:064x}", 1, 0.0, 1, 1)
                      for i in range(start, start + count)]  # fmt: skip
            store.write_batch(images, rng.normal(size=(count, 768)).astype(np.float32))
        store.save_vector_index()
        file_bytes = (folder / FAISS_NAME).stat().st_size

        def open_reader() -> None:
            Store.open(folder).close()

        def file_crc() -> None:
            FileDigest.of_file(folder / FAISS_NAME)

        def rebuild() -> None:
            build_from(store, IndexSpec("flat"))

        blobs = [row[0] for row in store.db.execute("SELECT vector FROM vectors")]

        def vector_crcs() -> None:
            for blob in blobs:
                zlib.crc32(blob)

        rows = [
            ("open (query process)", timed(open_reader, args.rounds), timed(file_crc, args.rounds)),
            ("rebuild from SQLite", timed(rebuild, args.rounds), timed(vector_crcs, args.rounds)),
        ]
        store.close()
    print(f"{args.n} vectors, FAISS file {file_bytes / 1e6:.0f} MB; {platform.machine()}; "
          f"median of {args.rounds}")  # fmt: skip
    print(f"{'operation':<24}{'seconds':>9}{'checks s':>10}{'share':>7}")
    for name, total, checks in rows:
        print(f"{name:<24}{total:>9.3f}{checks:>10.3f}{checks / total:>7.0%}")


if __name__ == "__main__":
    main()
