"""The Ray engine: a build whose files are read and embedded on a Ray cluster.

The driver (this process) does everything a local build does but the reading and the
embedding: it walks the folders, plans the sync with the same :class:`~imgindex.planner.
SyncPlanner` (a file whose size and time are unchanged is never sent), and commits results in
batches through the same store code, so the index cannot tell which engine made it. The files
to read go through a Ray Data pipeline::

    paths (driver) -> read, hash, decode, resize (CPU tasks) -> embed (actor pool) -> driver

* Each path travels with the content hashes of the stored files of its size: a worker that
  finds one of them (a moved or copied file) returns the hash without decoding, and the driver
  reuses the stored vector, as the local engine does.
* Each actor loads the network once and checks it makes the index's kind of vectors (weights,
  preset, model) before embedding anything. With GPUs in the cluster, one actor per GPU; on CPU
  nodes the reading runs in the actors themselves (Ray Data fuses the two steps when they ask
  for the same resources), as the local engine reads between forward passes on a CPU: a
  reading process beside the network stalls it more than the reading costs.
* Results come back in the order the paths were sent. The driver checks each one (a path it
  sent, not already taken: a retried task's repeat is dropped; the weights that made it; a
  finite vector) and commits batches of them, each in its own transaction, so a killed driver
  leaves a consistent index and the next build embeds only what was not committed.

Workers read the files themselves: the paths must be readable, under the same names, on every
node (a shared filesystem or the same mount everywhere). A file a worker cannot read is skipped
with the reason, as any unreadable file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgindex.catalog import NewImage
from imgindex.decode import DEFAULT_MAX_PIXELS
from imgindex.errors import ImageError, ImgIndexError
from imgindex.ingest import (
    BuildReport,
    ProgressCallback,
    _Build,
    _Read,
    decoded_read,
    read_image,
)
from imgindex.model import ReadyVectors
from imgindex.photofacts import PhotoFacts
from imgindex.preprocessing import PRESETS

if TYPE_CHECKING:
    from imgindex.model import Vectorizer
    from imgindex.store import Store

INSTALL_HINT = "pip install 'imgindex[ray]'"
LOCAL_ONLY = (
    "the Ray engine reads and decodes in the cluster's tasks: --workers and --decode device are "
    "for the local engine"
)

# The driver commits what has come back once this many images wait, or when results come this
# long after the last commit: few transactions for a fast cluster, little lost to a crash.
COMMIT_IMAGES = 512
COMMIT_SECONDS = 1.0
# A file size shared by more stored files than this sends their contents once, not per path.
CROWDED = 16
# An actor counts as running while it returned a result this recently.
ACTOR_SEEN_SECONDS = 30.0
# The input is cut into blocks of a few actor calls each: a block is what a task reads and
# embeds before its results stream back (and what a failed task repeats). At most this many
# blocks (larger ones for larger builds), and at least a few per actor, so all have work.
CALLS_PER_BLOCK = 4
MAX_BLOCKS = 100_000
BLOCKS_PER_ACTOR = 4


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs."""

    address: str | None = None  # "auto", "HOST:PORT", "local"; None: $RAY_ADDRESS, else local
    actors: int | None = None  # embedding actors; default: one per GPU, else one per node


@dataclass(frozen=True)
class EmbedderSpec:
    """How each actor makes its network: the arguments of a
    :class:`~imgindex.model.Vectorizer`, and what the index says its vectors must be."""

    preset: str
    expected: dict[str, Any]  # the index's fingerprint
    weights: str | None = None
    device: str = "auto"
    precision: str | None = None
    batch_size: int | None = None
    max_pixels: int | None = None
    runtime: str | None = None

    def make(self, threads: int | None = None) -> Vectorizer:
        """The network, refused (ImgIndexError) unless it makes the expected vectors: a node
        with other weights installed must not add its vectors to the index."""
        from imgindex.model import Vectorizer

        vectorizer = Vectorizer(
            device=self.device, weights=self.weights, batch_size=self.batch_size,
            max_pixels=self.max_pixels, preset=self.preset, precision=self.precision,
            runtime=self.runtime, threads=threads,
        )  # fmt: skip
        made = vectorizer.fingerprint()
        for key in ("model", "weights_sha256", "dim", "preprocessing"):
            if made[key] != self.expected[key]:
                raise ImgIndexError(
                    f"a Ray worker on {_host()} makes vectors with {key} {made[key]!r}, but the "
                    f"index holds {self.expected[key]!r} (weights {vectorizer.weights.path}); "
                    "install the same imgindex and weights on every node"
                )
        return vectorizer


