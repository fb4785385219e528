"""The SQLite + FAISS store: rows and vectors agree, survive reopening, and the FAISS file can
always be rebuilt from SQLite."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgindex.errors import (
    IncompatibleIndexError,
    IndexLockedError,
    IndexNotFoundError,
)
from imgindex.store import DB_NAME, FAISS_NAME, NewImage, Store, path_text

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
