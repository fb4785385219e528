"""Files to vectors to the index: walk -> read, hash, decode (threads) -> batch by shape -> embed
-> commit, with progress. What to do with each file (the sync rules that make a re-run cheap,
summed up below) is the planner's decision (:mod:`imgindex.planner`); this module carries it out.

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
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgindex import photos
from imgindex.catalog import FileState, NewImage, SkippedFile
from imgindex.decode import (
    DEFAULT_MAX_PIXELS,
    decode_image_bytes,
    decode_photo,
    device_decodable_jpeg,
    orient,
    pillow_block_cache,
    read_facts,
    read_file,
)
from imgindex.errors import DamagedIndexError, ImageError, ImgIndexError
from imgindex.files import is_gone, path_text, resolve_roots, walk_images
from imgindex.formats import MissingSupport
from imgindex.photofacts import PhotoFacts
from imgindex.planner import SyncPlanner, under
from imgindex.store import Store

if TYPE_CHECKING:
    import torch

    from imgindex.model import PendingVectors, Vectorizer
    from imgindex.preprocessing import Preprocessing

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
    loading_model: bool = False  # the network is being loaded (nothing is embedded meanwhile)
    model_seconds: float = 0.0  # time spent loading it
    engine: str = "local"  # or "ray" (see imgindex.distributed)
    actors: int = 0  # Ray engine: embedding actors that returned results lately
    # Images embedded while the start-up was timed (the Ray engine's first results, which came
    # with its actors' start): left out of the rate, as that time is.
    unclocked: int = 0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def images_per_second(self) -> float:
        """Embedding rate, not counting the time the model took to load."""
        seconds = self.elapsed - self.model_seconds
        images = self.embedded - self.unclocked
        return images / seconds if seconds > 0 and not self.loading_model else 0.0


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
    notes: list[str] = field(default_factory=list)  # for information (a root given twice)
    # Of the skipped files, those skipped by an earlier build and unchanged since: not read.
    skipped_unchanged: int = 0
    # A dry run changes nothing; it lists the files a build would read and the entries whose
    # files are gone (a build removes them, but for moved files, which keep theirs).
    dry_run: bool = False
    to_read: list[str] = field(default_factory=list)
    to_remove: list[str] = field(default_factory=list)
    unclocked: int = 0  # of the embedded, those not in the rate (see Progress.unclocked)
    facts_filled: int = 0  # images indexed before photo facts were kept, now read for them

    @property
    def images_per_second(self) -> float:
        """Embedding rate, not counting the time to load the model (so a new index, which
        loads it before the build, and an existing one, which loads it during, compare)."""
        starting = ("loading the model", "starting the cluster")
        seconds = self.seconds - sum(self.stage_seconds.get(s, 0.0) for s in starting)
        return (self.embedded - self.unclocked) / seconds if seconds > 0 else 0.0

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
            "notes": self.notes,
            "skipped_unchanged": self.skipped_unchanged,
            "facts_filled": self.facts_filled,
            **(
                {"dry_run": True, "to_read": self.to_read, "to_remove": self.to_remove}
                if self.dry_run
                else {}
            ),
        }


ProgressCallback = Callable[[Progress], None]

# The building thread's time, by stage (BuildReport.stage_seconds), in this order.
STAGES = (
    "loading the model",  # the weights, only when some file needs reading
    "reading",  # reading, decoding, resizing; with reading threads, waiting for them
    "decoding on the device",  # JPEGs decoded where the network runs (--decode device)
    "network",  # starting batches and waiting for their vectors
    "storing",  # committing vectors and metadata to SQLite and FAISS
    # The Ray engine (imgindex.distributed): starting or joining the cluster and loading the
    # network in its actors, then waiting for the cluster's results.
    "starting the cluster",
    "reading and embedding on the cluster",
)


# Decode JPEGs on the device in batches of at most this many pixels (600 MB as RGB).
JPEG_BATCH_PIXELS = 200_000_000


@dataclass
class _Read:
    """A file read by a worker: its facts, and its pixels ready for the network unless its
    content is already in the index (then ``tensor`` is None and nothing was decoded)."""

    image: NewImage
    tensor: torch.Tensor | None
    jpeg: bytes | None = None  # a JPEG left for the network's device to decode
    orientation: int = 1  # its EXIF orientation


_Outcome = tuple[Path, "_Read | ImageError"]  # a file, and what reading it gave


def build(
    store: Store,
    vectorizer: Vectorizer | Callable[[], Vectorizer],
    roots: Iterable[str | os.PathLike[str]],
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    max_pixels: int | None = None,
    remove_missing: bool = True,
    decode: str = "cpu",
    retry_skipped: bool = False,
    dry_run: bool = False,
    keep_gps: bool = False,
) -> BuildReport:
    """Bring the index up to date with the images under ``roots``. See the module docstring.
    ``decode="device"`` leaves JPEGs to the network's device (nvJPEG on a GPU), in batches.
    A file skipped by an earlier build is read again only if its size or times changed, or
    with ``retry_skipped``. With ``dry_run``, nothing is read or written: the report lists
    what a build would read and which entries' files are gone.
    ``vectorizer`` may be a function that makes one: it is then called only if some file needs
    reading, so a build that finds nothing changed does not load the model."""
    if decode not in ("cpu", "device"):
        raise ValueError(f"decode must be 'cpu' or 'device', not {decode!r}")
    return _Build(store, vectorizer, progress, max_pixels, decode == "device", keep_gps).run(
        roots, workers, remove_missing, retry_skipped, dry_run
    )


class _Build:
    def __init__(
        self,
        store: Store,
        vectorizer: Vectorizer | Callable[[], Vectorizer],
        progress: ProgressCallback | None,
        max_pixels: int | None,
        decode_on_device: bool = False,
        keep_gps: bool = False,
    ):
        self.store = store
        self.keep_gps = keep_gps  # GPS positions are personal data: stored only when asked
        self.decode_on_device = decode_on_device
        self.jpegs: list[_Read] = []  # read, waiting for a batch decode on the device
        self._vectorizer_source = vectorizer
        self.progress = progress
        self._max_pixels = max_pixels
        self.report = BuildReport()
        self.state = Progress(total=0)
        self.skips_to_record: list[SkippedFile] = []
        self.plan = SyncPlanner({})  # made from the index's entries when the build runs
        # Content waiting in a batch -> later files with the same content, to copy its vector.
        self.twins_waiting: dict[str, list[_Read]] = {}
        # The batch being embedded (on a GPU, maybe still computing), stored after the next.
        self.started: tuple[list[_Read], PendingVectors] | None = None

    @functools.cached_property
    def vectorizer(self) -> Vectorizer:
        source = self._vectorizer_source
        if not callable(source):
            return source
        self.state.loading_model = True
        self._notify()
        loading = time.perf_counter()
        try:
            with self._timed("loading the model"):
                return source()
        finally:
            self.state.loading_model = False
            self.state.model_seconds += time.perf_counter() - loading

    @functools.cached_property
    def max_pixels(self) -> int:
        return self._max_pixels if self._max_pixels is not None else self.vectorizer.max_pixels

    # -- the plan ---------------------------------------------------------------------------

    def run(
        self,
        roots: Iterable[str | os.PathLike[str]],
        workers: int | None,
        remove_missing: bool,
        retry_skipped: bool = False,
        dry_run: bool = False,
    ) -> BuildReport:
        started = time.perf_counter()
        given = [Path(os.path.abspath(r)) for r in roots]
        roots, self.report.notes = resolve_roots(given)
        skipped_before = {} if retry_skipped else self.store.skipped_states()
        self.plan = SyncPlanner.of_rows(self.store.file_rows(), skipped_before, remove_missing)
        try:
            walked = list(walk_images(roots, on_error=self._walking_error))
        except FileNotFoundError as exc:
            raise ImgIndexError(str(exc)) from None
        walked_raw = {os.fsencode(p) for p in walked}
        todo = [p for p in walked if not self.plan.unchanged(p) and not self._still_skipped(p)]
        # Entries may also lie under a root as given (through a link, indexed so by an older
        # imgindex): those are looked at too, and moved to the resolved names.
        looked_at = roots + [r for r in given if r not in roots]
        self.plan.find_gone(looked_at, walked_raw)
        self.report.warnings += self.plan.warnings
        if dry_run:
            self.report.dry_run = True
            self.report.to_read = [path_text(p) for p in todo]
            if remove_missing:
                self.report.to_remove = self.plan.gone_texts()
            return self._finished(started)
        self.state = Progress(total=len(todo))
        self._notify()
        try:
            self._process(todo, workers)
            # Files skipped since the last commit (or while walking, when nothing needed reading).
            if self.skips_to_record:
                self.store.record_skipped(self.skips_to_record)
                self.skips_to_record.clear()
            if remove_missing and self.plan.gone:
                self.report.removed = self.store.remove(self.plan.gone)
            self._forget_vanished_skips(looked_at, walked_raw)
            self._fill_in_facts(walked_raw)
        except BaseException:
            # Whatever was committed is saved to the FAISS file too, even after Ctrl-C. Should
            # that fail as well (a full disk), the next open reconciles the old file with
            # SQLite; the first error is the one to report.
            with contextlib.suppress(Exception):
                self.store.save_vector_index()
            raise
        self.store.save_vector_index()
        self.report.embedded = self.state.embedded
        self.report.unclocked = self.state.unclocked
        return self._finished(started)

    def _finished(self, started: float) -> BuildReport:
        """The report, with the planner's counts."""
        counts = self.plan.counts
        for name in ("added", "updated", "renamed", "unchanged", "reused", "skipped_unchanged"):
            setattr(self.report, name, getattr(counts, name))
        self.report.seconds = time.perf_counter() - started
        self.report.total = self.store.count()
        return self.report

    def _still_skipped(self, path: Path) -> bool:
        """Whether ``path`` was skipped before and would fail the same way now (see the
        planner): reported again without being read."""
        reason = self.plan.still_skipped(path, self._read_limit)
        if reason is None:
            return False
        self.report.skipped.append(Skipped(path_text(path), reason))
        return True

    def _walking_error(self, folder: Path, reason: str) -> None:
        """A folder walking could not list (or did not follow): skipped, and the entries under
        it are kept, since what it holds is not known."""
        self.plan.unlisted.append(folder)
        self.skip(folder, reason)

    def _fill_in_facts(self, walked: set[bytes]) -> None:
        """Read the photo facts of the images found here that an older imgindex indexed
        without them: each file is read again, but nothing is embedded (and for most formats
        nothing decoded). A file that cannot be read now keeps its entry, without facts, until
        a later build."""
        todo = [(i, raw) for i, raw in photos.missing(self.store.db) if raw in walked]
        short_side = self.store.fingerprint()["preprocessing"].get("short_side", 350)
        found: dict[int, PhotoFacts] = {}
        for image_id, raw in todo:
            name = os.fsdecode(raw)
            # Whatever fails (an unreadable file, a surprise from a decoder) leaves it without
            # facts until a later build; it must not fail this one, which has committed.
            with contextlib.suppress(Exception):
                data, _st = read_file(Path(name), self._read_limit)
                found[image_id] = self._kept(read_facts(data, name, short_side))
            if len(found) >= 1000:
                self.store.save_facts(found)
                self.report.facts_filled += len(found)
                found = {}
        if found:
            self.store.save_facts(found)
            self.report.facts_filled += len(found)

    def _forget_vanished_skips(self, roots: list[Path], walked: set[bytes]) -> None:
        vanished = [
            raw
            for text, raw, _reason in self.store.skipped_files()
            if raw not in walked and under(text, roots) and is_gone(raw)
        ]
        if vanished:
            self.store.forget_skipped(vanished)

    # -- reading (worker threads) -----------------------------------------------------------

    def read(self, path: Path, known_shas: frozenset[str], force_decode: bool = False) -> _Read:
        """Read, hash and (unless its content is stored) decode one file. Raises ImageError
        with the reason, and the file's status if it was opened (``stat``)."""
        known = frozenset() if force_decode else known_shas
        return read_image(
            path, known, self._read_limit, functools.partial(self._prepare, force_decode)
        )

    def _prepare(
        self, force_decode: bool, path: Path, data: bytes, sha: str, st: os.stat_result
    ) -> _Read:
        """A read file's pixels ready for the network (or a JPEG left for its device)."""
        name = os.fsdecode(path)
        if self.decode_on_device and not force_decode:
            header = device_decodable_jpeg(data, name, self.max_pixels)
            if header is not None:
                w, h = header.width, header.height
                w, h = (h, w) if header.orientation >= 5 else (w, h)
                facts = self._kept(read_facts(data, name))
                image = NewImage(path, sha, len(data), st.st_mtime, w, h, facts)
                return _Read(image, None, data, header.orientation)
        vectorizer = self.vectorizer
        return decoded_read(path, data, sha, st, self.max_pixels, vectorizer.preprocessing,
                            vectorizer.resize, self.keep_gps)  # fmt: skip

    def _kept(self, facts: PhotoFacts) -> PhotoFacts:
        """``facts`` as the index keeps them: without GPS unless the build was told to keep it."""
        return facts if self.keep_gps else facts.without_gps()

    @property
    def _read_limit(self) -> int:
        """The pixel limit a file is read under: hashing a moved file needs no model, so its
        limit is known without loading one unless only the model knows it."""
        if self._max_pixels is not None:
            return self._max_pixels
        return self.max_pixels if self._model_loaded() else DEFAULT_MAX_PIXELS

    # -- the main loop ----------------------------------------------------------------------

    def _process(self, todo: list[Path], workers: int | None) -> None:
        if not todo:
            return
        known_shas = self.plan.known_shas()
        if not self._model_loaded() and self.plan.may_all_be_stored(todo):
            # Every file has the size of a stored one: perhaps all moved or were copied. They
            # are hashed in this thread first; the model loads only if one of them needs
            # embedding after all.
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
                self.skip(path, outcome.reason, outcome.stat)
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
                self._skip_twins(read.image.sha256, exc.reason)
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
            self.skip(path, exc.reason, exc.stat)
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
        """Index ``read`` without embedding it if the planner says its content is stored (and
        the stored vector is sound). Returns whether it did."""
        image = read.image
        decision = self.plan.decide(image.path, image.sha256)
        if decision.action == "touched":
            self.store.touch(decision.entry, image)
            self.plan.touched(decision.entry, image)
            return True
        source = self.store.get(decision.entry) if decision.action != "embed" else None
        if source is None:
            return False
        image = NewImage(
            image.path, image.sha256, image.size, image.mtime, source.width, source.height
        )
        if decision.action == "renamed":
            self.store.rename(source.id, image)
            self.plan.moved(decision, image)
        else:
            stored = photos.of(self.store.db, [source.id]).get(source.id)
            image = replace(image, facts=None if stored is None else self._kept(stored))
            try:
                new_id = self.store.copy(source.id, image)
            except DamagedIndexError:
                return False  # its stored vector is damaged: embed this file instead
            self.plan.added(new_id, image, copied=True)
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
        """Store the batch whose embedding was started last, if any. An image whose vector is
        not finite (weights that give NaN for some input) is skipped, not stored."""
        if self.started is None:
            return
        items, pending = self.started
        self.started = None
        with self._timed("network"):
            vectors = pending.result()
        finite = np.isfinite(vectors).all(axis=1)
        for read in (r for r, ok in zip(items, finite, strict=True) if not ok):
            self.skip(read.image.path, "the network gave NaN or infinite numbers for it")
            self._skip_twins(read.image.sha256, "the network gave NaN or infinite numbers")
        items = [r for r, ok in zip(items, finite, strict=True) if ok]
        images = [r.image for r in items]
        with self._timed("storing"):
            new_ids = self.store.write_batch(images, vectors[finite], self.skips_to_record)
        self.skips_to_record.clear()
        for image, new_id in zip(images, new_ids, strict=True):
            self.plan.added(new_id, image)
        self.state.embedded += len(items)
        self.state.done += int(finite.size)
        with self._timed("storing"):
            self._after_commit()
        for image in images:
            for twin in self.twins_waiting.pop(image.sha256, []):
                if not self._reuse(twin):  # cannot happen: the twin was just stored
                    self.skip(twin.image.path, "internal error: its twin's vector was not found")
                self.state.done += 1

    def _skip_twins(self, sha: str, reason: str) -> None:
        """Skip the files waiting for the vector of content ``sha``, which will not come."""
        for twin in self.twins_waiting.pop(sha, []):
            self.skip(twin.image.path, reason)
            self.state.done += 1

    def _after_commit(self) -> None:
        self.store.save_vector_index_every(SAVE_EVERY_SECONDS)

    def skip(self, path: Path, reason: str, stat: os.stat_result | None = None) -> None:
        """Report ``path`` as skipped and record it, with its status when it was read (a
        later build reads it again only once that changes)."""
        self.report.skipped.append(Skipped(path_text(path), reason))
        state = FileState.of(stat) if stat is not None else None
        self.skips_to_record.append((path, reason, state, self._read_limit))

    def _notify(self) -> None:
        if self.progress is not None and self.state.total:
            self.progress(self.state)


