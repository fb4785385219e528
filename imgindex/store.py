"""SQLite metadata and FAISS vectors, kept consistent: the only code that touches both.

An index is a folder::

    imgindex.db     SQLite (WAL): one row per image, its vector, skipped files, settings
    vectors.faiss   FAISS IndexIDMap2(IndexFlatL2) over the same vectors, keyed by image id

    write.lock      held (flock) by the one process allowed to write

SQLite is the source of truth. Every vector is stored there too (float32 blobs), in the same
transaction as its row, so the FAISS file is only a cache: it can always be rebuilt without
re-embedding anything. Two rules make the cache easy to trust:

* an image id is never reused (AUTOINCREMENT) and the vector under an id never changes (new
  content gets a new id), so a FAISS file can only be *behind* SQLite, never wrong;
* whoever loads the FAISS file reconciles it with one SQLite snapshot (a read transaction):
  ids SQLite no longer has are removed, ids it has and the file lacks are added from the stored
  vectors. A reader therefore sees exactly the state of one committed transaction, whether the
  writer saved its FAISS file a moment ago, long ago, or was killed before saving it.

The FAISS file is written to a temporary name, flushed and renamed over the old one, so a reader
or a crash sees either the old file or the new one; its size and CRC-32 are recorded first, and a
file that does not match them is damaged: it is not used (the index is rebuilt from SQLite in
memory). Each stored vector has a CRC-32 too, and a damaged one never reaches the FAISS index.
Writers commit in batches, one transaction each, and save the FAISS file at the end of a build
(and every few minutes during a long one).

Nothing in the folder is written through a link: the lock file is opened without following one,
temporary files are created exclusively under unpredictable names, and a writer refuses
database files that are links and folders that belong to another user.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgindex import ann
from imgindex.ann import IndexSpec
from imgindex.errors import (
    DAMAGED,
    DamagedIndexError,
    ImgIndexError,
    IncompatibleIndexError,
    IndexExistsError,
    IndexLockedError,
    IndexNotFoundError,
)
from imgindex.files import is_gone, path_text, resolve
from imgindex.schema import (
    DB_NAME,
    apply_migrations,
    now,
    pending_migrations,
    vector_checksum,
    write_transaction,
)

FAISS_NAME = "vectors.faiss"
LOCK_NAME = "write.lock"
# How long opening an index of an older imgindex waits for the write lock to upgrade it (or for
# another process to finish upgrading it): several commands may start at once on it.
UPGRADE_WAIT = 30.0


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


@dataclass
class CheckReport:
    """What :meth:`Store.check` found. ``problems`` make the index wrong; ``warnings`` do not."""

    images: int = 0
    vectors: int = 0
    faiss_file: int | None = None  # vectors in the FAISS file; None when there is no file
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.missing_files

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


class Store:
    """An open index folder: SQLite rows and the FAISS index over their vectors."""

    def __init__(self, path: Path, db: Any, writable: bool):
        self.path = path
        self.db = db
        self.writable = writable
        self.dim = int(self.meta("dim"))
        self._lock_fh: Any = None
        self._leftovers_removed = 0  # temporary files of a crashed writer, deleted by lock()
        self._dirty = False  # vector_index differs from the FAISS file
        self._last_save = time.monotonic()
        self._stamp = self._files_stamp()
        self.rebuilds = 0  # times the vector index was built anew in memory (not added to)
        self.vector_index = self._load_vector_index()
        self._seen_data_version = self._data_version()
        self._reconcile()

    def _files_stamp(self) -> tuple[Any, ...]:
        """What changes on disk when anyone writes to the database."""
        stamp = []
        for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
            try:
                st = os.stat(self.path / name)
                stamp.append((st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                stamp.append(None)
        return tuple(stamp)

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        fingerprint: dict[str, Any],
        index_spec: IndexSpec | None = None,
        wait: float = 0.0,
        on_wait: Any = None,
        private: bool = False,
    ) -> Store:
        """Create a new, empty index folder recording which vectors it will hold and which
        kind of vector index to keep (None: auto).

        Creation holds the write lock (waiting up to ``wait`` seconds for another writer, as
        :meth:`lock`) and moves a complete database into place with one rename, so a crash
        leaves either no index or a whole one, and two processes creating the same index at
        once cannot both succeed: the second gets :class:`IndexExistsError`. Files of an
        earlier index in the folder (a FAISS file whose database was deleted, an unfinished
        database) are removed first: their ids would otherwise be taken for the new ones'.

        Folders made for the index are private (0700) with ``private``, or when the nearest
        folder that exists already is; otherwise they follow the umask."""
        path = Path(path)
        if index_spec is not None:
            index_spec.check(int(fingerprint["dim"]))
        make_folder(path, private)
        check_folder_for_writing(path)
        if private:
            os.chmod(path, 0o700)  # (an existing folder too)
        lock = _take_lock(path, wait, on_wait)
        try:
            state = database_state(path)
            if state == "complete":
                raise IndexExistsError(f"{path}: an index already exists here")
            if state == "foreign":
                raise IncompatibleIndexError(
                    f"{path}: {DB_NAME} is not an imgindex database; choose another folder"
                )
            for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", FAISS_NAME):
                with contextlib.suppress(FileNotFoundError):
                    (path / name).unlink()
            for leftover in [*path.glob(f".{FAISS_NAME}.*.tmp"), *path.glob(f".{DB_NAME}.*")]:
                leftover.unlink()
            settings = {
                "format": "imgindex",
                "created_at": now(),
                "model": fingerprint["model"],
                "weights_sha256": fingerprint["weights_sha256"],
                "dim": str(fingerprint["dim"]),
                "preprocessing": json.dumps(fingerprint["preprocessing"]),
                "index_requested": "auto"
                if index_spec is None
                else json.dumps(index_spec.as_dict()),
            }
            # Built under another name and renamed into place: the rename is the moment the
            # index exists. Already in WAL mode (the mode is recorded in the file), so opening it
            # never switches modes, which a kill could interrupt, leaving a journal that readers
            # cannot roll back; closed first, so no write-ahead log is left behind to rename.
            # The name is unpredictable and the file ours (created exclusively, not through a
            # link), so nothing planted in the folder is written to.
            building = path / f".{DB_NAME}.{secrets.token_hex(8)}.new"
            os.close(os.open(building, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644))
            db = _connect(building)
            try:
                apply_migrations(db, pending_migrations(db, path))
                with write_transaction(db):
                    db["meta"].insert_all([{"key": k, "value": v} for k, v in settings.items()])
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                db.close()
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{building}{suffix}")  # empty once checkpointed and closed
            os.replace(building, path / DB_NAME)
            _fsync_folder(path)
            store = cls.open(path, writable=True)
        finally:
            lock.close()
        return store

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], writable: bool = False, wait: float = UPGRADE_WAIT
    ) -> Store:
        """Open an existing index folder; raises IndexNotFoundError when there is none.

        An index made by an older imgindex is upgraded in place (its migrations applied under
        the write lock, waiting up to ``wait`` seconds, at least UPGRADE_WAIT, for another
        writer or upgrader), also when it is opened for reading, if its folder can be
        written."""
        path = Path(path)
        if path.is_dir():  # before anything opens the database, which writes SQLite's files
            if writable:
                check_folder_for_writing(path)
            else:
                check_index_files(path, (DB_NAME + "-wal", DB_NAME + "-shm"))
        state = database_state(path)
        if state in ("none", "unfinished"):
            unfinished = " (only an unfinished one, whose creation was interrupted)"
            raise IndexNotFoundError(
                f"{path}: no index here{unfinished if state == 'unfinished' else ''} "
                f"(create one with `imgindex build FOLDER --index {path}`)"
            )
        if state == "foreign":
            raise IncompatibleIndexError(f"{path}: {DB_NAME} is not an imgindex database")
        db = _connect(path / DB_NAME, read_only=not writable)
        try:
            pending = pending_migrations(db, path)
            if pending and not writable:
                db.close()
                return cls._open_upgraded(path, wait)
            if pending:
                _upgrade(db, path, wait)
            return cls(path, db, writable=writable)
        except sqlite3.DatabaseError as exc:
            db.close()
            if isinstance(exc, sqlite3.OperationalError):
                if not writable and "readonly" in str(exc):
                    raise ImgIndexError(
                        f"{path}: SQLite needs to write its shared files beside {DB_NAME} to "
                        "read it (a writer left them half there), and this folder cannot be "
                        "written: run an imgindex command that writes (imgindex repair, say) "
                        "as a user who may write it"
                    ) from None
                raise
            raise IncompatibleIndexError(f"{path}: {DB_NAME} {DAMAGED} ({exc})") from None
        except BaseException:
            db.close()
            raise

    @classmethod
    def _open_upgraded(cls, path: Path, wait: float) -> Store:
        """A reader's way into an index of an older imgindex: upgrade it, then read it."""
        if not os.access(path, os.W_OK):
            raise IncompatibleIndexError(
                f"{path}: made by an older imgindex; it is upgraded in place by the first "
                "imgindex command run by someone who may write its folder (imgindex check, say)"
            )
        cls.open(path, writable=True, wait=wait).close()
        return cls.open(path)

    def make_private(self) -> None:
        """Let only the index folder's owner read it from now on (0700)."""
        os.chmod(self.path, 0o700)

    def close(self) -> None:
        self.unlock()
        self.db.close()

    def _writing(self) -> contextlib.AbstractContextManager[Any]:
        return write_transaction(self.db)

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

    def lock(self, wait: float = 0.0, on_wait: Any = None) -> None:
        """Take the index's write lock, waiting up to ``wait`` seconds for another writer to
        finish; raise IndexLockedError if it does not. ``on_wait(holder)`` is called once when
        waiting starts."""
        if self._lock_fh is not None:
            return
        self._lock_fh = _take_lock(self.path, wait, on_wait)
        # Holding the lock, no one else is writing: temporary files are leftovers of a crash.
        for leftover in self._temporary_files():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                self._leftovers_removed += 1
        # Another writer may have committed since this store was opened.
        self.refresh()

    def unlock(self) -> None:
        if self._lock_fh is None:
            return
        # Fold the write-ahead log into the database file so the folder is compact at rest.
        # Only the lock's holder does this: a checkpoint that truncates the log takes SQLite's
        # write lock at its end, and so must not run beside another process's build (a writer
        # refused our lock used to do it on closing, and made the build's commits fail). It
        # does not wait for readers (busy timeout 0): one still reading stops it early, which
        # is harmless.
        with contextlib.suppress(Exception):
            self.db.execute("PRAGMA busy_timeout = 0")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with contextlib.suppress(Exception):
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._lock_fh.close()  # closing releases the flock
        self._lock_fh = None

    def _temporary_files(self) -> list[Path]:
        """Temporary FAISS files a writer left (killed before renaming one into place). Only
        files and links: anything else of that name is no file of ours (and no obstacle, the
        names being unpredictable)."""
        found = self.path.glob(f".{FAISS_NAME}.*.tmp")
        return sorted(p for p in found if p.is_symlink() or p.is_file())

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
        with self._snapshot():
            return self._present_vectors(self._live_ids())

    def _live_ids(self) -> np.ndarray:
        """Ids of the indexed images (sorted). Read from the images table alone: scanning the
        vectors table would read every 3 KB vector (13 s for a million on the test machine)."""
        rows = self.db.execute("SELECT id FROM images ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def _present_vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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

    def disk_usage(self) -> dict[str, int]:
        return disk_usage(self.path)

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
                blob = vector.tobytes()
                self.db.execute(
                    "INSERT INTO vectors (id, vector, crc32) VALUES (?, ?, ?)",
                    [cursor.lastrowid, blob, vector_checksum(blob)],
                )
                # A file that failed before and reads now is no longer skipped.
                self.db.execute("DELETE FROM skipped WHERE raw_path = ?", [raw])
            self._record_skipped(skipped, when)
        # Mirror the committed change in memory; the file is saved by save_vector_index().
        self._apply(remove=replaced, add_ids=new_ids, add_vectors=vectors)
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
        self._apply(remove=replaced)

    def copy(self, source_id: int, image: NewImage) -> int:
        """Index ``image`` with the stored vector of ``source_id`` (same content elsewhere)."""
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
        self._apply(remove=removed)
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

    def _require_writable(self) -> None:
        if not self.writable:
            raise RuntimeError("this index was opened read-only")

    # -- the FAISS index --------------------------------------------------------------------

    @property
    def requested_spec(self) -> IndexSpec | None:
        """The index kind asked for (None: auto)."""
        text = self.meta("index_requested", "auto")
        return None if text == "auto" else IndexSpec.from_dict(json.loads(text))

    @property
    def built_spec(self) -> IndexSpec:
        """The index kind the FAISS file holds (flat until an approximate one can be trained)."""
        text = self.meta("index_built", "")
        return IndexSpec.from_dict(json.loads(text)) if text else IndexSpec("flat")

    def _load_faiss_file(self, mmap: bool) -> ann.VectorIndex | None:
        """The FAISS file, or None (no file, or one that is not what was saved)."""
        return self._faiss_file(mmap)[0]

    def _faiss_file(self, mmap: bool) -> tuple[ann.VectorIndex | None, str | None]:
        """(the FAISS file loaded, or None; what is wrong with it, or None if nothing or if
        there is no file). It must have the size and CRC-32 recorded when it was saved, and is
        loaded as the kind recorded with them, or as the kind a save was writing when it
        stopped between renaming the file into place and recording that (a kill there). A file
        of an index saved before digests were recorded is loaded as its recorded kind."""
        file = self.path / FAISS_NAME
        if not file.exists():
            return None, None
        if not file.is_file():  # a pipe would block whoever reads it, for ever
            return None, f"{FAISS_NAME} cannot be read: it is not a plain file"
        for _attempt in range(5):  # a writer may save a new file meanwhile: look again
            with self._snapshot():
                candidates = self._faiss_candidates()
            for spec, digest in candidates:
                if digest is not None and ann.FileDigest.of_file(file, digest.size) != digest:
                    continue
                loaded = ann.VectorIndex.load(file, spec, self.dim, mmap)
                if loaded is not None:
                    return loaded, None  # (after a kill, the next save records the kind)
                if digest is not None:
                    return None, f"{FAISS_NAME} cannot be read as {spec.describe()}"
            if all(digest is None for _spec, digest in candidates):
                return None, f"{FAISS_NAME} cannot be read as {self.built_spec.describe()}"
        return None, (
            f"{FAISS_NAME} cannot be read: it is damaged (its size or CRC-32 differs from the "
            "one recorded when it was saved)"
        )

    def _faiss_candidates(self) -> list[tuple[IndexSpec, ann.FileDigest | None]]:
        """What the FAISS file may be: (its kind, the digest it must have), in order: the file
        last saved, then one a save renamed into place before a kill stopped it recording so.
        An index saved before digests were recorded has none to check."""
        out: list[tuple[IndexSpec, ann.FileDigest | None]] = []
        built, writing = self.meta("faiss_file", ""), self.meta("faiss_writing", "")
        writing_spec = self.meta("index_writing", "")
        if built:
            out.append((self.built_spec, ann.FileDigest.from_dict(json.loads(built))))
        elif not writing:
            out.append((self.built_spec, None))
        if writing_spec:
            spec = IndexSpec.from_dict(json.loads(writing_spec))
            digest = ann.FileDigest.from_dict(json.loads(writing)) if writing else None
            if digest is not None or not built:
                out.append((spec, digest))
        return out

    def request_index(self, spec: IndexSpec | None) -> None:
        """Ask for another index kind (None: auto); the next save builds it if it can."""
        self._require_writable()
        if spec is not None:
            spec.check(self.dim)
        value = "auto" if spec is None else json.dumps(spec.as_dict())
        with self._writing():
            self._set_meta("index_requested", value)

    def index_note(self) -> str | None:
        """Why the index built differs from the one asked for, if it does."""
        target, note = ann.plan(self.requested_spec, self.count(), self.dim)
        return note if target.kind != self.requested_kind() else None

    def requested_kind(self) -> str:
        spec = self.requested_spec
        return "auto" if spec is None else spec.kind

    def refresh(self) -> None:
        """Bring the in-memory FAISS index up to date if another process committed changes."""
        if getattr(self.db, "immutable", False) and self._files_stamp() != self._stamp:
            # Read as immutable (see _read_only_uri), SQLite sees no change: open anew.
            self.db.close()
            self.db = _connect(self.path / DB_NAME, read_only=True)
            self._stamp = self._files_stamp()
            self.vector_index = self._load_vector_index()
            self._seen_data_version = self._data_version()
            self._reconcile()
            return
        version = self._data_version()
        if version != self._seen_data_version:
            self._seen_data_version = version
            self._reconcile()

    def save_vector_index(self, force: bool = False) -> None:
        """Write the FAISS index atomically if it changed since it was loaded or saved; first
        build the kind asked for if the collection has become large enough to train it, and
        rebuild an HNSW index that carries many deleted vectors."""
        self._require_writable()
        built = self.vector_index.spec
        target = self._target_spec()
        if not _satisfies(built, target, self.requested_spec):
            self._rebuild(target)
        elif self.vector_index.tombstone_fraction > 0.1:
            self._rebuild(built)
        if not (self._dirty or force) and (self.path / FAISS_NAME).exists():
            return
        try:
            self._save_faiss_file()
        except (OSError, sqlite3.Error) as exc:
            raise ImgIndexError(
                f"{self.path}: could not save {FAISS_NAME} ({_describe(exc)}); the index keeps "
                f"its {self.count()} images in {DB_NAME}, and the FAISS index is rebuilt from "
                "them in memory when it is opened (once the cause is fixed, a full disk say, "
                "imgindex repair writes the file)"
            ) from None
        self._dirty = False
        self._last_save = time.monotonic()

    def _save_faiss_file(self) -> None:
        """Write the FAISS file under a temporary name, then rename it into place. The kind
        and digest of the file about to be renamed are recorded first: the rename and the
        record cannot be one step, and whoever opens the index after a kill between them must
        still recognise the file (:meth:`_faiss_file`)."""
        target = self.path / FAISS_NAME
        spec = json.dumps(self.vector_index.spec.as_dict())
        temp, digest = self.vector_index.write_temporary(target)
        try:
            with self._writing():
                self._settle_interrupted_save()
                self._set_meta("index_writing", spec)
                self._set_meta("faiss_writing", json.dumps(digest.as_dict()))
            os.replace(temp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        _fsync_folder(self.path)
        with self._writing():
            self._set_meta("index_built", spec)
            self._set_meta("faiss_file", json.dumps(digest.as_dict()))
            self.db.execute("DELETE FROM meta WHERE key IN ('index_writing', 'faiss_writing')")

    def _settle_interrupted_save(self) -> None:
        """A save killed between recording and renaming left its record (``faiss_writing``):
        before it is replaced by this save's, make the record say what the file in place is.
        If that file is the one the killed save renamed, it becomes the recorded file;
        otherwise the rename never happened and the record goes. (Only after a kill, so the
        file is read to tell, once.)"""
        writing = self.meta("faiss_writing", "")
        if not writing:
            return
        digest = ann.FileDigest.from_dict(json.loads(writing))
        if ann.FileDigest.of_file(self.path / FAISS_NAME, digest.size) == digest:
            self._set_meta("faiss_file", writing)
            self._set_meta("index_built", self.meta("index_writing"))
        self.db.execute("DELETE FROM meta WHERE key IN ('index_writing', 'faiss_writing')")

    def save_vector_index_every(self, seconds: float) -> None:
        """Save the FAISS index if it changed and the last save is older than ``seconds``."""
        if self._dirty and time.monotonic() - self._last_save >= seconds:
            self.save_vector_index()

    def _apply(
        self,
        remove: Sequence[int] = (),
        add_ids: Sequence[int] = (),
        add_vectors: np.ndarray | None = None,
    ) -> None:
        if len(remove):
            self.vector_index.remove(np.asarray(remove, dtype=np.int64))
        if len(add_ids):
            self.vector_index.add(np.asarray(add_ids, dtype=np.int64), add_vectors)
        if len(remove) or len(add_ids):
            self._dirty = True

    def _data_version(self) -> int:
        # Changes when another connection commits to the database (not for our own commits).
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    def _load_vector_index(self) -> ann.VectorIndex:
        """The FAISS file (memory-mapped for readers), or an index rebuilt from SQLite."""
        spec = self.built_spec
        loaded = self._load_faiss_file(mmap=not self.writable)
        if loaded is not None:
            return loaded
        self._dirty = True
        if spec.min_training_vectors() or spec.kind in ("ivf-flat", "ivf-pq", "factory"):
            return self._build_from_sqlite(spec)
        return ann.VectorIndex.empty(spec, self.dim)  # reconcile fills it

    def _target_spec(self) -> IndexSpec:
        """The index kind to have now. Once auto has left the flat index, it keeps the kind it
        chose (free memory varies; the index should not flip between kinds at every save)."""
        requested, built = self.requested_spec, self.vector_index.spec
        if requested is None and built.kind != "flat":
            return built
        return ann.plan(requested, self.count(), self.dim)[0]

    def _rebuild(self, spec: IndexSpec) -> None:
        self.vector_index = self._build_from_sqlite(spec)
        self.rebuilds += 1
        self._dirty = True

    def _build_from_sqlite(self, spec: IndexSpec) -> ann.VectorIndex:
        """``spec`` built (and trained) from the stored vectors of one SQLite snapshot."""
        with self._snapshot():
            live = self._live_ids()
            rng = np.random.default_rng(0)

            def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
                for start in range(0, len(live), 20_000):
                    yield self._present_vectors(live[start : start + 20_000])

            def sample(m: int) -> np.ndarray:
                picked = np.sort(rng.choice(live, size=min(m, len(live)), replace=False))
                return self._present_vectors(picked)[1]

            if spec.min_training_vectors() > len(live) or (
                spec.kind != "flat" and spec.kind != "hnsw" and not len(live)
            ):
                spec = IndexSpec("flat")
            if spec.kind in ("flat", "hnsw"):
                index = ann.VectorIndex.empty(spec, self.dim)
                for ids, vectors in chunks():
                    index.add(ids, vectors)
                return index
            return ann.VectorIndex.build(spec, self.dim, chunks, sample, len(live))

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """Reads inside see one committed state of the database."""
        if self.db.conn.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    def _reconcile(self) -> None:
        """Make the in-memory FAISS index hold exactly the vectors of one SQLite snapshot."""
        with self._snapshot():
            live = self._live_ids()
            present = self.vector_index.ids()
            stale = np.setdiff1d(present, live, assume_unique=True)
            missing, vectors = self._present_vectors(
                np.setdiff1d(live, present, assume_unique=True)
            )
        self._apply(remove=stale, add_ids=missing, add_vectors=vectors)

    def stored_vectors(self, ids: np.ndarray) -> np.ndarray:
        """Raw vectors of ``ids``: from the FAISS index when it keeps them exactly, else from
        SQLite."""
        found = self.vector_index.reconstruct(ids)
        return found if found is not None else self.vectors([int(i) for i in ids])

    # -- checking and repairing -------------------------------------------------------------

    def check(self, weights_sha256: str | None = None, check_files: bool = True) -> CheckReport:
        """Verify the index without changing it. See CheckReport."""
        report = CheckReport()
        db = self.db
        try:
            integrity = db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:  # too damaged to check
            report.problems.append(f"{DB_NAME} {DAMAGED} (SQLite: {exc})")
            return report
        if integrity != "ok":
            report.problems.append(f"SQLite reports damage: {integrity}")
        with self._snapshot():
            report.images = db.execute("SELECT count(*) FROM images").fetchone()[0]
            report.vectors = db.execute("SELECT count(*) FROM vectors").fetchone()[0]
            no_vector = db.execute(
                "SELECT count(*) FROM images WHERE id NOT IN (SELECT id FROM vectors)"
            ).fetchone()[0]
            orphans = db.execute(
                "SELECT count(*) FROM vectors WHERE id NOT IN (SELECT id FROM images)"
            ).fetchone()[0]
            damage = self._vector_damage()
            all_ids = self._live_ids()
            live, stored = self._present_vectors(all_ids)
            rows = list(self.file_rows()) if check_files else []
        if no_vector:
            report.problems.append(f"{no_vector} image rows have no vector (repair removes them)")
        if orphans:
            report.problems.append(f"{orphans} vectors belong to no image (repair removes them)")
        report.problems += _describe_damage(damage)
        meta_dim = self.fingerprint()["dim"]
        if meta_dim != self.dim:
            report.problems.append(f"index settings say {meta_dim} dimensions, found {self.dim}")

        file, problem = self._faiss_file(mmap=True)
        if not (self.path / FAISS_NAME).exists():
            report.warnings.append(
                f"no {FAISS_NAME} yet: it is rebuilt from SQLite on open (repair writes it)"
            )
        elif file is None:
            report.problems.append(f"{problem} (repair rebuilds it)")
        else:
            report.faiss_file = len(file.base_ids)
            file_ids = file.base_ids
            if len(np.unique(file_ids)) != len(file_ids):
                report.problems.append(f"{FAISS_NAME} holds duplicate ids (repair rebuilds it)")
            # Only sound stored vectors are compared: a damaged one is SQLite's fault, and
            # reported above as such.
            common, _, in_db = np.intersect1d(file_ids, live, return_indices=True)
            kept = file.reconstruct(common) if len(common) else None
            if kept is not None and not np.array_equal(kept, stored[in_db]):
                report.problems.append(
                    f"{FAISS_NAME} holds vectors that differ from SQLite's (repair rebuilds it)"
                )
            behind = len(np.setdiff1d(live, file_ids))
            ahead = len(np.setdiff1d(file_ids, all_ids))
            if behind or ahead:
                report.warnings.append(
                    f"{FAISS_NAME} is out of date ({behind} vectors to add, {ahead} to remove); "
                    "it is brought up to date in memory on open (repair rewrites it)"
                )
        note = self.index_note()
        if note:
            report.warnings.append(note)
        if weights_sha256 is not None and weights_sha256 != self.meta("weights_sha256"):
            report.problems.append(
                f"the index was built with weights {self.meta('weights_sha256')[:12]}, the "
                f"weights in use are {weights_sha256[:12]}: queries would be refused"
            )
        for leftover in self._temporary_files():
            report.warnings.append(f"leftover temporary file {leftover.name} (repair removes it)")
        for _image_id, text, raw, _size, _mtime, _sha in rows:
            if is_gone(raw):
                report.missing_files.append(text)
        report.missing_files.sort()
        return report

    def _vector_damage(self) -> dict[str, list[int]]:
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

    def repair(self, remove_missing: bool = False) -> dict[str, int]:
        """Fix what can be fixed without re-embedding: restore damaged stored vectors from the
        FAISS index where it holds them intact (their checksum says so), else drop them with
        their rows (the next build embeds those files again); drop vectors without a row;
        rebuild and rewrite the FAISS file; delete leftover temporary files and (with
        ``remove_missing``) the entries of files known to be gone."""
        self._require_writable()
        db = self.db
        with self._writing():
            orphans = db.execute(
                "DELETE FROM vectors WHERE id NOT IN (SELECT id FROM images)"
            ).rowcount
            damage = self._vector_damage()
            restored = self._restore_from_faiss(damage["size"] + damage["checksum"])
            bad = 0
            unsound = {i for ids in damage.values() for i in ids} - restored
            for chunk, marks in _id_chunks(sorted(unsound)):
                bad += db.execute(f"DELETE FROM vectors WHERE id IN ({marks})", chunk).rowcount
            unusable = db.execute(
                "DELETE FROM images WHERE id NOT IN (SELECT id FROM vectors)"
            ).rowcount
        missing = 0
        if remove_missing:
            gone = [row[0] for row in self.file_rows() if is_gone(row[2])]
            missing = self.remove(gone)
        temporary = self._leftovers_removed  # taking the lock deleted these already
        for leftover in self._temporary_files():
            leftover.unlink()
            temporary += 1
        self._rebuild(self._target_spec())
        self.save_vector_index(force=True)
        return {
            "orphan_vectors_removed": orphans,
            "damaged_vectors_restored": len(restored),
            "bad_vectors_removed": bad,
            "rows_without_vector_removed": unusable,
            "missing_files_removed": missing,
            "temporary_files_removed": temporary,
            "vectors_in_faiss": self.vector_index.ntotal,
        }

    def _restore_from_faiss(self, ids: list[int]) -> set[int]:
        """Put back the stored vectors of ``ids`` (damaged in SQLite) from the FAISS index, for
        those it holds exactly and whose copy there matches the checksum stored with them (or
        equals the stored bytes: then the checksum was the damaged part). Returns those ids."""
        held = np.intersect1d(np.asarray(ids, dtype=np.int64), self.vector_index.ids())
        copies = self.vector_index.reconstruct(held) if len(held) else None
        if copies is None:
            return set()
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


def _describe_damage(damage: dict[str, list[int]]) -> list[str]:
    """What check reports of damaged stored vectors (see Store._vector_damage)."""
    out = []
    if damage["size"]:
        out.append(
            f"{len(damage['size'])} stored vectors are not 768 float32 numbers (image ids "
            f"{damage['size'][:10]}); repair restores them from {FAISS_NAME} where it holds "
            "them intact, else removes their entries"
        )
    if damage["checksum"]:
        out.append(
            f"{len(damage['checksum'])} stored vectors in {DB_NAME} are damaged: their bytes "
            f"do not match their CRC-32 (image ids {damage['checksum'][:10]}); repair restores "
            f"them from {FAISS_NAME} where it holds them intact, else removes their entries so "
            "that the next build embeds those files again"
        )
    if damage["not finite"]:
        out.append(
            f"{len(damage['not finite'])} stored vectors hold NaN or infinite numbers (image "
            f"ids {damage['not finite'][:10]}; made by weights that had diverged?); repair "
            "removes their entries so that the next build embeds those files again"
        )
    return out


_RECORD_COLUMNS = "id, path, sha256, size, mtime, width, height, added_at"


def _satisfies(built: IndexSpec, target: IndexSpec, requested: IndexSpec | None) -> bool:
    """Whether the built index is the target: same kind and metric and, when the target is the
    kind the user asked for, the parameters they gave. Parameters filled in for the collection's
    size (nlist) do not force a rebuild as the collection grows."""
    if (built.kind, built.metric) != (target.kind, target.metric):
        return False
    if requested is None or requested.kind != target.kind:
        return True
    return all(built.params.get(key) == value for key, value in requested.params.items())


def _id_chunks(ids: Sequence[int], size: int = 500) -> Iterator[tuple[list[int], str]]:
    """``ids`` in chunks small enough for one ``IN (?, ?, ...)`` (SQLite limits parameters),
    each with its placeholders."""
    for start in range(0, len(ids), size):
        chunk = [int(i) for i in ids[start : start + size]]
        yield chunk, ",".join("?" * len(chunk))


def database_state(path: Path) -> str:
    """What the index folder ``path`` holds: "none" (no database), "unfinished" (a database
    whose creation was interrupted: empty, or without settings, by an imgindex older than the
    rename in :meth:`Store.create`), "foreign" (some other SQLite file) or "complete"."""
    db_path = path / DB_NAME
    if not db_path.is_file():
        return "none"
    if db_path.stat().st_size == 0:
        return "unfinished"
    try:
        conn = sqlite3.connect(_read_only_uri(db_path), uri=True)
    except sqlite3.Error:
        return "complete"  # opening it properly will say what is wrong
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if "meta" not in tables:
            return "unfinished" if not tables or tables <= {"_migrations"} else "foreign"
        if conn.execute("SELECT 1 FROM meta WHERE key = 'dim'").fetchone() is None:
            return "unfinished" if "_migrations" in tables else "foreign"
        return "complete"
    except sqlite3.Error:
        return "complete"
    finally:
        conn.close()


def disk_usage(path: Path) -> dict[str, int]:
    """Bytes of each file of the index folder ``path`` (the write-ahead log while it is open)."""
    sizes = {}
    for name in (DB_NAME, DB_NAME + "-wal", FAISS_NAME):
        with contextlib.suppress(FileNotFoundError):
            sizes[name] = (path / name).stat().st_size
    return sizes


# Files in the index folder are opened without following a symbolic link in their place: a
# link planted there must not make imgindex write through it to a file elsewhere.
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
TRUST_ENV = "IMGINDEX_TRUST_FOLDER"


def make_folder(path: Path, private: bool) -> None:
    """Make the index folder ``path`` and the folders above it that are missing: 0700 with
    ``private`` or when the nearest existing folder above is private (no access for group and
    others), else as the umask says."""
    missing = []
    existing = path
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not private and existing.is_dir():
        private = existing.stat().st_mode & 0o077 == 0
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made by another process meanwhile
            # Never writable by others, whatever the umask (see check_folder_for_writing).
            folder.mkdir(mode=0o700 if private else 0o775)


def check_folder_for_writing(path: Path) -> None:
    """Refuse to write into an index folder that this user cannot write, that another user
    owns or that anyone may write (either could plant links in it; ``$IMGINDEX_TRUST_FOLDER=1``
    allows it), or where imgindex's own files are not plain files of their own (links, hard
    links, folders, pipes: SQLite would write through them, or block on them)."""
    if not os.access(path, os.W_OK):
        raise ImgIndexError(
            f"{path}: the index folder cannot be written (permissions, or a read-only "
            "mount); commands that only read it still work"
        )
    st = path.stat()
    trusted = os.environ.get(TRUST_ENV) == "1"
    how = (
        "imgindex writes only into folders its user owns and others cannot write (set "
        f"{TRUST_ENV}=1 to write there anyway)"
    )
    if st.st_uid != os.geteuid() and not trusted:
        raise ImgIndexError(
            f"{path}: the index folder belongs to another user (uid {st.st_uid}), who could "
            f"plant links in it for imgindex to write through; {how}"
        )
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX and not trusted:
        raise ImgIndexError(
            f"{path}: anyone may write the index folder (mode {stat.S_IMODE(st.st_mode):o}) and "
            f"plant links in it for imgindex to write through; make it yours alone (chmod o-w "
            f"FOLDER), or: {how}"
        )
    check_index_files(path, (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", FAISS_NAME, LOCK_NAME))


def check_index_files(path: Path, names: Sequence[str]) -> None:
    """Refuse if any of the files ``names`` in the index folder exists as something other than
    a plain file with one name (readers check SQLite's shared files: SQLite writes them)."""
    for name in names:
        file = path / name
        try:
            st = os.lstat(file)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            what = "a symbolic link"
        elif not stat.S_ISREG(st.st_mode):
            what = "not a plain file (a folder, a pipe or a device)"
        elif st.st_nlink > 1:
            what = "a hard link shared with another file (copied with `cp -al`?)"
        else:
            continue
        raise ImgIndexError(
            f"{file}: {what} where imgindex keeps its own file; refusing to write through it "
            "(remove it if you did not make it; copy index folders with `cp -a`)"
        )


def _upgrade(db: Any, path: Path, wait: float) -> None:
    """Apply the migrations ``db`` lacks under the write lock, waiting for it; should another
    process upgrade the index meanwhile, there is nothing left to do."""
    deadline = time.monotonic() + max(wait, UPGRADE_WAIT)
    while True:
        try:
            lock = _take_lock(path, 0.0, None)
            break
        except IndexLockedError:
            if not pending_migrations(db, path):
                return  # upgraded by whoever holds the lock
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
    try:
        apply_migrations(db, pending_migrations(db, path))  # (it may be done meanwhile)
    finally:
        lock.close()


def _take_lock(path: Path, wait: float, on_wait: Any) -> Any:
    """The index's write lock (an flock on ``write.lock``, released by closing the file). The
    file is opened without following a link and must be a plain file of its own (one name):
    its contents are replaced by the holder's pid."""
    lock_path = path / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
    except OSError as exc:
        if lock_path.is_symlink():
            raise ImgIndexError(
                f"{lock_path}: a symbolic link where imgindex keeps its lock file; refusing to "
                "write through it (remove it if you did not make it)"
            ) from None
        raise ImgIndexError(f"{lock_path}: cannot open the lock file ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise ImgIndexError(
            f"{lock_path}: not a plain file of its own (a device, or a hard link to another "
            "file); refusing to write to it (remove it if you did not make it)"
        )
    fh = os.fdopen(fd, "r+b", buffering=0)
    deadline = time.monotonic() + max(0.0, wait)
    told = False
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _lock_holder(fh)
            if time.monotonic() >= deadline:
                fh.close()
                waited = f" after waiting {wait:g} s" if wait > 0 else ""
                if holder == f"pid {os.getpid()}":
                    who = "another Index object of this process is writing to this index"
                else:
                    who = f"another imgindex process ({holder}) is writing to this index"
                raise IndexLockedError(
                    f"{path}: {who}{waited}; let it finish, or wait for it "
                    "(--wait SECONDS; in Python, wait=SECONDS)"
                ) from None
            if on_wait is not None and not told:
                on_wait(holder)
                told = True
            time.sleep(0.1)
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}".encode())
    return fh


def _lock_holder(fh: Any) -> str:
    """Who holds the lock, as its file says ("pid N"); anything else is not repeated."""
    fh.seek(0)
    text = fh.read(64).decode("ascii", "replace").strip()
    return text if re.fullmatch(r"pid \d+", text) else "another process"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _fsync_folder(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_only_uri(path: Path) -> str:
    """How a reader opens the database: read-only, since it changes nothing (the journal mode is
    a property of the file), so that it also works where the folder cannot be written."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    if not os.access(path.parent, os.W_OK) and not os.path.exists(f"{path}-shm"):
        # SQLite cannot make the shared-memory file a WAL reader needs. No one is writing (a
        # writer makes that file), so the database file can be read as it stands, provided
        # no committed changes wait in a write-ahead log (ignored then). A writer that starts
        # later is noticed by Store.refresh, which opens the file again.
        wal = Path(f"{path}-wal")
        if wal.exists() and wal.stat().st_size:
            raise ImgIndexError(
                f"{path.parent}: changes wait in {wal.name}, which only someone who may write "
                "this folder can apply: run an imgindex command that writes (imgindex repair, "
                "say) as such a user, or make the folder writable"
            )
        uri += "&immutable=1"
    return uri


def _connect(path: Path, read_only: bool = False) -> Any:
    """A connection to the database (any thread may use it: Index lets one at a time)."""
    import sqlite_utils

    if read_only:
        uri = _read_only_uri(path)
        db = sqlite_utils.Database(sqlite3.connect(uri, uri=True, check_same_thread=False))
        db.immutable = uri.endswith("immutable=1")  # type: ignore[attr-defined]
    else:
        db = sqlite_utils.Database(sqlite3.connect(path, check_same_thread=False))
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return db


# How long a statement waits for SQLite's own locks (a reader's snapshot being set up, a
# checkpoint) before failing with "database is locked".
BUSY_TIMEOUT_MS = 10_000