# -- the cluster ------------------------------------------------------------------------------


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # Ray Data is the part the engine runs on
    except ImportError:
        raise ImgIndexError(f"--engine ray needs Ray: {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def connected(options: RayOptions) -> Iterator[Any]:
    """Ray, connected: to the cluster at ``options.address`` (or ``$RAY_ADDRESS``), else to a
    new local cluster on this machine; disconnected afterwards, which stops the work this
    process started there. A process already connected (``ray.init`` called) keeps its
    connection."""
    # imgindex sends nothing anywhere by default; Ray's own usage statistics are opt-in here.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's C++ core logs internal notes to this process's stderr (one about restartable
    # actors on every build); its errors reach the user as exceptions anyway.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        address = options.address or os.environ.get("RAY_ADDRESS") or None
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        check_reachable(address)
        try:
            with _native_note_hidden("Set ray log level from environment variable"):
                ray.init(address="local" if address in (None, "local") else address, **quiet)
        except ConnectionError as exc:
            raise ImgIndexError(
                f"no Ray cluster at {address} ({exc}); start one with `ray start --head` "
                "(see the README), or leave out --ray-address for a cluster on this machine"
            ) from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def check_reachable(address: str | None, seconds: float = 10.0) -> None:
    """Refuse a HOST:PORT nothing answers on, at once: Ray itself would retry for minutes."""
    if address in (None, "local", "auto") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=seconds):
            pass
    except (OSError, ValueError) as exc:
        raise ImgIndexError(
            f"cannot reach a Ray cluster at {address} ({exc}); is `ray start --head` running "
            "there, and is the port open to this machine?"
        ) from None


