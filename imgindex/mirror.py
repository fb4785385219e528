"""The FAISS mirror of the catalog's vectors: in memory, and in its file ``vectors.faiss``.

The catalog (:mod:`imgindex.catalog`, SQLite) is the truth; this module never opens it. It asks a
*source* (the catalog, see :class:`Source`) for what it needs: the live ids and their stored
vectors in one snapshot, and the records of which FAISS file was saved. Because an image id is
never reused and the vector under an id never changes, the file can only be *behind* the
catalog, never wrong, and :meth:`Mirror.reconcile` brings it up to date: ids the catalog no
longer has are removed, ids it has and the file lacks are added from the stored vectors.

Choosing the index kind (:meth:`Mirror.choose_kind`, :meth:`Mirror.adopt`) and saving the file
(:meth:`Mirror.save`) are separate steps. A save writes a temporary file
(:func:`imgindex.ann.write_temporary`), records its kind and digest as *being written*, renames
it into place and records it as *the file*: the rename and the record cannot be one step, so
whoever opens the index after a kill between them still recognises the file
(:meth:`FileRecords.candidates`). A file whose size or CRC-32 is not the recorded one is
damaged and not used; the index is then rebuilt from the catalog in memory.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from imgindex import ann
from imgindex.ann import IndexSpec
from imgindex.atomic import FileDigest, replace
from imgindex.folder import FAISS_NAME

# Chunks of stored vectors read at a time when a FAISS index is built from the catalog.
BUILD_CHUNK = 20_000
# An HNSW index (which cannot delete) is rebuilt at a save once this share of it is deleted.
MAX_TOMBSTONES = 0.1


@dataclass(frozen=True)
class FileRecords:
    """What the catalog recorded of the FAISS file: the kind and digest of the file saved last
    (``file`` None: saved before digests were recorded, or never), and of a file a save was
    writing when it stopped (``writing``: a kill between recording and renaming, or between
    renaming and recording it as saved)."""

    built: IndexSpec
    file: FileDigest | None = None
    writing_spec: IndexSpec | None = None
    writing: FileDigest | None = None

    def candidates(self) -> list[tuple[IndexSpec, FileDigest | None]]:
        """What the file in place may be, in order: (its kind, the digest it must have): the
        file last saved, then one a save renamed into place before a kill stopped it recording
        so. An index saved before digests were recorded has none to check."""
        out: list[tuple[IndexSpec, FileDigest | None]] = []
        if self.file is not None:
            out.append((self.built, self.file))
        elif self.writing is None:
            out.append((self.built, None))
        if self.writing_spec is not None and (self.writing is not None or self.file is None):
            out.append((self.writing_spec, self.writing))
        return out


class Source(Protocol):
    """What the mirror reads from and records in the truth (the catalog)."""

    path: Path
    dim: int

    def snapshot(self) -> contextlib.AbstractContextManager[None]: ...
    def live_ids(self) -> np.ndarray: ...
    def present_vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def vectors(self, ids: Sequence[int]) -> np.ndarray: ...
    def file_records(self) -> FileRecords: ...
    def record_writing(self, spec: IndexSpec, digest: FileDigest, earlier_landed: bool) -> None: ...
    def record_saved(self, spec: IndexSpec, digest: FileDigest) -> None: ...


class Mirror:
    """The FAISS index over a source's vectors, and whether it differs from its file."""

    def __init__(self, folder: Path, vector_index: ann.VectorIndex, dirty: bool):
        self.folder = folder
        self.vector_index = vector_index
        self.dirty = dirty  # the index in memory differs from the FAISS file
        self.rebuilds = 0  # times the index was built anew in memory (not added to)
        self.last_save = time.monotonic()

    @property
    def file(self) -> Path:
        return self.folder / FAISS_NAME

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def load(cls, source: Source, mmap: bool) -> Mirror:
        """The FAISS file (memory-mapped with ``mmap``), or an index built from ``source``;
        not yet reconciled with it."""
        loaded, _problem = read_file(source, mmap)
        if loaded is not None:
            return cls(source.path, loaded, dirty=False)
        spec = source.file_records().built
        if spec.min_training_vectors() or spec.kind in ("ivf-flat", "ivf-pq", "factory"):
            index = build_from(source, spec)
        else:
            index = ann.VectorIndex.empty(spec, source.dim)  # reconcile fills it
        return cls(source.path, index, dirty=True)

    def reconcile(self, source: Source) -> None:
        """Make the index hold exactly the vectors of one snapshot of ``source``."""
        with source.snapshot():
            live = source.live_ids()
            present = self.vector_index.ids()
            stale = np.setdiff1d(present, live, assume_unique=True)
            missing, vectors = source.present_vectors(
                np.setdiff1d(live, present, assume_unique=True)
            )
        self.apply(remove=stale, add_ids=missing, add_vectors=vectors)

    def apply(
        self,
        remove: Sequence[int] = (),
        add_ids: Sequence[int] = (),
        add_vectors: np.ndarray | None = None,
    ) -> None:
        """Mirror a change the source has committed."""
        if len(remove):
            self.vector_index.remove(np.asarray(remove, dtype=np.int64))
        if len(add_ids):
            self.vector_index.add(np.asarray(add_ids, dtype=np.int64), add_vectors)
        if len(remove) or len(add_ids):
            self.dirty = True

    def stored_vectors(self, source: Source, ids: np.ndarray) -> np.ndarray:
        """Raw vectors of ``ids``: from the index when it keeps them exactly, else from the
        source."""
        found = self.vector_index.reconstruct(ids)
        return found if found is not None else source.vectors([int(i) for i in ids])

    # -- choosing the kind ------------------------------------------------------------------

    def choose_kind(self, requested: IndexSpec | None, count: int) -> IndexSpec:
        """The index kind to have now for ``count`` vectors (``requested`` None: auto). Once
        auto has left the flat index, it keeps the kind it chose (free memory varies; the
        index should not flip between kinds at every save)."""
        built = self.vector_index.spec
        if requested is None and built.kind != "flat":
            return built
        return ann.plan(requested, count, self.vector_index.dim)[0]

    def adopt(self, source: Source, target: IndexSpec, requested: IndexSpec | None) -> bool:
        """Rebuild the index from ``source`` as ``target`` unless it is that already, or as the
        same kind when it carries many deleted vectors; returns whether it rebuilt."""
        built = self.vector_index.spec
        if not satisfies(built, target, requested):
            self.rebuild(source, target)
        elif self.vector_index.tombstone_fraction > MAX_TOMBSTONES:
            self.rebuild(source, built)
        else:
            return False
        return True

    def rebuild(self, source: Source, spec: IndexSpec) -> None:
        self.vector_index = build_from(source, spec)
        self.rebuilds += 1
        self.dirty = True

    # -- saving -----------------------------------------------------------------------------

    def save(self, source: Source, force: bool = False) -> bool:
        """Write the index to its file atomically if it differs from it (or with ``force``);
        returns whether it wrote. The kind and digest of the file about to be renamed are
        recorded first (see the module's docstring)."""
        if not (self.dirty or force) and self.file.exists():
            return False
        temp, digest = self.vector_index.write_temporary(self.file)
        try:
            # A save killed between recording and renaming left its record: the file in place
            # says whether its rename happened (read only after such a kill, once).
            writing = source.file_records().writing
            landed = writing is not None and FileDigest.of_file(self.file, writing.size) == writing
            source.record_writing(self.vector_index.spec, digest, landed)
        except BaseException:
            temp.unlink()
            raise
        replace(temp, self.file)
        source.record_saved(self.vector_index.spec, digest)
        self.dirty = False
        self.last_save = time.monotonic()
        return True

    def due(self, seconds: float) -> bool:
        """Whether the index changed and the last save is older than ``seconds``."""
        return self.dirty and time.monotonic() - self.last_save >= seconds


