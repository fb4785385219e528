"""Vectors in and out as Parquet: an index's records and vectors for pandas, DuckDB or Spark, and
vectors made elsewhere (another cluster job, another tool) indexed without embedding anything.

One row per image: ``path`` (text), ``sha256``, ``size``, ``mtime``, ``width``, ``height`` and
``vector`` (a fixed-size list of 768 float32). The file's metadata (key ``imgindex``) holds what
kind of vectors they are, the index fingerprint: model, weights' SHA-256, dim and preprocessing
(with its preset). An import checks it against the index and against the other files: vectors of
other weights or another preset are refused, never mixed.

Files are written whole or not at all (:mod:`imgindex.atomic`), in row groups of ``ROWS`` images,
so neither an export nor an import holds more than that many vectors in memory at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgindex.atomic import write_file
from imgindex.catalog import NewImage
from imgindex.errors import ImgIndexError, IncompatibleIndexError

ROWS = 10_000
METADATA_KEY = b"imgindex"
FORMAT = 1
COLUMNS = ("path", "sha256", "size", "mtime", "width", "height", "vector")


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImgIndexError("Parquet needs pyarrow: pip install 'imgindex[parquet]'") from None
    return pyarrow, pyarrow.parquet


def schema(fingerprint: dict[str, Any], dim: int) -> Any:
    pa, _ = _pyarrow()
    meta = json.dumps({"format": FORMAT, **fingerprint}, sort_keys=True)
    return pa.schema(
        [
            ("path", pa.string()),
            ("sha256", pa.string()),
            ("size", pa.int64()),
            ("mtime", pa.float64()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("vector", pa.list_(pa.float32(), dim)),
        ],
        metadata={METADATA_KEY: meta.encode()},
    )


def export(index: Any, out: Path, on_rows: Callable[[int], None] | None = None) -> int:
    """Write every record and vector of ``index`` (an :class:`imgindex.Index`) to the Parquet
    file ``out``; returns how many rows."""
    pa, pq = _pyarrow()
    fingerprint = index.fingerprint()
    dim = int(fingerprint["dim"])
    target = schema(fingerprint, dim)
    records = index.records()
    written = 0

    def write(fh: Any) -> None:
        nonlocal written
        with pq.ParquetWriter(pa.PythonFile(fh, mode="w"), target) as writer:
            for start in range(0, len(records), ROWS):
                chunk = records[start : start + ROWS]
                vectors = np.ascontiguousarray(index.vectors([r.id for r in chunk]), np.float32)
                flat = pa.array(vectors.reshape(-1), pa.float32())
                columns = [
                    pa.array([r.path for r in chunk], pa.string()),
                    pa.array([r.sha256 for r in chunk], pa.string()),
                    pa.array([r.size for r in chunk], pa.int64()),
                    pa.array([r.mtime for r in chunk], pa.float64()),
                    pa.array([r.width for r in chunk], pa.int32()),
                    pa.array([r.height for r in chunk], pa.int32()),
                    pa.FixedSizeListArray.from_arrays(flat, dim),
                ]
                writer.write_table(pa.Table.from_arrays(columns, schema=target))
                written += len(chunk)
                if on_rows is not None:
                    on_rows(written)

    write_file(out, write)
    return written


def fingerprint_of(path: Path) -> dict[str, Any]:
    """The fingerprint recorded in the Parquet file ``path`` (ImgIndexError if it has none)."""
    _, pq = _pyarrow()
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as exc:  # pyarrow raises its own kinds: a file that is not Parquet
        raise ImgIndexError(f"{path}: not a readable Parquet file ({exc})") from None
    if METADATA_KEY not in meta:
        raise ImgIndexError(
            f"{path}: has no imgindex metadata (which weights and preset made its vectors), so "
            "it cannot be checked against the index; export it with `imgindex export`"
        )
    recorded = json.loads(meta[METADATA_KEY])
    recorded.pop("format", None)
    return recorded


def check_files(paths: Sequence[Path], expected: dict[str, Any] | None) -> dict[str, Any]:
    """The fingerprint all ``paths`` share (and ``expected``, the index's, if given); refuses
    a mix."""
    found = {path: fingerprint_of(path) for path in paths}
    reference = expected or next(iter(found.values()))
    for path, fingerprint in found.items():
        for key in ("weights_sha256", "model", "dim", "preprocessing"):
            if fingerprint.get(key) != reference.get(key):
                what = "the index" if expected else str(paths[0])
                raise IncompatibleIndexError(
                    f"{path}: its vectors have {key} {_short(fingerprint.get(key))}, those of "
                    f"{what} {_short(reference.get(key))}; vectors of different weights or "
                    "presets cannot be mixed"
                )
    return reference


def batches(path: Path) -> Iterator[tuple[list[NewImage], np.ndarray]]:
    """The rows of ``path`` as (records, ``N x dim`` vectors), ``ROWS`` at a time."""
    _, pq = _pyarrow()
    table = pq.ParquetFile(path)
    missing = [c for c in COLUMNS if c not in table.schema_arrow.names]
    if missing:
        raise ImgIndexError(f"{path}: lacks the column(s) {', '.join(missing)}")
    for batch in table.iter_batches(batch_size=ROWS, columns=list(COLUMNS)):
        # (The vectors are taken as one float32 array, never as Python lists.)
        data = {name: batch.column(name).to_pylist() for name in COLUMNS[:-1]}
        vectors = batch.column("vector").flatten().to_numpy(zero_copy_only=False)
        vectors = vectors.astype(np.float32, copy=False).reshape(batch.num_rows, -1)
        images = [
            NewImage(Path(p), sha, int(size), float(mtime), int(w), int(h))
            for p, sha, size, mtime, w, h in zip(
                data["path"], data["sha256"], data["size"], data["mtime"], data["width"],
                data["height"], strict=True,
            )
        ]  # fmt: skip
        yield images, vectors


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:12] if isinstance(value, str) and len(text) == 64 else text


def import_into(
    index: Any, paths: Sequence[Path], on_rows: Callable[[int], None] | None = None
) -> int:
    """Add the rows of the Parquet files ``paths`` to ``index`` (an open, writable
    :class:`imgindex.Index` whose fingerprint they share: see :func:`check_files`), under one
    write lock, committing ``ROWS`` at a time, then save its vector index; returns how many
    rows. A row at a path already indexed replaces that entry."""
    added = 0
    with index.write_lock():
        for path in paths:
            for images, vectors in batches(path):
                try:
                    index.add_vectors(images, vectors, save=False)
                except ValueError as exc:  # NaN vectors, a wrong size
                    raise ImgIndexError(f"{path}: {exc}; nothing more was imported") from None
                added += len(images)
                if on_rows is not None:
                    on_rows(added)
        index.save()
    return added
