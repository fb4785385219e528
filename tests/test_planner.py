"""The sync planner on its own: every decision, from entries and files, without a network or an
index (the pipeline's use of it is covered by test_sync)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from imgindex.catalog import FileState, NewImage
from imgindex.planner import SyncPlanner


def write(path: Path, data: bytes) -> tuple[Path, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def row(image_id: int, path: Path, sha: str) -> tuple[int, str, bytes, int, float, str]:
    st = os.stat(path)
    return image_id, str(path), os.fsencode(path), st.st_size, st.st_mtime, sha


def image(path: Path, sha: str) -> NewImage:
    st = os.stat(path)
    return NewImage(path, sha, st.st_size, st.st_mtime, 4, 3)


def test_each_kind_of_file_gets_its_decision(tmp_path):
    root = tmp_path / "photos"
    same, same_sha = write(root / "same.jpg", b"same")
    touched, touched_sha = write(root / "touched.jpg", b"touched")
    changed, changed_sha = write(root / "changed.jpg", b"old content")
    old_name, moved_sha = write(root / "old-name.jpg", b"moved")
    original, copy_sha = write(root / "original.jpg", b"copied")
    gone, gone_sha = write(root / "gone.jpg", b"deleted")
    plan = SyncPlanner.of_rows(
        [
            row(1, same, same_sha),
            row(2, touched, touched_sha),
            row(3, changed, changed_sha),
            row(4, old_name, moved_sha),
            row(5, original, copy_sha),
            row(6, gone, gone_sha),
        ]
    )
    os.utime(touched, (1, 1))  # same bytes, another time
    _, changed_sha = write(changed, b"new content")
    new_name = old_name.with_name("new-name.jpg")
    old_name.rename(new_name)
    copy, _ = write(root / "copy.jpg", b"copied")
    new, new_sha = write(root / "new.jpg", b"new file")
    gone.unlink()

    walked = sorted(root.iterdir())
    assert [p.name for p in walked if plan.unchanged(p)] == ["original.jpg", "same.jpg"]
    plan.find_gone([root], {os.fsencode(p) for p in walked})
    assert sorted(plan.gone) == [4, 6] and plan.gone_texts() == [str(gone), str(old_name)]

    decisions = {
        p.name: plan.decide(p, sha)
        for p, sha in [(touched, touched_sha), (changed, changed_sha), (new_name, moved_sha),
                       (copy, copy_sha), (new, new_sha)]
    }  # fmt: skip
    assert decisions["touched.jpg"].action == "touched" and decisions["touched.jpg"].entry == 2
    assert decisions["changed.jpg"].action == "embed"
    assert decisions["changed.jpg"].replaces.id == 3  # a changed file replaces its entry
    assert decisions["new-name.jpg"].action == "renamed" and decisions["new-name.jpg"].entry == 4
    assert decisions["copy.jpg"].action == "copy" and decisions["copy.jpg"].entry == 5
    assert decisions["new.jpg"].action == "embed" and decisions["new.jpg"].replaces is None

    plan.touched(2, image(touched, touched_sha))
    plan.moved(decisions["new-name.jpg"], image(new_name, moved_sha))
    plan.added(7, image(copy, copy_sha), copied=True)
    plan.added(8, image(changed, changed_sha))
    plan.added(9, image(new, new_sha))
    assert sorted(plan.gone) == [6]  # the moved entry is no longer to remove
    counts = plan.counts
    assert (counts.unchanged, counts.renamed, counts.added, counts.updated, counts.reused) == (
        3, 1, 2, 1, 2,
    )  # fmt: skip
    # Later decisions of the same build see what was done: the moved file is known by its new
    # name, and a second copy of the old content finds nothing to reuse.
    assert plan.decide(new_name, moved_sha).action == "touched"
    assert plan.decide(tmp_path / "elsewhere.jpg", "0" * 64).action == "embed"


def test_a_file_moved_from_outside_the_folders_given_is_renamed_not_copied(tmp_path):
    outside, sha = write(tmp_path / "old-top" / "a.jpg", b"picture")
    plan = SyncPlanner.of_rows([row(1, outside, sha)])
    moved = tmp_path / "new-top" / "a.jpg"
    moved.parent.mkdir()
    outside.rename(moved)
    assert plan.decide(moved, sha).action == "renamed"
    kept = SyncPlanner.of_rows([row(1, moved, sha)], remove_missing=False)
    assert kept.decide(tmp_path / "new-top" / "b.jpg", sha).action == "copy"


def test_entries_are_kept_when_their_folder_is_empty_or_could_not_be_listed(tmp_path):
    root = tmp_path / "drive"
    inner = root / "inner"
    a, sha_a = write(root / "a.jpg", b"a")
    b, sha_b = write(inner / "b.jpg", b"b")
    plan = SyncPlanner.of_rows([row(1, a, sha_a), row(2, b, sha_b)])
    a.unlink()
    b.unlink()
    inner.rmdir()
    plan.find_gone([root], set())  # the root is empty now: a drive not mounted?
    assert plan.gone == {} and "is empty" in plan.warnings[0]

    a, sha_a = write(root / "a.jpg", b"a")
    b, sha_b = write(inner / "b.jpg", b"b")
    plan = SyncPlanner.of_rows([row(1, a, sha_a), row(2, b, sha_b)])
    b.unlink()
    plan.unlisted.append(inner)  # walking could not list it
    plan.find_gone([root], {os.fsencode(a)})
    assert plan.gone == {} and "could not be listed" in plan.warnings[0]


def test_a_file_skipped_before_is_read_again_only_when_it_changed_or_the_limit_rose(tmp_path):
    path, _ = write(tmp_path / "broken.jpg", b"not a picture")
    state = FileState.of(os.stat(path))
    plan = SyncPlanner({}, {os.fsencode(path): (state, 1000, "cannot identify image")})
    assert plan.still_skipped(path, read_limit=1000) == "cannot identify image"
    assert plan.still_skipped(path, read_limit=2000) is None  # a higher limit may read it
    os.utime(path, (5, 5))
    assert plan.still_skipped(path, read_limit=1000) is None  # changed since
    assert plan.counts.skipped_unchanged == 1
