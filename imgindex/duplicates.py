"""Groups of near-identical images: a thresholded self-join of the index's vectors, never an
N x N matrix in memory.

* On the exact (flat) index the join is exact: blocks of vectors are multiplied against the
  vectors after them (matrix products, O(N^2 d) work but O(N) memory plus the pairs found).
* On an approximate index each vector asks the index for its nearest neighbours (``neighbors``,
  16 by default), which scales to millions of images but can miss a pair that is not among a
  vector's nearest neighbours (a group of more than 16 copies, say).

Every pair is re-checked in float64 against the threshold, and pairs are joined into groups by
union-find (connected components): A~B and B~C put A, B and C in one group even if A and C are
further apart than the threshold, and the pairs listed with each group say exactly which
distances were under it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgindex.ann import VectorIndex
from imgindex.scoring import normalized, paired_scores, ranking_keys, squared_norms
from imgindex.search import check_metric, score

# The default thresholds: what they mean on real photos is measured by benchmarks/duplicates.py
# and shown in the README.
DEFAULT_THRESHOLDS = {"l2": 6.0, "cosine": 0.97}


@dataclass
class DuplicateGroup:
    """Images whose vectors are within the threshold of another member."""

    ids: list[int]
    pairs: list[tuple[int, int, float]] = field(default_factory=list)  # (id, id, score)
    paths: list[str] = field(default_factory=list)
    # What a person decided (see Index.review_duplicates): members marked for removal -> the
    # id kept in their place; whether every pair of the group has been decided.
    marked: dict[int, int | None] = field(default_factory=dict)
    reviewed: bool = False

    def as_dict(self) -> dict[str, Any]:
        images = []
        for image_id, path in zip(self.ids, self.paths, strict=True):
            entry: dict[str, Any] = {"id": image_id, "path": path}
            if image_id in self.marked:
                entry.update(marked_for_removal=True, keep=self.marked[image_id])
            images.append(entry)
        return {
            "size": len(self.ids),
            "images": images,
            "pairs": [{"a": a, "b": b, "score": s} for a, b, s in self.pairs],
            "reviewed": self.reviewed,
        }


def check_threshold(threshold: float, metric: str) -> None:
    """ValueError unless ``threshold`` is an L2 distance (0 or more) or a cosine (-1 to 1)."""
    check_metric(metric)
    low, high = (0.0, math.inf) if metric == "l2" else (-1.0, 1.0)
    if not low <= threshold <= high:  # also refuses NaN
        kind = "an L2 distance (0 or more)" if metric == "l2" else "a cosine (-1 to 1)"
        raise ValueError(f"threshold {threshold:g} is not {kind}")


def within(scores: np.ndarray, threshold: float, metric: str) -> np.ndarray:
    """Scores at the threshold or better; a float64 rounding error (identical vectors have a
    cosine of 1 - 1e-15) does not put a pair out."""
    if metric == "l2":
        return scores <= threshold + 1e-9
    return scores >= threshold - 1e-9


def exact_pairs(
    ids: np.ndarray, vectors: np.ndarray, threshold: float, metric: str, block: int = 2048
) -> Iterator[tuple[int, int, float]]:
    """Every pair (a, b, score) with a < b (by position) within ``threshold``: blockwise upper
    triangle of the similarity matrix, each block re-checked in float64."""
    check_metric(metric)
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = squared_norms(v)
    if metric == "cosine":
        v, norms = normalized(v), np.ones(len(v), np.float32)  # -keys are the cosines
    n = len(v)
    # float32 rounding can move a score by ~1e-4 relative; take a margin and re-check exactly.
    # A squared distance computed as |a|^2 + |b|^2 - 2 a.b is off by up to ~1e-7 of the norms
    # (about 1e-4 for AugNet's, whose squared norms are in the hundreds): far more than the
    # square of a small threshold, so that margin is relative to the norms.
    loose = threshold * 1.001 + 1e-3 if metric == "l2" else threshold - 1e-3
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        for start in range(lo, n, block):
            stop = min(n, start + block)
            keys = ranking_keys(v[lo:hi], v[start:stop], metric, norms[start:stop])
            if metric == "l2":
                both = norms[lo:hi, None] + norms[None, start:stop]
                cand = norms[lo:hi, None] + keys <= loose * loose + 1e-5 * both
            else:
                cand = -keys >= loose
            rows, cols = np.nonzero(cand)
            rows, cols = rows + lo, cols + start
            upper = rows < cols
            rows, cols = rows[upper], cols[upper]
            if not len(rows):
                continue
            exact = paired_scores(vectors[rows], vectors[cols], metric)
            keep = within(exact, threshold, metric)
            for r, c, s in zip(rows[keep], cols[keep], exact[keep], strict=True):
                yield int(ids[r]), int(ids[c]), float(s)


def neighbor_pairs(
    index: VectorIndex,
    ids: np.ndarray,
    vectors_of: Callable[[np.ndarray], np.ndarray],
    threshold: float,
    metric: str,
    neighbors: int = 16,
    batch: int = 1024,
) -> Iterator[tuple[int, int, float]]:
    """Pairs within ``threshold`` among each vector's ``neighbors`` nearest, found through an
    approximate index, each re-checked exactly."""
    check_metric(metric)
    seen: set[tuple[int, int]] = set()
    for start in range(0, len(ids), batch):
        part = ids[start : start + batch]
        queries = vectors_of(part)
        found = index.search(queries, neighbors + 1, metric)
        for qid, query, cands in zip(part, queries, found, strict=True):
            cands = cands[cands != qid]
            if not len(cands):
                continue
            exact = np.atleast_1d(score(query, vectors_of(cands), metric))
            for other, s in zip(
                cands[within(exact, threshold, metric)],
                exact[within(exact, threshold, metric)],
                strict=True,
            ):
                key = (min(int(qid), int(other)), max(int(qid), int(other)))
                if key not in seen:
                    seen.add(key)
                    yield key[0], key[1], float(s)


def group_pairs(pairs: Iterator[tuple[int, int, float]]) -> list[DuplicateGroup]:
    """Connected components of the pairs, largest first (then by smallest id)."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    edges = []
    for a, b, s in pairs:
        edges.append((a, b, s))
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, DuplicateGroup] = {}
    for member in parent:
        groups.setdefault(root(member), DuplicateGroup(ids=[])).ids.append(member)
    for a, b, s in edges:
        groups[root(a)].pairs.append((a, b, s))
    out = list(groups.values())
    for g in out:
        g.ids.sort()
        g.pairs.sort(key=lambda p: (p[0], p[1]))
    out.sort(key=lambda g: (-len(g.ids), g.ids[0]))
    return out