def decoded_read(
    path: Path,
    data: bytes,
    sha: str,
    st: os.stat_result,
    max_pixels: int,
    preprocessing: Preprocessing,
    resize: Callable[[Any, str], Any],
    keep_gps: bool,
) -> _Read:
    """A read file decoded on the CPU (:func:`~imgindex.decode.decode_photo`, under
    ``max_pixels`` and the preset's sizes) and resized for the network by ``resize``, with its
    photo facts (GPS only with ``keep_gps``)."""
    name = os.fsdecode(path)
    photo = decode_photo(data, name, max_pixels, preprocessing.draft_to, preprocessing.short_side)
    facts = photo.facts if keep_gps else photo.facts.without_gps()
    height, width = photo.pixels.shape[:2]
    image = NewImage(path, sha, len(data), st.st_mtime, width, height, facts)
    return _Read(image, resize(photo.pixels, name))


def read_image(
    path: Path,
    known_shas: Container[str],
    read_limit: int,
    prepare: Callable[[Path, bytes, str, os.stat_result], _Read],
) -> _Read:
    """Read and hash one file under ``read_limit`` pixels. A file whose content is in
    ``known_shas`` is not decoded (its dimensions come from the entry with that content);
    another is handed to ``prepare(path, data, sha256, status)``. Raises ImageError with the
    reason, and the file's status once it was opened (``stat``); any other error from a decoder
    becomes an ImageError too, so that it cannot stop a build."""
    name = os.fsdecode(path)
    st = None
    try:
        data, st = read_file(path, read_limit)
        sha = hashlib.sha256(data).hexdigest()
        if sha in known_shas:
            return _Read(NewImage(path, sha, len(data), st.st_mtime, 0, 0), None)
        return prepare(path, data, sha, st)
    except ImageError as exc:
        if not isinstance(exc, MissingSupport):  # (read again once the extra is installed)
            exc.stat = exc.stat or st
        raise
    except Exception as exc:
        error = ImageError(name, f"unexpected error ({type(exc).__name__}: {exc})")
        error.stat = st
        raise error from exc


def default_workers(device: str) -> int:
    """Reading threads for a build on ``device``.

    On a CPU the network already keeps every core busy, and a reading thread running beside it
    stalls its parallel convolutions far more than the reading costs (benchmarks/ingest.py
    measures both), so files are read in between forward passes (0 threads). A GPU leaves the
    cores free for reading ahead, and a fast GPU needs most of the host's cores decoding to
    keep it fed.
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
    """Run PyTorch's CPU operations single-threaded while reading threads work beside a GPU:
    a parallel region as wide as the machine, started by the building thread's CPU tensor work
    (assembling batches) while the readers hold the cores, would spin against them. The
    network is on the GPU, so nothing else needs the CPU pool meanwhile."""
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
