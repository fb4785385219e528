"""Distances, similarities and nearest-neighbour search over an index's vectors.

Two metrics, both exact on the default (flat) index:

* ``l2``: Euclidean distance between raw AugNet vectors (imgsim's ``distance``); smaller is closer.
* ``cosine``: cosine similarity, the dot product of the normalised vectors; larger is closer.

FAISS finds the candidates (float32 arithmetic, which loses about 1e-5 of a squared distance of a
few hundred, so an image's distance to itself could read 0.005). The candidates are then re-scored
in float64 from their stored vectors and re-sorted, so the reported numbers and order are those of
a brute-force float64 search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

METRICS = ("l2", "cosine")

# Extra candidates fetched from FAISS so that re-scoring can reorder near-ties at the k-th place.
_RERANK_MARGIN = 16


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


class VectorSearch:
    """Exact k-nearest-neighbour search over a FAISS ``IndexIDMap2(IndexFlatL2)``.

    Cosine search uses a second, normalised inner-product copy built on first use and rebuilt when
    the vectors change (``version`` tells).
    """

    def __init__(self) -> None:
        self._cosine: Any = None
        self._cosine_version: Any = None

    def search(
        self, l2_index: Any, version: Any, queries: np.ndarray, k: int, metric: str
    ) -> list[list[tuple[int, float]]]:
        """For each query row, up to ``k`` (id, score) pairs, best first."""
        check_metric(metric)
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        n = l2_index.ntotal
        if n == 0 or k <= 0:
            return [[] for _ in queries]
        fetch = min(n, k + _RERANK_MARGIN)
        if metric == "l2":
            _, candidates = l2_index.search(queries, fetch)
        else:
            _, candidates = self._cosine_index(l2_index, version).search(
                _normalized(queries.astype(np.float64)).astype(np.float32), fetch
            )
        results = []
        for query, row in zip(queries, candidates, strict=True):
            ids = row[row >= 0]
            exact = score(query, l2_index.reconstruct_batch(ids), metric)
            # Best first; equal scores by id, so the order is reproducible.
            order = np.lexsort((ids, exact if metric == "l2" else -exact))[:k]
            results.append([(int(ids[i]), float(exact[i])) for i in order])
        return results

    def _cosine_index(self, l2_index: Any, version: Any) -> Any:
        import faiss

        if self._cosine is None or self._cosine_version != version:
            ids = faiss.vector_to_array(l2_index.id_map).astype(np.int64)
            vectors = l2_index.reconstruct_batch(ids) if len(ids) else np.empty((0, l2_index.d))
            cosine = faiss.IndexIDMap2(faiss.IndexFlatIP(l2_index.d))
            if len(ids):
                cosine.add_with_ids(_normalized(vectors.astype(np.float64)).astype(np.float32), ids)
            self._cosine, self._cosine_version = cosine, version
        return self._cosine
