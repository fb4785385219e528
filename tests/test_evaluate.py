"""Retrieval metrics against values worked out by hand."""

import os

import numpy as np
import pytest

from imgindex.errors import ImgIndexError
from imgindex.evaluate import (
    average_precision,
    evaluate_vectors,
    exact_rankings,
    labels_from_csv,
    labels_from_folders,
    score_rankings,
)


def test_average_precision_by_hand():
    # Relevant at ranks 1 and 3: (1/1 + 2/3) / 2
    assert average_precision([True, False, True, False]) == pytest.approx((1 + 2 / 3) / 2)
    # Same list, but a third relevant item was never retrieved: divide by 3
    assert average_precision([True, False, True], total_relevant=3) == pytest.approx(
        (1 + 2 / 3) / 3
    )
    assert average_precision([False, False]) == 0.0
    assert average_precision([True, True, True]) == 1.0
    # Relevant only at rank 4: 1/4
    assert average_precision([False, False, False, True]) == pytest.approx(0.25)


def test_score_rankings_by_hand():
    # Collection: a1 a2 b1 b2 c1 (c1 has no relevant partner, so it is not a query).
    queries = ["a", "a", "b", "b", "c"]
    ranked = [
        ["a", "b", "b", "c"],  # a1: AP 1, hit@1
        ["b", "a", "b", "c"],  # a2: AP 1/2, miss@1, hit@2
        ["c", "a", "a", "b"],  # b1: relevant at 4 -> AP 1/4, miss@1
        ["b", "a", "a", "c"],  # b2: AP 1
        ["a", "a", "b", "b"],  # c1: skipped
    ]
    counts = [1, 1, 1, 1, 0]
    scores = score_rankings(queries, ranked, counts, ks=(1, 2, 4))
    assert scores.queries == 4
    assert scores.mean_average_precision == pytest.approx((1 + 0.5 + 0.25 + 1) / 4)
    assert scores.recall_at == {1: 0.5, 2: 0.75, 4: 1.0}
    assert scores.precision_at[1] == pytest.approx(0.5)
    assert scores.precision_at[2] == pytest.approx((1 / 2 + 1 / 2 + 0 + 1 / 2) / 4)
    assert scores.as_dict()["recall@2"] == 0.75


# -- exact rankings, depth, groups, metrics ------------------------------------------------------


def line(*xs):
    """Points on a line, as 1-D vectors."""
    return np.array([[x] for x in xs], dtype=np.float32)


def test_evaluate_vectors_by_hand():
    # a1=0, b1=1, a2=2.5, b2=4.2, c=10 (c has no partner, so it is not a query).
    # a1 ranks b1 a2 b2 c -> AP 1/2; b1 ranks a1 a2 b2 -> AP 1/3;
    # a2 ranks b1 b2 a1 -> AP 1/3; b2 ranks a2 b1 -> AP 1/2.
    vectors = line(0, 1, 2.5, 4.2, 10)
    labels = ["a", "b", "a", "b", "c"]
    scores = evaluate_vectors(vectors, labels, ks=(1, 2, 3))
    assert scores.queries == 4
    assert scores.mean_average_precision == pytest.approx(5 / 12)
    assert scores.recall_at == {1: 0.0, 2: 0.5, 3: 1.0}
    assert scores.precision_at[2] == pytest.approx(0.25)
    assert scores.precision_at[3] == pytest.approx((1 / 3) * 4 / 4)
    # Ranked only 2 deep: b1 and a2 never find their partner (AP 0).
    shallow = evaluate_vectors(vectors, labels, ks=(1,), depth=2)
    assert shallow.mean_average_precision == pytest.approx(0.25)


