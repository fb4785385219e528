"""Retrieval metrics against values worked out by hand."""

import pytest

from imgindex.evaluate import average_precision, score_rankings


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