@contextlib.contextmanager
def _native_note_hidden(note: str) -> Iterator[None]:
    """Drop the lines containing ``note`` that native code writes to stderr meanwhile (Ray's
    C++ logger announces the log level it was given); the rest is written out afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            sys.stderr.write("".join(x for x in text.splitlines(True) if note not in x))
            sys.stderr.flush()


@dataclass(frozen=True)
class Layout:
    """How many embedding actors, and what each asks Ray for."""

    actors: int
    num_cpus: float  # per actor (and per reading task on CPU nodes, so that the two fuse)
    num_gpus: float  # per actor
    threads: int | None  # compute threads per CPU actor
    rows: int  # images per actor call


def layout(ray: Any, options: RayOptions, device: str) -> Layout:
    """One actor per GPU when the cluster has GPUs (and the device allows them), else one per
    node, each with the node's cores for its network (``options.actors`` overrides the count;
    the cores are then shared)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = int(sum(n.get("GPU", 0) for n in nodes))
    if gpus and device != "cpu":
        return Layout(options.actors or gpus, 1, 1, None, 256)
    cpus = [int(n.get("CPU", 0)) for n in nodes] or [1]
    actors = options.actors or len(nodes) or 1
    threads = max(1, min(max(cpus), sum(cpus) // actors))
    return Layout(actors, threads, 0, threads, 4)


# -- the workers ------------------------------------------------------------------------------

# The columns a batch carries back to the driver (besides the path and the vector).
_FACTS = ("sha256", "size", "mtime", "width", "height", "reason", "st_size", "st_mtime", "st_ctime",
          "photo")  # fmt: skip


def read_batch(
    batch: dict[str, Any],
    preset: str,
    read_limit: int,
    pillow_limit: int | None,
    keep_gps: bool = False,
    crowded: Any = None,
) -> dict[str, np.ndarray]:
    """A Ray Data batch of paths -> their facts and resized pixels (a CPU task), read and
    decoded under ``read_limit`` pixels, with Pillow's own limit as the driver has it (the
    command line lifts it). ``known`` holds, per path, the stored contents of its size
    (``sha256,sha256``), or ``*SIZE`` for those of a size in ``crowded`` (an object reference
    to a dict, fetched once per worker): such a file is hashed only."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = pillow_limit
    preprocessing = PRESETS[preset]
    # GPS positions never leave the worker unless kept.
    prepare = functools.partial(decoded_read, max_pixels=read_limit, preprocessing=preprocessing,
                                resize=preprocessing.resize_array, keep_gps=keep_gps)  # fmt: skip

    out: dict[str, list[Any]] = defaultdict(list)
    for raw, known in zip(batch["path"], batch["known"], strict=True):
        stored: Any = (
            _crowded(crowded).get(int(known[1:]), ()) if known.startswith("*")
            else set(known.split(","))
        )  # fmt: skip
        facts: dict[str, Any] = dict.fromkeys(_FACTS, "")
        facts.update(size=0, mtime=0.0, width=0, height=0, st_size=-1, st_mtime=0.0, st_ctime=0.0)
        pixels = None
        try:
            read = read_image(Path(os.fsdecode(raw)), stored, read_limit, prepare)
            image = read.image
            facts.update(sha256=image.sha256, size=image.size, mtime=image.mtime)
            facts.update(width=image.width, height=image.height)
            if image.facts is not None:
                facts["photo"] = json.dumps(image.facts.as_dict())
            pixels = read.tensor
        except ImageError as exc:
            facts["reason"] = exc.reason
            if exc.stat is not None:
                facts.update(st_size=exc.stat.st_size, st_mtime=exc.stat.st_mtime)
                facts["st_ctime"] = exc.stat.st_ctime
        out["path"].append(raw)
        for key in _FACTS:
            out[key].append(facts[key])
        out["pixels"].append(b"" if pixels is None else np.ascontiguousarray(pixels).tobytes())
        out["shape"].append((0, 0, 0) if pixels is None else tuple(pixels.shape))
    return _columns(out)


# A worker's copy of the driver's crowded sizes, by object reference (fetched once).
_CROWDED_SEEN: dict[str, dict[int, frozenset[str]]] = {}


def _crowded(ref: Any) -> dict[int, frozenset[str]]:
    if ref is None:
        return {}
    key = ref.hex()
    if key not in _CROWDED_SEEN:
        import ray

        _CROWDED_SEEN.clear()  # (another build's)
        _CROWDED_SEEN[key] = ray.get(ref)
    return _CROWDED_SEEN[key]


class EmbedActor:
    """A Ray Data actor: one network, loaded once; a batch of read images -> their vectors.
    (Made a subclass per build by :func:`_actor_class`, which sets ``spec`` and ``threads``.)"""

    spec: EmbedderSpec
    threads: int | None = None

    def __init__(self) -> None:
        import ray

        self.vectorizer = self.spec.make(self.threads)
        context = ray.get_runtime_context()
        self.name = f"{context.get_actor_id()}@{_host()}:{os.getpid()}"

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = len(batch["path"])
        vectors = np.zeros((rows, self.vectorizer.dim), dtype=np.float32)
        todo = [i for i in range(rows) if len(batch["pixels"][i])]
        if todo:
            tensors = [_pixels(batch["pixels"][i], batch["shape"][i]) for i in todo]
            if self.vectorizer.runtime == "torch":
                import torch

                tensors = [torch.from_numpy(t) for t in tensors]
            vectors[todo] = self.vectorizer.embed_tensors(tensors)
        embedded = np.zeros(rows, dtype=bool)
        embedded[todo] = True
        out = {key: batch[key] for key in ("path", *_FACTS)}
        out.update(vector=vectors, embedded=embedded, actor=np.array([self.name] * rows))
        out["weights_sha256"] = np.array([self.vectorizer.weights.sha256] * rows)
        return out


def _actor_class(spec: EmbedderSpec, threads: int | None) -> type[EmbedActor]:
    # A class per build, holding its settings (Ray sends it by value): constructor arguments
    # would go through the object store, which restarting a killed actor then depends on.
    return type("EmbedActor", (EmbedActor,), {"spec": spec, "threads": threads})


def _pixels(data: bytes, shape: Any) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(tuple(int(n) for n in shape))


def _columns(out: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    columns = {key: np.array(values) for key, values in out.items() if key != "pixels"}
    pixels = np.empty(len(out["pixels"]), dtype=object)
    pixels[:] = out["pixels"]
    columns["pixels"] = pixels
    columns["path"] = np.array(out["path"], dtype=object)
    return columns


def _host() -> str:
    return os.uname().nodename


# -- the driver -------------------------------------------------------------------------------


def build(
    store: Store,
    spec: EmbedderSpec,
    roots: Iterable[str | os.PathLike[str]],
    progress: ProgressCallback | None = None,
    options: RayOptions | None = None,
    max_pixels: int | None = None,
    remove_missing: bool = True,
    retry_skipped: bool = False,
    keep_gps: bool = False,
) -> BuildReport:
    """:func:`imgindex.ingest.build` with the reading and embedding on a Ray cluster."""
    runner = RayBuild(store, spec, options or RayOptions(), progress, max_pixels, keep_gps)
    return runner.run(roots, None, remove_missing, retry_skipped)


@dataclass
class _Batch:
    """Embedded images waiting on the driver to be committed."""

    reads: list[_Read] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)


class RayBuild(_Build):
    """A build (see :class:`imgindex.ingest._Build`: planning, reuse, skips, removal, saving)
    whose files are read and embedded by :meth:`results`."""

    def __init__(
        self,
        store: Store,
        spec: EmbedderSpec,
        options: RayOptions,
        progress: ProgressCallback | None,
        max_pixels: int | None,
        keep_gps: bool = False,
    ):
        super().__init__(store, _no_local_network, progress, max_pixels, keep_gps=keep_gps)
        self.spec = spec
        self.options = options
        self.taken: set[bytes] = set()  # paths whose result was taken (a repeat is dropped)
        self.repeats = 0
        self.actors_seen: dict[str, float] = {}
        self.waiting = _Batch()
        self.last_commit = time.perf_counter()
        self.crowded: dict[int, frozenset[str]] = {}

    @property
    def _read_limit(self) -> int:
        return self._max_pixels or self.spec.max_pixels or DEFAULT_MAX_PIXELS

    def _process(self, todo: list[Path], workers: int | None) -> None:
        self.state.engine = "ray"
        again = todo
        known = True
        while again:  # a second round only for files whose stored twin went meanwhile
            self.state.loading_model = True
            self._notify()
            results = self.results(again, self._candidates(again) if known else None)
            with contextlib.closing(results):
                again = self._take(results)
            known = False

    def _candidates(self, paths: list[Path]) -> list[str]:
        """Per path, the stored contents of its size (``sha,sha``; usually none), or, for a
        size many stored files share (uncompressed RAW or BMP files of one camera), ``*SIZE``:
        those contents travel once, in :attr:`crowded`, not with every path."""
        by_size = self.plan.shas_by_size()
        sizes = []
        for path in paths:
            try:
                sizes.append(os.stat(path).st_size)
            except OSError:
                sizes.append(-1)  # the worker will say why
        self.crowded = {size: frozenset(by_size[size]) for size in set(sizes)
                        if len(by_size.get(size, ())) > CROWDED}  # fmt: skip
        return [
            f"*{size}" if size in self.crowded else ",".join(sorted(by_size.get(size, ())))
            for size in sizes
        ]

    def results(self, paths: list[Path], known: list[str] | None) -> Iterator[dict[str, Any]]:
        """Batches of results for ``paths``, in their order, from the cluster."""
        with connected(self.options) as ray:
            plan = layout(ray, self.options, self.spec.device)
            self.state.actors = 0
            crowded = ray.put(self.crowded) if known is not None and self.crowded else None
            data = _pipeline(
                ray, self.spec, plan, paths, known, self._read_limit, self.keep_gps, crowded
            )
            batches = data.iter_batches(batch_size=None, batch_format="numpy")
            try:
                yield from batches
            except Exception as exc:
                raise _cluster_error(exc) from exc
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()

    def _take(self, results: Iterator[dict[str, Any]]) -> list[Path]:
        """Check and commit results as they come; returns the paths to embed after all."""
        again: list[Path] = []
        try:
            for batch in self._timed_batches(results):
                self._seen(batch["actor"])
                for row in range(len(batch["path"])):
                    self._take_row(batch, row, again)
                if self._due():
                    self._commit()
                self._notify()
            self._commit()
        except BaseException:
            # Vectors that reached the driver (checked already) are kept too, whatever stopped
            # the build (Ctrl-C, a cluster failure); then the cluster work stops.
            with contextlib.suppress(Exception):
                self._commit()
            raise
        self._notify()
        return again

    def _timed_batches(self, results: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The batches, timed: until the first one comes, the cluster is starting (and its
        actors loading the network)."""
        while True:
            first = self.state.loading_model
            stage = "starting the cluster" if first else "reading and embedding on the cluster"
            started = time.perf_counter()
            with self._timed(stage):
                batch = next(results, None)
            if first:
                self.state.loading_model = False
                self.state.model_seconds += time.perf_counter() - started
                self.state.unclocked += 0 if batch is None else int(batch["embedded"].sum())
            if batch is None:
                return
            yield batch

    def _take_row(self, batch: dict[str, Any], row: int, again: list[Path]) -> None:
        raw = bytes(batch["path"][row])
        if raw in self.taken:
            self.repeats += 1  # a retried task's result, already taken
            return
        self.taken.add(raw)
        path = Path(os.fsdecode(raw))
        reason = str(batch["reason"][row])
        if reason:
            st_size = int(batch["st_size"][row])
            stat = None
            if st_size >= 0:
                times = (float(batch["st_mtime"][row]), float(batch["st_ctime"][row]))
                stat = os.stat_result((0, 0, 0, 0, 0, 0, st_size, 0, *times))
            self.skip(path, reason, stat)
            self.state.done += 1
            return
        if str(batch["weights_sha256"][row]) != self.spec.expected["weights_sha256"]:
            raise ImgIndexError(
                f"{path}: a vector came back from other weights; nothing of it kept"
            )
        photo = str(batch["photo"][row])
        image = NewImage(
            path, str(batch["sha256"][row]), int(batch["size"][row]), float(batch["mtime"][row]),
            int(batch["width"][row]), int(batch["height"][row]),
            PhotoFacts(**json.loads(photo)) if photo else None,  # (GPS only if kept)
        )  # fmt: skip
        read = _Read(image, None)
        if not batch["embedded"][row]:
            # Its content was stored when planned: the stored vector is reused (unless that
            # entry was replaced meanwhile; then it is embedded in a second round).
            if self._reuse(read):
                self.state.done += 1
            else:
                self.taken.discard(raw)
                again.append(path)
            return
        if image.sha256 in self.twins_waiting:  # the same content waits to be committed
            self.twins_waiting[image.sha256].append(read)
            return
        if self._reuse(read):  # the same content was committed earlier in this build
            self.state.done += 1
            return
        self.twins_waiting[image.sha256] = []
        self.waiting.reads.append(read)
        self.waiting.vectors.append(np.asarray(batch["vector"][row], dtype=np.float32))

    def _due(self) -> bool:
        waiting = len(self.waiting.reads)
        since = time.perf_counter() - self.last_commit
        return waiting >= COMMIT_IMAGES or (waiting > 0 and since >= COMMIT_SECONDS)

    def _commit(self) -> None:
        """Commit the waiting images (one transaction), as the local engine stores a batch."""
        waiting, self.waiting = self.waiting, _Batch()
        self.last_commit = time.perf_counter()
        if waiting.reads:
            self.started = waiting.reads, ReadyVectors(np.stack(waiting.vectors))
            self._store_started()

    def _seen(self, names: Any) -> None:
        now = time.perf_counter()
        for name in set(names.tolist()):
            self.actors_seen[name] = now
        recent = [t for t in self.actors_seen.values() if now - t <= ACTOR_SEEN_SECONDS]
        self.state.actors = len(recent)


def _pipeline(
    ray: Any,
    spec: EmbedderSpec,
    plan: Layout,
    paths: list[Path],
    known: list[str] | None,
    read_limit: int,
    keep_gps: bool,
    crowded: Any = None,
) -> Any:
    """The Ray Data pipeline for ``paths``: not started until iterated."""
    from PIL import Image

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # results in the order of the paths
    context.execution_options.verbose_progress = False
    items = [
        {"path": os.fsencode(p), "known": known[i] if known is not None else ""}
        for i, p in enumerate(paths)
    ]
    size = max(CALLS_PER_BLOCK * plan.rows, math.ceil(len(items) / MAX_BLOCKS))
    blocks = max(math.ceil(len(items) / size), BLOCKS_PER_ACTOR * plan.actors)
    blocks = max(1, min(blocks, len(items)))
    data = ray.data.from_items(items, override_num_blocks=blocks)
    data = data.map_batches(
        read_batch,
        fn_kwargs={
            "preset": spec.preset,
            "read_limit": read_limit,
            "pillow_limit": Image.MAX_IMAGE_PIXELS,
            "keep_gps": keep_gps,
            "crowded": crowded,
        },
        batch_size=plan.rows,
        num_cpus=plan.num_cpus if not plan.num_gpus else 1,
        batch_format="numpy",
    )
    return data.map_batches(
        _actor_class(spec, plan.threads),
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        batch_size=plan.rows,
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus or None,
        batch_format="numpy",
    )


def _cluster_error(exc: Exception) -> Exception:
    """An error from the cluster, as the user should see it: an ImgIndexError an actor raised
    (other weights on a node) keeps its message."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ImgIndexError):
            return ImgIndexError(str(cause))
        cause = cause.__cause__ or getattr(cause, "cause", None)
    text = str(exc).strip().splitlines()
    return ImgIndexError(f"the Ray cluster failed: {text[-1] if text else type(exc).__name__}")


def _no_local_network() -> Vectorizer:
    raise AssertionError("the Ray engine embeds on the cluster, never in the driver")
