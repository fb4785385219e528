"""The SQLite + FAISS store: rows and vectors agree, survive reopening, and the FAISS file can
always be rebuilt from SQLite."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgindex.catalog import NewImage
from imgindex.errors import (
    IncompatibleIndexError,
    IndexLockedError,
    IndexNotFoundError,
)
from imgindex.files import path_text
from imgindex.folder import FAISS_NAME
from imgindex.schema import DB_NAME
from imgindex.store import Store

FINGERPRINT = {"model": "m", "weights_sha256": "a" * 64, "dim": 768, "preprocessing": {"x": 1}}


def images(n, start=0):
    return [
        NewImage(Path(f"/photos/{i}.jpg"), f"{i:064x}", 100 + i, 1000.0 + i, 10, 20)
        for i in range(start, start + n)
    ]


def vectors(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 768)).astype(np.float32)


def assert_consistent(store):
    """FAISS and SQLite hold the same ids and the same vectors."""
    ids, stored = store.all_vectors()
    assert store.vector_index.ntotal == store.count() == len(ids)
    if len(ids):
        np.testing.assert_array_equal(store.vector_index.reconstruct(ids), stored)


def test_create_write_reopen(tmp_path):
    store = Store.create(tmp_path / "idx", FINGERPRINT)
    ids = store.write_batch(images(3), vectors(3))
    store.save_vector_index()
    store.close()
    store = Store.open(tmp_path / "idx")
    assert store.count() == 3
    assert store.fingerprint() == FINGERPRINT
    record = store.get(ids[1])
    assert record.path == "/photos/1.jpg" and record.size == 101 and record.width == 10
    np.testing.assert_array_equal(store.vectors([ids[2], ids[0]]), vectors(3)[[2, 0]])
    assert_consistent(store)
    assert store.get_by_path("/photos/2.jpg").id == ids[2]
    assert store.get(12345) is None


def test_rewriting_a_path_replaces_its_row_and_vector(tmp_path):
    store = Store.create(tmp_path / "idx", FINGERPRINT)
    old = store.write_batch(images(2), vectors(2))
    new = store.write_batch(images(1), vectors(1, seed=9))
    assert store.count() == 2
    assert new[0] not in old and store.get(old[0]) is None
    np.testing.assert_array_equal(store.vectors(new), vectors(1, seed=9))
    assert_consistent(store)


def test_faiss_file_behind_sqlite_is_rebuilt_on_open(tmp_path):
    store = Store.create(tmp_path / "idx", FINGERPRINT)
    store.write_batch(images(2), vectors(2))
    store.save_vector_index()
    store.write_batch(images(3, start=2), vectors(3, seed=1))  # committed, FAISS file not saved
    store.close()
    reopened = Store.open(tmp_path / "idx")
    assert reopened.count() == 5
    assert_consistent(reopened)


def test_missing_or_damaged_faiss_file_is_rebuilt(tmp_path):
    store = Store.create(tmp_path / "idx", FINGERPRINT)
    store.write_batch(images(4), vectors(4))
    store.save_vector_index()
    store.close()
    (tmp_path / "idx" / FAISS_NAME).unlink()
    assert_consistent(Store.open(tmp_path / "idx"))


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    store = Store.create(tmp_path / "idx", FINGERPRINT)
    store.write_batch(images(2), vectors(2))
    store.save_vector_index()
    names = sorted(os.listdir(tmp_path / "idx"))
    assert FAISS_NAME in names and not [n for n in names if n.endswith(".tmp")]


def test_skipped_files_are_recorded_and_cleared_when_they_index(tmp_path):
    store = Store.create(tmp_path / "idx", FINGERPRINT)
    store.write_batch([], None, [(Path("/photos/0.jpg"), "empty file (0 bytes)")])
    assert store.skipped() == [("/photos/0.jpg", "empty file (0 bytes)")]
    store.write_batch(images(1), vectors(1))
    assert store.skipped() == []


def test_non_utf8_file_names_are_stored(tmp_path):
    raw = os.fsdecode(b"/photos/caf\xe9 \xff.jpg")  # Latin-1 bytes, not UTF-8
    store = Store.create(tmp_path / "idx", FINGERPRINT)
    [image_id] = store.write_batch([NewImage(Path(raw), "0" * 64, 1, 1.0, 1, 1)], vectors(1))
    assert store.get(image_id).path == "/photos/caf\\xe9 \\xff.jpg"
    assert store.get_by_path(raw).id == image_id
    row = store.db.execute("SELECT raw_path FROM images WHERE id = ?", [image_id]).fetchone()
    assert row[0] == b"/photos/caf\xe9 \xff.jpg"
    assert path_text("/a/ü.jpg") == "/a/ü.jpg"


def test_missing_index_and_existing_index(tmp_path):
    with pytest.raises(IndexNotFoundError, match="no index here"):
        Store.open(tmp_path / "nothing")
    Store.create(tmp_path / "idx", FINGERPRINT).close()
    with pytest.raises(IncompatibleIndexError, match="already exists"):
        Store.create(tmp_path / "idx", FINGERPRINT)


def test_index_from_a_newer_imgindex_is_refused(tmp_path):
    Store.create(tmp_path / "idx", FINGERPRINT).close()
    import sqlite3

    with sqlite3.connect(tmp_path / "idx" / DB_NAME) as conn:
        conn.execute("INSERT INTO _migrations VALUES ('m999_future', 'now')")
    with pytest.raises(IncompatibleIndexError, match="newer imgindex"):
        Store.open(tmp_path / "idx")


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    store = Store.create(tmp_path / "idx", FINGERPRINT)
    store.lock()
    code = (
        "import sys; from imgindex.store import Store\n"
        "s = Store.open(sys.argv[1], writable=True)\n"
        "try:\n    s.lock()\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "idx")], capture_output=True, text=True
    )
    assert IndexLockedError.__name__ in out.stdout
    assert f"pid {os.getpid()}" in out.stdout
    store.unlock()
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "idx")], capture_output=True, text=True
    )
    assert out.stdout == "" and out.returncode == 0


def test_a_new_index_removes_the_vectors_of_a_deleted_database(tmp_path):
    """Deleting imgindex.db by hand left vectors.faiss behind; the new database reuses ids 1, 2,
    ..., which the old file holds with other vectors. They must not be taken for the new ones."""
    store = Store.create(tmp_path / "idx", FINGERPRINT)
    store.write_batch(images(3), vectors(3, seed=1))
    store.save_vector_index()
    store.close()
    for name in os.listdir(tmp_path / "idx"):
        if name.startswith(DB_NAME):
            os.remove(tmp_path / "idx" / name)
    assert (tmp_path / "idx" / FAISS_NAME).exists()
    store = Store.create(tmp_path / "idx", FINGERPRINT)
    store.write_batch(images(2), vectors(2, seed=2))
    assert_consistent(store)
    np.testing.assert_array_equal(store.vector_index.reconstruct([1, 2]), vectors(2, seed=2))
    assert store.check(check_files=False).problems == []


def test_an_unfinished_index_is_no_index_and_is_created_afresh(tmp_path):
    """A database whose creation stopped half-way (empty, or tables without settings: what an
    older imgindex left when killed while creating) is reported as such and replaced."""
    import sqlite3

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / DB_NAME).write_bytes(b"")
    with sqlite3.connect(tmp_path / "half.db") as conn:
        conn.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at TEXT)")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.close()
    (tmp_path / "half").mkdir()
    os.replace(tmp_path / "half.db", tmp_path / "half" / DB_NAME)
    for name in ("empty", "half"):
        with pytest.raises(IndexNotFoundError, match="unfinished"):
            Store.open(tmp_path / name)
        store = Store.create(tmp_path / name, FINGERPRINT)
        assert store.fingerprint() == FINGERPRINT
        store.close()
        assert Store.open(tmp_path / name).count() == 0


def test_another_programs_database_is_not_replaced(tmp_path):
    import sqlite3

    (tmp_path / "idx").mkdir()
    with sqlite3.connect(tmp_path / "idx" / DB_NAME) as conn:
        conn.execute("CREATE TABLE songs (title TEXT)")
    conn.close()
    with pytest.raises(IncompatibleIndexError, match="not an imgindex database"):
        Store.create(tmp_path / "idx", FINGERPRINT)
    with pytest.raises(IncompatibleIndexError, match="not an imgindex database"):
        Store.open(tmp_path / "idx")
    with sqlite3.connect(tmp_path / "idx" / DB_NAME) as conn:
        assert conn.execute("SELECT count(*) FROM songs").fetchone() == (0,)
    conn.close()


def test_creating_waits_for_whoever_holds_the_lock_and_then_finds_their_index(tmp_path):
    """Two processes creating one index: the second waits on the lock (or is refused without
    --wait), then sees the first's index instead of creating a second one over it."""
    from imgindex.errors import IndexExistsError
    from imgindex.folder import take_lock as _take_lock

    path = tmp_path / "idx"
    path.mkdir()
    held = _take_lock(path, 0, None)
    with pytest.raises(IndexLockedError, match="is writing to this index"):
        Store.create(path, FINGERPRINT)
    assert not (path / DB_NAME).exists()
    held.close()
    Store.create(path, FINGERPRINT).close()
    with pytest.raises(IndexExistsError, match="already exists"):
        Store.create(path, FINGERPRINT, wait=1)
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(".")) == []


