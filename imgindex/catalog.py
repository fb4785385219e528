"""The catalog: the index's SQLite database, which is the truth.

One row per image (its path, content hash, size, time and dimensions) and its vector, stored
together in one transaction (float32 blobs with a CRC-32 each), the files a build could not index
and why, decisions on duplicates, and the index's settings. An image id is never reused
(AUTOINCREMENT) and the vector under an id never changes (new content gets a new id), which is
what lets the FAISS mirror (:mod:`imgindex.mirror`) be a cache that can only be behind.

A :class:`Catalog` works on a connection it is given (:mod:`imgindex.store` opens it, under the
index folder's rules). Every committed change of ids or vectors is reported to
:meth:`Catalog._committed`, which the store overrides to keep its mirror in step.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from imgindex import photos
from imgindex.ann import IndexSpec
from imgindex.atomic import FileDigest
from imgindex.errors import DamagedIndexError, IncompatibleIndexError
from imgindex.files import path_text, resolve
from imgindex.mirror import FileRecords
from imgindex.photofacts import PhotoFacts
from imgindex.schema import now, vector_checksum, write_transaction


@dataclass(frozen=True)
class ImageRecord:
    """One indexed image, as stored in SQLite."""

    id: int
    path: str
    sha256: str
    size: int
    mtime: float
    width: int
    height: int
    added_at: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class NewImage:
    """An embedded image on its way into the index."""

    path: Path
    sha256: str
    size: int
    mtime: float
    width: int
    height: int
    facts: PhotoFacts | None = None  # what the file says about the photo, when it was read


@dataclass(frozen=True)
class FileState:
    """What a file's status said when it was read: a file whose state is the same later is
    taken to be the same file (as a build does for indexed files, by size and mtime)."""

    size: int
    mtime: float
    ctime: float  # changes with permissions too: a file made readable is read again

    @classmethod
    def of(cls, st: os.stat_result) -> FileState:
        return cls(st.st_size, st.st_mtime, st.st_ctime)


# A file a build could not index: (path, reason), optionally followed by its FileState when it
# was read and the pixel limit it was read under.
SkippedFile = tuple[Any, ...]


class Catalog:
    """The SQLite rows and vectors of an index, on an open connection ``db``."""

    def __init__(self, path: Path, db: Any, writable: bool):
        self.path = path
        self.db = db
        self.writable = writable
        self.dim = int(self.meta("dim"))

    def _committed(
        self,
        remove: Sequence[int] = (),
        add_ids: Sequence[int] = (),
        add_vectors: np.ndarray | None = None,
    ) -> None:
        """Called after each transaction that removed or added vectors (see the module's
        docstring)."""

    def _writing(self) -> contextlib.AbstractContextManager[Any]:
        return write_transaction(self.db)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one committed state of the database."""
        if self.db.conn.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    def data_version(self) -> int:
        """Changes when another connection commits to the database (not for our own commits)."""
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    def _require_writable(self) -> None:
        if not self.writable:
            raise RuntimeError("this index was opened read-only")

    # -- settings ---------------------------------------------------------------------------

    def meta(self, key: str, default: str | None = None) -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        if row is None:
            if default is None:
                raise IncompatibleIndexError(f"{self.path}: index settings lack {key!r}")
            return default
        return row[0]

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [key, value],
        )

    def fingerprint(self) -> dict[str, Any]:
        return {
            "model": self.meta("model"),
            "weights_sha256": self.meta("weights_sha256"),
            "dim": self.dim,
            "preprocessing": json.loads(self.meta("preprocessing")),
        }

    # -- the one-writer lock ----------------------------------------------------------------
    # -- reading ----------------------------------------------------------------------------

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM images").fetchone()[0]

    def get(self, image_id: int) -> ImageRecord | None:
        rows = self.get_many([image_id])
        return rows.get(image_id)

    def get_many(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        out: dict[int, ImageRecord] = {}
        for chunk, marks in _id_chunks(list(ids)):
            for row in self.db.execute(
                f"SELECT {_RECORD_COLUMNS} FROM images WHERE id IN ({marks})", chunk
            ):
                record = ImageRecord(*row)
                out[record.id] = record
        return out

    def get_by_path(self, path: str | os.PathLike[str]) -> ImageRecord | None:
        """The entry of the file ``path`` names exactly (see :meth:`find`)."""
        row = self.db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM images WHERE raw_path = ?", [os.fsencode(path)]
        ).fetchone()
        return ImageRecord(*row) if row else None

    def find(self, path: str | os.PathLike[str]) -> ImageRecord | None:
        """The entry of the file at ``path``: under its resolved name, as builds index it, or
        its absolute name as given (an older imgindex did not resolve links)."""
        return self.get_by_path(resolve(path)) or self.get_by_path(os.path.abspath(path))

    def raw_path(self, image_id: int) -> bytes:
        """The file name's bytes of image ``image_id``; KeyError if there is none."""
        row = self.db.execute("SELECT raw_path FROM images WHERE id = ?", [image_id]).fetchone()
        if row is None:
            raise KeyError(f"no image with id {image_id}")
        return bytes(row[0])

    def records(self) -> Iterator[ImageRecord]:
        for row in self.db.execute(f"SELECT {_RECORD_COLUMNS} FROM images ORDER BY id"):
            yield ImageRecord(*row)

    def file_rows(self) -> Iterator[tuple[int, str, bytes, int, float, str]]:
        """(id, path, raw_path, size, mtime, sha256) of every image, for syncing with disk."""
        yield from self.db.execute("SELECT id, path, raw_path, size, mtime, sha256 FROM images")

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors for ``ids``, in that order; KeyError for an id without a stored
        vector, DamagedIndexError for one that fails its checksum (see :meth:`check`)."""
        found, out, damaged = self._read_vectors(ids)
        if damaged:
            raise DamagedIndexError(
                f"{self.path}: the stored vectors of image ids {damaged[:10]} are damaged (their "
                "checksums fail); `imgindex repair` restores or removes them"
            )
        if len(found) != len(set(int(i) for i in ids)):
            missing = sorted({int(i) for i in ids} - set(found.tolist()))
            raise KeyError(f"no stored vector for image ids {missing[:10]}")
        position = {int(i): n for n, i in enumerate(found)}
        return out[[position[int(i)] for i in ids]]

    def _read_vectors(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(ids found with a sound vector, their vectors, ids whose vector is damaged). Sound:
        the stored checksum matches, and it is 768 finite numbers."""
        ids = list(ids)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        found: list[int] = []
        damaged: list[int] = []
        size = 4 * self.dim
        for chunk, marks in _id_chunks(ids):
            for image_id, blob, crc in self.db.execute(
                f"SELECT id, vector, crc32 FROM vectors WHERE id IN ({marks})", chunk
            ):
                if len(blob) == size and crc == vector_checksum(blob):
                    out[len(found)] = np.frombuffer(blob, dtype="<f4")
                    found.append(image_id)
                else:
                    damaged.append(image_id)
        out = out[: len(found)]
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            damaged += [i for i, ok in zip(found, finite, strict=True) if not ok]
            found = [i for i, ok in zip(found, finite, strict=True) if ok]
            out = out[finite]
        return np.asarray(found, dtype=np.int64), out, sorted(damaged)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every image, from SQLite, in one snapshot."""
        with self.snapshot():
            return self.present_vectors(self.live_ids())

    def live_ids(self) -> np.ndarray:
        """Ids of the indexed images (sorted). Read from the images table alone: scanning the
        vectors table would read every 3 KB vector."""
        rows = self.db.execute("SELECT id FROM images ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def present_vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of those of ``ids`` (sorted) that have a sound stored vector. An image
        row without one is damage that `check` reports and `repair` mends; it is left out here,
        so that nothing damaged reaches the FAISS index."""
        found, out, _damaged = self._read_vectors(ids.tolist())
        if len(found) > 1 and (np.diff(found) < 0).any():  # (SQLite gives them in id order)
            order = np.argsort(found, kind="stable")
            return found[order], out[order]
        return found, out

    def ids_under_indexed(self, folder: str) -> np.ndarray:
        """Ids of the images at or under ``folder`` as the index names it (text, as in
        ``ImageRecord.path``), sorted; the file system is not looked at."""
        prefix = folder.rstrip("/") + "/"
        rows = self.db.execute(
            "SELECT id FROM images WHERE path = ? OR (path >= ? AND path < ?) ORDER BY id",
            [folder, prefix, prefix[:-1] + "0"],
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def ids_under(self, path: str | os.PathLike[str]) -> np.ndarray:
        """Ids of the images at ``path`` or under it (a folder), sorted: under its resolved
        name (as builds index it) or its name as given (as an older imgindex indexed it)."""
        found = [self._ids_under(os.fsencode(resolve(path)))]
        given = os.fsencode(os.path.abspath(path))
        if given != os.fsencode(resolve(path)):
            found.append(self._ids_under(given))
        return np.unique(np.concatenate(found))

    def _ids_under(self, raw: bytes) -> np.ndarray:
        prefix = raw.rstrip(b"/") + b"/"
        # Every name that starts with "prefix/" sorts between "prefix/" and "prefix0" (bytes
        # compare as bytes: memcmp).
        upper = prefix[:-1] + b"0"
        rows = self.db.execute(
            "SELECT id FROM images WHERE raw_path = ? OR (raw_path >= ? AND raw_path < ?) "
            "ORDER BY id",
            [raw, prefix, upper],
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def ids_by_sha(self) -> dict[str, list[int]]:
        """Every content hash in the index and the ids of the images with that content."""
        out: dict[str, list[int]] = {}
        for image_id, sha in self.db.execute("SELECT id, sha256 FROM images ORDER BY id"):
            out.setdefault(sha, []).append(image_id)
        return out

    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of every file the builds could not index."""
        return [(p, r) for p, _raw, r in self.skipped_files()]

    def skipped_files(self) -> list[tuple[str, bytes, str]]:
        """(path, raw path bytes, reason) of every file the builds could not index."""
        return [
            tuple(r)
            for r in self.db.execute("SELECT path, raw_path, reason FROM skipped ORDER BY raw_path")
        ]

    def skipped_states(self) -> dict[bytes, tuple[FileState | None, int | None, str]]:
        """Raw path -> (the file's state when it was skipped, if known; the pixel limit it was
        read under, if known; the reason)."""
        out: dict[bytes, tuple[FileState | None, int | None, str]] = {}
        for raw, reason, size, mtime, ctime, max_pixels in self.db.execute(
            "SELECT raw_path, reason, size, mtime, ctime, max_pixels FROM skipped"
        ):
            known = size is not None and mtime is not None and ctime is not None
            state = FileState(size, mtime, ctime) if known else None
            out[bytes(raw)] = (state, max_pixels, reason)
        return out

    def records_page(
        self, offset: int, limit: int, order: str, ids: np.ndarray | None = None
    ) -> tuple[list[ImageRecord], int]:
        """A page of records, newest first (``order="newest"``) or by path ("path"), among
        ``ids`` if given; and how many there are in all."""
        by = {"newest": "id DESC", "path": "raw_path"}[order]
        if ids is None:
            total = self.count()
            rows = self.db.execute(
                f"SELECT {_RECORD_COLUMNS} FROM images ORDER BY {by} LIMIT ? OFFSET ?",
                [limit, offset],
            ).fetchall()
            return [ImageRecord(*row) for row in rows], total
        records = list(self.get_many(ids.tolist()).values())
        if order == "newest":
            records.sort(key=lambda r: -r.id)
        else:
            records.sort(key=lambda r: r.path)
        return records[offset : offset + limit], len(records)

    def folder_counts(self) -> dict[str, int]:
        """Each folder holding indexed images (as text) and how many it holds directly."""
        counts: dict[str, int] = {}
        for (text,) in self.db.execute("SELECT path FROM images"):
            folder = os.path.dirname(text)
            counts[folder] = counts.get(folder, 0) + 1
        return dict(sorted(counts.items()))

    # -- duplicate reviews ------------------------------------------------------------------

    def reviewed_pairs(self) -> dict[tuple[int, int], bool]:
        """(a, b) with a < b -> whether a person judged them duplicates."""
        return {(a, b): bool(same) for a, b, same in
                self.db.execute("SELECT a, b, same FROM duplicate_reviews")}  # fmt: skip

    def marked_for_removal(self) -> dict[int, int | None]:
        """Ids marked for removal -> the id kept in their place (None if it is gone)."""
        return dict(self.db.execute("SELECT id, keep FROM marked_for_removal ORDER BY id"))

    def review(self, ids: Sequence[int], keep: int | None) -> None:
        """Record a decision on the group ``ids``: duplicates with ``keep`` kept (the others
        marked for removal), or, with ``keep`` None, not duplicates (every pair apart)."""
        self._require_writable()
        ids = sorted({int(i) for i in ids})
        when = now()
        with self._writing():
            pairs = [(a, b) for n, a in enumerate(ids) for b in ids[n + 1 :]]
            self.db.conn.executemany(
                "INSERT OR REPLACE INTO duplicate_reviews (a, b, same, at) VALUES (?, ?, ?, ?)",
                [(a, b, int(keep is not None), when) for a, b in pairs],
            )
            self.db.conn.executemany(
                "DELETE FROM marked_for_removal WHERE id = ?", [(i,) for i in ids]
            )
            if keep is not None:
                self.db.conn.executemany(
                    "INSERT INTO marked_for_removal (id, keep, at) VALUES (?, ?, ?)",
                    [(i, keep, when) for i in ids if i != keep],
                )

    def forget_reviews(self, ids: Sequence[int]) -> int:
        """Undo the decisions involving ``ids``; returns how many decisions went."""
        self._require_writable()
        gone = 0
        with self._writing():
            for chunk, marks in _id_chunks(list(ids)):
                gone += self.db.execute(
                    f"DELETE FROM duplicate_reviews WHERE a IN ({marks}) OR b IN ({marks})",
                    chunk + chunk,
                ).rowcount
                gone += self.db.execute(  # marked, or kept in another's place
                    f"DELETE FROM marked_for_removal WHERE id IN ({marks}) OR keep IN ({marks})",
                    chunk + chunk,
                ).rowcount
        return gone

    # -- writing ----------------------------------------------------------------------------

    def write_batch(
        self,
        images: Sequence[NewImage],
        vectors: np.ndarray | None,
        skipped: Sequence[SkippedFile] = (),
    ) -> list[int]:
        """Insert or replace ``images`` with their ``vectors`` and record ``skipped`` files, in one
        transaction. Returns the new ids, in order. An image whose path is already indexed is
        replaced under a new id, so the vector under an id never changes. Vectors must be
        finite (ValueError otherwise: nothing is written)."""
        self._require_writable()
        if vectors is None:
            vectors = np.empty((0, self.dim), dtype="<f4")
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if vectors.shape != (len(images), self.dim):
            raise ValueError(f"expected {len(images)} x {self.dim} vectors, got {vectors.shape}")
        if not np.isfinite(vectors).all():
            bad = [str(images[n].path) for n in np.flatnonzero(~np.isfinite(vectors).all(1))]
            raise ValueError(f"vectors with NaN or infinite numbers, for {', '.join(bad[:3])}")
        when = now()
        new_ids: list[int] = []
        replaced: list[int] = []
        with self._writing():
            for image, vector in zip(images, vectors, strict=True):
                raw = os.fsencode(image.path)
                replaced += self._delete_path(raw)
                cursor = self.db.execute(
                    "INSERT INTO images (path, raw_path, sha256, size, mtime, width, height, "
                    "added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        path_text(image.path),
                        raw,
                        image.sha256,
                        image.size,
                        image.mtime,
                        image.width,
                        image.height,
                        when,
                    ],
                )
                new_ids.append(cursor.lastrowid)
                if image.facts is not None:
                    photos.insert(self.db, cursor.lastrowid, image.facts)
                blob = vector.tobytes()
                self.db.execute(
                    "INSERT INTO vectors (id, vector, crc32) VALUES (?, ?, ?)",
                    [cursor.lastrowid, blob, vector_checksum(blob)],
                )
                # A file that failed before and reads now is no longer skipped.
                self.db.execute("DELETE FROM skipped WHERE raw_path = ?", [raw])
            self._record_skipped(skipped, when)
        self._committed(remove=replaced, add_ids=new_ids, add_vectors=vectors)
        return new_ids

    def rename(self, image_id: int, image: NewImage) -> None:
        """Move image ``image_id`` to ``image.path`` (same content, so it keeps its id and
        vector); an entry already at that path is replaced."""
        self._require_writable()
        raw = os.fsencode(image.path)
        with self._writing():
            replaced = [i for i in self._delete_path(raw) if i != image_id]
            self.db.execute(
                "UPDATE images SET path = ?, raw_path = ?, size = ?, mtime = ? WHERE id = ?",
                [path_text(image.path), raw, image.size, image.mtime, image_id],
            )
            self.db.execute("DELETE FROM skipped WHERE raw_path = ?", [raw])
        self._committed(remove=replaced)

    def copy(self, source_id: int, image: NewImage) -> int:
        """Index ``image`` with the stored vector of ``source_id`` (same content elsewhere), and
        its photo facts (the same bytes say the same)."""
        if image.facts is None:
            image = replace(image, facts=photos.of(self.db, [source_id]).get(source_id))
        [new_id] = self.write_batch([image], self.vectors([source_id]))
        return new_id

    def touch(self, image_id: int, image: NewImage) -> None:
        """Record a new size / modification time for an image whose content is unchanged."""
        self._require_writable()
        with self._writing():
            # A file that failed to read (keeping its entry) and reads again is not skipped.
            self.db.execute("DELETE FROM skipped WHERE raw_path = ?", [os.fsencode(image.path)])
            self.db.execute(
                "UPDATE images SET size = ?, mtime = ? WHERE id = ?",
                [image.size, image.mtime, image_id],
            )

    def save_facts(self, found: dict[int, PhotoFacts]) -> None:
        """Store the photo facts of images indexed without them (one transaction)."""
        self._require_writable()
        with self._writing():
            for image_id, facts in found.items():
                photos.insert(self.db, image_id, facts)

    def remove(self, ids: Iterable[int]) -> int:
        """Remove the images ``ids`` (rows and vectors) in one transaction; returns how many."""
        self._require_writable()
        removed: list[int] = []
        with self._writing():
            for chunk, marks in _id_chunks(list(ids)):
                removed += [
                    r[0]
                    for r in self.db.execute(f"SELECT id FROM images WHERE id IN ({marks})", chunk)
                ]
                self.db.execute(f"DELETE FROM vectors WHERE id IN ({marks})", chunk)
                self.db.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)
        self._committed(remove=removed)
        return len(removed)

    def record_skipped(self, skipped: Sequence[SkippedFile]) -> None:
        self._require_writable()
        with self._writing():
            self._record_skipped(skipped, now())

    def forget_skipped(self, raw_paths: Iterable[bytes]) -> None:
        """Drop the skip records of ``raw_paths`` (names as bytes), e.g. files that no longer
        exist."""
        self._require_writable()
        with self._writing():
            for raw in raw_paths:
                self.db.execute("DELETE FROM skipped WHERE raw_path = ?", [raw])

    def _record_skipped(self, skipped: Sequence[SkippedFile], when: str) -> None:
        """Record files that were not indexed (see SkippedFile)."""
        rows = []
        for path, reason, *rest in skipped:
            state, max_pixels = (*rest, None, None)[:2]
            rows.append(
                [os.fsencode(path), path_text(path), reason, when]
                + ([state.size, state.mtime, state.ctime] if state else [None, None, None])
                + [max_pixels]
            )
        self.db.conn.executemany(
            "INSERT OR REPLACE INTO skipped (raw_path, path, reason, at, size, mtime, ctime, "
            "max_pixels) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def _delete_path(self, raw: bytes) -> list[int]:
        rows = self.db.execute("SELECT id FROM images WHERE raw_path = ?", [raw]).fetchall()
        for (image_id,) in rows:
            self.db.execute("DELETE FROM vectors WHERE id = ?", [image_id])
            self.db.execute("DELETE FROM images WHERE id = ?", [image_id])
        return [r[0] for r in rows]

    # -- the index kind and the FAISS file's records ----------------------------------------

    @property
    def requested_spec(self) -> IndexSpec | None:
        """The index kind asked for (None: auto)."""
        text = self.meta("index_requested", "auto")
        return None if text == "auto" else IndexSpec.from_dict(json.loads(text))

    def requested_kind(self) -> str:
        spec = self.requested_spec
        return "auto" if spec is None else spec.kind

    def request_index(self, spec: IndexSpec | None) -> None:
        """Ask for another index kind (None: auto); the next save builds it if it can."""
        self._require_writable()
        if spec is not None:
            spec.check(self.dim)
        value = "auto" if spec is None else json.dumps(spec.as_dict())
        with self._writing():
            self._set_meta("index_requested", value)

    def file_records(self) -> FileRecords:
        """What is recorded of the FAISS file (see :class:`imgindex.mirror.FileRecords`)."""
        built, writing_spec = self.meta("index_built", ""), self.meta("index_writing", "")
        file, writing = self.meta("faiss_file", ""), self.meta("faiss_writing", "")
        return FileRecords(
            built=IndexSpec.from_dict(json.loads(built)) if built else IndexSpec("flat"),
            file=FileDigest.from_dict(json.loads(file)) if file else None,
            writing_spec=IndexSpec.from_dict(json.loads(writing_spec)) if writing_spec else None,
            writing=FileDigest.from_dict(json.loads(writing)) if writing else None,
        )

    def record_writing(self, spec: IndexSpec, digest: FileDigest, earlier_landed: bool) -> None:
        """Record the FAISS file about to be renamed into place. A record left by a save killed
        before this one goes first: it becomes the record of the file in place if
        ``earlier_landed`` (its rename happened), else it is dropped."""
        with self._writing():
            if earlier_landed:
                self._set_meta("faiss_file", self.meta("faiss_writing"))
                self._set_meta("index_built", self.meta("index_writing"))
            self.db.execute("DELETE FROM meta WHERE key IN ('index_writing', 'faiss_writing')")
            self._set_meta("index_writing", json.dumps(spec.as_dict()))
            self._set_meta("faiss_writing", json.dumps(digest.as_dict()))

    def record_saved(self, spec: IndexSpec, digest: FileDigest) -> None:
        """Record the FAISS file renamed into place as the file."""
        with self._writing():
            self._set_meta("index_built", json.dumps(spec.as_dict()))
            self._set_meta("faiss_file", json.dumps(digest.as_dict()))
            self.db.execute("DELETE FROM meta WHERE key IN ('index_writing', 'faiss_writing')")

    # -- damage -----------------------------------------------------------------------------

    def check_rows(self, check_files: bool) -> RowsCheck:
        """Verify the database without changing it (see :class:`RowsCheck`)."""
        db = self.db
        try:
            integrity = db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:  # too damaged to check
            return RowsCheck(error=str(exc))
        with self.snapshot():
            all_ids = self.live_ids()
            live, stored = self.present_vectors(all_ids)
            return RowsCheck(
                integrity=integrity,
                images=db.execute("SELECT count(*) FROM images").fetchone()[0],
                vectors=db.execute("SELECT count(*) FROM vectors").fetchone()[0],
                no_vector=db.execute(
                    "SELECT count(*) FROM images WHERE id NOT IN (SELECT id FROM vectors)"
                ).fetchone()[0],
                orphans=db.execute(
                    "SELECT count(*) FROM vectors WHERE id NOT IN (SELECT id FROM images)"
                ).fetchone()[0],
                damage=self.vector_damage(),
                all_ids=all_ids,
                live=live,
                stored=stored,
                rows=list(self.file_rows()) if check_files else [],
            )

    def vector_damage(self) -> dict[str, list[int]]:
        """Ids of the stored vectors that are damaged, by how: "size" (not 768 float32),
        "checksum" (the bytes do not match their CRC-32), "not finite" (NaN or infinite numbers
        with a matching checksum: stored so, by weights that had diverged)."""
        damage: dict[str, list[int]] = {"size": [], "checksum": [], "not finite": []}
        for image_id, blob, crc in self.db.execute("SELECT id, vector, crc32 FROM vectors"):
            if len(blob) != 4 * self.dim:
                damage["size"].append(image_id)
            elif crc != vector_checksum(blob):
                damage["checksum"].append(image_id)
            elif not np.isfinite(np.frombuffer(blob, dtype="<f4")).all():
                damage["not finite"].append(image_id)
        return damage

    def mend_vectors(
        self, copies_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    ) -> dict[str, int]:
        """In one transaction: drop vectors without a row; restore damaged stored vectors from
        ``copies_of(ids)`` (-> the ids it holds exactly, their vectors; the FAISS index) where
        a copy matches the checksum stored with it (or equals the stored bytes: then the
        checksum was the damaged part); drop the other damaged vectors with their rows."""
        self._require_writable()
        db = self.db
        with self._writing():
            orphans = db.execute(
                "DELETE FROM vectors WHERE id NOT IN (SELECT id FROM images)"
            ).rowcount
            damage = self.vector_damage()
            held, copies = copies_of(np.asarray(damage["size"] + damage["checksum"], np.int64))
            restored = self._restore(held, copies) if copies is not None else set()
            bad = 0
            unsound = {i for ids in damage.values() for i in ids} - restored
            for chunk, marks in _id_chunks(sorted(unsound)):
                bad += db.execute(f"DELETE FROM vectors WHERE id IN ({marks})", chunk).rowcount
            unusable = db.execute(
                "DELETE FROM images WHERE id NOT IN (SELECT id FROM vectors)"
            ).rowcount
        return {
            "orphan_vectors_removed": orphans,
            "damaged_vectors_restored": len(restored),
            "bad_vectors_removed": bad,
            "rows_without_vector_removed": unusable,
        }

    def _restore(self, held: np.ndarray, copies: np.ndarray) -> set[int]:
        restored = set()
        for image_id, copy in zip(held.tolist(), copies, strict=True):
            blob = np.ascontiguousarray(copy, dtype="<f4").tobytes()
            stored, crc = self.db.execute(
                "SELECT vector, crc32 FROM vectors WHERE id = ?", [image_id]
            ).fetchone()
            if np.isfinite(copy).all() and (crc == vector_checksum(blob) or stored == blob):
                self.db.execute(
                    "UPDATE vectors SET vector = ?, crc32 = ? WHERE id = ?",
                    [blob, vector_checksum(blob), image_id],
                )
                restored.add(image_id)
        return restored


@dataclass
class RowsCheck:
    """What :meth:`Catalog.check_rows` found: SQLite's own verdict (``integrity``, or the
    ``error`` that kept it from checking), row and vector counts, image rows without a vector
    and vectors without a row, damaged vectors (:meth:`Catalog.vector_damage`), the ids of all
    images and of those with a sound vector (with the vectors), and the rows to look for on
    disk."""

    error: str | None = None
    integrity: str = "ok"
    images: int = 0
    vectors: int = 0
    no_vector: int = 0
    orphans: int = 0
    damage: dict[str, list[int]] = field(default_factory=dict)
    all_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    live: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    stored: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))
    rows: list[tuple[int, str, bytes, int, float, str]] = field(default_factory=list)


_RECORD_COLUMNS = "id, path, sha256, size, mtime, width, height, added_at"


def _id_chunks(ids: Sequence[int], size: int = 500) -> Iterator[tuple[list[int], str]]:
    """``ids`` in chunks small enough for one ``IN (?, ?, ...)`` (SQLite limits parameters),
    each with its placeholders."""
    for start in range(0, len(ids), size):
        chunk = [int(i) for i in ids[start : start + size]]
        yield chunk, ",".join("?" * len(chunk))
