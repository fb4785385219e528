"""An open index folder: the catalog (SQLite, the truth) and its FAISS mirror, kept consistent.

An index is a folder::

    imgindex.db     SQLite (WAL): one row per image, its vector, skipped files, settings
    vectors.faiss   the FAISS index over the same vectors, keyed by image id
    write.lock      held (flock) by the one process allowed to write

Every vector is stored in SQLite, in the same transaction as its row (:mod:`imgindex.catalog`),
so the FAISS file is only a cache (:mod:`imgindex.mirror`): it can always be rebuilt without
re-embedding anything. Whoever opens the index loads the FAISS file and reconciles it with one
SQLite snapshot, so a reader sees exactly the state of one committed transaction, whether the
writer saved its FAISS file a moment ago, long ago, or was killed before saving it. Writers
commit in batches, one transaction each, and save the FAISS file at the end of a build (and
every few minutes during a long one). :class:`Store` adds to the catalog what needs the folder
or both halves: creating and opening (and upgrading) an index, the write lock, following other
writers' commits, saving the mirror, and checking and repairing the whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgindex import ann
from imgindex.ann import IndexSpec
from imgindex.atomic import fsync_folder
from imgindex.catalog import Catalog
from imgindex.errors import (
    DAMAGED,
    ImgIndexError,
    IncompatibleIndexError,
    IndexExistsError,
    IndexLockedError,
    IndexNotFoundError,
)
from imgindex.files import is_gone
from imgindex.folder import (
    FAISS_NAME,
    NOFOLLOW,
    check_folder_for_writing,
    check_index_files,
    disk_usage,
    make_folder,
    take_lock,
    temporary_files,
)
from imgindex.mirror import Mirror, read_file
from imgindex.schema import (
    DB_NAME,
    apply_migrations,
    now,
    pending_migrations,
    write_transaction,
)

# How long opening an index of an older imgindex waits for the write lock to upgrade it (or for
# another process to finish upgrading it): several commands may start at once on it.
UPGRADE_WAIT = 30.0


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


class Store(Catalog):
    """An open index folder: the catalog's rows and the FAISS mirror over their vectors."""

    def __init__(self, path: Path, db: Any, writable: bool):
        super().__init__(path, db, writable)
        self._lock_fh: Any = None
        self._leftovers_removed = 0  # temporary files of a crashed writer, deleted by lock()
        self._stamp = self._files_stamp()
        self.mirror = Mirror.load(self, mmap=not writable)
        self._seen_data_version = self.data_version()
        self.mirror.reconcile(self)

    def _committed(
        self,
        remove: Any = (),
        add_ids: Any = (),
        add_vectors: np.ndarray | None = None,
    ) -> None:
        # Mirror the committed change in memory; the file is saved by save_vector_index().
        self.mirror.apply(remove, add_ids, add_vectors)

    @property
    def vector_index(self) -> ann.VectorIndex:
        return self.mirror.vector_index

    @property
    def rebuilds(self) -> int:
        """Times the vector index was built anew in memory (not added to)."""
        return self.mirror.rebuilds

    @property
    def _dirty(self) -> bool:
        return self.mirror.dirty

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
        lock = take_lock(path, wait, on_wait)
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
            fsync_folder(path)
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

    def lock(self, wait: float = 0.0, on_wait: Any = None) -> None:
        """Take the index's write lock, waiting up to ``wait`` seconds for another writer to
        finish; raise IndexLockedError if it does not. ``on_wait(holder)`` is called once when
        waiting starts."""
        if self._lock_fh is not None:
            return
        self._lock_fh = take_lock(self.path, wait, on_wait)
        # Holding the lock, no one else is writing: temporary files are leftovers of a crash.
        for leftover in temporary_files(self.path):
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
        # write lock at its end, and so must not run beside another process's build (whose
        # commits would then fail; a writer refused the lock does not do it). It does not
        # wait for readers (busy timeout 0): one still reading stops it early, harmlessly.
        with contextlib.suppress(Exception):
            self.db.execute("PRAGMA busy_timeout = 0")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with contextlib.suppress(Exception):
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._lock_fh.close()  # closing releases the flock
        self._lock_fh = None

    def disk_usage(self) -> dict[str, int]:
        return disk_usage(self.path)

    # -- following other writers ------------------------------------------------------------

    def refresh(self) -> None:
        """Bring the in-memory FAISS index up to date if another process committed changes."""
        if getattr(self.db, "immutable", False) and self._files_stamp() != self._stamp:
            # Read as immutable (see _read_only_uri), SQLite sees no change: open anew.
            self.db.close()
            self.db = _connect(self.path / DB_NAME, read_only=True)
            self._stamp = self._files_stamp()
            self.mirror = Mirror.load(self, mmap=True)
            self._seen_data_version = self.data_version()
            self.mirror.reconcile(self)
            return
        version = self.data_version()
        if version != self._seen_data_version:
            self._seen_data_version = version
            self.mirror.reconcile(self)

    # -- the index kind, and saving the mirror ----------------------------------------------

    def index_note(self) -> str | None:
        """Why the index built differs from the one asked for, if it does."""
        target, note = ann.plan(self.requested_spec, self.count(), self.dim)
        return note if target.kind != self.requested_kind() else None

    def update_kind(self) -> bool:
        """Build the index kind to have now, if the mirror is not that kind already (the one
        asked for, once the collection is large enough to train it), or rebuild an HNSW index
        that carries many deleted vectors; returns whether it rebuilt."""
        self._require_writable()
        target = self.mirror.choose_kind(self.requested_spec, self.count())
        return self.mirror.adopt(self, target, self.requested_spec)

    def save_file(self, force: bool = False) -> None:
        """Write the FAISS file atomically if the mirror changed since it was loaded or saved."""
        self._require_writable()
        try:
            self.mirror.save(self, force)
        except (OSError, sqlite3.Error) as exc:
            raise ImgIndexError(
                f"{self.path}: could not save {FAISS_NAME} ({_describe(exc)}); the index keeps "
                f"its {self.count()} images in {DB_NAME}, and the FAISS index is rebuilt from "
                "them in memory when it is opened (once the cause is fixed, a full disk say, "
                "imgindex repair writes the file)"
            ) from None

    def save_vector_index(self, force: bool = False) -> None:
        """The two steps writers take at the end of their work: :meth:`update_kind`, then
        :meth:`save_file`."""
        self.update_kind()
        self.save_file(force)

    def save_vector_index_every(self, seconds: float) -> None:
        """Save the FAISS index if it changed and the last save is older than ``seconds``."""
        if self.mirror.due(seconds):
            self.save_vector_index()

    def stored_vectors(self, ids: np.ndarray) -> np.ndarray:
        """Raw vectors of ``ids``: from the FAISS index when it keeps them exactly, else from
        SQLite."""
        return self.mirror.stored_vectors(self, ids)

    # -- describing -------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Size, model, weights, preprocessing, the vector index, files on disk (Index.info)."""
        fingerprint = self.fingerprint()
        sizes = self.disk_usage()
        built = self.vector_index.spec
        requested = self.requested_spec
        return {
            "path": str(self.path),
            "images": self.count(),
            "skipped": len(self.skipped()),
            "model": fingerprint["model"],
            "weights_sha256": fingerprint["weights_sha256"],
            "dim": fingerprint["dim"],
            "preprocessing": fingerprint["preprocessing"],
            "index_type": built.describe(),
            "index": built.as_dict(),
            "index_requested": "auto" if requested is None else requested.as_dict(),
            "index_note": self.index_note(),
            "exact": built.exact,
            "metrics": ["l2", "cosine"] if built.metric == "both" else [built.metric],
            "vector_index_bytes_in_memory": self.vector_index.memory_bytes(),
            "created_at": self.meta("created_at"),
            "files": sizes,
            "bytes_on_disk": sum(sizes.values()),
        }

    def describe_vector_index(self) -> dict[str, Any]:
        """What the in-memory vector index holds now (Index.vector_index_info)."""
        vector_index = self.vector_index
        return {
            "kind": vector_index.spec.kind,
            "metric": vector_index.spec.metric,
            "params": dict(vector_index.spec.params),
            "vectors": vector_index.ntotal,
            "ids": vector_index.ids(),
            "tombstones": len(vector_index.tombstones),
            "memory_mapped": not vector_index.mutable,
            "lists": vector_index.nlist,
            "rebuilds": self.rebuilds,
        }

    # -- checking and repairing -------------------------------------------------------------

    def check(self, weights_sha256: str | None = None, check_files: bool = True) -> CheckReport:
        """Verify the index without changing it. See CheckReport."""
        report = CheckReport()
        rows = self.check_rows(check_files)
        if rows.error is not None:
            report.problems.append(f"{DB_NAME} {DAMAGED} (SQLite: {rows.error})")
            return report
        if rows.integrity != "ok":
            report.problems.append(f"SQLite reports damage: {rows.integrity}")
        report.images, report.vectors = rows.images, rows.vectors
        if rows.no_vector:
            report.problems.append(
                f"{rows.no_vector} image rows have no vector (repair removes them)"
            )
        if rows.orphans:
            report.problems.append(
                f"{rows.orphans} vectors belong to no image (repair removes them)"
            )
        report.problems += _describe_damage(rows.damage)
        meta_dim = self.fingerprint()["dim"]
        if meta_dim != self.dim:
            report.problems.append(f"index settings say {meta_dim} dimensions, found {self.dim}")
        self._check_file(report, rows.all_ids, rows.live, rows.stored)
        note = self.index_note()
        if note:
            report.warnings.append(note)
        if weights_sha256 is not None and weights_sha256 != self.meta("weights_sha256"):
            report.problems.append(
                f"the index was built with weights {self.meta('weights_sha256')[:12]}, the "
                f"weights in use are {weights_sha256[:12]}: queries would be refused"
            )
        for leftover in temporary_files(self.path):
            report.warnings.append(f"leftover temporary file {leftover.name} (repair removes it)")
        for _image_id, text, raw, _size, _mtime, _sha in rows.rows:
            if is_gone(raw):
                report.missing_files.append(text)
        report.missing_files.sort()
        return report

    def _check_file(
        self, report: CheckReport, all_ids: np.ndarray, live: np.ndarray, stored: np.ndarray
    ) -> None:
        """What check says of the FAISS file against the catalog's ids (``all_ids``) and sound
        vectors (``stored``, of ``live``)."""
        file, problem = read_file(self, mmap=True)
        if not (self.path / FAISS_NAME).exists():
            report.warnings.append(
                f"no {FAISS_NAME} yet: it is rebuilt from SQLite on open (repair writes it)"
            )
            return
        if file is None:
            report.problems.append(f"{problem} (repair rebuilds it)")
            return
        report.faiss_file = len(file.base_ids)
        file_ids = file.base_ids
        if len(np.unique(file_ids)) != len(file_ids):
            report.problems.append(f"{FAISS_NAME} holds duplicate ids (repair rebuilds it)")
        # Only sound stored vectors are compared: a damaged one is SQLite's fault, and
        # reported as such.
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

    def repair(self, remove_missing: bool = False) -> dict[str, int]:
        """Fix what can be fixed without re-embedding: restore damaged stored vectors from the
        FAISS index where it holds them intact (their checksum says so), else drop them with
        their rows (the next build embeds those files again); drop vectors without a row;
        rebuild and rewrite the FAISS file; delete leftover temporary files and (with
        ``remove_missing``) the entries of files known to be gone."""
        self._require_writable()
        counts = self.mend_vectors(self._faiss_copies)
        missing = 0
        if remove_missing:
            gone = [row[0] for row in self.file_rows() if is_gone(row[2])]
            missing = self.remove(gone)
        temporary = self._leftovers_removed  # taking the lock deleted these already
        for leftover in temporary_files(self.path):
            leftover.unlink()
            temporary += 1
        self.mirror.rebuild(self, self.mirror.choose_kind(self.requested_spec, self.count()))
        self.save_vector_index(force=True)
        return {
            **counts,
            "missing_files_removed": missing,
            "temporary_files_removed": temporary,
            "vectors_in_faiss": self.vector_index.ntotal,
        }

    def _faiss_copies(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Those of ``ids`` the FAISS index holds exactly, and their vectors there."""
        held = np.intersect1d(ids, self.vector_index.ids())
        return held, (self.vector_index.reconstruct(held) if len(held) else None)


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


def _upgrade(db: Any, path: Path, wait: float) -> None:
    """Apply the migrations ``db`` lacks under the write lock, waiting for it; should another
    process upgrade the index meanwhile, there is nothing left to do."""
    deadline = time.monotonic() + max(wait, UPGRADE_WAIT)
    while True:
        try:
            lock = take_lock(path, 0.0, None)
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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


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
