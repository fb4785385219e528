"""Metrics and exact search: results equal a brute-force numpy search."""

from pathlib import Path

import numpy as np
import pytest

import imgindex
from imgindex.catalog import NewImage


def test_distance_is_imgsims_euclidean_and_takes_stacks():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=768).astype(np.float32), rng.normal(size=768).astype(np.float32)
    assert imgindex.distance(a, b) == pytest.approx(np.sqrt(np.sum((a - b) ** 2)), rel=1e-6)
    assert isinstance(imgindex.distance(a, b), float)
    A, B = rng.normal(size=(5, 768)), rng.normal(size=(3, 768))
    expected = np.linalg.norm(A[:, None, :] - B[None, :, :], axis=2)
    np.testing.assert_allclose(imgindex.distance(A, B), expected, rtol=1e-9)
    np.testing.assert_allclose(imgindex.distance(A, B[0]), expected[:, 0], rtol=1e-9)
    np.testing.assert_allclose(imgindex.distance(A[1], B), expected[1], rtol=1e-9)
    assert imgindex.distance(A[2], A[2]) == 0.0


def test_cosine_similarity_and_its_shapes():
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(4, 768)), rng.normal(size=(6, 768))
    expected = (A @ B.T) / np.outer(np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=1))
    np.testing.assert_allclose(imgindex.cosine_similarity(A, B), expected, rtol=1e-9)
    assert imgindex.cosine_similarity(A[0], 3 * A[0]) == pytest.approx(1.0)
    assert imgindex.cosine_similarity(A[0], -A[0]) == pytest.approx(-1.0)
    assert imgindex.cosine_similarity(np.zeros(768), A[0]) == 0.0
    with pytest.raises(ValueError, match="stack"):
        imgindex.distance(np.zeros((2, 2, 2)), np.zeros(2))


def fill(index: imgindex.Index, vectors: np.ndarray) -> list[int]:
    images = [
        NewImage(Path(f"/img/{i}.jpg"), f"{i:064x}", 1, 0.0, 1, 1) for i in range(len(vectors))
    ]
    return index.add_vectors(images, vectors)


def brute_force(vectors, ids, query, k, metric):
    if metric == "l2":
        scores = np.linalg.norm(vectors.astype(np.float64) - query.astype(np.float64), axis=1)
        order = np.lexsort((ids, scores))
    else:
        v = vectors.astype(np.float64)
        q = query.astype(np.float64)
        scores = v @ q / np.linalg.norm(v, axis=1) / np.linalg.norm(q)
        order = np.lexsort((ids, -scores))
    return [(int(ids[i]), float(scores[i])) for i in order[:k]]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_index_search_equals_brute_force(tmp_path, fake_vectorizer, metric):
    rng = np.random.default_rng(3)
    # Shaped like AugNet output: tanh of correlated values, norms that differ between vectors.
    base = rng.normal(size=(20, 768))
    vectors = np.tanh(
        base[rng.integers(0, 20, 500)] * rng.uniform(0.3, 2, (500, 1))
        + rng.normal(0, 0.5, (500, 768))
    ).astype(np.float32)
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        ids = np.asarray(fill(index, vectors))
        queries = np.concatenate([vectors[:5], rng.normal(size=(5, 768)).astype(np.float32)])
        results = index.search_by_vector(queries, k=25, metric=metric)
        for query, hits in zip(queries, results, strict=True):
            expected = brute_force(vectors, ids, query, 25, metric)
            assert [h.id for h in hits] == [i for i, _ in expected]
            np.testing.assert_allclose(
                [h.score for h in hits], [s for _, s in expected], rtol=1e-9, atol=1e-12
            )
            assert [h.rank for h in hits] == list(range(1, 26))
            assert all(h.metric == metric for h in hits)
        # An indexed vector finds itself first, at distance exactly 0 / similarity 1.
        first = index.search_by_vector(vectors[7], k=1, metric=metric)[0]
        assert first.id == ids[7]
        assert first.score == (0.0 if metric == "l2" else pytest.approx(1.0, abs=1e-12))


def test_metrics_rank_differently_on_the_same_index(tmp_path, fake_vectorizer):
    # b points the same way as the query but is far; a is near but at an angle.
    q = np.zeros(768, np.float32)
    q[0] = 1
    a = q.copy()
    a[1] = 0.5
    b = q * 10
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        ids = fill(index, np.stack([a, b]))
        assert [h.id for h in index.search_by_vector(q, k=2, metric="l2")] == [ids[0], ids[1]]
        assert [h.id for h in index.search_by_vector(q, k=2, metric="cosine")] == [ids[1], ids[0]]


def test_k_larger_than_index_and_empty_index(tmp_path, fake_vectorizer):
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fake_vectorizer) as index:
        assert index.search_by_vector(np.ones(768), k=5) == []
        fill(index, np.eye(3, 768, dtype=np.float32))
        assert len(index.search_by_vector(np.ones(768), k=50)) == 3
        with pytest.raises(ValueError, match="768"):
            index.search_by_vector(np.ones(10))
        with pytest.raises(ValueError, match="unknown metric"):
            index.search_by_vector(np.ones(768), metric="hamming")


def test_hits_as_dicts():
    hit = imgindex.Hit(rank=1, id=3, path="/a.jpg", score=0.5, metric="l2")
    assert hit.as_dict() == {"rank": 1, "id": 3, "path": "/a.jpg", "distance": 0.5}
    assert hit.distance == 0.5 and hit.similarity is None
    cos = imgindex.Hit(rank=1, id=3, path="/a.jpg", score=0.9, metric="cosine")
    assert cos.as_dict()["similarity"] == 0.9 and cos.distance is None
