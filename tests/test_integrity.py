"""The guarantees of issue 12's "data integrity" part: a failed write never reports success,
every reported number is exact (damage is detected, rebuilt from the truth and reported as what it
is), only files known to be gone lose their entries, and each file has one entry of its own."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import imgindex
import imgindex.ann
import imgindex.atomic
import imgindex.folder
import imgindex.store
from imgindex.catalog import NewImage
from imgindex.errors import DamagedIndexError, ImgIndexError, WeightsError
from imgindex.folder import FAISS_NAME
from imgindex.schema import DB_NAME
from imgindex.store import Store

from .conftest import FakeVectorizer, random_image, refuse_listing

FINGERPRINT = {"model": "m", "weights_sha256": "a" * 64, "dim": 768, "preprocessing": {"x": 1}}


def images(n, start=0):
    return [
        NewImage(Path(f"/photos/{i}.jpg"), f"{i:064x}", 100 + i, 1000.0 + i, 10, 20)
        for i in range(start, start + n)
    ]


def vectors(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 768)).astype(np.float32)


def saved_store(tmp_path, n=4):
    store = Store.create(tmp_path / "idx", FINGERPRINT)
    store.lock()
    store.write_batch(images(n), vectors(n))
    store.save_vector_index()
    return store


# -- 2. a full disk never ends in success ---------------------------------------------------------


def test_faiss_reports_a_failed_write_only_on_stderr(tmp_path, monkeypatch):
    """Why the FAISS file is written through Python: FAISS's own writer, given a file name on a
    full disk, prints the close error and returns normally."""
    import faiss

    index = faiss.IndexFlatL2(8)
    index.add(np.zeros((100, 8), np.float32))
    faiss.write_index(index, "/dev/full")  # no exception: this is what must not be trusted
    real_open = os.open
    monkeypatch.setattr(
        imgindex.atomic.os, "open", lambda *a, **k: real_open("/dev/full", os.O_WRONLY)
    )
    with pytest.raises(OSError) as failed:
        imgindex.ann.write_temporary(faiss, index, tmp_path / FAISS_NAME)
    assert failed.value.errno == errno.ENOSPC


@pytest.mark.parametrize(
    "fails", ["first write", "a later write", "size on disk", "fsync", "recording", "rename"]
)
def test_a_failed_save_at_any_point_is_an_error_and_keeps_the_old_file(
    tmp_path, monkeypatch, fails
):
    store = saved_store(tmp_path)
    before = (tmp_path / "idx" / FAISS_NAME).read_bytes()
    store.write_batch(images(3, start=10), vectors(3, seed=1))  # committed, not yet saved
    calls = {"write": 0}
    real_write, real_fstat = os.write, os.fstat

    def write(fd, data):
        calls["write"] += 1
        if fails == "first write" or calls["write"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    def fstat(fd):  # the disk kept less than the writes reported
        st = real_fstat(fd)
        return os.stat_result((*st[:6], st.st_size - 1, *st[7:]))

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    def fail_sql(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    if fails in ("first write", "a later write"):
        monkeypatch.setattr(imgindex.atomic.os, "write", write)
    elif fails == "size on disk":
        monkeypatch.setattr(imgindex.atomic.os, "fstat", fstat)
    elif fails == "fsync":
        monkeypatch.setattr(imgindex.atomic.os, "fsync", fail)
    elif fails == "recording":
        monkeypatch.setattr(store, "_set_meta", fail_sql)
    else:
        monkeypatch.setattr(imgindex.store.os, "replace", fail)
    with pytest.raises(ImgIndexError) as failed:
        store.save_vector_index()
    message = str(failed.value)
    assert f"could not save {FAISS_NAME}" in message and "keeps its 7 images" in message
    monkeypatch.undo()
    folder = tmp_path / "idx"
    assert [p for p in os.listdir(folder) if p.endswith(".tmp")] == []
    assert (folder / FAISS_NAME).read_bytes() == before  # the old file, untouched
    store.close()
    reopened = Store.open(folder)
    assert reopened.count() == 7 and reopened.vector_index.ntotal == 7
    assert reopened.check(check_files=False).problems == []


def test_short_writes_are_completed(tmp_path, monkeypatch):
    """The operating system may write less than asked; the rest is written, not lost."""
    store = saved_store(tmp_path)
    store.write_batch(images(3, start=10), vectors(3, seed=1))
    real_write = os.write
    monkeypatch.setattr(
        imgindex.atomic.os, "write", lambda fd, data: real_write(fd, bytes(data)[:1000])
    )
    store.save_vector_index()
    monkeypatch.undo()
    store.close()
    reopened = Store.open(tmp_path / "idx")
    assert reopened.vector_index.base.ntotal == 7  # read from the file, not rebuilt
    assert reopened.check(check_files=False).problems == []


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only; CI runs as root). Skipped where mounting is not allowed: the
    test above covers the same failures by injection."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill the disk but for about ``leave`` bytes."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.parametrize("leave", [0, 20_000, 60_000])
def test_add_and_repair_on_a_full_disk_print_one_line(run, tmp_path, small_disk, leave):
    for i in range(8):
        random_image(tmp_path / "first" / f"{i}.png", size=(40, 30), seed=i)
    for i in range(100):  # 300 KB of vectors: more than is left
        random_image(tmp_path / "more" / f"{i}.png", size=(40, 30), seed=100 + i)
    index = small_disk / "idx"
    run("build", tmp_path / "first", "--index", index)
    filler = fill(small_disk, leave)
    for command in (("add", tmp_path / "more"), ("repair",)):
        result = run(*command, "--index", index, ok=False)
        lines = result.stderr.strip().splitlines()
        if result.exit_code == 0 and command[0] == "repair":  # it fitted after all
            continue
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    filler.unlink()
    checked = json.loads(run("check", "--index", index, "--json", "--no-files", ok=False).stdout)
    assert [p for p in checked["problems"] if "queries would be refused" not in p] == []
    built = json.loads(run("build", tmp_path / "first", "--index", index, "--json").stdout)
    assert built["total"] >= 8  # nothing committed was lost


# -- 3. damage is detected, rebuilt from the truth, and called what it is -------------------------


def flip_bytes(path: Path, at: int, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_faiss_file_is_detected_and_rebuilt_from_sqlite(tmp_path, photos, run):
    """Flipped bytes in vectors.faiss gave an identical copy a distance of 0.33 with exit 0."""
    index = tmp_path / "idx"
    copy = photos / "pizza" / "copy.jpg"
    copy.write_bytes((photos / "pizza" / "image_0001.jpg").read_bytes())
    run("build", photos / "pizza", "--index", index)
    size = (index / FAISS_NAME).stat().st_size
    flip_bytes(index / FAISS_NAME, size // 2)
    checked = json.loads(run("check", "--index", index, "--json", ok=False).stdout)
    assert any("damaged" in p and FAISS_NAME in p for p in checked["problems"])
    hits = json.loads(run("similar", copy, "--index", index, "--json", "-k", "1").stdout)
    assert hits[0]["results"][0]["distance"] == 0.0  # rebuilt from SQLite: exact again
    run("repair", "--index", index)
    checked = json.loads(run("check", "--index", index, "--json", ok=False).stdout)
    assert [p for p in checked["problems"] if "queries would be refused" not in p] == []


def damage_vector_in_sqlite(folder: Path, image_id: int) -> bytes:
    with sqlite3.connect(folder / DB_NAME) as db:
        [blob] = db.execute("SELECT vector FROM vectors WHERE id = ?", [image_id]).fetchone()
        bad = bytearray(blob)
        bad[100] ^= 0x40  # one flipped bit: a plausible number, silently wrong
        db.execute("UPDATE vectors SET vector = ? WHERE id = ?", [bytes(bad), image_id])
    return blob


def test_a_damaged_stored_vector_is_reported_as_such_and_restored_from_faiss(tmp_path):
    store = saved_store(tmp_path)
    store.close()
    good = damage_vector_in_sqlite(tmp_path / "idx", 2)
    store = Store.open(tmp_path / "idx", writable=True)
    problems = store.check(check_files=False).problems
    assert len(problems) == 1, problems
    assert "stored vectors in imgindex.db are damaged" in problems[0] and "[2]" in problems[0]
    with pytest.raises(DamagedIndexError, match="repair"):
        store.vectors([2])
    store.lock()
    done = store.repair()
    assert done["damaged_vectors_restored"] == 1 and done["bad_vectors_removed"] == 0
    np.testing.assert_array_equal(store.vectors([2])[0], np.frombuffer(good, "<f4"))
    assert store.check(check_files=False).problems == []
    store.close()


def test_a_damaged_vector_the_faiss_file_lacks_is_removed_and_embedded_again(tmp_path, photos):
    folder = photos / "pizza"
    with imgindex.Index.create(tmp_path / "idx", vectorizer=FakeVectorizer(device="cpu")) as ix:
        ix.add(folder)
        victim = ix.find(folder / "image_0003.jpg")
        expected = ix.vectors([victim.id])[0]
    (tmp_path / "idx" / FAISS_NAME).unlink()  # no intact copy anywhere
    damage_vector_in_sqlite(tmp_path / "idx", victim.id)
    with imgindex.Index.open(tmp_path / "idx", vectorizer=FakeVectorizer(device="cpu")) as ix:
        # The damaged vector is kept out of the vector index rebuilt from SQLite.
        assert victim.id not in ix.vector_index_info()["ids"].tolist()
        done = ix.repair()
        assert done["bad_vectors_removed"] == 1 and done["rows_without_vector_removed"] == 1
        assert ix.count() == 5 and ix.check(check_files=False).ok
        report = ix.add(folder)
        assert report.embedded == 1 and ix.count() == 6
        np.testing.assert_array_equal(
            ix.vectors([ix.find(folder / "image_0003.jpg").id])[0], expected
        )


def make_old_index(tmp_path: Path) -> Path:
    """An index as imgindex with only migration m001 made it: ids 1..5, the last two
    removed, no checksums, no FAISS file."""
    from imgindex.schema import MIGRATIONS, apply_migrations

    folder = tmp_path / "idx"
    store = saved_store(tmp_path, n=5)
    store.close()
    old = folder / "old.db"
    db = imgindex.store._connect(old)
    apply_migrations(db, MIGRATIONS[:1])
    with sqlite3.connect(folder / DB_NAME) as new:
        meta = new.execute("SELECT key, value FROM meta").fetchall()
        rows = new.execute(
            "SELECT id, path, raw_path, sha256, size, mtime, width, height, added_at FROM images"
        ).fetchall()
        blobs = new.execute("SELECT id, vector FROM vectors").fetchall()
    db.conn.executemany("INSERT INTO meta VALUES (?, ?)", meta)
    db.conn.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.conn.executemany("INSERT INTO vectors VALUES (?, ?)", blobs)
    db.conn.execute("DELETE FROM images WHERE id > 3")
    db.conn.execute("DELETE FROM vectors WHERE id > 3")
    db.conn.commit()
    db.close()
    for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", FAISS_NAME):
        (folder / name).unlink(missing_ok=True)
    os.replace(old, folder / DB_NAME)
    return folder


def test_an_older_index_is_upgraded_in_place_without_reusing_ids(tmp_path):
    """An index made before the checksums and byte keys (schema m001 only) is migrated when
    opened: rows, ids and vectors kept, checksums filled in, and the id counter goes on from
    where it was, also past images removed before the upgrade."""
    from imgindex.schema import MIGRATIONS

    folder = make_old_index(tmp_path)
    reader = Store.open(folder)  # a reader upgrades it: the folder may be written
    assert reader.count() == 3 and reader.check(check_files=False).problems == []
    np.testing.assert_array_equal(reader.vectors([1, 3]), vectors(5)[[0, 2]])
    reader.close()
    store = Store.open(folder, writable=True)
    store.lock()
    [new_id] = store.write_batch(images(1, start=50), vectors(1, seed=3))
    assert new_id == 6  # not 4: ids 4 and 5 were used before the upgrade
    names = {r[0] for r in store.db.execute("SELECT name FROM _migrations")}
    assert names == {name for name, _ in MIGRATIONS}
    store.close()


def test_an_older_index_opened_by_several_processes_at_once_is_upgraded_once(tmp_path):
    """The upgrade takes the write lock; a second opener waits for it (or for the other's
    upgrade) instead of failing with "another imgindex process is writing"."""
    import threading

    folder = make_old_index(tmp_path)
    held = imgindex.folder.take_lock(folder, 0.0, None)  # as another process upgrading it
    threading.Timer(1.0, held.close).start()
    reader = Store.open(folder)  # waits for the lock, then upgrades
    assert reader.count() == 3
    reader.close()
    shared = make_old_index(tmp_path / "shared")
    opener = "import sys; from imgindex.store import Store; Store.open(sys.argv[1]).close()"
    openers = [
        subprocess.Popen([sys.executable, "-c", opener, str(shared)], stderr=subprocess.PIPE)
        for _ in range(3)
    ]  # three processes open it at once: one upgrades it, the others wait
    for child in openers:
        assert child.wait(timeout=60) == 0, child.stderr.read()


def test_two_interrupted_saves_in_a_row_leave_a_file_the_index_recognises(tmp_path, monkeypatch):
    """A save killed after its rename leaves the file recorded only as being written; the next
    save, killed before its rename, used to overwrite that record: the file in place matched
    no record, and check called it damaged."""

    def die(*args):
        raise SystemExit("killed")

    store = saved_store(tmp_path)
    store.write_batch(images(2, start=10), vectors(2, seed=1))
    monkeypatch.setattr(imgindex.atomic, "fsync_folder", die)  # killed after the rename
    with pytest.raises(SystemExit):
        store.save_vector_index()
    monkeypatch.undo()
    store.close()
    store = Store.open(tmp_path / "idx", writable=True)
    store.lock()
    store.write_batch(images(2, start=20), vectors(2, seed=2))
    monkeypatch.setattr(imgindex.store.os, "replace", die)  # killed before the rename
    with pytest.raises(SystemExit):
        store.save_vector_index()
    monkeypatch.undo()
    store.unlock()
    store.db.close()
    reopened = Store.open(tmp_path / "idx")
    assert reopened.vector_index.base.ntotal == 6  # the renamed file, recognised
    assert reopened.count() == 8 and reopened.check(check_files=False).problems == []


def test_a_reader_does_not_call_a_file_damaged_that_writers_replace_while_it_looks(
    tmp_path, monkeypatch
):
    store = saved_store(tmp_path)
    real_digest = imgindex.ann.FileDigest.of_file
    saves = {"n": 0}

    def digest_while_a_writer_saves(path, expected_size=None):
        if saves["n"] < 3:  # a new file lands between reading the record and the file
            saves["n"] += 1
            store.write_batch(images(1, start=100 + saves["n"]), vectors(1, seed=saves["n"]))
            store.save_vector_index()
        return real_digest(path, expected_size)

    monkeypatch.setattr(
        imgindex.ann.FileDigest, "of_file", staticmethod(digest_while_a_writer_saves)
    )
    reader = Store.open(tmp_path / "idx")
    monkeypatch.undo()
    assert reader.vector_index.base is not None and not reader._dirty  # the file was used
    assert reader.count() == 7 and reader.check(check_files=False).problems == []
    reader.close()
    store.close()


# -- 4. only a file known to be gone loses its entry ----------------------------------------------


def test_a_folder_that_cannot_be_listed_keeps_its_entries(tmp_path, monkeypatch):
    """Permission denied on a folder (or a mount that hiccups) made every entry in it look
    deleted: "1 removed". Listing fails, and so does looking at the files in it."""
    for i in range(3):
        random_image(tmp_path / "pics" / "locked" / f"{i}.png", seed=i)
    random_image(tmp_path / "pics" / "open.png", seed=9)
    with imgindex.Index.create(tmp_path / "idx", vectorizer=FakeVectorizer(device="cpu")) as ix:
        assert ix.sync(tmp_path / "pics").added == 4
        refuse_listing(monkeypatch, "locked")
        real_lstat = os.lstat

        def lstat(path, *args, **kwargs):
            if "locked" in os.fsdecode(path).split(os.sep)[:-1]:
                raise PermissionError(13, "Permission denied", os.fsdecode(path))
            return real_lstat(path, *args, **kwargs)

        monkeypatch.setattr(os, "lstat", lstat)
        report = ix.sync(tmp_path / "pics")
        assert report.removed == 0 and ix.count() == 4
        assert [Path(s.path).name for s in report.skipped] == ["locked"]
        assert any("could not be listed" in w for w in report.warnings)
        assert not ix.check().missing_files  # check does not call them missing either
        monkeypatch.undo()
        (tmp_path / "pics" / "locked" / "0.png").unlink()
        assert ix.sync(tmp_path / "pics").removed == 1  # once it is known to be gone, it goes


@pytest.mark.skipif(os.geteuid() == 0, reason="root may list any folder")
def test_a_folder_without_permission_keeps_its_entries_for_real(tmp_path):
    for i in range(2):
        random_image(tmp_path / "pics" / "locked" / f"{i}.png", seed=i)
    with imgindex.Index.create(tmp_path / "idx", vectorizer=FakeVectorizer(device="cpu")) as ix:
        ix.sync(tmp_path / "pics")
        os.chmod(tmp_path / "pics" / "locked", 0)
        try:
            report = ix.sync(tmp_path / "pics")
        finally:
            os.chmod(tmp_path / "pics" / "locked", 0o755)
        assert report.removed == 0 and ix.count() == 2


# -- 5. non-finite weights and vectors are refused ------------------------------------------------


def test_weights_with_nan_are_refused(tmp_path):
    import torch

    from imgindex.model import Vectorizer
    from imgindex.weights import build_network, write_checkpoint

    network = build_network("resnet18")
    with torch.no_grad():
        network[0].fc.weight[0, 0] = float("nan")
    write_checkpoint(tmp_path / "diverged.pth", network, {"arch": "resnet18"})
    with pytest.raises(WeightsError, match="NaN or infinite"):
        Vectorizer(weights=tmp_path / "diverged.pth", device="cpu").vectorize(
            np.zeros((40, 40, 3), np.uint8)
        )


class NaNForRed(torch.nn.Module):
    """The stand-in network, giving NaN for pictures that are pure red."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        red = (x[:, 0].mean((1, 2)) > 2.0) & (x[:, 1].mean((1, 2)) < -1.9)
        return torch.where(red[:, None], torch.full_like(out, float("nan")), out)


