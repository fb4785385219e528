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
import numbers
import operator
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from imgindex import ann, photos
from imgindex.catalog import ImageRecord
from imgindex.decode import DEFAULT_MAX_PIXELS
from imgindex.duplicates import DEFAULT_THRESHOLDS, DuplicateGroup, check_threshold, find_groups
from imgindex.errors import (
    ImageError,
    IncompatibleIndexError,
    IndexExistsError,
)
from imgindex.files import resolve
from imgindex.folder import FAISS_NAME, disk_usage
from imgindex.index.writing import Writing, as_spec, serialized
from imgindex.marked import marked_records, move_marked
from imgindex.model import Vectorizer, _split_batch
from imgindex.photofacts import PhotoFacts
from imgindex.photos import PhotoFilter
from imgindex.preprocessing import PRESETS
from imgindex.schema import DB_NAME
from imgindex.search import (
    UNLIKE_WEIGHT,
    Hit,
    check_cutoffs,
    check_metric,
    chosen_ids,
    combine_examples,
    example_vectors,
    search_store,
)
from imgindex.store import Store, database_state
from imgindex.thumbnails import THUMBNAIL_SIZE, Thumbnail, ThumbnailCache

INDEX_ENV = "IMGINDEX_INDEX"


def default_index_path() -> Path:
    """``$IMGINDEX_INDEX``, else ``$XDG_DATA_HOME/imgindex/default`` (``~/.local/share/...``)."""
    configured = os.environ.get(INDEX_ENV)
    if configured:
        return Path(configured).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join("~", ".local", "share")
    return Path(data_home).expanduser() / "imgindex" / "default"


