"""Exact L2 and cosine scores: the one kernel that every search, join and evaluation uses.

* :func:`distances` and :func:`similarities` give the scores people see, in float64: Euclidean
  distance from differences (``|a|^2 + |b|^2 - 2ab`` cancels badly for near-identical vectors,
  and an image's distance to itself would not be exactly 0), and the dot product of normalised
  vectors clipped to [-1, 1]. :func:`paired_scores` gives them for pairs of rows.
* :func:`ranking_keys` orders vectors for each query as a metric does, smallest first, without
  the terms that are the same for every vector of one query: ``|v|^2 - 2 q.v`` for l2 (the
  squared distance less ``|q|^2``), ``-q.v / |v|`` for cosine (the similarity times ``|q|``). It
  is a matrix product, so a scan over millions of vectors runs at the speed of BLAS; its float32
  rounding only decides which candidates are re-scored exactly, never a reported number.
* :class:`BestK` keeps the k smallest keys per query over a scan in blocks.

A zero vector has no direction: it is left at zero when normalised, and scores a cosine of 0.
"""

from __future__ import annotations

import numpy as np


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in their own float type; zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms).astype(vectors.dtype)


def squared_norms(vectors: np.ndarray) -> np.ndarray:
    """``|v|^2`` of each row, in its own float type."""
    return np.einsum("ij,ij->i", vectors, vectors)


def ranking_keys(
    queries: np.ndarray,
    vectors: np.ndarray,
    metric: str,
    norms: np.ndarray | None = None,
) -> np.ndarray:
    """``len(queries) x len(vectors)`` keys, smallest first for the nearest (see the module's
    docstring); ``norms`` are the vectors' squared norms, if known already."""
    if norms is None:
        norms = squared_norms(vectors)
    dots = queries @ vectors.T
    if metric == "l2":
        return norms[None, :] - 2 * dots
    return -dots / np.sqrt(np.maximum(norms, 1e-30))[None, :]


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The ``len(a) x len(b)`` Euclidean distances between rows, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = np.empty((len(a), len(b)))
    if len(a) <= len(b):
        for i, row in enumerate(a):
            out[i] = np.linalg.norm(b - row, axis=1)
    else:
        for j, row in enumerate(b):
            out[:, j] = np.linalg.norm(a - row, axis=1)
    return out


def similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The ``len(a) x len(b)`` cosine similarities between rows, in float64."""
    a, b = normalized(np.asarray(a, np.float64)), normalized(np.asarray(b, np.float64))
    return np.clip(a @ b.T, -1.0, 1.0)


def paired_scores(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """The score of each row of ``a`` with the same row of ``b``, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if metric == "l2":
        return np.linalg.norm(a - b, axis=1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.where(na * nb == 0, 1, na * nb)


class BestK:
    """The k smallest keys per query, and their rows, over keys offered in blocks of rows."""

    def __init__(self, queries: int, k: int):
        self.k = k
        self.scores = np.full((queries, 0), np.inf, dtype=np.float32)
        self.rows = np.empty((queries, 0), dtype=np.int64)

    def offer(self, scores: np.ndarray, rows: np.ndarray) -> None:
        """``scores``: ``queries x len(rows)`` keys of the rows ``rows``; inf leaves one out."""
        k = min(self.k, scores.shape[1])
        if k < scores.shape[1]:
            part = np.argpartition(scores, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        cand_scores = np.take_along_axis(scores, part, axis=1)
        merged_scores = np.concatenate([self.scores, cand_scores], axis=1)
        merged_rows = np.concatenate([self.rows, rows[part]], axis=1)
        keep = min(self.k, merged_scores.shape[1])
        order = np.argsort(merged_scores, axis=1, kind="stable")[:, :keep]
        self.scores = np.take_along_axis(merged_scores, order, axis=1)
        self.rows = np.take_along_axis(merged_rows, order, axis=1)

    def result(self) -> list[np.ndarray]:
        """The rows kept for each query, best first."""
        return [r[np.isfinite(s)] for r, s in zip(self.rows, self.scores, strict=True)]