def test_readers_open_the_database_read_only(tmp_path):
    """A reader writes nothing (no journal-mode switch), so a read-only mount can be read."""
    import sqlite3

    Store.create(tmp_path / "idx", FINGERPRINT).close()
    reader = Store.open(tmp_path / "idx")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.db.execute("CREATE TABLE x (a)")
    assert reader.count() == 0
    reader.close()


def test_an_index_in_a_folder_nobody_may_write_is_read_and_not_written(tmp_path, monkeypatch):
    """A read-only mount: readers open the file as it stands (SQLite could not create its
    shared-memory file there); writers are refused with a message saying why. (The folder is
    made unwritable through os.access: chmod does not stop root, which CI may run as.)"""
    from imgindex.errors import ImgIndexError

    store = Store.create(tmp_path / "idx", FINGERPRINT)
    store.write_batch(images(3), vectors(3))
    store.save_vector_index()
    store.close()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK and real_access(p, mode))
    reader = Store.open(tmp_path / "idx")
    assert reader.count() == 3
    assert_consistent(reader)
    reader.close()
    with pytest.raises(ImgIndexError, match="folder cannot be written"):
        Store.open(tmp_path / "idx", writable=True)
    assert sorted(os.listdir(tmp_path / "idx")) == [DB_NAME, FAISS_NAME, "write.lock"]


