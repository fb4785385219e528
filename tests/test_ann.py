"""Approximate indexes against exact search, training rules, metrics, deletions, memory-mapped
readers, filters, duplicates and tuning (synthetic AugNet-like vectors, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import imgindex
import imgindex.evaluate
from imgindex.ann import IndexSpec, parse_index_type, plan
from imgindex.catalog import NewImage

from .conftest import FakeVectorizer

D = 768


def augnet_like(n: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """tanh of clustered Gaussian vectors: bounded like AugNet's, with neighbourhoods."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (clusters, D))
    scale = rng.uniform(0.5, 1.5, (n, 1))
    return np.tanh(
        centres[rng.integers(0, clusters, n)] * scale + rng.normal(0, 0.6, (n, D))
    ).astype(np.float32)


def make_index(tmp_path: Path, vectors: np.ndarray, index_type: str | None, metric: str = "l2"):
    index = imgindex.Index.create(
        tmp_path / "idx",
        vectorizer=FakeVectorizer(device="cpu"),
        index_type=index_type,
        metric=metric,
    )
    images = [
        NewImage(tmp_path / "img" / f"{i // 100}" / f"{i}.png", f"{i:064x}", 1, 0.0, 1, 1)
        for i in range(len(vectors))
    ]
    with index.write_lock():
        for start in range(0, len(vectors), 1000):
            part = slice(start, start + 1000)
            index.add_vectors(images[part], vectors[part], save=False)
        index.save()
    return index


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int, metric: str) -> list[list[int]]:
    v = vectors.astype(np.float64)
    out = []
    for q in queries.astype(np.float64):
        if metric == "l2":
            scores = np.linalg.norm(v - q, axis=1)
        else:
            scores = -(v @ q) / np.linalg.norm(v, axis=1) / np.linalg.norm(q)
        out.append([int(i) + 1 for i in np.argsort(scores, kind="stable")[:k]])  # ids start at 1
    return out


