"""The Python search API: an :class:`Index` is a folder of images you can add to and search.

It ties the pieces together: a :class:`~imgindex.store.Store` (the SQLite catalog and its
FAISS mirror), a :class:`~imgindex.model.Vectorizer` loaded only when images must be
embedded, the ingest pipeline, and exact L2 / cosine search.

    with imgindex.Index.open("photos.idx", create=True) as index:
        index.add(["~/Pictures"])
        for hit in index.search("query.jpg", k=5, metric="cosine"):
            print(hit.rank, hit.score, hit.path)
"""

from __future__ import annotations

import contextlib
import errno
import functools
import numbers
import operator
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from imgindex import ann, ingest
from imgindex.catalog import ImageRecord, NewImage
from imgindex.decode import DEFAULT_MAX_PIXELS
from imgindex.duplicates import (
    DEFAULT_THRESHOLDS,
    DuplicateGroup,
    check_threshold,
    exact_pairs,
    group_pairs,
    neighbor_pairs,
)
from imgindex.errors import (
    ImageError,
    ImgIndexError,
    IncompatibleIndexError,
    IndexExistsError,
    WeightsError,
)
from imgindex.files import is_under, path_text, resolve
from imgindex.folder import FAISS_NAME, disk_usage
from imgindex.model import Vectorizer, _split_batch
from imgindex.preprocessing import PRESETS
from imgindex.schema import DB_NAME
from imgindex.search import (
    UNLIKE_WEIGHT,
    Hit,
    check_cutoffs,
    check_metric,
    combine_examples,
    rank_exactly,
)
from imgindex.store import CheckReport, Store, database_state
from imgindex.thumbnails import THUMBNAIL_SIZE, Thumbnail, ThumbnailCache
from imgindex.weights import resolve_weights

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
        self.created = False  # whether this Index created the index (see open)
        self._held = False  # write_lock() holds the write lock
        self._thumbnails: dict[int, ThumbnailCache] = {}
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
        on_wait: Callable[[str], None] | None = None,
        private: bool = False,
        **vectorizer_args: Any,
    ) -> Index:
        """Open the index at ``path`` (default: :func:`default_index_path`); with ``create=True``
        a missing index is created (``index_type``, ``metric``, ``wait``, ``on_wait`` and
        ``private`` as for :meth:`create`; the first two do not change an existing index,
        ``private`` makes it private). :attr:`created` says whether this call created it (two
        processes creating one index at once: one creates it, the other opens it)."""
        _check_vectorizer_args(vectorizer_args)
        _as_spec(index_type, metric)  # a misspelt kind or metric is an error, used or not
        path = _index_path(path)
        if create and database_state(path) != "complete":
            try:
                return cls.create(
                    path, vectorizer=vectorizer, index_type=index_type, metric=metric, wait=wait,
                    on_wait=on_wait, private=private, **vectorizer_args,
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
        index = cls(store, vectorizer, **vectorizer_args)
        index.created = True
        return index

    @staticmethod
    def state(path: str | os.PathLike[str] | None = None) -> str:
        """What the folder ``path`` holds: "none" (no index), "unfinished" (an index whose
        creation was interrupted; creating one there replaces it), "foreign" (another program's
        SQLite file) or "complete"."""
        return database_state(_index_path(path))

    @staticmethod
    def disk_usage(path: str | os.PathLike[str] | None = None) -> dict[str, int]:
        """Bytes of each file of the index at ``path`` (also of a closed one)."""
        return disk_usage(_index_path(path))

    # The index folder's own files, by what they hold.
    database_name = DB_NAME
    vectors_name = FAISS_NAME

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
        with self._write_lock(store, wait, on_wait):  # not while another process builds the index
            store.request_index(spec)

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

    def check_weights(self) -> None:
        """Refuse (IncompatibleIndexError) the weights and preset this Index would embed with
        if their vectors are not of the index's kind, from the weights file's checksum and the
        preset alone: no network is built (for a build that may find nothing to embed, or to
        say early that other weights cannot query this index)."""
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
        self.check_weights()
        if dry_run:
            self._store.refresh()
            return ingest.build(
                self._store, lambda: self.vectorizer, folders, remove_missing=remove_missing,
                retry_skipped=retry_skipped, dry_run=True,
            )  # fmt: skip
        store = self._writable_store()
        with self._write_lock(store, wait, on_wait):
            # The model is loaded only if some file needs reading (not for an unchanged folder).
            if max_pixels is None:
                max_pixels = self._vectorizer_args.get("max_pixels")
            model = self._vectorizer or (lambda: self.vectorizer)  # loaded now, or when needed
            return ingest.build(
                store, model, folders, progress, workers, max_pixels, remove_missing, decode,
                retry_skipped,
            )  # fmt: skip

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
        with self._write_lock(store, wait, on_wait):
            ids = [i for i, _text, raw, *_ in store.file_rows() if _under_any(raw, names)]
            removed = store.remove(ids)
            store.forget_skipped(
                [raw for _t, raw, _r in store.skipped_files() if _under_any(raw, names)]
            )
            store.save_vector_index()
            return removed

    @_serialized
    def add_vectors(
        self,
        images: Any,
        vectors: Any,
        *,
        save: bool = True,
        wait: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> list[int]:
        """Add entries with vectors made elsewhere (``images``: :class:`~imgindex.catalog.
        NewImage` records; ``vectors``: ``len(images) x 768``), in one transaction, as a build
        commits a batch; with ``save``, the vector index file is written after. Returns the new
        ids. For vectors this index's model did not make, nothing checks that they are alike:
        synthetic collections, benchmarks, imports."""
        store = self._writable_store()
        with self._write_lock(store, wait, on_wait):
            ids = store.write_batch(list(images), vectors)
            if save:
                store.save_vector_index()
            return ids

    @_serialized
    def remove_ids(
        self,
        ids: Any,
        *,
        save: bool = True,
        wait: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> int:
        """Remove the entries of images ``ids`` (the files are not touched); returns how many
        went."""
        store = self._writable_store()
        with self._write_lock(store, wait, on_wait):
            removed = store.remove([int(i) for i in ids])
            if save:
                store.save_vector_index()
            return removed

    @_serialized
    def save(self, *, wait: float = 0.0, on_wait: Callable[[str], None] | None = None) -> None:
        """Write the vector index file now if it changed (a sync does this at its end), first
        building the kind asked for if the collection has become large enough for it."""
        store = self._writable_store()
        with self._write_lock(store, wait, on_wait):
            store.save_vector_index()

    @contextlib.contextmanager
    def write_lock(
        self, wait: float = 0.0, on_wait: Callable[[str], None] | None = None
    ) -> Iterator[None]:
        """Hold the index's write lock (as a build holds it), for several changes in a row;
        other processes are refused meanwhile. Writing methods of this Index work inside."""
        with self._lock:
            store = self._writable_store()
            store.lock(wait, on_wait)
            self._held = True
        try:
            yield
        finally:
            with self._lock:
                self._held = False
                store.unlock()

    def _write_lock(
        self, store: Store, wait: float, on_wait: Callable[[str], None] | None
    ) -> contextlib.AbstractContextManager[None]:
        """The write lock for one change: taken now, or already held by :meth:`write_lock`."""
        if self._held:
            return contextlib.nullcontext()
        return _held_lock(store, wait, on_wait)

    @_serialized
    def vector_index_info(self) -> dict[str, Any]:
        """What the in-memory vector index holds now: its kind and parameters, how many
        vectors it serves, how many deleted ones it still carries (tombstones), whether its
        base is the file memory-mapped, and how many times this Index built it anew."""
        store = self._store
        store.refresh()
        vector_index = store.vector_index
        return {
            "kind": vector_index.spec.kind,
            "metric": vector_index.spec.metric,
            "params": dict(vector_index.spec.params),
            "vectors": vector_index.ntotal,
            "ids": vector_index.ids(),
            "tombstones": len(vector_index.tombstones),
            "memory_mapped": not vector_index.mutable,
            "rebuilds": store.rebuilds,
        }

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
        with self._write_lock(store, wait, on_wait):
            return store.repair(remove_missing=remove_missing)

    @_serialized
    def refresh(self) -> None:
        """See changes other processes committed since the index was opened (searches do this
        by themselves)."""
        self._store.refresh()

    def _writable_store(self) -> Store:
        if not self._store.writable:
            # Reopen for writing; the read-only handle's view is replaced (once the writable
            # one is open: when it cannot be, this Index goes on reading).
            writable = Store.open(self._store.path, writable=True)
            self._store.close()
            self._store = writable
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
    def raw_path(self, image_id: int) -> bytes:
        """The exact name (bytes) of the file of image ``image_id``; ``ImageRecord.path`` is
        its text form, which cannot always be opened (names that are not UTF-8)."""
        return self._store.raw_path(int(image_id))

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

    def search_each(
        self, images: Any, k: int = 10, metric: str = "l2", channels: str = "bgr", **options: Any
    ) -> list[list[Hit] | ImageError]:
        """:meth:`search` for a list of images, where one that cannot be read does not cost the
        others their answers: each entry is that image's hits, or the ImageError saying why it
        could not be read."""
        check_metric(metric)
        items = list(images)
        try:
            vectors = self.vectorizer.vectorize_many(items, channels=channels)
            failed: dict[int, ImageError] = {}
        except ImageError:  # one by one, to know which
            rows, failed = [], {}
            for n, item in enumerate(items):
                try:
                    rows.append(self.vectorizer.vectorize(item, channels=channels))
                except ImageError as exc:
                    failed[n] = exc
            vectors = np.stack(rows) if rows else np.empty((0, self._store.dim), np.float32)
        found = iter(self.search_by_vector(vectors, k=k, metric=metric, **options)
                     if len(vectors) else [])  # fmt: skip
        return [failed[n] if n in failed else next(found) for n in range(len(items))]

    @_serialized
    def similar(self, image: int | str | os.PathLike[str], k: int = 10, metric: str = "l2",
                **options: Any) -> list[Hit]:  # fmt: skip
        """Nearest images to an indexed image, given by id or path, using its stored vector (no
        embedding); the image itself is left out."""
        record = self.lookup(image)
        vector = self._store.vectors([record.id])[0]
        return self.search_by_vector(vector, k=k, metric=metric, exclude=[record.id], **options)

    @_serialized
    def lookup(self, image: int | str | os.PathLike[str] | ImageRecord) -> ImageRecord:
        """The record of an indexed image given by id, by path (see :meth:`find`) or by its
        record; KeyError if it is not in the index."""
        if isinstance(image, ImageRecord):
            image = image.id
        is_id = isinstance(image, numbers.Integral) and not isinstance(image, bool)
        record = self._store.get(int(image)) if is_id else self.find(image)
        if record is None:
            raise KeyError(f"{image} is not in the index {self.path}")
        return record

    def search_like(
        self,
        like: Any,
        unlike: Any = (),
        k: int = 10,
        metric: str = "l2",
        *,
        unlike_weight: float = UNLIKE_WEIGHT,
        channels: str = "bgr",
        **options: Any,
    ) -> list[Hit]:
        """Images like the examples in ``like`` and unlike those in ``unlike``: one query
        vector combined from them (:func:`~imgindex.search.combine_examples`). An example is
        an indexed image (an id or an :class:`ImageRecord`: its stored vector, and it is left
        out of the results), a vector (a 1-D array of 768 numbers), or an image to embed (a
        path, an array, a PIL image, as for :meth:`search`). ``options`` are those of
        :meth:`search_by_vector`."""
        check_metric(metric)
        like_vectors, like_ids = self._example_vectors(like, channels)
        unlike_vectors, unlike_ids = self._example_vectors(unlike, channels)
        if not len(like_vectors):
            raise ValueError("search_like needs at least one example to be like")
        query = combine_examples(like_vectors, unlike_vectors, metric, unlike_weight)
        exclude = [*like_ids, *unlike_ids, *options.pop("exclude", ())]
        return self.search_by_vector(query, k=k, metric=metric, exclude=exclude, **options)

    def _example_vectors(self, examples: Any, channels: str) -> tuple[np.ndarray, list[int]]:
        """Vectors of examples (see :meth:`search_like`) and the ids of the indexed ones."""
        if isinstance(
            examples, (str, bytes, os.PathLike, ImageRecord, numbers.Integral, np.ndarray)
        ):
            examples = [examples]
        rows, ids, images = [], [], []
        dim = self._store.dim
        for example in examples:
            if isinstance(example, ImageRecord) or (
                isinstance(example, numbers.Integral) and not isinstance(example, bool)
            ):
                record = self.lookup(example)
                ids.append(record.id)
                rows.append(self.vectors([record.id])[0])
            elif isinstance(example, np.ndarray) and example.shape == (dim,):
                rows.append(example.astype(np.float32))  # a vector, embedded already
            else:
                images.append(example)
        if images:
            rows += list(self.vectorizer.vectorize_many(images, channels=channels))
        return (np.stack(rows) if rows else np.empty((0, dim), np.float32)), ids

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
        within: Any = None,
        exclude: Any = (),
    ) -> Any:
        """Nearest indexed images to one vector (-> list of :class:`Hit`) or to each row of an
        ``N x 768`` matrix (-> one list per row).

        ``nprobe`` (IVF) and ``ef_search`` (HNSW) trade speed for recall on approximate indexes;
        ``max_distance`` (l2) or ``min_similarity`` (cosine) drop results beyond a threshold;
        ``under`` keeps only images whose path is under that folder (or is that file);
        ``within`` only the images of the given ids (:meth:`ids_under` makes such a list);
        ``exclude`` leaves out the given ids.
        """
        check_metric(metric)
        k = _check_k(k)
        check_cutoffs(metric, max_distance, min_similarity)
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
            if within is not None:
                chosen = np.unique(np.asarray(list(within), dtype=np.int64))
                allowed = chosen if allowed is None else np.intersect1d(allowed, chosen)
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
        threshold: float | None = None,
        metric: str = "l2",
        *,
        under: str | os.PathLike[str] | None = None,
        neighbors: int = 16,
        include_reviewed: bool = False,
        within: Any = None,
    ) -> list[DuplicateGroup]:
        """Groups of images whose vectors are within ``threshold`` of another member (an L2
        distance, or a cosine similarity of at least ``threshold``; by default
        :data:`~imgindex.duplicates.DEFAULT_THRESHOLDS`); see
        :mod:`imgindex.duplicates`. Exact on a flat index; through each image's ``neighbors``
        nearest on an approximate one. Pairs a person has decided on, and images marked for
        removal, are left out unless ``include_reviewed`` (see :meth:`review_duplicates`)."""
        if threshold is None:
            threshold = DEFAULT_THRESHOLDS[check_metric(metric)]
        check_threshold(threshold, metric)
        store = self._store
        store.refresh()
        index = store.vector_index
        ids = index.ids()
        if under is not None:
            ids = np.intersect1d(ids, store.ids_under(under))
        if within is not None:  # (as for search_by_vector)
            ids = np.intersect1d(ids, np.asarray(list(within), dtype=np.int64))
        marked = store.marked_for_removal()
        reviewed = store.reviewed_pairs()
        if not include_reviewed:  # what a person decided does not come back
            ids = np.setdiff1d(ids, np.fromiter(marked, dtype=np.int64, count=len(marked)))
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
        if not include_reviewed:
            pairs = (p for p in pairs if (p[0], p[1]) not in reviewed)
        groups = group_pairs(pairs)
        records = store.get_many({i for g in groups for i in g.ids})
        for group in groups:
            group.paths = [records[i].path for i in group.ids]
            group.marked = {i: marked[i] for i in group.ids if i in marked}
            group.reviewed = all((a, b) in reviewed for a, b, _s in group.pairs)
        return groups

    @_serialized
    def review_duplicates(
        self,
        ids: Any,
        keep: int | None = None,
        *,
        wait: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        """Record a person's decision on a duplicate group ``ids``, stored in the index so that
        :meth:`duplicates` does not offer it again: with ``keep`` (one of ``ids``), they are
        duplicates and the others are marked for removal (files are never touched; see
        :meth:`marked_for_removal`, :meth:`move_marked`); without, they are not duplicates."""
        members = sorted({int(self.lookup(i).id) for i in ids})
        if len(members) < 2:
            raise ValueError("a decision needs a group of at least two images")
        if keep is not None and int(self.lookup(keep).id) not in members:
            raise ValueError(f"the image to keep ({keep}) is not one of the group {members}")
        store = self._writable_store()
        with self._write_lock(store, wait, on_wait):
            store.review(members, None if keep is None else int(self.lookup(keep).id))

    @_serialized
    def forget_reviews(
        self, ids: Any, *, wait: float = 0.0, on_wait: Callable[[str], None] | None = None
    ) -> int:
        """Undo the decisions on the images ``ids`` (their groups come back); returns how many
        decisions went."""
        members = [int(self.lookup(i).id) for i in ids]
        store = self._writable_store()
        with self._write_lock(store, wait, on_wait):
            return store.forget_reviews(members)

    @_serialized
    def marked_for_removal(self) -> list[tuple[ImageRecord, ImageRecord | None]]:
        """The images marked for removal by :meth:`review_duplicates`, each with the one kept
        in its place (None if that one has left the index)."""
        store = self._store
        store.refresh()
        marked = store.marked_for_removal()
        records = store.get_many({*marked, *(k for k in marked.values() if k is not None)})
        return [(records[i], records.get(k) if k is not None else None)
                for i, k in marked.items() if i in records]  # fmt: skip

    @_serialized
    def move_marked(
        self,
        folder: str | os.PathLike[str],
        *,
        dry_run: bool = False,
        wait: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> list[tuple[str, str]]:
        """Move the files marked for removal into ``folder`` (made if missing), where a person
        can look at them before deleting them; nothing is ever deleted. A name already taken
        there gets a number; the index entries follow the files (same ids and vectors).
        Returns (from, to) for each file (with ``dry_run``, what would be moved)."""
        target = resolve(folder)
        store = self._writable_store() if not dry_run else self._store
        locked = contextlib.nullcontext() if dry_run else self._write_lock(store, wait, on_wait)
        with locked:
            store.refresh()
            records = store.get_many(store.marked_for_removal())
            moves = []
            taken: set[str] = set()
            for record in sorted(records.values(), key=lambda r: r.id):
                raw = store.raw_path(record.id)
                destination = _free_name(target, os.path.basename(raw), taken)
                moves.append((record, raw, destination))
            if dry_run:
                return [(r.path, path_text(d)) for r, _raw, d in moves]
            done = []
            for record, raw, destination in moves:
                moved = _move_file(raw, destination)
                store.rename(record.id, NewImage(moved, record.sha256, record.size,
                                                 os.stat(moved).st_mtime, record.width,
                                                 record.height))  # fmt: skip
                done.append((record.path, path_text(moved)))
            store.save_vector_index()
            return done

    @_serialized
    def page(
        self,
        offset: int = 0,
        limit: int = 50,
        order: str = "newest",
        under: str | os.PathLike[str] | None = None,
        within: Any = None,
    ) -> tuple[list[ImageRecord], int]:
        """Records to browse, ``limit`` from ``offset``, newest first (``order="newest"``) or
        by path ("path"), under a folder if given, among the ids ``within`` if given; and how
        many there are in all."""
        if order not in ("newest", "path"):
            raise ValueError(f"order must be 'newest' or 'path', not {order!r}")
        offset, limit = max(0, int(offset)), max(0, int(limit))
        store = self._store
        store.refresh()
        ids = store.ids_under(under) if under is not None else None
        if within is not None:
            chosen = np.unique(np.asarray(list(within), dtype=np.int64))
            ids = chosen if ids is None else np.intersect1d(ids, chosen)
        return store.records_page(offset, limit, order, ids)

    def thumbnail(
        self, image: int | str | os.PathLike[str], size: int = THUMBNAIL_SIZE
    ) -> Thumbnail:
        """A JPEG preview of an indexed image, at most ``size`` pixels on its longer side, made
        from its file on first use and cached by content (see :mod:`imgindex.thumbnails`); a
        placeholder with the reason when the file is missing or unreadable."""
        record = self.lookup(image)
        with self._lock:
            raw = self._store.raw_path(record.id)
            cache = self._thumbnails.get(size)
            if cache is None:
                limit = self._vectorizer_args.get("max_pixels") or DEFAULT_MAX_PIXELS
                cache = ThumbnailCache.for_index(self.path, size=size, max_pixels=limit)
                self._thumbnails[size] = cache
        # (outside the lock: decoding takes a while)
        return cache.get(raw, record.sha256, record.size, record.mtime)

    @_serialized
    def ids_under(self, folder: str | os.PathLike[str], *, resolve: bool = True) -> np.ndarray:
        """Ids of the images at or under ``folder``. With ``resolve=False`` the folder is taken
        as the index names it (as in ``ImageRecord.path`` and :meth:`folders`) and the file
        system is not looked at: for a server, whose requests must not reach it."""
        self._store.refresh()
        if resolve:
            return self._store.ids_under(folder)
        return self._store.ids_under_indexed(os.fsdecode(folder))

    @_serialized
    def folders(self) -> dict[str, int]:
        """Every folder holding indexed images, with how many it holds directly."""
        self._store.refresh()
        return self._store.folder_counts()

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


@contextlib.contextmanager
def _held_lock(store: Store, wait: float, on_wait: Callable[[str], None] | None) -> Iterator[None]:
    store.lock(wait, on_wait)
    try:
        yield
    finally:
        store.unlock()


def _free_name(folder: Path, name: bytes, taken: set[str]) -> Path:
    """``folder/name``, or ``name (2)``, ``name (3)``, ... when that is taken (on disk, or by
    another file of the same move)."""
    stem, suffix = os.path.splitext(os.fsdecode(name))
    candidate, n = folder / f"{stem}{suffix}", 1
    while str(candidate) in taken or os.path.lexists(candidate):
        n += 1
        candidate = folder / f"{stem} ({n}){suffix}"
    taken.add(str(candidate))
    return candidate


def _move_file(source: bytes, destination: Path) -> Path:
    """Move a file without ever replacing one: a new hard link, then the old name removed (the
    same file system), or an exclusive copy, flushed, then the old name removed."""
    import shutil

    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise ImgIndexError(
                f"{os.fsdecode(source)}: cannot move it to {destination} ({exc.strerror})"
            ) from None
        with open(source, "rb") as src, open(destination, "xb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copystat(source, destination)
    os.unlink(source)
    return destination


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
