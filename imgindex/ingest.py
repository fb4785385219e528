"""Files to vectors to the index: walk -> read, hash, decode (threads) -> batch by shape -> embed
-> commit, with progress. Also the sync rules that make a re-run cheap.

Reading, hashing, decoding and resizing run in a thread pool (file I/O, hashlib, Pillow and
PyTorch release the GIL) while the main thread embeds and writes. Images are batched only with
images of the same resized shape, so every vector is the one a one-by-one call would give.

Each embedded batch is committed to SQLite in its own transaction (with the files skipped so
far), so an interrupted build keeps everything committed before the interruption and a re-run
picks up where it stopped. A re-run of the same folders:

* does not open files whose size and modification time are unchanged;
* does not embed a file whose content hash is already in the index: a file that moved (its old
  path is gone, even from outside the folders given: a renamed top folder) keeps its id and
  vector under the new path ("renamed"), a copy gets a new entry with the stored vector, a file
  merely touched keeps its entry;
* removes the entries of files that no longer exist under the folders given (unless told to keep
  them). A file that exists but could not be read this time keeps its earlier entry.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import hashlib
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from imgindex.decode import (
    decode_image_bytes,
    device_decodable_jpeg,
    orient,
    pillow_block_cache,
    read_file,
)
from imgindex.errors import ImageError, ImgIndexError
from imgindex.files import is_under, walk_images
from imgindex.store import NewImage, Store, path_text

if TYPE_CHECKING:
    import torch

    from imgindex.model import PendingVectors, Vectorizer

# A long build saves its FAISS file this often, so that opening the index after a crash has
# little to reconcile; the save itself is atomic.
SAVE_EVERY_SECONDS = 300.0


@dataclass(frozen=True)
class Skipped:
    """A file that was not indexed, and why."""

    path: str
    reason: str


@dataclass
class Progress:
    """Where a build stands; passed to the progress callback as files are processed."""

    total: int  # files to read in this build (files with unchanged size and time excluded)
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
    updated: int = 0  # known paths whose content changed
    renamed: int = 0  # files that moved: same content at a new path, old path gone
    removed: int = 0  # entries of files that no longer exist
    unchanged: int = 0  # known paths with the same size and time, or the same content
    skipped: list[Skipped] = field(default_factory=list)
    embedded: int = 0  # images run through the network
    reused: int = 0  # new entries that got an already stored vector (copies, renames)
    seconds: float = 0.0
    total: int = 0  # images in the index afterwards
    # Where the building thread spent its time: see STAGES.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # nothing failed, but look

    @property
    def images_per_second(self) -> float:
        """Embedding rate, not counting the time to load the model (so a new index, which
        loads it before the build, and an existing one, which loads it during, compare)."""
        seconds = self.seconds - self.stage_seconds.get("loading the model", 0.0)
        return self.embedded / seconds if seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "renamed": self.renamed,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "embedded": self.embedded,
            "reused": self.reused,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "total": self.total,
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "warnings": self.warnings,
        }


ProgressCallback = Callable[[Progress], None]

# The building thread's time, by stage (BuildReport.stage_seconds), in this order.
STAGES = (
    "loading the model",  # the weights, only when some file needs reading
    "reading",  # reading, decoding, resizing; with reading threads, waiting for them
    "decoding on the device",  # JPEGs decoded where the network runs (--decode device)
    "network",  # starting batches and waiting for their vectors
    "storing",  # committing vectors and metadata to SQLite and FAISS
)


# Decode JPEGs on the device in batches of at most this many pixels (600 MB as RGB).
JPEG_BATCH_PIXELS = 200_000_000


class _Row(NamedTuple):
    id: int
    raw: bytes
    size: int
    mtime: float
    sha: str


@dataclass
class _Read:
    """A file read by a worker: its facts, and its pixels ready for the network unless its
    content is already in the index (then ``tensor`` is None and nothing was decoded)."""

    image: NewImage
    tensor: torch.Tensor | None
    jpeg: bytes | None = None  # a JPEG left for the network's device to decode
    orientation: int = 1  # its EXIF orientation


_Outcome = tuple[Path, "_Read | ImageError"]  # a file, and what reading it gave


def _is_empty_folder(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False  # not a folder, or not listable (walking reported that)


def build(
    store: Store,
    vectorizer: Vectorizer | Callable[[], Vectorizer],
    roots: Iterable[str | os.PathLike[str]],
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    max_pixels: int | None = None,
    remove_missing: bool = True,
    decode: str = "cpu",
) -> BuildReport:
    """Bring the index up to date with the images under ``roots``. See the module docstring.
    ``decode="device"`` leaves JPEGs to the network's device (nvJPEG on a GPU), in batches.
    ``vectorizer`` may be a function that makes one: it is then called only if some file needs
    reading, so a build that finds nothing changed does not load the model."""
    if decode not in ("cpu", "device"):
        raise ValueError(f"decode must be 'cpu' or 'device', not {decode!r}")
    return _Build(store, vectorizer, progress, max_pixels, decode == "device").run(
        roots, workers, remove_missing
    )


class _Build:
    def __init__(
        self,
        store: Store,
        vectorizer: Vectorizer | Callable[[], Vectorizer],
        progress: ProgressCallback | None,
        max_pixels: int | None,
        decode_on_device: bool = False,
    ):
        self.store = store
        self.decode_on_device = decode_on_device
        self.jpegs: list[_Read] = []  # read, waiting for a batch decode on the device
        self._vectorizer_source = vectorizer
        self.progress = progress
        self._max_pixels = max_pixels
        self.report = BuildReport()
        self.state = Progress(total=0)
        self.skips_to_record: list[tuple[Path, str]] = []
        self.remove_missing = True
        self.known: dict[str, _Row] = {}
        self.by_sha: dict[str, set[int]] = {}
        self.gone: dict[int, str] = {}  # id -> path of entries whose file no longer exists
        # Content waiting in a batch -> later files with the same content, to copy its vector.
        self.twins_waiting: dict[str, list[_Read]] = {}
        # The batch being embedded (on a GPU, maybe still computing), stored after the next.
        self.started: tuple[list[_Read], PendingVectors] | None = None

    @functools.cached_property
    def vectorizer(self) -> Vectorizer:
        source = self._vectorizer_source
        if not callable(source):
            return source
        with self._timed("loading the model"):
            return source()

    @functools.cached_property
    def max_pixels(self) -> int:
        return self._max_pixels if self._max_pixels is not None else self.vectorizer.max_pixels

    # -- the plan ---------------------------------------------------------------------------

    def run(
        self, roots: Iterable[str | os.PathLike[str]], workers: int | None, remove_missing: bool
    ) -> BuildReport:
        started = time.perf_counter()
        self.remove_missing = remove_missing
        roots = [Path(os.path.abspath(r)) for r in roots]
        for row in self.store.file_rows():
            image_id, text, raw, size, mtime, sha = row
            self.known[text] = _Row(image_id, raw, size, mtime, sha)
            self.by_sha.setdefault(sha, set()).add(image_id)
        try:
            walked = list(walk_images(roots, on_error=self.skip))
        except FileNotFoundError as exc:
            raise ImgIndexError(str(exc)) from None
        walked_texts = {path_text(p) for p in walked}
        todo = [p for p in walked if not self._unchanged(p)]
        self._find_gone(roots, walked_texts)
        self.state = Progress(total=len(todo))
        self._notify()
        try:
            self._process(todo, workers)
            # Files skipped since the last commit (or while walking, when nothing needed reading).
            if self.skips_to_record:
                self.store.record_skipped(self.skips_to_record)
                self.skips_to_record.clear()
            if remove_missing and self.gone:
                self.report.removed = self.store.remove(self.gone)
            self._forget_vanished_skips(roots, walked_texts)
        except BaseException:
            # Whatever was committed is saved to the FAISS file too, even after Ctrl-C. Should
            # that fail as well (a full disk), the next open reconciles the old file with
            # SQLite; the first error is the one to report.
            with contextlib.suppress(Exception):
                self.store.save_vector_index()
            raise
        self.store.save_vector_index()
        self.report.embedded = self.state.embedded
        self.report.seconds = time.perf_counter() - started
        self.report.total = self.store.count()
        return self.report

    def _unchanged(self, path: Path) -> bool:
        row = self.known.get(path_text(path))
        if row is None:
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False  # reading it will say why
        if (st.st_size, st.st_mtime) != (row.size, row.mtime):
            return False
        self.report.unchanged += 1
        return True

    def _find_gone(self, roots: list[Path], walked: set[str]) -> None:
        """Entries under ``roots`` whose files no longer exist. A file that exists but was not
        walked (in a folder that could not be listed, say) is not gone. Nor are the entries
        under a root folder that is empty: more likely a drive not mounted than a collection
        deleted, and re-embedding it all would take long."""
        for text, row in self.known.items():
            if text not in walked and _under(text, roots) and not os.path.lexists(row.raw):
                self.gone[row.id] = text
        for root in roots:
            if not _is_empty_folder(root):
                continue
            kept = [i for i, text in self.gone.items() if _under(text, [root])]
            for image_id in kept:
                del self.gone[image_id]
            if kept:
                self.report.warnings.append(
                    f"{path_text(root)} is empty, but {len(kept)} indexed images were in it; "
                    "they are kept (is a drive not mounted?). To drop them: imgindex remove "
                    f"{path_text(root)}"
                )

    def _forget_vanished_skips(self, roots: list[Path], walked: set[str]) -> None:
        vanished = [
            text
            for text, raw, _reason in self.store.skipped_files()
            if text not in walked and _under(text, roots) and not os.path.lexists(raw)
        ]
        if vanished:
            self.store.forget_skipped(vanished)

    # -- reading (worker threads) -----------------------------------------------------------

    def read(self, path: Path, known_shas: frozenset[str], force_decode: bool = False) -> _Read:
        name = os.fsdecode(path)
        try:
            data, st = read_file(path)
            sha = hashlib.sha256(data).hexdigest()
            if sha in known_shas and not force_decode:
                image = NewImage(path, sha, len(data), st.st_mtime, 0, 0)
                return _Read(image, None)  # dimensions come from the entry with this content
            if self.decode_on_device and not force_decode:
                header = device_decodable_jpeg(data, name, self.max_pixels)
                if header is not None:
                    w, h = header.width, header.height
                    w, h = (h, w) if header.orientation >= 5 else (w, h)
                    image = NewImage(path, sha, len(data), st.st_mtime, w, h)
                    return _Read(image, None, data, header.orientation)
            pixels = decode_image_bytes(
                data, name, self.max_pixels, self.vectorizer.preprocessing.draft_to
            )
            image = NewImage(path, sha, len(data), st.st_mtime, pixels.shape[1], pixels.shape[0])
            return _Read(image, self.vectorizer.preprocessing.resize(pixels, name))
        except ImageError:
            raise
        except Exception as exc:  # a surprise from a decoder must not stop the build
            raise ImageError(name, f"unexpected error ({type(exc).__name__}: {exc})") from exc

    # -- the main loop ----------------------------------------------------------------------

    def _process(self, todo: list[Path], workers: int | None) -> None:
        if not todo:
            return
        known_shas = frozenset(self.by_sha)
        if not self._model_loaded() and self._may_all_be_stored(todo):
            # Every file has the size of a stored one: perhaps all moved or were copied. They
            # are hashed in this thread first; the model loads (about 5 s) only if one of them
            # needs embedding after all.
            self._consume(_map_bounded(lambda p: self.read(p, known_shas), todo, 0, 1))
            return
        self.max_pixels  # noqa: B018 - loads the model here, before reading threads ask for it
        if workers is None:
            workers = default_workers(self.vectorizer.device)
        ahead = 4 * self.vectorizer.batch_size
        with (
            _one_thread_per_reader(workers > 0 and self.vectorizer.device != "cpu"),
            # Up to 3 blocks per picture being decoded (a 12 MP one is 48 MB as Pillow holds it).
            pillow_block_cache(3 * max(1, workers) + 2),
        ):
            self._consume(_map_bounded(lambda p: self.read(p, known_shas), todo, workers, ahead))

    def _model_loaded(self) -> bool:
        return "vectorizer" in self.__dict__ or not callable(self._vectorizer_source)

    def _may_all_be_stored(self, todo: list[Path]) -> bool:
        sizes = {row.size for row in self.known.values()}
        try:
            return all(os.stat(path).st_size in sizes for path in todo)
        except OSError:
            return False

    @contextlib.contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = self.report.stage_seconds.get(stage, 0.0) + time.perf_counter() - started
            self.report.stage_seconds[stage] = spent

    def _timed_reads(self, results: Iterable[_Outcome]) -> Iterator[_Outcome]:
        iterator = iter(results)
        while True:
            with self._timed("reading"):
                item = next(iterator, None)
            if item is None:
                return
            yield item

    def _consume(self, results: Iterator[_Outcome]) -> None:
        # (The model is asked for only once something waits to be embedded: see _process.)
        buckets: dict[tuple[int, ...], list[_Read]] = defaultdict(list)
        pending = 0
        for path, outcome in self._timed_reads(results):
            if isinstance(outcome, ImageError):
                self.skip(path, outcome.reason)
                self.state.done += 1
            elif self._reuse(outcome):
                self.state.done += 1
            elif outcome.image.sha256 in self.twins_waiting:
                # The same content is already waiting to be embedded: copy its vector later.
                self.twins_waiting[outcome.image.sha256].append(outcome)
            elif outcome.jpeg is not None:
                self.twins_waiting[outcome.image.sha256] = []
                self.jpegs.append(outcome)
                pending += 1
                # A batch, or fewer very large pictures (their pixels all land on the device).
                pixels = sum(r.image.width * r.image.height for r in self.jpegs)
                if len(self.jpegs) >= self.vectorizer.batch_size or pixels >= JPEG_BATCH_PIXELS:
                    pending -= self._decode_jpegs(buckets)
            elif outcome.tensor is None:
                # Its only twin was replaced earlier in this build: embed it after all.
                self._queue_alone(path, buckets)
                pending += 1
            else:
                buckets[self.vectorizer.group_key(outcome.tensor)].append(outcome)
                self.twins_waiting[outcome.image.sha256] = []
                pending += 1
            shape = (
                self._full_bucket(buckets, self.vectorizer.batch_size, pending) if pending else None
            )
            if shape is not None:
                pending -= len(buckets[shape])
                self._embed(buckets.pop(shape))
            self._notify()
        if self.jpegs:
            self._decode_jpegs(buckets)
        for shape in list(buckets):
            self._embed(buckets.pop(shape))
        self._store_started()
        self._notify()

    def _decode_jpegs(self, buckets: dict[tuple[int, ...], list[_Read]]) -> int:
        """Decode the waiting JPEGs in one batch on the network's device, resize them there and
        put them in their buckets. Returns how many failed (they are skipped with a reason)."""
        with self._timed("decoding on the device"):
            return self._decode_jpegs_now(buckets)

    def _decode_jpegs_now(self, buckets: dict[tuple[int, ...], list[_Read]]) -> int:
        import torch

        ImageReadMode, decode_jpeg = _torchvision_decoder()
        items, self.jpegs = self.jpegs, []
        device = self.vectorizer.device
        data = [torch.frombuffer(bytearray(r.jpeg or b""), dtype=torch.uint8) for r in items]
        try:
            decoded: list[Any] = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except Exception:  # one file the decoder refuses fails the batch: decode each alone
            decoded = [None] * len(items)
        failed = 0
        for read, pixels, one in zip(items, decoded, data, strict=True):
            name = os.fsdecode(read.image.path)
            try:
                upright = self._upright(read, pixels, one, name)
                read.tensor = self.vectorizer.preprocessing.resize(upright, name)
            except ImageError as exc:
                failed += 1
                self.skip(read.image.path, exc.reason)
                self.state.done += 1
                for twin in self.twins_waiting.pop(read.image.sha256, []):
                    self.skip(twin.image.path, exc.reason)
                    self.state.done += 1
                continue
            read.jpeg = None
            buckets[self.vectorizer.group_key(read.tensor)].append(read)
        return failed

    def _upright(self, read: _Read, pixels: Any, data: Any, name: str) -> Any:
        """Upright ``H x W x 3`` pixels of a JPEG: as decoded in the batch, else decoded alone on
        the device, else (a JPEG the device decoder refuses) by Pillow on the CPU, which also
        gives the reason when the file is broken."""
        import torch

        ImageReadMode, decode_jpeg = _torchvision_decoder()
        if pixels is None:
            try:
                pixels = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.vectorizer.device)
            except Exception:
                rgb = decode_image_bytes(read.jpeg or b"", name, self.max_pixels, None)
                return torch.from_numpy(rgb.copy()).to(self.vectorizer.device)
        return orient(pixels.permute(1, 2, 0), read.orientation)

    def _queue_alone(self, path: Path, buckets: dict[tuple[int, ...], list[_Read]]) -> None:
        try:
            again = self.read(path, frozenset(), force_decode=True)
        except ImageError as exc:
            self.skip(path, exc.reason)
            return
        buckets[self.vectorizer.group_key(again.tensor)].append(again)
        self.twins_waiting[again.image.sha256] = []

    @staticmethod
    def _full_bucket(
        buckets: dict[tuple[int, ...], list[_Read]], batch_size: int, pending: int
    ) -> tuple[int, ...] | None:
        """The bucket to embed now: a full one, or the fullest when too many images wait (to
        bound memory when many shapes are in flight)."""
        if not buckets:
            return None
        shape = max(buckets, key=lambda s: len(buckets[s]))
        if len(buckets[shape]) >= batch_size or pending >= 2 * batch_size:
            return shape
        return None

    def _reuse(self, read: _Read) -> bool:
        """Index ``read`` without embedding it if its content is already stored. Returns
        whether it did."""
        image = read.image
        text = path_text(image.path)
        here = self.known.get(text)
        if here is not None and here.sha == image.sha256:
            self.store.touch(here.id, image)
            self.known[text] = here._replace(size=image.size, mtime=image.mtime)
            self.report.unchanged += 1
            return True
        twins = self.by_sha.get(image.sha256)
        if not twins:
            return False
        moved = next((i for i in sorted(twins) if i in self.gone), None)
        if moved is None and self.remove_missing:
            # Moved from outside the folders given (a renamed top folder, say): its old file is
            # gone too, and an entry left at that path would only be a stale duplicate.
            moved = next((i for i in sorted(twins) if self._file_is_gone(i)), None)
        source = self.store.get(moved if moved is not None else min(twins))
        if source is None:
            return False
        image = NewImage(
            image.path, image.sha256, image.size, image.mtime, source.width, source.height
        )
        if here is not None:
            self._forget(here)
        if moved is not None:
            self.store.rename(moved, image)
            self.gone.pop(moved, None)
            self.known.pop(source.path, None)
            self._remember(text, moved, image)
            self.report.renamed += 1
        else:
            new_id = self.store.copy(source.id, image)
            self._remember(text, new_id, image)
            self._count_new_or_updated(here)
        self.report.reused += 1
        self._after_commit()
        return True

    def _embed(self, items: list[_Read]) -> None:
        """Start embedding ``items``, then store the batch started before it: on a GPU its
        vectors are ready by then, and the GPU works on this batch while the CPU commits."""
        with self._timed("network"):
            started = self.vectorizer.start_group([r.tensor for r in items])
        self._store_started()
        self.started = items, started

    def _store_started(self) -> None:
        """Store the batch whose embedding was started last, if any."""
        if self.started is None:
            return
        items, pending = self.started
        self.started = None
        with self._timed("network"):
            vectors = pending.result()
        images = [r.image for r in items]
        with self._timed("storing"):
            new_ids = self.store.write_batch(images, vectors, self.skips_to_record)
        self.skips_to_record.clear()
        for image, new_id in zip(images, new_ids, strict=True):
            text = path_text(image.path)
            here = self.known.get(text)
            if here is not None:
                self._forget(here)
            self._remember(text, new_id, image)
            self._count_new_or_updated(here)
        self.state.embedded += len(items)
        self.state.done += len(items)
        with self._timed("storing"):
            self._after_commit()
        for image in images:
            for twin in self.twins_waiting.pop(image.sha256, []):
                if not self._reuse(twin):  # cannot happen: the twin was just stored
                    self.skip(twin.image.path, "internal error: its twin's vector was not found")
                self.state.done += 1

    def _file_is_gone(self, image_id: int) -> bool:
        record = self.store.get(image_id)
        row = self.known.get(record.path) if record is not None else None
        return row is not None and not os.path.lexists(row.raw)

    def _remember(self, text: str, image_id: int, image: NewImage) -> None:
        raw = os.fsencode(image.path)
        self.known[text] = _Row(image_id, raw, image.size, image.mtime, image.sha256)
        self.by_sha.setdefault(image.sha256, set()).add(image_id)

    def _forget(self, row: _Row) -> None:
        """The entry ``row`` was replaced; its vector can no longer be reused."""
        self.by_sha.get(row.sha, set()).discard(row.id)
        self.gone.pop(row.id, None)

    def _count_new_or_updated(self, previous: _Row | None) -> None:
        if previous is None:
            self.report.added += 1
        else:
            self.report.updated += 1

    def _after_commit(self) -> None:
        self.store.save_vector_index_every(SAVE_EVERY_SECONDS)

    def skip(self, path: Path, reason: str) -> None:
        self.report.skipped.append(Skipped(path_text(path), reason))
        self.skips_to_record.append((path, reason))

    def _notify(self) -> None:
        if self.progress is not None and self.state.total:
            self.progress(self.state)


def _under(text: str, roots: list[Path]) -> bool:
    return any(is_under(text, path_text(root)) for root in roots)


def default_workers(device: str) -> int:
    """Reading threads for a build on ``device``.

    On a CPU the network already keeps every core busy, and a reading thread running beside it
    stalls its parallel convolutions far more than the reading costs (about 22 ms per image
    against 4 ms of reading, measured on 2 cores), so files are read in between forward passes
    (0 threads). A GPU leaves the cores free for reading ahead: decoding a 1 MP JPEG takes a
    core about 3 ms, so a GPU embedding 2,000 images/s needs most of a 16-core host's cores.
    """
    return 0 if device == "cpu" else max(1, min(16, (os.cpu_count() or 1) - 2))


def _torchvision_decoder() -> tuple[Any, Any]:
    """torchvision's JPEG decoder (nvJPEG on a GPU). torchvision 0.29 warns that its image
    decoding moves to TorchCodec; the warning says nothing a user of imgindex can act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torchvision.io

    def decode_jpeg(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torchvision.io.decode_jpeg(*args, **kwargs)

    return torchvision.io.ImageReadMode, decode_jpeg


@contextlib.contextmanager
def _one_thread_per_reader(enabled: bool) -> Iterator[None]:
    """Run PyTorch's CPU operations single-threaded while reading threads work beside a GPU.
    When the exact resize ran in torch, every reading thread started a parallel region as wide
    as the machine (14 threads x 16 on a 16-core host) and the threads spun against each other;
    on 2 cores, 2 reading threads read and resized 1 MP JPEGs 22% faster this way. The resize
    now runs in numpy, so what this still keeps narrow is the building thread's CPU tensor work
    (assembling batches) while the readers hold the cores (not measured since). The network is
    on the GPU, so nothing else needs the CPU pool meanwhile."""
    if not enabled:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _map_bounded(
    fn: Callable[[Path], _Read], items: list[Path], workers: int, ahead: int
) -> Iterator[_Outcome]:
    """``(item, fn(item))`` in order, computed in ``workers`` threads with at most ``ahead`` in
    flight (0 workers: in the calling thread, one at a time). ImageError is returned, not
    raised."""
    if workers == 0:
        for item in items:
            try:
                yield item, fn(item)
            except ImageError as exc:
                yield item, exc
        return
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgindex-read") as pool:
        futures: dict[int, cf.Future[_Read]] = {}
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