class SometimesNaN(FakeVectorizer):
    def _build_network(self):
        return NaNForRed(super()._build_network()).eval()


def test_nan_vectors_are_skipped_not_stored(tmp_path):
    from PIL import Image

    folder = tmp_path / "pics"
    random_image(folder / "ok.png", seed=1)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "nan.png")
    with pytest.raises(ValueError, match="NaN"):
        saved_store(tmp_path / "other").write_batch(images(1), np.full((1, 768), np.nan))
    with imgindex.Index.create(tmp_path / "idx", vectorizer=SometimesNaN(device="cpu")) as ix:
        report = ix.add(folder)
        assert report.added == 1 and ix.count() == 1
        assert [(Path(s.path).name, s.reason) for s in report.skipped] == [
            ("nan.png", "the network gave NaN or infinite numbers for it")
        ]


def test_nan_vectors_stored_by_an_older_imgindex_are_reported_and_repaired(tmp_path, run):
    from imgindex.schema import vector_checksum

    index = tmp_path / "idx"
    for i in range(3):
        random_image(tmp_path / "pics" / f"{i}.png", seed=i)
    run("build", tmp_path / "pics", "--index", index)
    nan = np.full(768, np.nan, dtype="<f4").tobytes()
    with sqlite3.connect(index / DB_NAME) as db:  # as a diverged fine-tune left it
        db.execute(
            "UPDATE vectors SET vector = ?, crc32 = ? WHERE id = 2", [nan, vector_checksum(nan)]
        )
    (index / FAISS_NAME).unlink()
    checked = json.loads(run("check", "--index", index, "--json", ok=False).stdout)
    assert any("NaN or infinite" in p for p in checked["problems"])
    similar = run("similar", "2", "--index", index, ok=False)  # was a traceback
    assert similar.exit_code == 1 and "Traceback" not in similar.output
    assert "damaged" in similar.stderr
    [answer] = json.loads(run("similar", "1", "--index", index, "--json").stdout)
    assert [h["id"] for h in answer["results"]] == [3]  # the NaN vector is not searched
    assert np.isfinite(answer["results"][0]["distance"])
    done = json.loads(run("repair", "--index", index, "--json").stdout)
    assert done["bad_vectors_removed"] == 1 and done["total"] == 2
    assert (
        json.loads(run("build", tmp_path / "pics", "--index", index, "--json").stdout)["added"] == 1
    )