def find_groups(
    store: Any,
    threshold: float,
    metric: str,
    allowed: np.ndarray | None = None,
    neighbors: int = 16,
    include_reviewed: bool = False,
) -> list[DuplicateGroup]:
    """The duplicate groups of an open store (see ``Index.duplicates``; the caller refreshes
    it), among the ids ``allowed`` if given, with their paths and what a person decided."""
    index = store.vector_index
    ids = index.ids()
    if allowed is not None:
        ids = np.intersect1d(ids, allowed)
    marked = store.marked_for_removal()
    reviewed = store.reviewed_pairs()
    if not include_reviewed:  # what a person decided does not come back
        ids = np.setdiff1d(ids, np.fromiter(marked, dtype=np.int64, count=len(marked)))
    if index.spec.exact:
        pairs = exact_pairs(ids, store.stored_vectors(ids), threshold, metric)
    else:
        members = set(ids.tolist())
        found = neighbor_pairs(index, ids, store.stored_vectors, threshold, metric, neighbors)
        pairs = (p for p in found if p[0] in members and p[1] in members)
    if not include_reviewed:
        pairs = (p for p in pairs if (p[0], p[1]) not in reviewed)
    groups = group_pairs(pairs)
    records = store.get_many({i for g in groups for i in g.ids})
    for group in groups:
        group.paths = [records[i].path for i in group.ids]
        group.marked = {i: marked[i] for i in group.ids if i in marked}
        group.reviewed = all((a, b) in reviewed for a, b, _s in group.pairs)
    return groups
