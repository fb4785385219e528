"""Incremental sync: moved, copied, deleted, changed and vanishing files (stand-in network)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import imgindex
import imgindex.ingest

from .conftest import random_image, refuse_listing


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for i in range(8):
        random_image(tmp_path / "pics" / f"{i}.png", size=(40 + i, 30), seed=i)
    return tmp_path / "pics"


@pytest.fixture
def index(tmp_path, fake_vectorizer):
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        yield index


def counts(report):
    return {
        key: value
        for key, value in report.as_dict().items()
        if key in {"added", "updated", "renamed", "removed", "unchanged", "embedded", "reused"}
    }


def test_moved_file_keeps_its_id_and_vector(index, folder):
    index.sync(folder)
    before = index.find(folder / "3.png")
    (folder / "sub").mkdir()
    (folder / "3.png").rename(folder / "sub" / "three.png")
    report = index.sync(folder)
    assert counts(report) == {
        "added": 0, "updated": 0, "renamed": 1, "removed": 0, "unchanged": 7,
        "embedded": 0, "reused": 1,
    }  # fmt: skip
    after = index.find(folder / "sub" / "three.png")
    assert after.id == before.id and after.sha256 == before.sha256
    assert index.find(folder / "3.png") is None and index.count() == 8


def test_copied_file_reuses_the_stored_vector(index, folder):
    index.sync(folder)
    shutil.copy2(folder / "2.png", folder / "copy.png")
    report = index.sync(folder)
    assert (report.added, report.embedded, report.reused) == (1, 0, 1)
    a, b = index.find(folder / "2.png"), index.find(folder / "copy.png")
    assert a.id != b.id
    np.testing.assert_array_equal(index.vectors([a.id]), index.vectors([b.id]))


def test_duplicates_in_one_build_are_embedded_once(index, folder):
    shutil.copy(folder / "1.png", folder / "again.png")
    report = index.sync(folder)
    assert (report.added, report.embedded, report.reused) == (9, 8, 1)


def test_deleted_files_are_removed_unless_kept(index, folder):
    index.sync(folder)
    (folder / "0.png").unlink()
    (folder / "1.png").unlink()
    kept = index.sync(folder, remove_missing=False)
    assert kept.removed == 0 and index.count() == 8
    assert index.add(folder).removed == 0
    report = index.sync(folder)
    assert report.removed == 2 and index.count() == 6
    assert index.find(folder / "0.png") is None


def test_only_files_under_the_given_folders_are_removed(index, tmp_path, folder):
    other = random_image(tmp_path / "elsewhere" / "x.png")
    (other.parent / "notes.txt").write_text("not empty")  # an empty folder keeps its entries
    index.sync([folder, other.parent])
    other.unlink()
    assert index.sync(folder).removed == 0  # x.png is not under pics/
    assert index.sync(other.parent).removed == 1


def test_unlistable_folder_does_not_lose_its_entries(index, folder, monkeypatch):
    random_image(folder / "locked" / "a.png")
    index.sync(folder)
    refuse_listing(monkeypatch, "locked")
    report = index.sync(folder)
    assert report.removed == 0 and index.find(folder / "locked" / "a.png") is not None
    assert [s.reason for s in report.skipped] == ["cannot list folder (Permission denied)"]
    # Nothing needed reading in that build, and still the reason is kept (info --skipped).
    assert report.embedded == 0
    assert [r for _, r in index.skipped()] == ["cannot list folder (Permission denied)"]


def test_moved_onto_an_existing_path_replaces_it(index, folder):
    index.sync(folder)
    moved = index.find(folder / "5.png")
    (folder / "5.png").replace(folder / "6.png")
    report = index.sync(folder)
    assert report.renamed == 1 and index.count() == 7
    assert index.find(folder / "6.png").id == moved.id


def test_changed_content_gets_a_new_id_and_vector(index, folder, fake_vectorizer):
    index.sync(folder)
    old = index.find(folder / "4.png")
    random_image(folder / "4.png", size=(60, 50), seed=99)
    report = index.sync(folder)
    assert (report.updated, report.embedded) == (1, 1)
    new = index.find(folder / "4.png")
    assert new.id != old.id and (new.width, new.height) == (60, 50)
    np.testing.assert_allclose(
        index.vectors([new.id])[0], fake_vectorizer.vectorize(folder / "4.png"), atol=1e-6
    )


def test_file_vanishing_or_changing_during_the_build(index, folder, monkeypatch, fake_vectorizer):
    real_read = imgindex.ingest.read_file

    def read_file(path, *args):
        if path.name == "2.png":
            path.unlink()  # deleted after the walk listed it
        if path.name == "3.png":
            random_image(path, size=(33, 33), seed=42)  # rewritten just before reading
        return real_read(path, *args)

    monkeypatch.setattr(imgindex.ingest, "read_file", read_file)
    report = index.sync(folder)
    assert [(Path(s.path).name, s.reason) for s in report.skipped] == [
        ("2.png", "file not found (deleted, or a broken link)")
    ]
    record = index.find(folder / "3.png")
    assert (record.width, record.height) == (33, 33)
    assert record.size == (folder / "3.png").stat().st_size
    np.testing.assert_allclose(
        index.vectors([record.id])[0], fake_vectorizer.vectorize(folder / "3.png"), atol=1e-6
    )
    monkeypatch.undo()
    assert index.sync(folder).embedded == 0  # nothing left to do: the entry matches the file


def test_skip_records_go_when_the_file_goes(index, folder):
    (folder / "bad.jpg").write_bytes(b"")
    index.sync(folder)
    assert [Path(p).name for p, _ in index.skipped()] == ["bad.jpg"]
    (folder / "bad.jpg").unlink()
    index.sync(folder)
    assert index.skipped() == []


def test_remove_entries_by_file_or_folder(index, folder):
    random_image(folder / "sub" / "a.png", seed=50)
    random_image(folder / "sub" / "b.png", seed=51)
    index.sync(folder)
    assert index.remove(folder / "0.png") == 1
    shutil.rmtree(folder / "sub")
    assert index.remove(folder / "sub") == 2  # the files need not exist any more
    assert index.remove(folder / "nothing-here") == 0
    assert index.count() == 7
    assert index.find(folder / "0.png") is None
    assert index.check().ok


def test_a_second_index_object_sees_changes_committed_by_another(tmp_path, folder, fake_vectorizer):
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as writer:
        writer.sync(folder)
        reader = imgindex.Index.open(tmp_path / "idx", vectorizer=fake_vectorizer)
        probe = writer.vectors([1])[0]
        assert len(reader.search_by_vector(probe, k=100)) == 8
        random_image(folder / "new.png", seed=77)
        (folder / "0.png").unlink()
        writer.sync(folder)
        hits = reader.search_by_vector(probe, k=100)
        assert len(hits) == 8
        assert {h.path for h in hits} == {r.path for r in writer.records()}
        reader.close()


def test_reading_threads_beside_a_gpu_run_torch_single_threaded():
    import torch

    from imgindex.ingest import _one_thread_per_reader

    before = torch.get_num_threads()
    with _one_thread_per_reader(True):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with _one_thread_per_reader(False):
        assert torch.get_num_threads() == before


def test_an_unchanged_folder_is_synced_without_loading_the_model(tmp_path, folder, use_fake_model):
    with imgindex.Index.create(tmp_path / "idx") as index:
        first = index.sync(folder)
    assert first.embedded == 8 and set(first.stage_seconds) >= {"reading", "network", "storing"}
    with imgindex.Index.open(tmp_path / "idx") as index:
        again = index.sync(folder)
        assert counts(again)["unchanged"] == 8 and again.embedded == 0
        assert index._vectorizer is None and "loading the model" not in again.stage_seconds
        random_image(folder / "new.png", seed=99)
        added = index.sync(folder)
        assert added.embedded == 1 and "loading the model" in added.stage_seconds


def test_other_weights_are_refused_even_when_nothing_needs_embedding(
    tmp_path, folder, use_fake_model, monkeypatch
):
    from imgindex.errors import IncompatibleIndexError

    with imgindex.Index.create(tmp_path / "idx") as index:
        index.sync(folder)

    class OtherWeights(use_fake_model):
        @classmethod
        def _resolve_weights(cls, weights):
            w = super()._resolve_weights(weights)
            return type(w)(path=w.path, sha256="f" * 64, is_default=False)

    monkeypatch.setattr(imgindex.index, "Vectorizer", OtherWeights)
    with (
        imgindex.Index.open(tmp_path / "idx") as index,
        pytest.raises(IncompatibleIndexError, match="built with weights 000000000000"),
    ):
        index.sync(folder)


def test_a_file_that_reads_again_is_no_longer_skipped(tmp_path, photos, fake_vectorizer):
    """A file that became unreadable keeps its entry and is listed as skipped; once its old
    bytes are back (the same content, a new time), it is not skipped any more."""
    path = photos / "pizza" / "image_0001.jpg"
    original = path.read_bytes()
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        index.add(photos / "pizza")
        path.write_bytes(b"garbage")
        report = index.sync([photos / "pizza"])
        assert [s.path for s in report.skipped] == [str(path)]
        assert [p for p, _ in index.skipped()] == [str(path)]
        path.write_bytes(original)
        os.utime(path, (1e9, 1e9))
        report = index.sync([photos / "pizza"])
        assert report.skipped == [] and index.skipped() == []


def test_a_renamed_top_folder_moves_its_entries(tmp_path, photos, fake_vectorizer):
    """Renaming the folder that was indexed, then building the new name: the entries move with
    their files (no stale copies of every entry under the old name)."""
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        index.sync(photos / "pizza")
        count = len(index)
        ids = {r.id for r in index.records()}
        (photos / "pizza").rename(photos / "pie")
        report = index.sync(photos / "pie")
        assert (report.renamed, report.added, report.embedded) == (count, 0, 0)
        assert len(index) == count and {r.id for r in index.records()} == ids
        assert all(r.path.startswith(str(photos / "pie")) for r in index.records())
        # With add (which removes nothing), a copy of a file that still exists stays a copy.
        shutil.copytree(photos / "pie", photos / "copy")
        assert index.add(photos / "copy").renamed == 0 and len(index) == 2 * count


def test_moved_and_copied_files_are_synced_without_loading_the_model(
    tmp_path, photos, use_fake_model, monkeypatch
):
    """Files whose content is stored need no network: a build of moved and copied files does
    not load the model (about 5 s); one with a new picture does."""
    with imgindex.Index.create(tmp_path / "idx") as index:
        index.sync(photos / "pizza")
    (photos / "pizza").rename(photos / "pie")
    shutil.copy(photos / "pie" / "image_0001.jpg", photos / "pie" / "copy.jpg")
    loads = []
    real_build = use_fake_model._build_network
    monkeypatch.setattr(
        use_fake_model, "_build_network", lambda self: loads.append(1) or real_build(self)
    )
    with imgindex.Index.open(tmp_path / "idx", create=True) as index:
        report = index.sync(photos / "pie")
        assert (report.renamed, report.reused, report.embedded) == (6, 7, 0) and loads == []
        random_image(photos / "pie" / "new.png", size=(40, 30), seed=9)
        assert index.sync(photos / "pie").embedded == 1 and loads == [1]