# -- 6. one entry per file name -------------------------------------------------------------------


def test_names_that_share_a_text_form_are_two_entries_and_the_index_settles(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"\xff.png")  # a raw byte 0xFF
    literal = folder / "\\xff.png"  # the four characters \, x, f, f
    random_image(Path(os.fsdecode(raw)), seed=1)
    random_image(literal, seed=2)
    with imgindex.Index.create(tmp_path / "idx", vectorizer=FakeVectorizer(device="cpu")) as ix:
        assert ix.sync(folder).added == 2
        again = ix.sync(folder)
        assert (again.added, again.updated, again.unchanged, again.removed) == (0, 0, 2, 0)
        assert ix.count() == 2
        assert ix.find(literal).id != ix.find(os.fsdecode(raw)).id
        assert {r.path for r in ix.records()} == {str(literal)}  # shown alike, kept apart


# -- 7. a folder is indexed once, however it is reached -------------------------------------------


def test_a_folder_built_directly_and_through_a_link_is_indexed_once(tmp_path, run):
    for i in range(3):
        random_image(tmp_path / "inc" / f"{i}.png", seed=i)
    os.symlink(tmp_path / "inc", tmp_path / "linkinc")
    index = tmp_path / "idx"
    run("build", tmp_path / "inc", "--index", index)
    second = json.loads(run("build", tmp_path / "linkinc", "--index", index, "--json").stdout)
    assert (second["added"], second["unchanged"], second["total"]) == (0, 3, 3)
    hits = json.loads(run("similar", tmp_path / "linkinc" / "1.png", "--index", index,
                          "--json", "--under", tmp_path / "linkinc").stdout)  # fmt: skip
    assert len(hits[0]["results"]) == 2


