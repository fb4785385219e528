"""The Python API end to end, with the fast stand-in network: build, rebuild, search, look up."""

import itertools
import os
import time

import numpy as np
import pytest
from PIL import Image

import imgindex
from imgindex.errors import IncompatibleIndexError

from .conftest import FakeVectorizer, random_image


def test_build_search_and_look_up(tmp_path, photos, fake_vectorizer):
    seen = []
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        report = index.add(photos, progress=lambda p: seen.append((p.done, p.total)))
        assert (report.added, report.updated, report.unchanged, report.skipped) == (36, 0, 0, [])
        assert report.total == len(index) == index.count() == 36
        assert seen[-1] == (36, 36) and all(d <= t for d, t in seen)

        query = photos / "pizza" / "image_0003.jpg"
        hits = index.search(query, k=5)
        assert len(hits) == 5 and hits[0].path == str(query) and hits[0].score == 0.0
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        assert all(a.score <= b.score for a, b in itertools.pairwise(hits))

        many = index.search([query, photos / "bonsai" / "image_0001.jpg"], k=3, metric="cosine")
        assert [len(m) for m in many] == [3, 3]
        assert many[1][0].path.endswith("bonsai/image_0001.jpg")
        assert many[1][0].score == pytest.approx(1.0)

        record = index.get(hits[0].id)
        assert record.path == str(query)
        assert record.size == query.stat().st_size
        assert (record.width, record.height) == Image.open(query).size
        assert index.find(query) == record
        np.testing.assert_allclose(
            index.vectors([record.id])[0], fake_vectorizer.vectorize(query), atol=1e-6
        )
        with pytest.raises(KeyError):
            index.get(99999)


def test_reopen_and_search_without_the_model_loaded(tmp_path, photos, fake_vectorizer):
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        index.add(photos)
        vector = index.vectors([5])[0]
    with imgindex.Index.open(tmp_path / "idx") as index:
        assert index._vectorizer is None
        hits = index.search_by_vector(vector, k=3)
        assert hits[0].id == 5 and index._vectorizer is None


def test_rebuild_embeds_only_new_and_changed_files(tmp_path, photos, fake_vectorizer):
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        index.add(photos)
        again = index.add(photos)
        assert (again.added, again.updated, again.unchanged, again.embedded) == (0, 0, 36, 0)

        changed = photos / "pizza" / "image_0001.jpg"
        old_id = index.find(changed).id
        Image.open(photos / "bonsai" / "image_0001.jpg").save(changed)  # new content
        touched = photos / "pizza" / "image_0002.jpg"
        touched_id = index.find(touched).id
        later = time.time() + 5
        os.utime(touched, (later, later))  # same content, new time
        random_image(photos / "new" / "extra.png")

        report = index.add(photos)
        assert (report.added, report.updated, report.unchanged, report.embedded) == (1, 1, 35, 2)
        assert index.count() == 37
        assert index.find(changed).id != old_id
        assert index.find(touched).id == touched_id
        assert index.find(touched).mtime == pytest.approx(later)
        np.testing.assert_allclose(
            index.vectors([index.find(changed).id])[0],
            fake_vectorizer.vectorize(changed),
            atol=1e-6,
        )


def test_bad_files_are_skipped_with_reasons_and_lose_nothing(tmp_path, photos, fake_vectorizer):
    bad = photos / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("not a picture")
    good = random_image(bad / "fine.png")
    cut = photos / "pizza" / "image_0004.jpg"
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        index.add(photos)
        assert index.count() == 37
        cut.write_bytes(cut.read_bytes()[:2000])  # truncated after it was indexed
        report = index.add(photos)
        reasons = {os.path.basename(s.path): s.reason for s in report.skipped}
        assert set(reasons) == {"empty.jpg", "text.jpg", "image_0004.jpg"}
        assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["text.jpg"]
        assert "truncated" in reasons["image_0004.jpg"]
        assert index.count() == 37  # the broken file keeps its earlier entry
        assert index.find(cut) is not None and index.find(good) is not None
        assert {os.path.basename(p) for p, _ in index.skipped()} == set(reasons)


def test_thin_and_huge_images_are_skipped(tmp_path, fake_vectorizer):
    folder = tmp_path / "odd"
    random_image(folder / "thin.png", size=(10000, 1))
    random_image(folder / "ok.png", size=(50, 40))
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        report = index.add(folder, max_pixels=5_000)
        assert report.added == 1
        [skip] = report.skipped
        assert skip.path.endswith("thin.png") and "over the limit" in skip.reason
        report = index.add(folder)
        assert "aspect ratio 10000:1" in report.skipped[0].reason


def test_index_refuses_vectors_from_other_weights(tmp_path, photos, fake_vectorizer):
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        index.add(photos / "pizza")

    class OtherWeights(FakeVectorizer):
        @classmethod
        def _resolve_weights(cls, weights):
            w = super()._resolve_weights(weights)
            return type(w)(path=w.path, sha256="f" * 64, is_default=False)

    with pytest.raises(IncompatibleIndexError, match="built with weights 000000000000"):
        imgindex.Index.open(tmp_path / "idx", vectorizer=OtherWeights(device="cpu"))


def test_empty_folder_builds_an_empty_index(tmp_path, fake_vectorizer):
    (tmp_path / "empty").mkdir()
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        report = index.add(tmp_path / "empty")
        assert (report.added, report.total, report.skipped) == (0, 0, [])
        assert index.search_by_vector(np.zeros(768), k=3) == []


