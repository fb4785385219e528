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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

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
    """Euclidean (L2) distance, as ``imgsim.distance``.

    Two vectors give a float; a vector and an ``N x d`` stack give N distances; two stacks give
    the ``N x M`` matrix.
    """
    a2, b2 = _as_matrix(a), _as_matrix(b)
    # Differences, not |a|^2 + |b|^2 - 2ab: that form cancels badly for near-identical vectors
    # (an image's distance to itself would not be exactly 0).
    out = np.empty((len(a2), len(b2)))
    if len(a2) <= len(b2):
        for i, row in enumerate(a2):
            out[i] = np.linalg.norm(b2 - row, axis=1)
    else:
        for j, row in enumerate(b2):
            out[:, j] = np.linalg.norm(a2 - row, axis=1)
    return _shape_like(out, a, b)


def cosine_similarity(a: Any, b: Any) -> Any:
    """Cosine similarity in [-1, 1]; shapes as :func:`distance`. A zero vector scores 0."""
    a2, b2 = _normalized(_as_matrix(a)), _normalized(_as_matrix(b))
    return _shape_like(np.clip(a2 @ b2.T, -1.0, 1.0), a, b)


def score(a: Any, b: Any, metric: str) -> Any:
    return distance(a, b) if check_metric(metric) == "l2" else cosine_similarity(a, b)


def _as_matrix(x: Any) -> np.ndarray:
    m = np.asarray(x, dtype=np.float64)
    if m.ndim == 1:
        return m[None, :]
    if m.ndim != 2:
        raise ValueError(f"expected a vector or an N x d stack of vectors, got shape {m.shape}")
    return m


def _normalized(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norms == 0, 1.0, norms)


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
        like, unlike = _normalized(like), _normalized(unlike) if len(unlike) else unlike
    query = like.mean(axis=0)
    if len(unlike):
        query = (1 + unlike_weight) * query - unlike_weight * unlike.mean(axis=0)
    return query.astype(np.float32)
