import os
from pathlib import Path

import pytest

from imgindex.files import is_image_name, walk_images

from .conftest import refuse_listing


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_walks_recursively_in_sorted_order_and_filters_by_suffix(tmp_path):
    names = ["b/2.png", "b/1.JPG", "a.jpeg", "c/d/e.webp", "notes.txt", "c/clip.mp4", "c/raw.cr2",
             "c/phone.HEIC"]  # fmt: skip
    for name in names:
        touch(tmp_path / name)
    found = [p.relative_to(tmp_path).as_posix() for p in walk_images([tmp_path])]
    assert found == ["a.jpeg", "b/1.JPG", "b/2.png", "c/d/e.webp", "c/phone.HEIC", "c/raw.cr2"]


def test_all_usual_formats_are_images():
    for suffix in ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "JPG"]:
        assert is_image_name(f"x.{suffix}")
    assert not is_image_name("x.txt")
    assert not is_image_name("jpg")


def test_named_files_are_taken_whatever_their_suffix_and_not_twice(tmp_path):
    a = touch(tmp_path / "dir" / "a.png")
    odd = touch(tmp_path / "picture.data")
    found = list(walk_images([tmp_path / "dir", a, odd]))
    assert found == [a, odd]


def test_missing_root_is_an_error_before_anything_is_walked(tmp_path):
    touch(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match="nope"):
        list(walk_images([tmp_path, tmp_path / "nope"]))


def test_symlink_loop_is_reported_not_followed(tmp_path):
    touch(tmp_path / "a" / "x.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    errors = []
    found = list(walk_images([tmp_path], on_error=lambda p, r: errors.append((p, r))))
    assert found == [tmp_path / "a" / "x.png"]
    assert errors and "loop" in errors[0][1]


def test_unreadable_folder_is_reported(tmp_path, monkeypatch):
    touch(tmp_path / "locked" / "x.png")
    touch(tmp_path / "open" / "y.png")
    refuse_listing(monkeypatch, "locked")
    errors = []
    found = list(walk_images([tmp_path], on_error=lambda p, r: errors.append((p, r))))
    assert found == [tmp_path / "open" / "y.png"]
    assert [(p.name, r) for p, r in errors] == [
        ("locked", "cannot list folder (Permission denied)")
    ]


def test_a_folder_reached_directly_and_through_a_link_is_walked_under_its_own_path(tmp_path):
    from .conftest import random_image

    real = random_image(tmp_path / "photos" / "real" / "a.png")
    os.symlink(tmp_path / "photos" / "real", tmp_path / "photos" / "alias")  # sorts first
    os.symlink(tmp_path / "photos", tmp_path / "photos" / "real" / "up")  # a loop
    errors = []
    found = list(walk_images([tmp_path / "photos"], on_error=lambda p, r: errors.append((p, r))))
    assert found == [real]
    reasons = {p.name: r for p, r in errors}
    assert reasons["alias"] == f"links to a folder indexed as {real.parent}, not followed"
    assert reasons["up"] == "links to a folder it is in (symbolic link loop), not followed"


def test_two_roots_reaching_one_folder_walk_it_once(tmp_path):
    from .conftest import random_image

    image = random_image(tmp_path / "photos" / "a.png")
    os.symlink(tmp_path / "photos", tmp_path / "link")
    errors = []
    found = list(
        walk_images([tmp_path / "photos", tmp_path / "link"], on_error=lambda *e: errors.append(e))
    )
    assert found == [image]
    assert errors == [
        (tmp_path / "link", f"links to a folder indexed as {image.parent}, not followed")
    ]