def test_entries_indexed_through_a_link_move_to_the_real_folder(tmp_path):
    """An older imgindex stored a linked root's files under the link's name; a build of either
    name now moves them to the real names (same ids, same vectors) instead of indexing them
    twice."""
    for i in range(3):
        random_image(tmp_path / "inc" / f"{i}.png", seed=i)
    os.symlink(tmp_path / "inc", tmp_path / "linkinc")
    with imgindex.Index.create(tmp_path / "idx", vectorizer=FakeVectorizer(device="cpu")) as ix:
        old = [
            NewImage(p, hashlib.sha256(p.read_bytes()).hexdigest(), 1, 0.0, 40, 30)
            for p in (tmp_path / "linkinc" / f"{i}.png" for i in range(3))
        ]
        ids = ix.add_vectors(old, vectors(3))  # as the older imgindex left them
        report = ix.sync(tmp_path / "linkinc")
        assert (report.renamed, report.added, report.removed, report.embedded) == (3, 0, 0, 0)
        assert sorted(r.id for r in ix.records()) == ids
        assert {r.path for r in ix.records()} == {
            str(tmp_path / "inc" / f"{i}.png") for i in range(3)
        }


def test_nested_roots_are_noted_not_skipped(tmp_path, run):
    for i in range(2):
        random_image(tmp_path / "photos" / f"{i}.png", seed=i)
        random_image(tmp_path / "photos" / "misc" / f"{i}.png", seed=10 + i)
    index = tmp_path / "idx"
    for order in ((tmp_path / "photos", tmp_path / "photos" / "misc"),
                  (tmp_path / "photos" / "misc", tmp_path / "photos")):  # fmt: skip
        result = run("build", *order, "--index", index, "--strict", "--json")
        report = json.loads(result.stdout)
        assert report["skipped"] == [] and report["total"] == 4
        assert len(report["notes"]) == 1 and "walked as part of it" in report["notes"][0]
    text = run("build", tmp_path / "photos", tmp_path / "photos" / "misc", "--index", index)
    assert "Note: " in text.stdout and "Skipped" not in text.stdout
