"""Seeing and acting on answers without the web page: combined queries (--like / --unlike),
contact sheets, thumbnails, and duplicate review decisions kept in the index."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import imgindex
from imgindex.search import combine_examples

from .conftest import DATA, FakeVectorizer


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "pics"
    for name in ("pizza", "bonsai"):
        shutil.copytree(DATA / name, folder / name)
    shutil.copy(folder / "pizza" / "image_0001.jpg", folder / "pizza" / "copy.jpg")
    shutil.copy(folder / "pizza" / "image_0001.jpg", folder / "pizza" / "copy2.jpg")
    return folder


@pytest.fixture
def index(tmp_path, folder):
    with imgindex.Index.create(tmp_path / "idx", vectorizer=FakeVectorizer(device="cpu")) as ix:
        ix.sync(folder)
        yield ix


# -- combined queries -----------------------------------------------------------------------------


def test_the_combination_formula():
    like = np.array([[1.0, 0.0], [3.0, 0.0]])
    unlike = np.array([[0.0, 4.0]])
    np.testing.assert_allclose(combine_examples(like, np.empty((0, 2)), "l2"), [2.0, 0.0])
    # (1 + w) mean(like) - w mean(unlike), w = 0.5
    np.testing.assert_allclose(combine_examples(like, unlike, "l2"), [3.0, -2.0])
    # cosine: on unit vectors
    np.testing.assert_allclose(combine_examples(like, unlike, "cosine"), [1.5, -0.5])
    with pytest.raises(ValueError, match="NaN"):
        combine_examples(np.array([[np.nan, 0.0]]), unlike, "l2")


def test_search_like_moves_away_from_what_it_should_be_unlike(index, folder):
    pizza = [index.find(folder / "pizza" / f"image_000{n}.jpg").id for n in (2, 3)]
    bonsai = index.find(folder / "bonsai" / "image_0001.jpg").id
    plain = index.search_like(pizza, k=20)
    away = index.search_like(pizza, [bonsai], k=20)
    assert {h.id for h in away}.isdisjoint({*pizza, bonsai})
    rank, plain_rank = {h.id: h.rank for h in away}, {h.id: h.rank for h in plain}
    bonsai_ids = {r.id for r in index.records() if "/bonsai/" in r.path} - {bonsai}
    # The other bonsai go down the list, on the whole.
    assert sum(rank[i] for i in bonsai_ids) > sum(plain_rank[i] for i in bonsai_ids)
    vector = combine_examples(index.vectors(pizza), index.vectors([bonsai]), "l2")
    direct = index.search_by_vector(vector, k=20, exclude=[*pizza, bonsai])
    assert [h.id for h in direct] == [h.id for h in away]


def test_cli_like_and_unlike(run, index, folder):
    a, b = folder / "pizza" / "image_0002.jpg", folder / "pizza" / "image_0003.jpg"
    c = folder / "bonsai" / "image_0001.jpg"
    ids = [index.find(p).id for p in (a, b, c)]
    [answer] = json.loads(run("similar", ids[0], "--like", ids[1], "--unlike", ids[2],
                              "--index", index.path, "--json", "-k", "5").stdout)  # fmt: skip
    expected = index.search_like(ids[:2], [ids[2]], k=5)
    assert [r["id"] for r in answer["results"]] == [h.id for h in expected]
    assert answer["like"] == [str(a), str(b)] and answer["unlike"] == [str(c)]
    [query] = json.loads(run("query", a, "--like", b, "--unlike", c, "--index", index.path,
                             "--json", "-k", "5").stdout)  # fmt: skip
    embedded = index.search_like([a, b], [c], k=5)
    assert [r["id"] for r in query["results"]] == [h.id for h in embedded]
    text = run("similar", ids[0], "--like", ids[1], "--index", index.path).stdout
    assert text.startswith("Query like pics/pizza/image_0002.jpg, pics/pizza/image_0003.jpg") or \
        "Query like " in text  # fmt: skip
    missing = run("similar", ids[0], "--unlike", "99999", "--index", index.path, ok=False)
    assert missing.exit_code == 1 and "no combined query was made" in missing.stderr


# -- contact sheets -------------------------------------------------------------------------------


def test_contact_sheets(run, index, folder, tmp_path):
    out = tmp_path / "sheets" / "answer.png"
    result = run("similar", index.find(folder / "pizza" / "image_0002.jpg").id, "--index",
                 index.path, "-k", "4", "--sheet", out)  # fmt: skip
    assert f"Wrote the contact sheet {out}" in result.stderr
    sheet = Image.open(out)
    assert sheet.width > 4 * 200 and sheet.height > 200  # the query and 4 results, labelled
    two = [folder / "pizza" / "image_0002.jpg", folder / "bonsai" / "image_0002.jpg"]
    several = run("query", *two, "--index", index.path, "-k", "3", "--sheet", tmp_path / "q.jpg")
    assert (tmp_path / "q-1.jpg").exists() and (tmp_path / "q-2.jpg").exists()
    assert "q-2.jpg" in several.stderr
    run("duplicates", "--index", index.path, "--threshold", "0.5", "--sheet", tmp_path / "groups")
    assert sorted(os.listdir(tmp_path / "groups")) == ["group-001.jpg"]
    # A missing file is a grey cell, not a failure.
    (folder / "bonsai" / "image_0003.jpg").unlink()
    run("similar", index.find(folder / "bonsai" / "image_0002.jpg").id, "--index", index.path,
        "--sheet", tmp_path / "gap.png")  # fmt: skip
    assert Image.open(tmp_path / "gap.png").size[0] > 0


# -- thumbnails -----------------------------------------------------------------------------------


def test_thumbnails_are_cached_by_content(index, folder):
    photo = folder / "bonsai" / "image_0004.jpg"
    record = index.find(photo)
    first = index.thumbnail(record.id)
    assert first.problem is None and first.content_type == "image/jpeg"
    picture = Image.open(io.BytesIO(first.data))
    assert max(picture.size) <= 256 and picture.mode == "RGB"
    cached = list((index.path / "thumbnails").rglob("*.jpg"))
    assert [p.name for p in cached] == [f"{record.sha256}-256.jpg"]
    os.rename(photo, folder / "bonsai" / "moved.jpg")
    index.sync(folder)
    moved = index.find(folder / "bonsai" / "moved.jpg")
    assert moved.id == record.id and index.thumbnail(moved.id).data == first.data  # kept
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "bonsai" / "moved.jpg")
    index.sync(folder)
    changed = index.thumbnail(index.find(folder / "bonsai" / "moved.jpg").id)
    assert changed.data != first.data and len(list((index.path / "thumbnails").rglob("*.jpg"))) == 2


def test_thumbnails_of_rotated_and_odd_images(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.new("RGB", (120, 60), (0, 128, 0)).save(folder / "rotated.jpg", exif=exif)
    Image.new("I;16", (80, 40)).save(folder / "grey16.png")
    Image.new("P", (50, 50)).save(folder / "palette.gif")
    with imgindex.Index.create(tmp_path / "idx", vectorizer=FakeVectorizer(device="cpu")) as ix:
        ix.sync(folder)
        rotated = Image.open(
            __import__("io").BytesIO(ix.thumbnail(ix.find(folder / "rotated.jpg").id).data)
        )
        assert rotated.size[1] > rotated.size[0]  # upright: taller than wide
        for name in ("grey16.png", "palette.gif"):
            assert ix.thumbnail(ix.find(folder / name).id).problem is None
        (folder / "palette.gif").write_bytes(b"broken now")
        broken = ix.thumbnail(ix.find(folder / "palette.gif").id)
        assert broken.content_type == "image/png" and "not an image" in broken.problem


# -- duplicate review -----------------------------------------------------------------------------


def test_decisions_are_kept_in_the_index_and_groups_do_not_come_back(index, folder, run):
    copies = [
        index.find(folder / "pizza" / n).id for n in ("image_0001.jpg", "copy.jpg", "copy2.jpg")
    ]
    [group] = index.duplicates(0.5)
    assert group.ids == sorted(copies)
    index.review_duplicates(copies, keep=copies[0])
    assert index.duplicates(0.5) == []
    marked = [(r.id, k.id) for r, k in index.marked_for_removal()]
    assert marked == [(copies[1], copies[0]), (copies[2], copies[0])]
    with imgindex.Index.open(index.path) as reopened:  # stored, not remembered in memory
        assert reopened.duplicates(0.5) == []
        [shown] = reopened.duplicates(0.5, include_reviewed=True)
        assert shown.reviewed and set(shown.marked) == set(copies[1:])
    # A new copy of the kept image is a new group, without the ones already marked.
    shutil.copy(folder / "pizza" / "image_0001.jpg", folder / "pizza" / "copy3.jpg")
    index.sync(folder)
    [new] = index.duplicates(0.5)
    assert new.ids == sorted([copies[0], index.find(folder / "pizza" / "copy3.jpg").id])
    index.forget_reviews([copies[0]])
    assert len(index.duplicates(0.5)[0].ids) == 4  # all back together
    index.review_duplicates(copies, keep=None)  # not duplicates: those pairs stay apart
    assert {frozenset(p[:2]) for g in index.duplicates(0.5) for p in g.pairs}.isdisjoint(
        {frozenset((a, b)) for a in copies for b in copies if a < b}
    )
    with pytest.raises(ValueError, match="not one of the group"):
        index.review_duplicates(copies[:2], keep=copies[2])


def test_a_changed_file_drops_its_decisions(index, folder):
    copies = [index.find(folder / "pizza" / n).id for n in ("image_0001.jpg", "copy.jpg")]
    index.review_duplicates(copies, keep=copies[0])
    Image.new("RGB", (30, 30), (9, 9, 9)).save(folder / "pizza" / "copy.jpg")
    index.sync(folder)
    assert index.marked_for_removal() == []  # a new image: nothing was decided about it


def test_review_commands_and_moving_marked_files(run, index, folder, tmp_path):
    original = index.find(folder / "pizza" / "image_0001.jpg").id
    kept = run("review", "keep", original, "--index", index.path, "--threshold", "0.5")
    assert "Kept" in kept.stdout and "marked 2 images for removal" in kept.stdout
    assert "1 group" not in run("duplicates", "--index", index.path, "--threshold", "0.5").stdout
    listed = run("review", "list", "--index", index.path, "--csv").stdout.splitlines()
    assert listed[0] == "id,path,keep_id,keep_path" and len(listed) == 3
    dry = json.loads(run("review", "move", tmp_path / "trash", "--index", index.path,
                         "--dry-run", "--json").stdout)  # fmt: skip
    assert len(dry["moved"]) == 2 and not (tmp_path / "trash").exists()
    (tmp_path / "trash").mkdir()
    (tmp_path / "trash" / "copy.jpg").write_text("already here: not replaced")
    moved = json.loads(run("review", "move", tmp_path / "trash", "--index", index.path,
                           "--json").stdout)["moved"]  # fmt: skip
    assert sorted(os.path.basename(m["to"]) for m in moved) == ["copy (2).jpg", "copy2.jpg"]
    assert (tmp_path / "trash" / "copy.jpg").read_text() == "already here: not replaced"
    assert not (folder / "pizza" / "copy.jpg").exists()  # moved, never deleted:
    assert (tmp_path / "trash" / "copy (2).jpg").read_bytes() == (
        folder / "pizza" / "image_0001.jpg"
    ).read_bytes()
    assert index.count() == 14  # the entries followed the files
    assert index.find(tmp_path / "trash" / "copy2.jpg") is not None
    assert "Forgot" in run("review", "undo", original, "--index", index.path).stdout
    different = run("review", "different", original, "--index", index.path, "--threshold", "0.5")
    assert "not duplicates" in different.stdout
    unknown = run("review", "keep", "99999", "--index", index.path, ok=False)
    assert unknown.exit_code == 1 and "not in the index" in unknown.stderr