def test_groups_leave_out_same_label_same_group():
    # Re-identification: person p seen by cameras 1, 1, 2; person q by cameras 1, 2.
    # A(p,c1)=0, B(p,c1)=0.5, C(p,c2)=3, D(q,c1)=1.2, E(q,c2)=2.
    vectors = line(0, 0.5, 3, 1.2, 2)
    labels = ["p", "p", "p", "q", "q"]
    groups = ["c1", "c1", "c2", "c1", "c2"]
    # A: B is left out; D E C -> C at 3, AP 1/3. B: likewise 1/3. C: E D B A -> (1/3 + 2/4)/2.
    # D: B E A C -> E at 2, AP 1/2. E: D first, AP 1.
    scores = evaluate_vectors(vectors, labels, groups, ks=(1,))
    assert scores.queries == 5
    assert scores.mean_average_precision == pytest.approx(31 / 60)
    assert scores.recall_at[1] == pytest.approx(1 / 5)
    # Without groups, A and B find each other first, and E finds D: 3 of 5.
    assert evaluate_vectors(vectors, labels, ks=(1,)).recall_at[1] == pytest.approx(3 / 5)


def test_cosine_ignores_length_where_l2_does_not():
    vectors = np.array([[1, 0], [10, 1], [0, 1], [0.1, 5]], dtype=np.float32)
    labels = ["a", "a", "b", "b"]
    assert evaluate_vectors(vectors, labels, metric="cosine").mean_average_precision == 1.0
    # By L2 the long a2 is far from a1: a1 ranks b1 b2 a2 -> AP 1/3.
    l2 = evaluate_vectors(vectors, labels, metric="l2")
    assert l2.mean_average_precision < 1.0


def test_exact_rankings_match_a_sort(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 8)).astype(np.float32)
    for metric in ("l2", "cosine"):
        got = dict(exact_rankings(vectors, metric, depth=7, chunk=64))
        v = vectors.astype(np.float64)
        if metric == "cosine":
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            d = -(v @ v.T)
        else:
            d = ((v[:, None, :] - v[None, :, :]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        for q in (0, 150, 299):
            assert got[q].tolist() == np.argsort(d[q], kind="stable")[:7].tolist()


# -- labels --------------------------------------------------------------------------------------


def test_labels_from_folders(tmp_path):
    root = tmp_path / "set"
    paths = [str(root / "cats" / "1.jpg"), str(root / "a" / "b" / "2.jpg"), str(root / "3.jpg")]
    labels = labels_from_folders(paths, [root])
    assert list(labels.label.values()) == ["cats", "a/b", "set"]
    assert labels_from_folders(paths[:1], []).label[paths[0]] == "cats"


def test_labels_from_csv(tmp_path):
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("path,label,camera\nimgs/1.jpg,p1,c1\n/abs/2.jpg,p2,\n")
    labels = labels_from_csv(csv_file, group_column="camera")
    one = str(tmp_path / "imgs" / "1.jpg")
    assert labels.label == {one: "p1", "/abs/2.jpg": "p2"}
    assert labels.group == {one: "c1"}

    csv_file.write_text("file,class\nx.jpg,a\n")
    with pytest.raises(ImgIndexError, match="path and label"):
        labels_from_csv(csv_file)
    csv_file.write_text("path,label\nx.jpg,a\nx.jpg,b\n")
    with pytest.raises(ImgIndexError, match=r"line 3: x\.jpg is labelled twice"):
        labels_from_csv(csv_file)
    with pytest.raises(ImgIndexError, match="cannot read labels"):
        labels_from_csv(tmp_path / "missing.csv")


def test_labels_under_folders(tmp_path):
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("path,label\na/1.jpg,x\na/b/2.jpg,y\nab/3.jpg,z\n4.jpg,w\n")
    labels = labels_from_csv(csv_file)
    assert sorted(labels.under([tmp_path / "a"]).label.values()) == ["x", "y"]
    assert sorted(labels.under([tmp_path / "ab", tmp_path / "4.jpg"]).label.values()) == [
        "w",
        "z",
    ]
    assert labels.under([tmp_path / "a"]).source == labels.source


def test_csv_paths_are_relative_to_the_folder_as_reached_through_a_link(tmp_path):
    """Relative paths start from the CSV's folder as reached (through the link), and are then
    resolved as builds resolve the folders they index: labels must name the same paths as the
    index, or they match nothing."""
    from imgindex.evaluate import labels_from_csv

    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "via")
    (tmp_path / "real" / "labels.csv").write_text("path,label\npics/a.jpg,cat\n")
    labels = labels_from_csv(tmp_path / "via" / "labels.csv")
    assert list(labels.label) == [str(tmp_path / "real" / "pics" / "a.jpg")]
