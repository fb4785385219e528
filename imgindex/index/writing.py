"""The methods of :class:`~imgindex.index.Index` that change an index: bringing it up to date
with folders (sync, add, remove), adding vectors made elsewhere, saving the vector index file,
holding the write lock for several changes, choosing the kind of vector index, and checking and
repairing. :class:`Writing` is a part of ``Index`` (its base class) and uses its state: the
store, the lock that serialises its methods, and the vectorizer.

Every change holds the index's write lock (one writer at a time, across processes): for one
call, or for several inside :meth:`Writing.write_lock`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

from imgindex import ann, ingest
from imgindex.errors import ImgIndexError, WeightsError
from imgindex.files import is_under, resolve
from imgindex.search import check_metric
from imgindex.store import CheckReport, Store
from imgindex.weights import resolve_weights


def serialized(method: Callable[..., Any]) -> Callable[..., Any]:
    """One thread at a time in the index's methods (they share its SQLite connection)."""

    @functools.wraps(method)
    def serialized(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._closed and method.__name__ != "close":
                raise ImgIndexError(f"{self.path}: this Index was closed; open it again")
            return method(self, *args, **kwargs)

    return serialized


class Writing:
    """The writing half of :class:`~imgindex.index.Index` (see the module's docstring)."""

    _store: Store
    _held: bool
    _vectorizer: Any
    _vectorizer_args: dict[str, Any]

    @serialized
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
        spec = as_spec(index_type, metric)
        store = self._writable_store()
        with self._write_lock(store, wait, on_wait):  # not while another process builds the index
            store.request_index(spec)

    @serialized
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
        engine: str = "local",
        ray_address: str | None = None,
        ray_actors: int | None = None,
        keep_gps: bool = False,
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

        ``engine="ray"`` reads and embeds on a Ray cluster (:mod:`imgindex.distributed`): the
        one at ``ray_address`` ("auto", "HOST:PORT"; default ``$RAY_ADDRESS``, else a new one on
        this machine), with ``ray_actors`` embedding actors (default: one per GPU, else one per
        node). The paths must be readable under the same names on every node.

        Each image's photo facts (format, date taken, camera, lens, orientation) are stored;
        GPS positions only with ``keep_gps`` (they are personal data).
        """
        if isinstance(folders, (str, os.PathLike)):
            folders = [folders]
        if engine not in ("local", "ray"):
            raise ValueError(f"engine must be 'local' or 'ray', not {engine!r}")
        if engine == "ray" and (decode != "cpu" or workers is not None):
            from imgindex.distributed import LOCAL_ONLY

            raise ImgIndexError(LOCAL_ONLY)
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
            if engine == "ray":
                from imgindex import distributed

                options = distributed.RayOptions(ray_address, ray_actors)
                return distributed.build(
                    store, self._embedder_spec(max_pixels), folders, progress, options,
                    max_pixels, remove_missing, retry_skipped, keep_gps,
                )  # fmt: skip
            model = self._vectorizer or (lambda: self.vectorizer)  # loaded now, or when needed
            return ingest.build(
                store, model, folders, progress, workers, max_pixels, remove_missing, decode,
                retry_skipped, keep_gps=keep_gps,
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
        engine: str = "local",
        ray_address: str | None = None,
        ray_actors: int | None = None,
        keep_gps: bool = False,
    ) -> ingest.BuildReport:
        """Add (or update) the images in ``paths``, files or folders, removing nothing."""
        return self.sync(
            paths, progress, workers=workers, max_pixels=max_pixels, remove_missing=False,
            wait=wait, on_wait=on_wait, retry_skipped=retry_skipped, engine=engine,
            ray_address=ray_address, ray_actors=ray_actors, keep_gps=keep_gps,
        )  # fmt: skip

    @serialized
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

    @serialized
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

    @serialized
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

    @serialized
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

    @serialized
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

    @serialized
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

    @serialized
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


@contextlib.contextmanager
def _held_lock(store: Store, wait: float, on_wait: Callable[[str], None] | None) -> Iterator[None]:
    store.lock(wait, on_wait)
    try:
        yield
    finally:
        store.unlock()


def _under_any(raw: bytes, names: set[bytes]) -> bool:
    return any(is_under(raw, name) for name in names)


def as_spec(index_type: str | ann.IndexSpec | None, metric: str) -> ann.IndexSpec | None:
    if index_type is None or isinstance(index_type, ann.IndexSpec):
        return index_type
    check_metric(metric)
    return ann.parse_index_type(index_type, metric)