def test_info_describes_the_index(tmp_path, photos, fake_vectorizer):
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        index.add(photos / "Leopards")
        info = index.info()
    assert info["images"] == 6 and info["dim"] == 768 and info["index_type"] == "Flat (exact)"
    assert info["weights_sha256"] == "0" * 64 and info["metrics"] == ["l2", "cosine"]
    assert info["preprocessing"]["short_side"] == 350
    assert info["bytes_on_disk"] > 6 * 768 * 4


def test_interrupted_build_keeps_committed_batches_and_resumes(tmp_path, photos, fake_vectorizer):
    class Stop(KeyboardInterrupt):
        pass

    def interrupt_after_first_batch(state):
        if state.embedded:
            raise Stop

    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        with pytest.raises(Stop):
            index.add(photos, progress=interrupt_after_first_batch)
        committed = index.count()
    assert 0 < committed < 36
    with imgindex.Index.open(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        assert index.vector_index_info()["vectors"] == index.count() == committed
        report = index.add(photos)
        assert (report.unchanged, report.added, index.count()) == (committed, 36 - committed, 36)
        assert len({r.path for r in index.records()}) == 36


def test_open_with_create_takes_the_same_arguments_whether_or_not_the_index_exists(
    tmp_path, photos, fake_vectorizer
):
    for _ in range(2):  # creates, then opens
        with imgindex.Index.open(
            tmp_path / "idx", create=True, vectorizer=fake_vectorizer, index_type="flat"
        ) as index:
            index.add(photos / "pizza")
            assert len(index.search(photos / "pizza" / "image_0001.jpg", k=2)) == 2
    with pytest.raises(TypeError, match="devcie"):
        imgindex.Index.open(tmp_path / "idx", devcie="cpu")
    with pytest.raises(ValueError, match="unknown index type 'banana'"):
        imgindex.Index.open(tmp_path / "idx", create=True, index_type="banana")
    with pytest.raises(imgindex.IndexExistsError, match="already exists"):
        imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer)


def test_k_must_be_a_whole_number_of_at_least_one(tmp_path, photos, fake_vectorizer):
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        index.add(photos / "pizza")
        vector = index.vectors([1])[0]
        assert len(index.search_by_vector(vector, k=np.int64(3))) == 3
        for bad in (0, -1, 2.5, None, True):
            with pytest.raises(ValueError, match="k must be"):
                index.search_by_vector(vector, k=bad)
        # Ids as numpy hands them out work wherever ids do.
        [first] = index.search_by_vector(vector, k=1)
        ids = np.array([first.id])
        assert index.similar(ids[0], k=2)[0].id != first.id
        assert index.get(ids[0]).id == first.id


def test_an_empty_root_folder_keeps_its_entries(tmp_path, photos, fake_vectorizer):
    """A folder that is suddenly empty (a drive not mounted) does not cost every vector: its
    entries stay, with a warning saying how to drop them. Files deleted from a folder that still
    has files are removed as before."""
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        index.add(photos / "pizza")
        count = len(index)
        (photos / "pizza" / "image_0001.jpg").unlink()
        report = index.sync([photos / "pizza"])
        assert report.removed == 1 and report.warnings == []
        for path in (photos / "pizza").iterdir():
            path.unlink()
        report = index.sync([photos / "pizza"])
        assert report.removed == 0 and len(index) == count - 1
        [warning] = report.warnings
        assert "is empty" in warning and f"imgindex remove {photos / 'pizza'}" in warning
        assert index.remove([photos / "pizza"]) == count - 1


def test_one_index_serves_several_threads(tmp_path, photos, fake_vectorizer):
    """Searches from a pool of threads (a web server's) on one Index give the answers one thread
    gets, also while another thread adds images."""
    from concurrent.futures import ThreadPoolExecutor

    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        index.add(photos / "pizza")
        queries = sorted((photos / "pizza").glob("*.jpg"))
        expected = [[h.id for h in index.search(q, k=3)] for q in queries]
        with ThreadPoolExecutor(4) as pool:
            adding = pool.submit(index.add, photos / "bonsai")
            found = list(pool.map(lambda q: [h.id for h in index.search(q, k=3)], queries * 5))
            adding.result()
        # Before the bonsai images are in, and after, a pizza's nearest are pizzas.
        assert all(ids[0] == want[0] for ids, want in zip(found, expected * 5, strict=True))
        assert len(index) == len(queries) + len(list((photos / "bonsai").glob("*.jpg")))


def test_misuse_gets_imgindex_errors_that_say_what_to_do(tmp_path, photos, fake_vectorizer):
    index = imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer)
    index.add(photos / "pizza")
    vector = index.vectors([1])[0]
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.search_by_vector(np.full(768, np.nan, np.float32))
    with pytest.raises(imgindex.ImageError, match="no pixels"):
        index.search(np.zeros((0, 0, 3), np.uint8))
    # A second Index of this process writing is not "another process".
    other = imgindex.Index.open(tmp_path / "idx", create=True, vectorizer=fake_vectorizer)
    with (
        other,
        other.write_lock(),
        pytest.raises(imgindex.IndexLockedError, match="another Index object of this proc"),
    ):
        index.add(photos / "bonsai")
    index.close()
    index.close()
    with pytest.raises(imgindex.ImgIndexError, match="was closed"):
        index.search_by_vector(vector)
    with pytest.raises(imgindex.ImgIndexError, match="was closed"):
        len(index)


def test_a_database_that_is_not_sqlite_is_named_with_a_way_forward(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "imgindex.db").write_bytes(b"\x07" * 4096)
    with pytest.raises(IncompatibleIndexError, match=f"{tmp_path / 'idx'}: imgindex.db is damag"):
        imgindex.Index.open(tmp_path / "idx")
