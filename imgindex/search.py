"""Distances, similarities and nearest-neighbour search over an index's vectors.

Two metrics, both exact on the default (flat) index:

* ``l2``: Euclidean distance between raw AugNet vectors (imgsim's ``distance``); smaller is closer.
* ``cosine``: cosine similarity, the dot product of the normalised vectors; larger is closer.

The vector index (:mod:`imgindex.ann`) finds candidates in float32 (which loses about 1e-5 of a
squared distance of a few hundred, so an image's distance to itself could read 0.005), or
approximately. The candidates are then re-scored in float64 from their stored vectors and
re-sorted (:func:`rank_exactly`), so the reported numbers and order are those of a brute-force
float64 search over the candidates.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgindex.ann import IndexSpec, SearchParams
from imgindex.catalog import ImageRecord
from imgindex.scoring import distances, normalized, similarities

METRICS = ("l2", "cosine")


@dataclass(frozen=True)
class Hit:
    """One search result. ``score`` is a distance for ``l2`` and a similarity for ``cosine``."""

    rank: int
    id: int
    path: str
    score: float
    metric: str

    @property
    def distance(self) -> float | None:
        return self.score if self.metric == "l2" else None

    @property
    def similarity(self) -> float | None:
        return self.score if self.metric == "cosine" else None

    def as_dict(self) -> dict[str, Any]:
        key = "distance" if self.metric == "l2" else "similarity"
        return {"rank": self.rank, "id": self.id, "path": self.path, key: self.score}


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    return metric


def check_cutoffs(metric: str, max_distance: float | None, min_similarity: float | None) -> None:
    """ValueError for a cutoff of the other metric (a distance for cosine, a similarity for
    l2)."""
    if max_distance is not None and metric != "l2":
        raise ValueError("max_distance applies to the l2 metric; use min_similarity")
    if min_similarity is not None and metric != "cosine":
        raise ValueError("min_similarity applies to the cosine metric; use max_distance")


def distance(a: Any, b: Any) -> Any:
    """Euclidean (L2) distance, as ``imgsim.distance`` (:func:`imgindex.scoring.distances`).

    Two vectors give a float; a vector and an ``N x d`` stack give N distances; two stacks give
    the ``N x M`` matrix.
    """
    return _shape_like(distances(_as_matrix(a), _as_matrix(b)), a, b)


def cosine_similarity(a: Any, b: Any) -> Any:
    """Cosine similarity in [-1, 1]; shapes as :func:`distance`. A zero vector scores 0."""
    return _shape_like(similarities(_as_matrix(a), _as_matrix(b)), a, b)


def score(a: Any, b: Any, metric: str) -> Any:
    return distance(a, b) if check_metric(metric) == "l2" else cosine_similarity(a, b)


def _as_matrix(x: Any) -> np.ndarray:
    m = np.asarray(x, dtype=np.float64)
    if m.ndim == 1:
        return m[None, :]
    if m.ndim != 2:
        raise ValueError(f"expected a vector or an N x d stack of vectors, got shape {m.shape}")
    return m


def _shape_like(matrix: np.ndarray, a: Any, b: Any) -> Any:
    a_vec, b_vec = np.ndim(a) == 1, np.ndim(b) == 1
    if a_vec and b_vec:
        return float(matrix[0, 0])
    if a_vec:
        return matrix[0]
    if b_vec:
        return matrix[:, 0]
    return matrix


def rank_exactly(
    queries: np.ndarray,
    candidates: list[np.ndarray],
    vectors_of: Callable[[np.ndarray], np.ndarray],
    k: int,
    metric: str,
) -> list[list[tuple[int, float]]]:
    """Re-score each query's candidate ids in float64 against their stored vectors and keep the
    best ``k``: (id, score) pairs, best first, equal scores by id (reproducible order)."""
    check_metric(metric)
    unique = np.unique(np.concatenate(candidates)) if candidates else np.empty(0, np.int64)
    if not len(unique):
        return [[] for _ in candidates]
    stored = vectors_of(unique)
    results = []
    for query, ids in zip(queries, candidates, strict=True):
        ids = np.unique(ids)
        rows = np.searchsorted(unique, ids)
        exact = np.atleast_1d(score(query, stored[rows], metric))
        order = np.lexsort((ids, exact if metric == "l2" else -exact))[:k]
        results.append([(int(ids[i]), float(exact[i])) for i in order])
    return results


# How far a query moves away from the examples it should be unlike (Rocchio's gamma, in the
# form q = (1 + w) mean(like) - w mean(unlike)).
UNLIKE_WEIGHT = 0.5


def combine_examples(
    like: np.ndarray, unlike: np.ndarray, metric: str, unlike_weight: float = UNLIKE_WEIGHT
) -> np.ndarray:
    """One query vector from examples to be like (rows of ``like``, at least one) and unlike
    (rows of ``unlike``, maybe none)::

        q = mean(like)                                     without unlike examples
        q = (1 + w) * mean(like) - w * mean(unlike)        with them (w = ``unlike_weight``)

    the mean of the positives pushed away from the mean of the negatives along the line
    between them (Rocchio's relevance feedback, with the first positive not weighed apart).
    For cosine the examples are L2-normalised first (only directions count); for l2 they are
    taken as they are, so the query is a point in the vectors' own space."""
    check_metric(metric)
    like = np.atleast_2d(np.asarray(like, dtype=np.float64))
    unlike = np.asarray(unlike, dtype=np.float64).reshape(-1, like.shape[1])
    if not len(like):
        raise ValueError("at least one example to be like is needed")
    if not np.isfinite(like).all() or not np.isfinite(unlike).all():
        raise ValueError("example vectors hold NaN or infinite numbers")
    if metric == "cosine":
        like, unlike = normalized(like), normalized(unlike) if len(unlike) else unlike
    query = like.mean(axis=0)
    if len(unlike):
        query = (1 + unlike_weight) * query - unlike_weight * unlike.mean(axis=0)
    return query.astype(np.float32)


# -- searching an index ------------------------------------------------------------------------


def chosen_ids(store: Any, under: Any = None, within: Any = None) -> np.ndarray | None:
    """The ids a search, a page or a duplicate search is limited to (sorted), or None for all:
    those under the folder ``under`` (see ``Store.ids_under``) and among the ids ``within``."""
    allowed = store.ids_under(under) if under is not None else None
    if within is not None:
        chosen = np.unique(np.asarray(list(within), dtype=np.int64))
        allowed = chosen if allowed is None else np.intersect1d(allowed, chosen)
    return allowed


def candidates_for(spec: IndexSpec, k: int) -> int:
    """How many candidates to take from the vector index for ``k`` results: a margin for
    re-scoring to reorder near-ties, and many more for IVF-PQ, whose compressed codes only
    approximate the distances (benchmarks/scale.py measures the recall this buys)."""
    if spec.kind == "ivf-pq" or (spec.kind == "factory" and "PQ" in spec.params["factory"]):
        return max(10 * k, k + 100)
    return k + 16


def search_store(
    store: Any,
    queries: np.ndarray,
    k: int,
    metric: str,
    params: SearchParams,
    *,
    under: Any = None,
    within: Any = None,
    exclude: Any = (),
    max_distance: float | None = None,
    min_similarity: float | None = None,
) -> list[list[Hit]]:
    """The ``k`` nearest images to each row of ``queries`` in an open store: candidates from its
    vector index, re-scored exactly (:func:`rank_exactly`), limited and cut off as
    ``Index.search_by_vector`` says, each with its record's path."""
    excluded = {int(i) for i in exclude}
    # The FAISS index and the rows are read at different moments; if a writer removed a found
    # image in between, search again on the newer state instead of returning a hit without a
    # row (or a short list).
    for _attempt in range(5):
        store.refresh()
        allowed = chosen_ids(store, under, within)
        fetch = candidates_for(store.vector_index.spec, k + len(excluded))
        candidates = store.vector_index.search(queries, fetch, metric, params, allowed)
        if excluded:
            candidates = [c[~np.isin(c, list(excluded))] for c in candidates]
        found = rank_exactly(queries, candidates, store.stored_vectors, k, metric)
        records = store.get_many({i for row in found for i, _ in row})
        if all(i in records for row in found for i, _ in row):
            break

    def kept(score: float) -> bool:
        return (max_distance is None or score <= max_distance) and (
            min_similarity is None or score >= min_similarity
        )

    results = []
    for row in found:
        hits = [(i, s) for i, s in row if i in records and kept(s)]
        results.append([Hit(rank, i, records[i].path, s, metric)
                        for rank, (i, s) in enumerate(hits, start=1)])  # fmt: skip
    return results


def example_vectors(
    examples: Any,
    dim: int,
    stored: Callable[[Any], tuple[int, np.ndarray]],
    embed: Callable[[list[Any]], np.ndarray],
) -> tuple[np.ndarray, list[int]]:
    """Vectors of the examples of ``Index.search_like`` (one example, or a list), and the ids
    of the indexed ones: an id or a record gives ``stored(example)`` -> (id, its stored
    vector); a 1-D array of ``dim`` numbers is a vector already; anything else is an image,
    embedded by ``embed``."""
    if isinstance(examples, (str, bytes, os.PathLike, ImageRecord, numbers.Integral, np.ndarray)):
        examples = [examples]
    rows, ids, images = [], [], []
    for example in examples:
        if isinstance(example, ImageRecord) or (
            isinstance(example, numbers.Integral) and not isinstance(example, bool)
        ):
            image_id, vector = stored(example)
            ids.append(image_id)
            rows.append(vector)
        elif isinstance(example, np.ndarray) and example.shape == (dim,):
            rows.append(example.astype(np.float32))  # a vector, embedded already
        else:
            images.append(example)
    if images:
        rows += list(embed(images))
    return (np.stack(rows) if rows else np.empty((0, dim), np.float32)), ids
