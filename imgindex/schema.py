"""The SQLite schema of an index, and the named migrations that build and upgrade it.

Every change to the schema is a migration appended to :data:`MIGRATIONS` and applied in order,
each in its own transaction, with its name recorded in ``_migrations``. A migration is SQL, or a
function of the database for what SQL alone cannot do (a checksum computed in Python, a counter
carried over). Migrations run only while the index's write lock is held (see ``store``).

What the tables hold, after every migration:

* ``meta``: the index's settings (model, weights, preprocessing, the vector index kind) and the
  size and CRC-32 of the FAISS file last saved;
* ``images``: one row per indexed file. Its key is ``raw_path``, the file name's bytes; ``path``
  is the same name as text (:func:`~imgindex.files.path_text`), for showing, and two names can
  share it. ``id`` is never reused (AUTOINCREMENT): it is also the FAISS id;
* ``vectors``: the vector of each image (768 little-endian float32) and its CRC-32, so that a
  damaged vector is recognised as what it is;
* ``skipped``: files a build could not index, why, and their size and times then, so that an
  unchanged file is not read again;
* ``duplicate_reviews`` and ``marked_for_removal``: decisions on duplicate groups;
* ``photo_facts``: what each image's file says about the photo (format, date taken, camera,
  lens, GPS when kept, orientation; :mod:`imgindex.photos`). An image without a row has not been
  read for them yet (indexed by an older imgindex): a build fills them in without embedding.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from imgindex.errors import IncompatibleIndexError

DB_NAME = "imgindex.db"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def write_transaction(db: Any) -> Iterator[Any]:
    """One write transaction on ``db`` (nested: a savepoint). It takes SQLite's write lock at
    its start (``BEGIN IMMEDIATE``), waiting up to the busy timeout for whoever holds it. A
    deferred ``BEGIN`` would take it only at the first write, and SQLite refuses that upgrade at
    once, without waiting, when another connection wrote since the transaction began reading:
    "database is locked" in the middle of a build."""
    conn = db.conn
    if conn.in_transaction:
        with db.atomic():
            yield db
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def vector_checksum(blob: bytes) -> int:
    """The CRC-32 stored beside a vector's bytes. A checksum against damage (flipped bits, a
    torn page), as file formats keep them, not against someone who may write the index."""
    return zlib.crc32(blob)


def _m002_vector_checksums(db: Any) -> None:
    db.conn.create_function("imgindex_crc32", 1, vector_checksum, deterministic=True)
    db.execute("ALTER TABLE vectors ADD COLUMN crc32 INTEGER")
    # The vectors as they are now are taken to be right: a damaged one among them would have
    # been damaged before anything could tell.
    db.execute("UPDATE vectors SET crc32 = imgindex_crc32(vector)")


def _m003_paths_keyed_by_bytes(db: Any) -> None:
    # Two names can have one text form (a raw byte 0xFF and the characters "\xff"), so entries
    # and skip records are keyed on the name's bytes. SQLite cannot drop a UNIQUE constraint:
    # the tables are rebuilt (foreign keys are off meanwhile, see apply_migrations).
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()
    sequence = row[0] if row else 0
    for statement in (
        """CREATE TABLE images_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            path TEXT NOT NULL,
            raw_path BLOB NOT NULL UNIQUE,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime REAL NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            added_at TEXT NOT NULL
        )""",
        "INSERT INTO images_new SELECT id, path, raw_path, sha256, size, mtime, width, height, "
        "added_at FROM images",
        "DROP TABLE images",
        "ALTER TABLE images_new RENAME TO images",
        "CREATE INDEX images_sha256 ON images (sha256)",
        """CREATE TABLE skipped_new (
            raw_path BLOB PRIMARY KEY,
            path TEXT NOT NULL,
            reason TEXT NOT NULL,
            at TEXT NOT NULL
        )""",
        "INSERT OR REPLACE INTO skipped_new SELECT raw_path, path, reason, at FROM skipped",
        "DROP TABLE skipped",
        "ALTER TABLE skipped_new RENAME TO skipped",
    ):
        db.execute(statement)
    # Ids are never reused, also those of images removed before the rebuild: the new table's
    # counter starts where the old one stopped, not at its highest remaining id.
    db.execute("DELETE FROM sqlite_sequence WHERE name = 'images'")
    db.execute(
        "INSERT INTO sqlite_sequence (name, seq) "
        "VALUES ('images', max(?, (SELECT coalesce(max(id), 0) FROM images)))",
        [sequence],
    )


Migration = tuple[str, "str | Callable[[Any], None]"]

# Schema changes happen only here, as named migrations applied in order.
MIGRATIONS: list[Migration] = [
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
    ("m002_vector_checksums", _m002_vector_checksums),
    ("m003_paths_keyed_by_bytes", _m003_paths_keyed_by_bytes),
    (
        "m004_skipped_file_state",
        # A skipped file is read again only when its size or a time changes (ctime: also a
        # change of permissions), when a build allows more pixels than the one that skipped
        # it, or when a build is asked to retry skipped files.
        """
        ALTER TABLE skipped ADD COLUMN size INTEGER;
        ALTER TABLE skipped ADD COLUMN mtime REAL;
        ALTER TABLE skipped ADD COLUMN ctime REAL;
        ALTER TABLE skipped ADD COLUMN max_pixels INTEGER;
        """,
    ),
    (
        "m005_duplicate_reviews",
        # What a person decided about duplicate groups, so that a decided group does not come
        # back: pairs judged duplicates or not (a < b), and the images marked for removal with
        # the one kept in their place. Keyed by image id: a changed file is a new image.
        """
        CREATE TABLE duplicate_reviews (
            a INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
            b INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
            same INTEGER NOT NULL,
            at TEXT NOT NULL,
            PRIMARY KEY (a, b),
            CHECK (a < b)
        );
        CREATE TABLE marked_for_removal (
            id INTEGER PRIMARY KEY REFERENCES images (id) ON DELETE CASCADE,
            keep INTEGER REFERENCES images (id) ON DELETE SET NULL,
            at TEXT NOT NULL
        );
        """,
    ),
    (
        "m006_photo_facts",
        # Filters (date, camera, format) select ids here and hand them to the vector search.
        """
        CREATE TABLE photo_facts (
            id INTEGER PRIMARY KEY REFERENCES images (id) ON DELETE CASCADE,
            format TEXT,
            source TEXT,
            taken_at TEXT,
            taken_offset TEXT,
            camera_make TEXT,
            camera_model TEXT,
            lens TEXT,
            gps_latitude REAL,
            gps_longitude REAL,
            orientation INTEGER
        );
        CREATE INDEX photo_facts_taken_at ON photo_facts (taken_at);
        CREATE INDEX photo_facts_format ON photo_facts (format);
        """,
    ),
]


def pending_migrations(db: Any, path: Path) -> list[Migration]:
    """The migrations ``db`` lacks; refuses a database of a newer imgindex or another program."""
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
    return [(name, step) for name, step in MIGRATIONS if name not in applied]


def apply_migrations(db: Any, pending: list[Migration]) -> None:
    """Apply ``pending`` in order, one transaction each (the caller holds the write lock)."""
    if not pending:
        return
    # Rebuilding a table drops the old one; with foreign keys on, that would delete every
    # vector (ON DELETE CASCADE). The setting cannot change inside a transaction.
    db.execute("PRAGMA foreign_keys = OFF")
    try:
        for name, step in pending:
            with write_transaction(db):
                db.execute(
                    "CREATE TABLE IF NOT EXISTS _migrations "
                    "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
                )
                if callable(step):
                    step(db)
                else:
                    # One statement at a time, inside our transaction (executescript commits).
                    for statement in step.split(";"):
                        if statement.strip():
                            db.execute(statement)
                broken = db.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise IncompatibleIndexError(
                        f"{DB_NAME}: migration {name} left {len(broken)} rows without their "
                        "parent row; nothing was changed"
                    )
                db.execute("INSERT INTO _migrations VALUES (?, ?)", [name, now()])
    finally:
        db.execute("PRAGMA foreign_keys = ON")
