"""Files to vectors to the index: walk -> read and decode (threads) -> batch by shape -> embed ->
commit, with progress.

Decoding and resizing run in a thread pool (Pillow and PyTorch release the GIL) while the main
thread embeds. Images are batched only with images of the same resized shape, so every vector is
the one a one-by-one call would give. Each embedded batch is committed to SQLite in its own
transaction together with the files skipped so far, so an interrupted build loses at most one
batch of work and a re-run picks up where it stopped: files whose size and modification time are
unchanged are not read again, and files whose content hash is unchanged are not embedded again.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgindex.decode import read_image_file
from imgindex.errors import ImageError
from imgindex.files import walk_images
from imgindex.store import NewImage, Store, path_text

if TYPE_CHECKING:
    import torch

    from imgindex.model import Vectorizer


@dataclass(frozen=True)
class Skipped:
    """A file that was not indexed, and why."""

    path: str
    reason: str


@dataclass
class Progress:
    """Where a build stands; passed to the progress callback after every batch."""

    total: int  # files to read and embed in this build (unchanged files excluded)
    done: int = 0  # of those, finished (embedded, reused or skipped)
    embedded: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class BuildReport:
    """What a build did."""

    added: int = 0  # new paths
    updated: int = 0  # known paths whose content changed (re-embedded)
    unchanged: int = 0  # known paths with the same size and time, or the same content hash
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    embedded: int = 0
    total: int = 0  # images in the index afterwards

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "total": self.total,
        }


ProgressCallback = Callable[[Progress], None]


@dataclass
class _Decoded:
    image: NewImage
    tensor: torch.Tensor | None  # None: content unchanged, no embedding needed
    known_id: int | None


def build(
    store: Store,
    vectorizer: Vectorizer,
    roots: Iterable[str | os.PathLike[str]],
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    max_pixels: int | None = None,
) -> BuildReport:
    """Index every image under ``roots`` into ``store``. See the module docstring."""
    started = time.perf_counter()
    report = BuildReport()
    skipped_pending: list[tuple[Path, str]] = []

    def skip(path: Path, reason: str) -> None:
        report.skipped.append(Skipped(path_text(path), reason))
        skipped_pending.append((path, reason))

    known = {
        path: (image_id, size, mtime, sha)
        for image_id, path, size, mtime, sha in store.db.execute(
            "SELECT id, path, size, mtime, sha256 FROM images"
        )
    }
    todo: list[Path] = []
    for path in walk_images(roots, on_error=skip):
        row = known.get(path_text(path))
        if row is not None:
            try:
                st = os.stat(path)
            except OSError:
                st = None
            if st is not None and (st.st_size, st.st_mtime) == (row[1], row[2]):
                report.unchanged += 1
                continue
        todo.append(path)

    state = Progress(total=len(todo))
    limit = max_pixels if max_pixels is not None else vectorizer.max_pixels

    def decode(path: Path) -> _Decoded:
        name = os.fsdecode(path)
        try:
            decoded = read_image_file(path, limit)
            image = NewImage(
                path, decoded.sha256, decoded.size, decoded.mtime, decoded.width, decoded.height
            )
            row = known.get(path_text(path))
            if row is not None and row[3] == decoded.sha256:
                return _Decoded(image, None, row[0])  # touched, not changed: keep its vector
            tensor = vectorizer.preprocessing.resize(decoded.pixels, name)
            return _Decoded(image, tensor, row[0] if row else None)
        except ImageError:
            raise
        except Exception as exc:  # a surprise from a decoder must not stop the build
            raise ImageError(name, f"unexpected error ({type(exc).__name__}: {exc})") from exc

    def commit(items: list[_Decoded]) -> None:
        import torch

        vectors = vectorizer.embed_batch(torch.stack([d.tensor for d in items]))
        store.write_batch([d.image for d in items], vectors, skipped_pending)
        skipped_pending.clear()
        for d in items:
            if d.known_id is None:
                report.added += 1
            else:
                report.updated += 1
        state.embedded += len(items)
        state.done += len(items)
        if progress:
            progress(state)

    buckets: dict[tuple[int, ...], list[_Decoded]] = defaultdict(list)
    pending = 0
    batch_size = vectorizer.batch_size
    if progress and todo:
        progress(state)
    try:
        for path, outcome in _map_bounded(decode, todo, workers, ahead=4 * batch_size):
            if isinstance(outcome, ImageError):
                skip(path, outcome.reason)
                state.done += 1
                continue
            if outcome.tensor is None:
                store.touch(outcome.known_id, outcome.image)
                report.unchanged += 1
                state.done += 1
                continue
            shape = tuple(outcome.tensor.shape)
            buckets[shape].append(outcome)
            pending += 1
            if len(buckets[shape]) < batch_size:
                if pending < 2 * batch_size:
                    continue
                # Too many shapes in flight: embed the fullest bucket to bound memory.
                shape = max(buckets, key=lambda s: len(buckets[s]))
            pending -= len(buckets[shape])
            commit(buckets.pop(shape))
        for shape in list(buckets):
            commit(buckets.pop(shape))
        if skipped_pending:
            store.write_batch([], None, skipped_pending)
            skipped_pending.clear()
        if progress:
            progress(state)
    except BaseException:
        # Whatever was committed is saved to the FAISS file too, even after Ctrl-C. Should that
        # fail as well (a full disk), the next open rebuilds it from SQLite; the first error is
        # the one to report.
        with contextlib.suppress(Exception):
            store.save_vector_index()
        raise
    store.save_vector_index()
    report.embedded = state.embedded
    report.seconds = time.perf_counter() - started
    report.total = store.count()
    return report


def _map_bounded(
    fn: Callable[[Path], _Decoded], items: list[Path], workers: int | None, ahead: int
) -> Iterator[tuple[Path, _Decoded | ImageError]]:
    """``(item, fn(item))`` in order, computed in threads with at most ``ahead`` in flight.
    ImageError is returned, not raised."""
    workers = workers or min(4, os.cpu_count() or 1)
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgindex-decode") as pool:
        futures: dict[int, cf.Future[_Decoded]] = {}
        try:
            for i in range(min(ahead, len(items))):
                futures[i] = pool.submit(fn, items[i])
            for i, item in enumerate(items):
                nxt = i + ahead
                if nxt < len(items):
                    futures[nxt] = pool.submit(fn, items[nxt])
                try:
                    yield item, futures.pop(i).result()
                except ImageError as exc:
                    yield item, exc
        finally:
            for future in futures.values():
                future.cancel()
