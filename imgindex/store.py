"""SQLite metadata and FAISS vectors, kept consistent: the only code that touches both.

An index is a folder::

    imgindex.db     SQLite (WAL): one row per image, its vector, skipped files, settings
    vectors.faiss   FAISS IndexIDMap2(IndexFlatL2) over the same vectors, keyed by image id

SQLite is the source of truth. Every vector is stored there too (float32 blobs), in the same
transaction as its row, so the FAISS file is a cache that can always be rebuilt without
re-embedding anything. ``meta.data_version`` counts committed changes to the vectors and
``meta.faiss_version`` says which of them the FAISS file holds; when they differ (a build was
interrupted before it saved the FAISS file) the FAISS index is rebuilt from SQLite on open.

The FAISS file is written to a temporary name, flushed and renamed over the old one, so a reader
or a crash sees either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgindex.errors import IncompatibleIndexError, IndexLockedError, IndexNotFoundError

DB_NAME = "imgindex.db"
FAISS_NAME = "vectors.faiss"
LOCK_NAME = "write.lock"

_GENERATIONS = itertools.count()


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


def path_text(path: str | os.PathLike[str]) -> str:
    """The text form of a path stored and shown by imgindex.

    File names are bytes on Linux and need not be UTF-8; such bytes are written as ``\\xNN`` so the
    text is always valid (the exact bytes are kept beside it in ``raw_path``).
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# Schema changes happen only here, as named migrations applied in order.
MIGRATIONS: list[tuple[str, str]] = [
    (
        "m001_initial",
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE images (
            id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: it is also the FAISS id
            path TEXT NOT NULL UNIQUE,
            raw_path BLOB NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime REAL NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            added_at TEXT NOT NULL
        );
        CREATE INDEX images_sha256 ON images (sha256);
        -- Kept apart from images so that scanning metadata never reads 3 KB vectors.
        CREATE TABLE vectors (
            id INTEGER PRIMARY KEY REFERENCES images (id) ON DELETE CASCADE,
            vector BLOB NOT NULL
        );
        CREATE TABLE skipped (
            path TEXT PRIMARY KEY,
            raw_path BLOB NOT NULL,
            reason TEXT NOT NULL,
            at TEXT NOT NULL
        );
        """,
    ),
]


class Store:
    """An open index folder: SQLite rows and the FAISS index over their vectors."""

    def __init__(self, path: Path, db: Any, writable: bool):
        import faiss

        self.path = path
        self.db = db
        self.writable = writable
        self._faiss = faiss
        self.dim = int(self.meta("dim"))
        self._lock_fh: Any = None
        self.vector_index = self._load_or_rebuild_faiss()
        # Changes whenever vector_index changes in memory, so derived indexes know to rebuild;
        # unique across Store objects, so a reopened store never repeats an old value.
        self.generation = next(_GENERATIONS)

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], fingerprint: dict[str, Any]) -> Store:
        """Create a new, empty index folder recording which vectors it will hold."""
        path = Path(path)
        if (path / DB_NAME).exists():
            raise IncompatibleIndexError(f"{path}: an index already exists here")
        path.mkdir(parents=True, exist_ok=True)
        db = _connect(path / DB_NAME)
        _migrate(db, path)
        with db.atomic():
            db["meta"].insert_all(
                [
                    {"key": "format", "value": "imgindex"},
                    {"key": "created_at", "value": _now()},
                    {"key": "model", "value": fingerprint["model"]},
                    {"key": "weights_sha256", "value": fingerprint["weights_sha256"]},
                    {"key": "dim", "value": str(fingerprint["dim"])},
                    {"key": "preprocessing", "value": json.dumps(fingerprint["preprocessing"])},
                    {"key": "index_type", "value": "Flat"},
                    {"key": "data_version", "value": "0"},
                    {"key": "faiss_version", "value": "-1"},
                ]
            )
        return cls(path, db, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike[str], writable: bool = False) -> Store:
        """Open an existing index folder; raises IndexNotFoundError when there is none."""
        path = Path(path)
        if not (path / DB_NAME).is_file():
            raise IndexNotFoundError(
                f"{path}: no index here (create one with `imgindex build FOLDER --index {path}`)"
            )
        db = _connect(path / DB_NAME)
        _migrate(db, path, apply=writable)
        return cls(path, db, writable=writable)

    def close(self) -> None:
        if self.writable:
            # Fold the write-ahead log into the database file so the folder is compact at rest;
            # harmless if a reader holds it open (the checkpoint then stops early).
            with contextlib.suppress(Exception):
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.unlock()
        self.db.close()

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

    def lock(self) -> None:
        """Take the index's write lock, or raise IndexLockedError if another process has it."""
        if self._lock_fh is not None:
            return
        fh = open(self.path / LOCK_NAME, "a+")  # noqa: SIM115 - held open while locked
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise IndexLockedError(
                f"{self.path}: another imgindex process ({holder}) is writing to this index; "
                "try again when it has finished"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock_fh = fh

    def unlock(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()  # closing releases the flock
            self._lock_fh = None

    # -- reading ----------------------------------------------------------------------------

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM images").fetchone()[0]

    def get(self, image_id: int) -> ImageRecord | None:
        rows = self.get_many([image_id])
        return rows.get(image_id)

    def get_many(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        ids = [int(i) for i in ids]
        out: dict[int, ImageRecord] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.db.execute(
                f"SELECT {_RECORD_COLUMNS} FROM images WHERE id IN ({marks})", chunk
            ):
                record = ImageRecord(*row)
                out[record.id] = record
        return out

    def get_by_path(self, path: str | os.PathLike[str]) -> ImageRecord | None:
        row = self.db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM images WHERE path = ?", [path_text(path)]
        ).fetchone()
        return ImageRecord(*row) if row else None

    def records(self) -> Iterator[ImageRecord]:
        for row in self.db.execute(f"SELECT {_RECORD_COLUMNS} FROM images ORDER BY id"):
            yield ImageRecord(*row)

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors for ``ids``, in that order."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        position = {int(i): n for n, i in enumerate(ids)}
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            for image_id, blob in self.db.execute(
                f"SELECT id, vector FROM vectors WHERE id IN ({marks})", chunk
            ):
                out[position[image_id]] = np.frombuffer(blob, dtype="<f4")
        return out

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every image, from SQLite."""
        n = self.count()
        ids = np.empty(n, dtype=np.int64)
        vectors = np.empty((n, self.dim), dtype=np.float32)
        i = 0
        for image_id, blob in self.db.execute("SELECT id, vector FROM vectors ORDER BY id"):
            if i == n:  # a concurrent writer added rows since count(); the next open sees them
                break
            ids[i] = image_id
            vectors[i] = np.frombuffer(blob, dtype="<f4")
            i += 1
        return ids[:i], vectors[:i]

    def skipped(self) -> list[tuple[str, str]]:
        return [tuple(r) for r in self.db.execute("SELECT path, reason FROM skipped ORDER BY path")]

    def disk_usage(self) -> dict[str, int]:
        sizes = {}
        for name in (DB_NAME, DB_NAME + "-wal", FAISS_NAME):
            p = self.path / name
            if p.exists():
                sizes[name] = p.stat().st_size
        return sizes

    # -- writing ----------------------------------------------------------------------------

    def write_batch(
        self,
        images: Sequence[NewImage],
        vectors: np.ndarray | None,
        skipped: Sequence[tuple[Path, str]] = (),
    ) -> list[int]:
        """Insert or replace ``images`` with their ``vectors`` and record ``skipped`` files, in one
        transaction. Returns the new ids, in order. An image whose path is already indexed is
        replaced (new id), so FAISS never holds a stale vector under a live id."""
        self._require_writable()
        if vectors is None:
            vectors = np.empty((0, self.dim), dtype="<f4")
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if vectors.shape != (len(images), self.dim):
            raise ValueError(f"expected {len(images)} x {self.dim} vectors, got {vectors.shape}")
        now = _now()
        new_ids: list[int] = []
        replaced: list[int] = []
        with self.db.atomic():
            for image, vector in zip(images, vectors, strict=True):
                text = path_text(image.path)
                old = self.db.execute("SELECT id FROM images WHERE path = ?", [text]).fetchone()
                if old:
                    replaced.append(old[0])
                    self.db.execute("DELETE FROM images WHERE id = ?", [old[0]])
                cursor = self.db.execute(
                    "INSERT INTO images (path, raw_path, sha256, size, mtime, width, height, "
                    "added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        text,
                        os.fsencode(image.path),
                        image.sha256,
                        image.size,
                        image.mtime,
                        image.width,
                        image.height,
                        now,
                    ],
                )
                new_ids.append(cursor.lastrowid)
                self.db.execute(
                    "INSERT INTO vectors (id, vector) VALUES (?, ?)",
                    [cursor.lastrowid, vector.tobytes()],
                )
                # A file that failed before and reads now is no longer skipped.
                self.db.execute("DELETE FROM skipped WHERE path = ?", [text])
            self.db["skipped"].insert_all(
                [
                    {"path": path_text(p), "raw_path": os.fsencode(p), "reason": r, "at": now}
                    for p, r in skipped
                ],
                replace=True,
            )
            if images:
                self._bump_data_version()
        # Mirror the committed change in memory; the file is saved by save_vector_index().
        if replaced:
            self.vector_index.remove_ids(np.asarray(replaced, dtype=np.int64))
        if new_ids:
            self.vector_index.add_with_ids(vectors, np.asarray(new_ids, dtype=np.int64))
        self.generation = next(_GENERATIONS)
        return new_ids

    def touch(self, image_id: int, image: NewImage) -> None:
        """Record a new size / modification time for an image whose content is unchanged."""
        self._require_writable()
        with self.db.atomic():
            self.db.execute(
                "UPDATE images SET size = ?, mtime = ? WHERE id = ?",
                [image.size, image.mtime, image_id],
            )

    def _bump_data_version(self) -> None:
        self._set_meta("data_version", str(int(self.meta("data_version")) + 1))

    def save_vector_index(self) -> None:
        """Write the FAISS index atomically and record which data version it holds."""
        self._require_writable()
        version = self.meta("data_version")
        if self.meta("faiss_version") == version and (self.path / FAISS_NAME).exists():
            return
        _atomic_write_faiss(self._faiss, self.vector_index, self.path / FAISS_NAME)
        with self.db.atomic():
            self._set_meta("faiss_version", version)

    def _require_writable(self) -> None:
        if not self.writable:
            raise RuntimeError("this index was opened read-only")

    # -- FAISS ------------------------------------------------------------------------------

    def _new_vector_index(self) -> Any:
        faiss = self._faiss
        return faiss.IndexIDMap2(faiss.IndexFlatL2(self.dim))

    def _load_or_rebuild_faiss(self) -> Any:
        faiss = self._faiss
        file = self.path / FAISS_NAME
        if file.exists() and self.meta("faiss_version") == self.meta("data_version"):
            index = faiss.read_index(str(file))
            if index.ntotal == self.count() and index.d == self.dim:
                return index
        # The file is missing or behind SQLite (an interrupted build): rebuild from the stored
        # vectors, which costs a read of the database and no embedding.
        index = self._new_vector_index()
        ids, vectors = self.all_vectors()
        if len(ids):
            index.add_with_ids(vectors, ids)
        return index


_RECORD_COLUMNS = "id, path, sha256, size, mtime, width, height, added_at"


def _connect(path: Path) -> Any:
    import sqlite_utils

    db = sqlite_utils.Database(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA busy_timeout = 10000")
    return db


def _migrate(db: Any, path: Path, apply: bool = True) -> None:
    """Apply the pending MIGRATIONS in order (or, read-only, refuse an index that needs them)."""
    applied: set[str] = set()
    if "_migrations" in db.table_names():
        applied = {row[0] for row in db.execute("SELECT name FROM _migrations")}
    elif "images" in db.table_names():
        raise IncompatibleIndexError(f"{path}: {DB_NAME} is not an imgindex database")
    known = {name for name, _ in MIGRATIONS}
    if applied - known:
        raise IncompatibleIndexError(
            f"{path}: made by a newer imgindex (schema {max(applied - known)}); upgrade imgindex "
            "to use it"
        )
    pending = [(name, sql) for name, sql in MIGRATIONS if name not in applied]
    if pending and not apply:
        raise IncompatibleIndexError(
            f"{path}: made by an older imgindex; run `imgindex build` on it once to upgrade it"
        )
    for name, sql in pending:
        with db.atomic():
            db.execute(
                "CREATE TABLE IF NOT EXISTS _migrations "
                "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            # One statement at a time, inside our transaction (executescript would commit).
            for statement in sql.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT INTO _migrations VALUES (?, ?)", [name, _now()])


def _atomic_write_faiss(faiss: Any, index: Any, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