def read_file(source: Source, mmap: bool) -> tuple[ann.VectorIndex | None, str | None]:
    """(the FAISS file loaded, or None; what is wrong with it, or None if nothing or if there
    is no file). It must have a digest recorded in ``source`` and is loaded as the kind recorded
    with it (see :meth:`FileRecords.candidates`). A file of an index saved before digests were
    recorded is loaded as its recorded kind."""
    file = source.path / FAISS_NAME
    if not file.exists():
        return None, None
    if not file.is_file():  # a pipe would block whoever reads it, for ever
        return None, f"{FAISS_NAME} cannot be read: it is not a plain file"
    for _attempt in range(5):  # a writer may save a new file meanwhile: look again
        with source.snapshot():
            records = source.file_records()
        candidates = records.candidates()
        for spec, digest in candidates:
            if digest is not None and FileDigest.of_file(file, digest.size) != digest:
                continue
            loaded = ann.VectorIndex.load(file, spec, source.dim, mmap)
            if loaded is not None:
                return loaded, None  # (after a kill, the next save records the kind)
            if digest is not None:
                return None, f"{FAISS_NAME} cannot be read as {spec.describe()}"
        if all(digest is None for _spec, digest in candidates):
            return None, f"{FAISS_NAME} cannot be read as {records.built.describe()}"
    return None, (
        f"{FAISS_NAME} cannot be read: it is damaged (its size or CRC-32 differs from the "
        "one recorded when it was saved)"
    )


def build_from(source: Source, spec: IndexSpec) -> ann.VectorIndex:
    """``spec`` built (and trained) from the stored vectors of one snapshot of ``source``; a
    flat index while there are too few vectors to train it."""
    with source.snapshot():
        live = source.live_ids()
        rng = np.random.default_rng(0)

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for start in range(0, len(live), BUILD_CHUNK):
                yield source.present_vectors(live[start : start + BUILD_CHUNK])

        def sample(m: int) -> np.ndarray:
            picked = np.sort(rng.choice(live, size=min(m, len(live)), replace=False))
            return source.present_vectors(picked)[1]

        if spec.min_training_vectors() > len(live) or (
            spec.kind not in ("flat", "hnsw") and not len(live)
        ):
            spec = IndexSpec("flat")
        if spec.kind in ("flat", "hnsw"):
            index = ann.VectorIndex.empty(spec, source.dim)
            for ids, vectors in chunks():
                index.add(ids, vectors)
            return index
        return ann.VectorIndex.build(spec, source.dim, chunks, sample, len(live))


def satisfies(built: IndexSpec, target: IndexSpec, requested: IndexSpec | None) -> bool:
    """Whether the built index is the target: same kind and metric and, when the target is the
    kind the user asked for, the parameters they gave. Parameters filled in for the collection's
    size (nlist) do not force a rebuild as the collection grows."""
    if (built.kind, built.metric) != (target.kind, target.metric):
        return False
    if requested is None or requested.kind != target.kind:
        return True
    return all(built.params.get(key) == value for key, value in requested.params.items())