def recall(found, truth) -> float:
    return float(
        np.mean(
            [len({h.id for h in f} & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]
        )
    )


def test_parse_and_plan():
    assert parse_index_type("auto") is None
    assert parse_index_type("hnsw:M=48", "cosine") == IndexSpec("hnsw", "cosine", {"M": 48})
    assert parse_index_type("flat", "cosine").metric == "both"
    assert parse_index_type("factory:IVF16,PQ8x4").params == {"factory": "IVF16,PQ8x4"}
    with pytest.raises(ValueError, match="unknown index type 'annoy'"):
        parse_index_type("annoy")
    with pytest.raises(ValueError, match="takes"):
        parse_index_type("hnsw:nlist=5")
    # auto: exact for small collections; approximate beyond, by memory.
    assert plan(None, 1000, D) == (IndexSpec("flat"), None)
    big, note = plan(None, 2_000_000, D, available_bytes=64 << 30)
    assert big.kind == "hnsw" and "auto" in note
    assert plan(None, 2_000_000, D, available_bytes=4 << 30)[0].kind == "ivf-pq"
    # Never trained on too few vectors: flat stands in, and says why.
    spec, why = plan(IndexSpec("ivf-pq", "l2"), 5000, D)
    assert spec.kind == "flat" and "needs 9984 vectors to train" in why
    spec, _ = plan(IndexSpec("ivf-flat", "l2"), 5000, D)
    assert spec.kind == "ivf-flat" and 39 * spec.params["nlist"] <= 5000
    assert plan(IndexSpec("factory", "l2", {"factory": "IVF16,PQ8x4"}), 600, D)[0].kind == "flat"


@pytest.mark.parametrize(
    "index_type, metric, minimum",
    [
        ("hnsw", "l2", 0.97),
        ("hnsw", "cosine", 0.97),
        ("ivf-flat", "l2", 0.95),
        ("ivf-flat", "cosine", 0.95),
        ("factory:IVF16,PQ32x4", "l2", 0.90),
    ],
)
def test_approximate_kinds_against_exact(tmp_path, index_type, metric, minimum):
    data = augnet_like(3040)  # queries from the same distribution, not in the index
    vectors, queries = data[:3000], data[3000:]
    with make_index(tmp_path, vectors, index_type, metric) as index:
        info = index.info()
        assert not info["exact"] and info["metrics"] == [metric]
        found = index.search_by_vector(queries, k=10, metric=metric)
        assert recall(found, brute_force(vectors, queries, 10, metric)) >= minimum
        # Scores are exact whatever found the candidates.
        for hits in found[:5]:
            expected = imgindex.search.score(
                queries[0] if False else hits and queries[found.index(hits)],
                index.vectors([h.id for h in hits]),
                metric,
            )
            np.testing.assert_allclose([h.score for h in hits], expected, rtol=1e-9)
        other = "cosine" if metric == "l2" else "l2"
        with pytest.raises(imgindex.IncompatibleIndexError, match=f"answers {metric} queries only"):
            index.search_by_vector(queries[0], metric=other)


def test_flat_index_is_exact_for_both_metrics(tmp_path):
    data = augnet_like(2020)
    vectors, queries = data[:2000], data[2000:]
    with make_index(tmp_path, vectors, "flat") as index:
        for metric in ("l2", "cosine"):
            found = index.search_by_vector(queries, k=10, metric=metric)
            assert [[h.id for h in f] for f in found] == brute_force(vectors, queries, 10, metric)


def test_too_few_vectors_to_train_fall_back_to_flat_and_convert_later(tmp_path):
    vectors = augnet_like(800)
    with make_index(tmp_path, vectors[:500], "ivf-flat:nlist=16") as index:
        assert index.info()["index"]["kind"] == "flat"
        assert "needs 624 vectors to train" in index.info()["index_note"]
        extra = [NewImage(Path(f"/x/{i}.png"), f"{i:064x}", 1, 0.0, 1, 1) for i in range(500, 800)]
        index.add_vectors(extra, vectors[500:])  # saved: now there are enough, it is trained
        assert index.info()["index"]["kind"] == "ivf-flat" and index.info()["index_note"] is None
        assert index.count() == 800 and index.vector_index_info()["vectors"] == 800


def test_hnsw_deletions_are_filtered_and_compacted(tmp_path):
    vectors = augnet_like(2000)
    with make_index(tmp_path, vectors, "hnsw") as index:
        with index.write_lock():
            index.remove_ids(range(1, 101), save=False)  # 5%: tombstones
            assert index.vector_index_info()["tombstones"] == 100
            hits = index.search_by_vector(vectors[:50], k=5)
            assert all(h.id > 100 for row in hits for h in row)
            index.save()
            reader = imgindex.Index.open(tmp_path / "idx")  # memory-mapped, reconciled on open
            assert reader.vector_index_info()["vectors"] == 1900
            found = reader.search_by_vector(vectors[:50], k=5)
            assert all(h.id > 100 for row in found for h in row)
            index.remove_ids(range(101, 301), save=False)  # 15% in all: the next save rebuilds
            index.save()
        after = index.vector_index_info()
        assert after["tombstones"] == 0 and after["vectors"] == 1700
        reader.refresh()
        assert reader.vector_index_info()["vectors"] == 1700
        reader.close()


def test_memory_mapped_reader_sees_later_writes(tmp_path):
    vectors = augnet_like(1200)
    with make_index(tmp_path, vectors[:1000], "flat") as writer:
        reader = imgindex.Index.open(tmp_path / "idx")
        assert reader.vector_index_info()["memory_mapped"]  # read-only, memory-mapped
        with writer.write_lock():
            writer.add_vectors(
                [NewImage(Path(f"/y/{i}.png"), f"y{i:063x}", 1, 0.0, 1, 1) for i in range(200)],
                vectors[1000:],
                save=False,
            )
            writer.remove_ids([5], save=False)  # not saved: the reader must reconcile
        hits = reader.search_by_vector(vectors[1000], k=1)
        assert hits[0].path == "/y/0.png" and hits[0].score == 0.0
        assert 5 not in {h.id for h in reader.search_by_vector(vectors[4], k=3)}
        assert reader.vector_index_info()["vectors"] == 1199
        reader.close()


def test_thresholds_prefix_filter_and_similar(tmp_path):
    vectors = augnet_like(600)
    with make_index(tmp_path, vectors, "flat") as index:
        query = vectors[10]
        near = index.search_by_vector(query, k=50, max_distance=8.0)
        assert near and all(h.score <= 8.0 for h in near)
        assert len(near) < len(index.search_by_vector(query, k=50))
        similar = index.search_by_vector(query, k=50, metric="cosine", min_similarity=0.5)
        assert all(h.score >= 0.5 for h in similar)
        with pytest.raises(ValueError, match="min_similarity"):
            index.search_by_vector(query, max_distance=1.0, metric="cosine")
        folder = tmp_path / "img" / "3"
        under = index.search_by_vector(query, k=20, under=folder)
        assert len(under) == 20 and all(h.path.startswith(str(folder) + "/") for h in under)
        alike = index.similar(11, k=5)
        assert 11 not in {h.id for h in alike} and len(alike) == 5
        assert [h.id for h in alike] == [h.id for h in index.search_by_vector(query, k=6)[1:]]
        assert [h.id for h in index.similar(tmp_path / "img" / "0" / "10.png", k=5)] == [
            h.id for h in alike
        ]
        with pytest.raises(KeyError):
            index.similar(99999)


def test_duplicates_exact_and_approximate(tmp_path):
    rng = np.random.default_rng(5)
    vectors = augnet_like(1500)
    # Plant 30 groups: copies within a small distance of an original.
    for g in range(30):
        for j in range(1, 3):
            vectors[1000 + g * 3 + j] = vectors[1000 + g * 3] + rng.normal(0, 0.05, D)
    planted = {frozenset(range(1001 + g * 3, 1004 + g * 3)) for g in range(30)}
    for index_type in ("flat", "hnsw"):
        with make_index(tmp_path / index_type, vectors, index_type) as index:
            groups = index.duplicates(threshold=3.0)
            assert {frozenset(g.ids) for g in groups} == planted
            group = groups[0]
            assert len(group.pairs) >= 2 and all(s <= 3.0 for _, _, s in group.pairs)
            assert group.paths[0].endswith(".png")
            cosine = (
                index.duplicates(threshold=0.995, metric="cosine") if index_type == "flat" else None
            )
            if cosine is not None:
                assert {frozenset(g.ids) for g in cosine} == planted


def test_tune_reports_recall_and_latency(tmp_path):
    vectors = augnet_like(3000)
    with make_index(tmp_path, vectors, "hnsw") as index:
        rows = imgindex.evaluate.tune(index, queries=30, k=10)
        assert [r.setting for r in rows][:2] == ["ef_search=16", "ef_search=32"]
        assert rows[-1].recall >= 0.97
        assert all(r.p50_ms > 0 and r.p99_ms >= r.p50_ms and r.batch_qps > 0 for r in rows)
    with make_index(tmp_path / "flat", vectors[:500], "flat") as index:
        [row] = imgindex.evaluate.tune(index, queries=20, k=5)
        assert row.setting == "exact" and row.recall == 1.0


def test_memory_estimates(tmp_path):
    vectors = augnet_like(1500)
    with make_index(tmp_path / "f", vectors, "flat") as flat:
        assert 3072 <= flat.info()["vector_index_bytes_in_memory"] / 1500 <= 3200
    with make_index(tmp_path / "p", vectors, "factory:IVF16,PQ32x4") as pq:
        assert pq.info()["vector_index_bytes_in_memory"] / 1500 < 200


def test_changing_parameters_rebuilds_and_growth_does_not(tmp_path):
    vectors = augnet_like(1500)
    with make_index(tmp_path, vectors[:1000], "hnsw:M=16") as index:
        built = index.vector_index_info
        assert built()["params"]["M"] == 16
        with index.write_lock():
            index.set_index_type("hnsw:M=24")
            index.save()
            assert built()["params"]["M"] == 24  # a new parameter: rebuilt
            index.set_index_type("ivf-flat")  # nlist planned for the size
            index.save()
            nlist = built()["params"]["nlist"]
            before = built()["rebuilds"]
            extra = [NewImage(Path(f"/z/{i}.png"), f"z{i:063x}", 1, 0.0, 1, 1) for i in range(500)]
            index.add_vectors(extra, vectors[1000:])
            assert built()["rebuilds"] == before  # more vectors: added, not rebuilt
            assert built()["params"]["nlist"] == nlist and index.count() == 1500


def test_tune_recall_counts_ties_and_small_indexes_right(tmp_path):
    """Asking for more neighbours than there are images divides by the number there are, and of
    identical vectors any one is a right answer: an exact index has recall 1.0 either way."""
    vectors = augnet_like(12)
    vectors[6:] = vectors[:6]  # six pairs of duplicates
    with make_index(tmp_path, vectors, "flat") as index:
        [row] = imgindex.evaluate.tune(index, queries=12, k=100)
        assert row.recall == 1.0
        [row] = imgindex.evaluate.tune(index, queries=12, k=1)
        assert row.recall == 1.0


@pytest.mark.parametrize(
    ("before", "after"), [(("flat", "l2"), ("hnsw", "l2")), (("hnsw", "l2"), ("hnsw", "cosine"))]
)
def test_a_kill_between_writing_the_faiss_file_and_recording_its_kind(
    tmp_path, monkeypatch, before, after
):
    """The new file is renamed into place, then its kind is recorded: a kill between the two
    must not leave a file that the index no longer recognises (check would call it damaged,
    and every open would rebuild the vector index from SQLite), nor one it takes for another
    (an HNSW file for cosine read as one for l2 gave wrong distances)."""
    from imgindex.store import Store

    vectors = augnet_like(300)
    with make_index(tmp_path, vectors, before[0], before[1]) as index:
        index.set_index_type(after[0], after[1])

    def die_after_the_rename(folder):
        raise SystemExit("killed after the rename")

    store = Store.open(tmp_path / "idx", writable=True)
    store.lock()
    monkeypatch.setattr(imgindex.atomic, "fsync_folder", die_after_the_rename)
    with pytest.raises(SystemExit):
        store.save_vector_index()
    store.unlock()
    store.db.close()
    monkeypatch.undo()
    reopened = Store.open(tmp_path / "idx")
    spec = reopened.vector_index.spec
    assert (spec.kind, spec.metric) == after and not reopened._dirty
    assert reopened.check(check_files=False).problems == []
    reopened.close()
    with imgindex.Index.open(tmp_path / "idx") as index:
        [hit] = index.search_by_vector(vectors[7], k=1, metric=after[1])
        assert hit.id == 8 and hit.score == pytest.approx(0.0 if after[1] == "l2" else 1.0)


def test_exact_copies_are_duplicates_at_the_strictest_thresholds():
    """Identical AugNet-like vectors (squared norms in the hundreds) are found at threshold 0 by
    distance and at 1 by cosine: float32 rounding in the pre-filter (about 1e-4 on a squared
    distance) and float64 rounding in the cosine (1 - 1e-15) must not put them out."""
    from imgindex.duplicates import exact_pairs

    vectors = augnet_like(50)
    vectors[10] = vectors[3]
    vectors[40] = vectors[3]
    ids = np.arange(100, 150)
    for threshold, metric in ((0.0, "l2"), (1e-4, "l2"), (1.0, "cosine")):
        pairs = {(a, b) for a, b, _ in exact_pairs(ids, vectors, threshold, metric)}
        assert pairs == {(103, 110), (103, 140), (110, 140)}, (threshold, metric)