def test_a_new_database_is_in_wal_mode_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """Switching modes on the first open could be interrupted by a kill, leaving a rollback
    journal a reader cannot replay ("attempt to write a readonly database"): the database is
    already in WAL mode, and closed, when it appears."""
    import sqlite3

    def killed(*args, **kwargs):
        raise SystemExit("killed right after the rename")

    monkeypatch.setattr(Store, "open", classmethod(killed))
    with pytest.raises(SystemExit):
        Store.create(tmp_path / "idx", FINGERPRINT)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "idx")) == [DB_NAME, "write.lock"]
    conn = sqlite3.connect(f"file:{tmp_path / 'idx' / DB_NAME}?mode=ro", uri=True)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
    reader = Store.open(tmp_path / "idx")
    assert reader.count() == 0 and reader.fingerprint() == FINGERPRINT


def test_a_reader_that_cannot_write_the_folder_still_sees_later_writes(tmp_path, monkeypatch):
    """Such a reader opens the database as immutable, where SQLite notices no change; a writer
    with more rights (the folder's owner) may start later, and refresh must then open the
    database anew. Committed changes left in a write-ahead log are refused, not ignored."""
    from imgindex.errors import ImgIndexError

    store = Store.create(tmp_path / "idx", FINGERPRINT)
    store.write_batch(images(3), vectors(3))
    store.close()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK and real_access(p, mode))
    reader = Store.open(tmp_path / "idx")
    assert reader.db.immutable and reader.count() == 3
    monkeypatch.undo()  # the owner writes
    writer = Store.open(tmp_path / "idx", writable=True)
    writer.write_batch(images(2, start=3), vectors(2, seed=1))
    reader.refresh()
    assert reader.count() == 5
    assert_consistent(reader)
    reader.close()
    # A writer killed before folding its log in (its -shm then deleted): not read as if empty.
    os.remove(tmp_path / "idx" / f"{DB_NAME}-shm")
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK and real_access(p, mode))
    with pytest.raises(ImgIndexError, match=r"changes wait in imgindex\.db-wal"):
        Store.open(tmp_path / "idx")
    writer.db.close()


def test_repair_counts_the_leftovers_that_taking_the_lock_removed(tmp_path):
    store = Store.create(tmp_path / "idx", FINGERPRINT)
    store.close()
    (tmp_path / "idx" / f".{FAISS_NAME}.12345.tmp").write_bytes(b"half a file")
    store = Store.open(tmp_path / "idx", writable=True)
    assert store.check(check_files=False).warnings[-1].startswith("leftover temporary file")
    store.lock()
    assert store.repair()["temporary_files_removed"] == 1
    assert not list((tmp_path / "idx").glob("*.tmp"))
