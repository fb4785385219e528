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

import functools
import numbers
import operator
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from imgindex import ann, ingest
from imgindex.duplicates import (
    DuplicateGroup,
    check_threshold,
    exact_pairs,
    group_pairs,
    neighbor_pairs,
)
from imgindex.errors import ImgIndexError, IncompatibleIndexError, IndexExistsError, WeightsError
from imgindex.files import is_under, resolve
from imgindex.model import PRESETS, Vectorizer, _split_batch, resolve_weights
from imgindex.search import Hit, check_metric, rank_exactly
from imgindex.store import CheckReport, ImageRecord, Store, database_state

INDEX_ENV = "IMGINDEX_INDEX"


def default_index_path() -> Path:
    """``$IMGINDEX_INDEX``, else ``$XDG_DATA_HOME/imgindex/default`` (``~/.local/share/...``)."""
    configured = os.environ.get(INDEX_ENV)
    if configured:
        return Path(configured).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join("~", ".local", "share")
    return Path(data_home).expanduser() / "imgindex" / "default"


def _serialized(method: Callable[..., Any]) -> Callable[..., Any]:
    """One thread at a time in the index's methods (they share its SQLite connection)."""

    @functools.wraps(method)
    def serialized(self: Index, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._closed and method.__name__ != "close":
                raise ImgIndexError(f"{self.path}: this Index was closed; open it again")
            return method(self, *args, **kwargs)

    return serialized


class Index:
    """An image index on disk. Open one with :meth:`open` or :meth:`create`.

    Images are embedded (for adding and for searching by image) by ``vectorizer``, or by a
    :class:`~imgindex.model.Vectorizer` made on first use from ``vectorizer_args``: ``weights``,
    ``device``, ``batch_size``, ``precision`` and ``preset`` (by default the preset the index
    was built with). Its vectors must be of the kind the index holds, or it is refused.

    An Index may be shared by threads (a web server's, say): its methods run one at a time,
    except the embedding of :meth:`search`'s images, which runs in parallel. A long
    :meth:`sync` holds it throughout; to search meanwhile, open a second Index.
    """

    def __init__(self, store: Store, vectorizer: Vectorizer | None = None, **vectorizer_args: Any):
        _check_vectorizer_args(vectorizer_args)
        self._lock = threading.RLock()
        self._closed = False
        self._store = store
        self._vectorizer = vectorizer
        self._vectorizer_args = vectorizer_args
        if vectorizer is not None:
            self._check_compatible(vectorizer)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        create: bool = False,
        vectorizer: Vectorizer | None = None,
        index_type: str | ann.IndexSpec | None = None,
        metric: str = "l2",
        wait: float = 0.0,
        private: bool = False,
        **vectorizer_args: Any,
    ) -> Index:
        """Open the index at ``path`` (default: :func:`default_index_path`); with ``create=True``
        a missing index is created (``index_type``, ``metric``, ``wait`` and ``private`` as for
        :meth:`create`; the first two do not change an existing index, ``private`` makes it
        private)."""
        _check_vectorizer_args(vectorizer_args)
        _as_spec(index_type, metric)  # a misspelt kind or metric is an error, used or not
        path = _index_path(path)
        if create and database_state(path) != "complete":
            try:
                return cls.create(
                    path, vectorizer=vectorizer, index_type=index_type, metric=metric, wait=wait,
                    private=private, **vectorizer_args,
                )  # fmt: skip
            except IndexExistsError:
                pass  # another process created it meanwhile: open theirs
        store = Store.open(path, writable=create or private, wait=wait)
        if private:
            store.make_private()
        return cls(store, vectorizer, **vectorizer_args)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        vectorizer: Vectorizer | None = None,
        index_type: str | ann.IndexSpec | None = None,
        metric: str = "l2",
        wait: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
        private: bool = False,
        **vectorizer_args: Any,
    ) -> Index:
        """Create a new, empty index at ``path``; it records the vectorizer's weights and
        preprocessing (``preset="fast"`` for the fast preset) and the kind of vector index
        to keep (``index_type``: auto (default), flat, hnsw, ivf-flat, ivf-pq or
        factory:STRING; ``metric`` is the one an approximate index is built for). Raises
        :class:`~imgindex.errors.IndexExistsError` if there is one already; ``wait`` is how
        long to wait for another process writing there (creating it, say). With ``private``
        (or when the nearest existing folder above is private) the index folder is made 0700:
        it holds the full paths of the images, which the umask would otherwise let others
        read."""
        _check_vectorizer_args(vectorizer_args)
        path = _index_path(path)
        spec = _as_spec(index_type, metric)
        if database_state(path) == "complete":  # before loading the model for nothing
            raise IndexExistsError(f"{path}: an index already exists here")
        args = {k: v for k, v in vectorizer_args.items() if v is not None}
        vectorizer = vectorizer or Vectorizer(**args)
        store = Store.create(
            path, vectorizer.fingerprint(), spec, wait=wait, on_wait=on_wait, private=private
        )
        return cls(store, vectorizer, **vectorizer_args)

    @_serialized
    def set_index_type(
        self,
        index_type: str | ann.IndexSpec | None,
        metric: str = "l2",
        *,
        wait: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        """Keep another kind of vector index from now on (None or "auto": auto). It is built
        from the stored vectors, without embedding anything, at the next save (the end of the
        next sync, or :meth:`repair`)."""
        spec = _as_spec(index_type, metric)
        store = self._writable_store()
        store.lock(wait, on_wait)  # not while another process builds the index
        try:
            store.request_index(spec)
        finally:
            store.unlock()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._store.path

    @_serialized
    def close(self) -> None:
        """Release the database and the write lock; closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self._store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.count()

    @_serialized
    def count(self) -> int:
        """Number of images in the index."""
        return self._store.count()

    @property
    @_serialized
    def vectorizer(self) -> Vectorizer:
        """The vectorizer, loaded on first use and checked against the index."""
        if self._vectorizer is None:
            args = {k: v for k, v in self._vectorizer_args.items() if v is not None}
            args.setdefault("preset", self.preset)
            vectorizer = Vectorizer(**args)
            self._check_compatible(vectorizer)
            self._vectorizer = vectorizer
        return self._vectorizer

    @property
    @_serialized
    def preset(self) -> str:
        """The preprocessing preset the index's vectors were made with (exact or fast)."""
        return self._store.fingerprint()["preprocessing"].get("preset", "exact")

    def _check_compatible(self, vectorizer: Vectorizer) -> None:
        self._check_fingerprint(vectorizer.fingerprint(), vectorizer.weights.path)

    def _check_without_the_model(self) -> None:
        """The compatibility check, from the weights file's checksum and the preset alone (no
        network is built): for a build that may find nothing to embed."""
        if self._vectorizer is not None:
            return
        weights = Vectorizer._resolve_weights(self._vectorizer_args.get("weights"))
        theirs: dict[str, Any] = {"weights_sha256": weights.sha256}
        preset = self._vectorizer_args.get("preset")
        if preset in PRESETS:
            theirs["preprocessing"] = PRESETS[preset].describe()
        self._check_fingerprint(theirs, weights.path)

    def _check_fingerprint(self, theirs: dict[str, Any], weights_path: Path) -> None:
        """Refuse vectors unlike the index's: ``theirs`` holds what is known of them."""
        ours = self._store.fingerprint()
        if ours["weights_sha256"] != theirs["weights_sha256"]:
            raise IncompatibleIndexError(
                f"{self.path}: this index was built with weights {ours['weights_sha256'][:12]}, "
                f"but the weights in use are {theirs['weights_sha256'][:12]} "
                f"({weights_path}); vectors of different weights cannot be compared. "
                "Use the weights it was built with, or re-embed into a new index: "
                "`imgindex build FOLDERS --index NEW_INDEX --weights WEIGHTS`"
            )
        for key in ("model", "dim", "preprocessing"):
            if key in theirs and ours[key] != theirs[key]:
                raise IncompatibleIndexError(
                    f"{self.path}: this index holds vectors with {key} {ours[key]!r}, not "
                    f"{theirs[key]!r}; re-embed into a new index: "
                    "`imgindex build FOLDERS --index NEW_INDEX`"
                )

    # -- adding -----------------------------------------------------------------------------

    @_serialized
    def sync(
        self,
        folders: Any,
        progress: ingest.ProgressCallback | None = None,
        *,
        workers: int | None = None,
        max_pixels: int | None = None,
        remove_missing: bool = True,
        wait: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
        decode: str = "cpu",
        retry_skipped: bool = False,
        dry_run: bool = False,
    ) -> ingest.BuildReport:
        """Bring the index up to date with the images under ``folders`` (what ``imgindex
        build`` does): new and changed files are embedded, moved and copied files reuse their
        stored vectors, and entries of files that no longer exist under ``folders`` are removed
        (unless ``remove_missing=False``). Unreadable files are reported in the returned
        :class:`~imgindex.ingest.BuildReport`, never raised.

        ``wait`` is how many seconds to wait for another process writing to the index.
        ``decode="device"`` decodes JPEGs in batches on the network's device (nvJPEG on a GPU;
        vectors move by a cosine of about 5e-5), others on the CPU. A file an earlier build
        skipped is read again only once its size or times change, or with ``retry_skipped``.
        Folders are indexed under their real paths (symbolic links resolved). ``dry_run``
        changes nothing and reads no image: the report lists what would be read and removed.
        """
        if isinstance(folders, (str, os.PathLike)):
            folders = [folders]
        self._check_without_the_model()
        if dry_run:
            self._store.refresh()
            return ingest.build(
                self._store, lambda: self.vectorizer, folders, remove_missing=remove_missing,
                retry_skipped=retry_skipped, dry_run=True,
            )  # fmt: skip
        store = self._writable_store()
        store.lock(wait, on_wait)
        try:
            # The model is loaded only if some file needs reading (not for an unchanged folder).
            if max_pixels is None:
                max_pixels = self._vectorizer_args.get("max_pixels")
            model = self._vectorizer or (lambda: self.vectorizer)  # loaded now, or when needed
            return ingest.build(
                store, model, folders, progress, workers, max_pixels, remove_missing, decode,
                retry_skipped,
            )  # fmt: skip
        finally:
            store.unlock()

    def add(
        self,
        paths: Any,
        progress: ingest.ProgressCallback | None = None,
        *,
        workers: int | None = None,
        max_pixels: int | None = None,
        wait: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
        retry_skipped: bool = False,
    ) -> ingest.BuildReport:
        """Add (or update) the images in ``paths``, files or folders, removing nothing."""
        return self.sync(
            paths,
            progress,
            workers=workers,
            max_pixels=max_pixels,
            remove_missing=False,
            wait=wait,
            on_wait=on_wait,
            retry_skipped=retry_skipped,
        )

    @_serialized
    def remove(
        self,
        paths: Any,
        *,
        wait: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
        dry_run: bool = False,
    ) -> int:
        """Remove the entries of ``paths`` (files, or folders: every entry under them) from the
        index; the files themselves are not touched. Returns how many entries went (with
        ``dry_run``, would go: nothing is changed)."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        # Entries are under the resolved names, or (made by an older imgindex) as given.
        names = {os.fsencode(resolve(p)) for p in paths}
        names |= {os.fsencode(os.path.abspath(p)) for p in paths}
        store = self._store if dry_run else self._writable_store()
        if dry_run:
            store.refresh()
            return sum(1 for _i, _t, raw, *_ in store.file_rows() if _under_any(raw, names))
        store.lock(wait, on_wait)
        try:
            ids = [i for i, _text, raw, *_ in store.file_rows() if _under_any(raw, names)]
            removed = store.remove(ids)
            store.forget_skipped(
                [raw for _t, raw, _r in store.skipped_files() if _under_any(raw, names)]
            )
            store.save_vector_index()
            return removed
        finally:
            store.unlock()

    @_serialized
    def check(self, check_files: bool = True) -> CheckReport:
        """Verify the index (see :class:`~imgindex.store.CheckReport`); changes nothing. The
        weights check compares the index with the weights queries would use now."""
        try:
            if self._vectorizer is not None:
                sha = self._vectorizer.weights.sha256
            else:
                sha = resolve_weights(self._vectorizer_args.get("weights")).sha256
            weights_problem = None
        except WeightsError as exc:
            sha, weights_problem = None, str(exc)
        report = self._store.check(weights_sha256=sha, check_files=check_files)
        if weights_problem:
            report.problems.append(f"weights: {weights_problem}")
        return report

    @_serialized
    def repair(
        self,
        remove_missing: bool = False,
        *,
        wait: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> dict[str, int]:
        """Fix what can be fixed without re-embedding; see :meth:`Store.repair`."""
        store = self._writable_store()
        store.lock(wait, on_wait)
        try:
            return store.repair(remove_missing=remove_missing)
        finally:
            store.unlock()

    @_serialized
    def refresh(self) -> None:
        """See changes other processes committed since the index was opened (searches do this
        by themselves)."""
        self._store.refresh()

    def _writable_store(self) -> Store:
        if not self._store.writable:
            # Reopen for writing; the read-only handle's view is replaced.
            path = self._store.path
            self._store.close()
            self._store = Store.open(path, writable=True)
        return self._store

    # -- looking up -------------------------------------------------------------------------

    @_serialized
    def get(self, image_id: int) -> ImageRecord:
        """The stored record of image ``image_id``; KeyError if there is none (for a path,
        use :meth:`find`)."""
        if isinstance(image_id, bool) or not isinstance(image_id, numbers.Integral):
            raise TypeError(
                f"Index.get takes an image id (a whole number), not {image_id!r}; to look an "
                "image up by its path, use Index.find(path)"
            )
        record = self._store.get(int(image_id))
        if record is None:
            raise KeyError(f"no image with id {image_id} in {self.path}")
        return record

    @_serialized
    def find(self, path: str | os.PathLike[str]) -> ImageRecord | None:
        """The record of an indexed file, by its path (relative paths are taken from the current
        folder, and links in its folders followed, as builds index them), or None."""
        return self._store.find(path)

    @_serialized
    def records(self) -> list[ImageRecord]:
        return list(self._store.records())

    @_serialized
    def vectors(self, ids: list[int]) -> np.ndarray:
        """The stored vectors of images ``ids`` (``len(ids) x 768``)."""
        return self._store.vectors(ids)

    @_serialized
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of the files the last builds could not index."""
        return self._store.skipped()

    # -- searching --------------------------------------------------------------------------

    def search(
        self, images: Any, k: int = 10, metric: str = "l2", channels: str = "bgr", **options: Any
    ) -> Any:
        """Nearest indexed images to one image (-> list of :class:`Hit`) or to a list / batch of
        images (-> one list per image). Images are given as for ``Vectorizer.vectorize``;
        ``options`` are those of :meth:`search_by_vector`."""
        check_metric(metric)
        single, items = _split_batch(images)
        vectors = self.vectorizer.vectorize_many(items, channels=channels)
        results = self.search_by_vector(vectors, k=k, metric=metric, **options)
        return results[0] if single else results

    @_serialized
    def similar(self, image: int | str | os.PathLike[str], k: int = 10, metric: str = "l2",
                **options: Any) -> list[Hit]:  # fmt: skip
        """Nearest images to an indexed image, given by id or path, using its stored vector (no
        embedding); the image itself is left out."""
        is_id = isinstance(image, numbers.Integral) and not isinstance(image, bool)
        record = self.get(int(image)) if is_id else self.find(image)
        if record is None:
            raise KeyError(f"{image} is not in the index {self.path}")
        vector = self._store.vectors([record.id])[0]
        return self.search_by_vector(vector, k=k, metric=metric, exclude=[record.id], **options)

    @_serialized
    def search_by_vector(
        self,
        vectors: Any,
        k: int = 10,
        metric: str = "l2",
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        max_distance: float | None = None,
        min_similarity: float | None = None,
        under: str | os.PathLike[str] | None = None,
        exclude: Any = (),
    ) -> Any:
        """Nearest indexed images to one vector (-> list of :class:`Hit`) or to each row of an
        ``N x 768`` matrix (-> one list per row).

        ``nprobe`` (IVF) and ``ef_search`` (HNSW) trade speed for recall on approximate indexes;
        ``max_distance`` (l2) or ``min_similarity`` (cosine) drop results beyond a threshold;
        ``under`` keeps only images whose path is under that folder (or is that file);
        ``exclude`` leaves out the given ids.
        """
        check_metric(metric)
        k = _check_k(k)
        if max_distance is not None and metric != "l2":
            raise ValueError("max_distance applies to the l2 metric; use min_similarity")
        if min_similarity is not None and metric != "cosine":
            raise ValueError("min_similarity applies to the cosine metric; use max_distance")
        matrix = np.asarray(vectors, dtype=np.float32)
        single = matrix.ndim == 1
        matrix = np.atleast_2d(matrix)
        if matrix.shape[1] != self._store.dim:
            raise ValueError(
                f"expected vectors of {self._store.dim} numbers, got {matrix.shape[1]}"
            )
        if not np.isfinite(matrix).all():
            raise ValueError("query vectors hold NaN or infinite numbers")
        excluded = {int(i) for i in exclude}
        params = ann.SearchParams(nprobe=nprobe, ef_search=ef_search)
        # The FAISS index and the rows are read at different moments; if a writer removed a
        # found image in between, search again on the newer state instead of returning a hit
        # without a row (or a short list).
        for _attempt in range(5):
            store = self._store
            store.refresh()
            allowed = store.ids_under(under) if under is not None else None
            fetch = candidates_for(store.vector_index.spec, k + len(excluded))
            candidates = store.vector_index.search(matrix, fetch, metric, params, allowed)
            if excluded:
                candidates = [c[~np.isin(c, list(excluded))] for c in candidates]
            found = rank_exactly(matrix, candidates, store.stored_vectors, k, metric)
            records = store.get_many({i for row in found for i, _ in row})
            if all(i in records for row in found for i, _ in row):
                break
        results = [
            [
                Hit(rank=rank, id=i, path=records[i].path, score=s, metric=metric)
                for rank, (i, s) in enumerate(
                    [
                        (i, s)
                        for i, s in row
                        if i in records
                        and (max_distance is None or s <= max_distance)
                        and (min_similarity is None or s >= min_similarity)
                    ],
                    start=1,
                )
            ]
            for row in found
        ]
        return results[0] if single else results

    @_serialized
    def duplicates(
        self,
        threshold: float,
        metric: str = "l2",
        *,
        under: str | os.PathLike[str] | None = None,
        neighbors: int = 16,
    ) -> list[DuplicateGroup]:
        """Groups of images whose vectors are within ``threshold`` of another member (an L2
        distance, or a cosine similarity of at least ``threshold``); see
        :mod:`imgindex.duplicates`. Exact on a flat index; through each image's ``neighbors``
        nearest on an approximate one."""
        check_threshold(threshold, metric)
        store = self._store
        store.refresh()
        index = store.vector_index
        ids = index.ids()
        if under is not None:
            ids = np.intersect1d(ids, store.ids_under(under))
        if index.spec.exact:
            pairs = exact_pairs(ids, store.stored_vectors(ids), threshold, metric)
        else:
            members = set(ids.tolist())
            pairs = (
                p
                for p in neighbor_pairs(
                    index, ids, store.stored_vectors, threshold, metric, neighbors
                )
                if p[0] in members and p[1] in members
            )
        groups = group_pairs(pairs)
        records = store.get_many({i for g in groups for i in g.ids})
        for group in groups:
            group.paths = [records[i].path for i in group.ids]
        return groups

    # -- describing -------------------------------------------------------------------------

    @_serialized
    def info(self) -> dict[str, Any]:
        """A description of the index: size, model, weights, preprocessing, files on disk."""
        store = self._store
        fingerprint = store.fingerprint()
        sizes = store.disk_usage()
        built = store.vector_index.spec
        requested = store.requested_spec
        return {
            "path": str(self.path),
            "images": store.count(),
            "skipped": len(store.skipped()),
            "model": fingerprint["model"],
            "weights_sha256": fingerprint["weights_sha256"],
            "dim": fingerprint["dim"],
            "preprocessing": fingerprint["preprocessing"],
            "index_type": built.describe(),
            "index": built.as_dict(),
            "index_requested": "auto" if requested is None else requested.as_dict(),
            "index_note": store.index_note(),
            "exact": built.exact,
            "metrics": ["l2", "cosine"] if built.metric == "both" else [built.metric],
            "vector_index_bytes_in_memory": store.vector_index.memory_bytes(),
            "created_at": store.meta("created_at"),
            "files": sizes,
            "bytes_on_disk": sum(sizes.values()),
        }


VECTORIZER_ARGS = ("weights", "device", "batch_size", "precision", "preset", "max_pixels")


def _check_vectorizer_args(args: dict[str, Any]) -> None:
    unknown = sorted(set(args) - set(VECTORIZER_ARGS))
    if unknown:
        raise TypeError(
            f"unexpected argument(s) {', '.join(unknown)}; the vectorizer takes "
            f"{', '.join(VECTORIZER_ARGS)}"
        )


def _under_any(raw: bytes, names: set[bytes]) -> bool:
    return any(is_under(raw, name) for name in names)


def _check_k(k: Any) -> int:
    """``k`` as an int of at least 1 (numpy integers welcome); ValueError otherwise."""
    try:
        if isinstance(k, bool):
            raise TypeError
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be a whole number of results, not {k!r}") from None
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    return k


def _index_path(path: str | os.PathLike[str] | None) -> Path:
    return Path(path).expanduser() if path is not None else default_index_path()


def candidates_for(spec: ann.IndexSpec, k: int) -> int:
    """How many candidates to take from the vector index for ``k`` results: a margin for
    re-scoring to reorder near-ties, and many more for IVF-PQ, whose compressed codes only
    approximate the distances (benchmarks/scale.py measures the recall this buys)."""
    if spec.kind == "ivf-pq" or (spec.kind == "factory" and "PQ" in spec.params["factory"]):
        return max(10 * k, k + 100)
    return k + 16


def _as_spec(index_type: str | ann.IndexSpec | None, metric: str) -> ann.IndexSpec | None:
    if index_type is None or isinstance(index_type, ann.IndexSpec):
        return index_type
    check_metric(metric)
    return ann.parse_index_type(index_type, metric)
