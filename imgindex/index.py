"""The Python search API: an :class:`Index` is a folder of images you can add to and search.

It ties the pieces together: a :class:`~imgindex.store.Store` (SQLite + FAISS), a
:class:`~imgindex.model.Vectorizer` loaded only when images must be embedded, the ingest
pipeline, and exact L2 / cosine search.

    with imgindex.Index.open("photos.idx", create=True) as index:
        index.add(["~/Pictures"])
        for hit in index.search("query.jpg", k=5, metric="cosine"):
            print(hit.rank, hit.score, hit.path)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from imgindex import ingest
from imgindex.errors import IncompatibleIndexError
from imgindex.model import Vectorizer, _split_batch
from imgindex.search import Hit, VectorSearch, check_metric
from imgindex.store import DB_NAME, ImageRecord, Store

INDEX_ENV = "IMGINDEX_INDEX"


def default_index_path() -> Path:
    """``$IMGINDEX_INDEX``, else ``$XDG_DATA_HOME/imgindex/default`` (``~/.local/share/...``)."""
    configured = os.environ.get(INDEX_ENV)
    if configured:
        return Path(configured).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join("~", ".local", "share")
    return Path(data_home).expanduser() / "imgindex" / "default"


class Index:
    """An image index on disk. Open one with :meth:`open` or :meth:`create`.

    ``vectorizer`` (or ``weights`` / ``device`` / ``batch_size`` to make one) embeds images for
    :meth:`add` and :meth:`search`; it must produce the same kind of vectors the index holds.
    """

    def __init__(
        self,
        store: Store,
        vectorizer: Vectorizer | None = None,
        *,
        weights: str | os.PathLike[str] | None = None,
        device: str = "auto",
        batch_size: int = 16,
    ):
        self._store = store
        self._vectorizer = vectorizer
        self._vectorizer_args = {"weights": weights, "device": device, "batch_size": batch_size}
        self._search = VectorSearch()
        if vectorizer is not None:
            self._check_compatible(vectorizer)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        create: bool = False,
        vectorizer: Vectorizer | None = None,
        weights: str | os.PathLike[str] | None = None,
        device: str = "auto",
        batch_size: int = 16,
    ) -> Index:
        """Open the index at ``path`` (default: :func:`default_index_path`); with ``create=True``
        a missing index is created."""
        path = Path(path) if path is not None else default_index_path()
        args = {"weights": weights, "device": device, "batch_size": batch_size}
        if create and not (path / DB_NAME).exists():
            return cls.create(path, vectorizer=vectorizer, **args)
        return cls(Store.open(path, writable=create), vectorizer, **args)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        vectorizer: Vectorizer | None = None,
        weights: str | os.PathLike[str] | None = None,
        device: str = "auto",
        batch_size: int = 16,
    ) -> Index:
        """Create a new, empty index at ``path``; it records the vectorizer's weights."""
        path = Path(path) if path is not None else default_index_path()
        vectorizer = vectorizer or Vectorizer(device=device, weights=weights, batch_size=batch_size)
        return cls(Store.create(path, vectorizer.fingerprint()), vectorizer)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._store.path

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self._store.count()

    def count(self) -> int:
        """Number of images in the index."""
        return self._store.count()

    @property
    def vectorizer(self) -> Vectorizer:
        """The vectorizer, loaded on first use and checked against the index."""
        if self._vectorizer is None:
            vectorizer = Vectorizer(**self._vectorizer_args)
            self._check_compatible(vectorizer)
            self._vectorizer = vectorizer
        return self._vectorizer

    def _check_compatible(self, vectorizer: Vectorizer) -> None:
        ours, theirs = self._store.fingerprint(), vectorizer.fingerprint()
        if ours["weights_sha256"] != theirs["weights_sha256"]:
            raise IncompatibleIndexError(
                f"{self.path}: this index was built with weights {ours['weights_sha256'][:12]}, "
                f"but the weights in use are {theirs['weights_sha256'][:12]} "
                f"({vectorizer.weights.path}); use the same --weights, or build a new index "
                "with these weights"
            )
        for key in ("model", "dim", "preprocessing"):
            if ours[key] != theirs[key]:
                raise IncompatibleIndexError(
                    f"{self.path}: this index holds vectors with {key} {ours[key]!r}, not "
                    f"{theirs[key]!r}; build a new index for these vectors"
                )

    # -- adding -----------------------------------------------------------------------------

    def add(
        self,
        paths: Any,
        progress: ingest.ProgressCallback | None = None,
        workers: int | None = None,
        max_pixels: int | None = None,
    ) -> ingest.BuildReport:
        """Index the images in ``paths`` (folders are walked recursively; files are taken as
        given). Unchanged files already in the index are skipped; unreadable ones are reported
        in the returned :class:`~imgindex.ingest.BuildReport`, never raised."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        store = self._writable_store()
        store.lock()
        try:
            return ingest.build(store, self.vectorizer, paths, progress, workers, max_pixels)
        finally:
            store.unlock()

    def _writable_store(self) -> Store:
        if not self._store.writable:
            # Reopen for writing; the read-only handle's view is replaced.
            path = self._store.path
            self._store.close()
            self._store = Store.open(path, writable=True)
        return self._store

    # -- looking up -------------------------------------------------------------------------

    def get(self, image_id: int) -> ImageRecord:
        """The stored record of image ``image_id``; KeyError if there is none."""
        record = self._store.get(image_id)
        if record is None:
            raise KeyError(f"no image with id {image_id} in {self.path}")
        return record

    def find(self, path: str | os.PathLike[str]) -> ImageRecord | None:
        """The record of an indexed file, by its path (relative paths are taken from the current
        folder), or None."""
        return self._store.get_by_path(os.path.abspath(path))

    def records(self) -> list[ImageRecord]:
        return list(self._store.records())

    def vectors(self, ids: list[int]) -> np.ndarray:
        """The stored vectors of images ``ids`` (``len(ids) x 768``)."""
        return self._store.vectors(ids)

    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of the files the last builds could not index."""
        return self._store.skipped()

    # -- searching --------------------------------------------------------------------------

    def search(self, images: Any, k: int = 10, metric: str = "l2", channels: str = "bgr") -> Any:
        """Nearest indexed images to one image (-> list of :class:`Hit`) or to a list / batch of
        images (-> one list per image). Images are given as for ``Vectorizer.vectorize``."""
        check_metric(metric)
        single, items = _split_batch(images)
        vectors = self.vectorizer.vectorize_many(items, channels=channels)
        results = self.search_by_vector(vectors, k=k, metric=metric)
        return results[0] if single else results

    def search_by_vector(self, vectors: Any, k: int = 10, metric: str = "l2") -> Any:
        """Nearest indexed images to one vector (-> list of :class:`Hit`) or to each row of an
        ``N x 768`` matrix (-> one list per row)."""
        check_metric(metric)
        matrix = np.asarray(vectors, dtype=np.float32)
        single = matrix.ndim == 1
        matrix = np.atleast_2d(matrix)
        if matrix.shape[1] != self._store.dim:
            raise ValueError(
                f"expected vectors of {self._store.dim} numbers, got {matrix.shape[1]}"
            )
        found = self._search.search(
            self._store.vector_index, self._store.generation, matrix, k, metric
        )
        records = self._store.get_many({i for row in found for i, _ in row})
        results = [
            [
                Hit(rank=rank, id=i, path=records[i].path, score=s, metric=metric)
                for rank, (i, s) in enumerate(row, start=1)
                if i in records
            ]
            for row in found
        ]
        return results[0] if single else results

    # -- describing -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """A description of the index: size, model, weights, preprocessing, files on disk."""
        store = self._store
        fingerprint = store.fingerprint()
        sizes = store.disk_usage()
        return {
            "path": str(self.path),
            "images": store.count(),
            "skipped": len(store.skipped()),
            "model": fingerprint["model"],
            "weights_sha256": fingerprint["weights_sha256"],
            "dim": fingerprint["dim"],
            "preprocessing": fingerprint["preprocessing"],
            "index_type": store.meta("index_type"),
            "exact": True,
            "metrics": ["l2", "cosine"],
            "created_at": store.meta("created_at"),
            "files": sizes,
            "bytes_on_disk": sum(sizes.values()),
        }