class Index(Writing):
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
        as_spec(index_type, metric)  # a misspelt kind or metric is an error, used or not
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
        fingerprint: dict[str, Any] | None = None,
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
        read. With ``fingerprint`` (as :meth:`fingerprint` gives), the index records those
        vectors instead and no network is loaded: for vectors made elsewhere (an import)."""
        _check_vectorizer_args(vectorizer_args)
        path = _index_path(path)
        spec = as_spec(index_type, metric)
        if database_state(path) == "complete":  # before loading the model for nothing
            raise IndexExistsError(f"{path}: an index already exists here")
        args = {k: v for k, v in vectorizer_args.items() if v is not None}
        if fingerprint is None:
            vectorizer = vectorizer or Vectorizer(**args)
            fingerprint = vectorizer.fingerprint()
        store = Store.create(path, fingerprint, spec, wait=wait, on_wait=on_wait, private=private)
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

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._store.path

    @serialized
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

    @serialized
    def count(self) -> int:
        """Number of images in the index."""
        return self._store.count()

    @property
    @serialized
    def vectorizer(self) -> Vectorizer:
        """The vectorizer, loaded on first use and checked against the index."""
        if self._vectorizer is None:
            args = {k: v for k, v in self._vectorizer_args.items() if v is not None}
            args.setdefault("preset", self.preset)
            if args.get("precision") in (None, "auto"):
                args["precision"] = self._precision_of_index(args)
            self.check_weights()  # before loading (or exporting) a network only to refuse it
            vectorizer = Vectorizer(**args)
            self._check_compatible(vectorizer)
            self._vectorizer = vectorizer
        return self._vectorizer

    def _embedder_spec(self, max_pixels: int | None) -> Any:
        """What a Ray actor needs to make this index's network (see imgindex.distributed)."""
        from imgindex.distributed import EmbedderSpec

        args = {k: v for k, v in self._vectorizer_args.items() if v is not None}
        args.setdefault("preset", self.preset)
        if args.get("precision") in (None, "auto"):
            args["precision"] = self._precision_of_index(args)
        weights = args.pop("weights", None)
        return EmbedderSpec(
            expected=self._store.fingerprint(),
            weights=None if weights is None else os.path.abspath(weights),
            max_pixels=max_pixels or args.pop("max_pixels", None),
            **{k: v for k, v in args.items() if k != "max_pixels"},
        )

    def _precision_of_index(self, args: dict[str, Any]) -> str:
        """The precision to embed with when none is given: int8 for an index of INT8 vectors,
        else the float default of the preset and device (an index's vectors are never mixed)."""
        if self._store.fingerprint()["model"].endswith("-int8"):
            return "int8"
        from imgindex.devices import default_precision, resolve_device

        return default_precision(args["preset"], resolve_device(args.get("device")))

    @serialized
    def fingerprint(self) -> dict[str, Any]:
        """What kind of vectors the index holds: model, weights' SHA-256, dim, preprocessing."""
        return self._store.fingerprint()

    @property
    @serialized
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

    # -- the vector index -------------------------------------------------------------------

    @serialized
    def vector_index_info(self) -> dict[str, Any]:
        """What the in-memory vector index holds now: its kind and parameters, how many
        vectors it serves, how many deleted ones it still carries (tombstones), whether its
        base is the file memory-mapped, its inverted lists (IVF; else None), and how many times
        this Index built it anew."""
        self._store.refresh()
        return self._store.describe_vector_index()

    # -- looking up -------------------------------------------------------------------------

    @serialized
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

    @serialized
    def find(self, path: str | os.PathLike[str]) -> ImageRecord | None:
        """The record of an indexed file, by its path (relative paths are taken from the current
        folder, and links in its folders followed, as builds index them), or None."""
        return self._store.find(path)

    @serialized
    def raw_path(self, image_id: int) -> bytes:
        """The exact name (bytes) of the file of image ``image_id``; ``ImageRecord.path`` is
        its text form, which cannot always be opened (names that are not UTF-8)."""
        return self._store.raw_path(int(image_id))

    @serialized
    def records(self) -> list[ImageRecord]:
        return list(self._store.records())

    @serialized
    def vectors(self, ids: list[int]) -> np.ndarray:
        """The stored vectors of images ``ids`` (``len(ids) x 768``)."""
        return self._store.vectors(ids)

    @serialized
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

    @serialized
    def similar(self, image: int | str | os.PathLike[str], k: int = 10, metric: str = "l2",
                **options: Any) -> list[Hit]:  # fmt: skip
        """Nearest images to an indexed image, given by id or path, using its stored vector (no
        embedding); the image itself is left out."""
        record = self.lookup(image)
        vector = self._store.vectors([record.id])[0]
        return self.search_by_vector(vector, k=k, metric=metric, exclude=[record.id], **options)

    @serialized
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
        def stored(example: Any) -> tuple[int, np.ndarray]:
            record = self.lookup(example)
            return record.id, self.vectors([record.id])[0]

        def embed(images: list[Any]) -> np.ndarray:
            return self.vectorizer.vectorize_many(images, channels=channels)

        return example_vectors(examples, self._store.dim, stored, embed)

    @serialized
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
        where: PhotoFilter | None = None,
    ) -> Any:
        """Nearest indexed images to one vector (-> list of :class:`Hit`) or to each row of an
        ``N x 768`` matrix (-> one list per row).

        ``nprobe`` (IVF) and ``ef_search`` (HNSW) trade speed for recall on approximate indexes;
        ``max_distance`` (l2) or ``min_similarity`` (cosine) drop results beyond a threshold;
        ``under`` keeps only images whose path is under that folder (or is that file);
        ``within`` only the images of the given ids (:meth:`ids_under` makes such a list);
        ``where`` only the photos a :class:`~imgindex.photos.PhotoFilter` selects (date taken,
        camera, format, size); ``exclude`` leaves out the given ids. These limits apply inside
        the vector search: ``k`` results come back whenever ``k`` images qualify.
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
        params = ann.SearchParams(nprobe=nprobe, ef_search=ef_search)
        within = self._within(within, where)
        results = search_store(
            self._store, matrix, k, metric, params, under=under, within=within, exclude=exclude,
            max_distance=max_distance, min_similarity=min_similarity,
        )  # fmt: skip
        return results[0] if single else results

    @serialized
    def duplicates(
        self,
        threshold: float | None = None,
        metric: str = "l2",
        *,
        under: str | os.PathLike[str] | None = None,
        neighbors: int = 16,
        include_reviewed: bool = False,
        within: Any = None,
        where: PhotoFilter | None = None,
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
        self._store.refresh()
        allowed = chosen_ids(self._store, under, self._within(within, where))
        return find_groups(self._store, threshold, metric, allowed, neighbors, include_reviewed)

    def _within(self, within: Any, where: PhotoFilter | None) -> Any:
        """``within`` narrowed to the ids ``where`` selects."""
        if where is None or where.empty:
            return within
        matching = photos.matching(self._store.db, where)
        if within is None:
            return matching
        return np.intersect1d(matching, np.asarray(list(within), dtype=np.int64))

    @serialized
    def ids_matching(self, where: PhotoFilter) -> np.ndarray:
        """Ids (sorted) of the images ``where`` selects."""
        self._store.refresh()
        return photos.matching(self._store.db, where)

    @serialized
    def photo_facts(self, ids: Any) -> dict[int, PhotoFacts]:
        """What each image's file says about the photo (format, date taken, camera, lens, GPS
        if the index keeps it), for the ids that have facts."""
        return photos.of(self._store.db, ids)

    @serialized
    def photo_summary(self) -> dict[str, Any]:
        """Formats and cameras (with counts), the range of dates taken, and how many images
        have GPS positions or no facts yet (see :func:`imgindex.photos.summary`)."""
        return photos.summary(self._store.db)

    @serialized
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

    @serialized
    def forget_reviews(
        self, ids: Any, *, wait: float = 0.0, on_wait: Callable[[str], None] | None = None
    ) -> int:
        """Undo the decisions on the images ``ids`` (their groups come back); returns how many
        decisions went."""
        members = [int(self.lookup(i).id) for i in ids]
        store = self._writable_store()
        with self._write_lock(store, wait, on_wait):
            return store.forget_reviews(members)

    @serialized
    def marked_for_removal(self) -> list[tuple[ImageRecord, ImageRecord | None]]:
        """The images marked for removal by :meth:`review_duplicates`, each with the one kept
        in its place (None if that one has left the index)."""
        return marked_records(self._store)

    @serialized
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
            return move_marked(store, target, dry_run)

    @serialized
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
        self._store.refresh()
        ids = chosen_ids(self._store, under, within)
        return self._store.records_page(offset, limit, order, ids)

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

    @serialized
    def ids_under(self, folder: str | os.PathLike[str], *, resolve: bool = True) -> np.ndarray:
        """Ids of the images at or under ``folder``. With ``resolve=False`` the folder is taken
        as the index names it (as in ``ImageRecord.path`` and :meth:`folders`) and the file
        system is not looked at: for a server, whose requests must not reach it."""
        self._store.refresh()
        if resolve:
            return self._store.ids_under(folder)
        return self._store.ids_under_indexed(os.fsdecode(folder))

    @serialized
    def folders(self) -> dict[str, int]:
        """Every folder holding indexed images, with how many it holds directly."""
        self._store.refresh()
        return self._store.folder_counts()

    # -- describing -------------------------------------------------------------------------

    @serialized
    def info(self) -> dict[str, Any]:
        """A description of the index: size, model, weights, preprocessing, files on disk."""
        return self._store.describe()


VECTORIZER_ARGS = (
    "weights",
    "device",
    "batch_size",
    "precision",
    "preset",
    "max_pixels",
    "runtime",
)


def _check_vectorizer_args(args: dict[str, Any]) -> None:
    unknown = sorted(set(args) - set(VECTORIZER_ARGS))
    if unknown:
        raise TypeError(
            f"unexpected argument(s) {', '.join(unknown)}; the vectorizer takes "
            f"{', '.join(VECTORIZER_ARGS)}"
        )


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
