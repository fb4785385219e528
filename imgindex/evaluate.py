"""Retrieval-quality metrics for labelled collections: mAP, recall@k, precision@k.

Each image in turn is the query; every other image is ranked by the index; an image is relevant
to the query when it has the same label (for example, the same folder). Definitions follow the
usual image-retrieval conventions (as in the deep-metric-learning literature, e.g. Musgrave et
al., "A Metric Learning Reality Check", ECCV 2020):

* average precision (AP): the mean, over the relevant images, of the precision at the rank where
  each appears; mAP is its mean over queries that have at least one relevant image.
* recall@k: the fraction of those queries with at least one relevant image in the top k.
* precision@k: the fraction of the top k that is relevant, averaged over those queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def average_precision(
    relevant: Sequence[bool] | np.ndarray, total_relevant: int | None = None
) -> float:
    """AP of one ranked list. ``relevant[i]`` says whether the item at rank i+1 is relevant;
    ``total_relevant`` counts relevant items also beyond the list (default: those in it)."""
    flags = np.asarray(relevant, dtype=bool)
    total = int(flags.sum()) if total_relevant is None else total_relevant
    if total == 0:
        return 0.0
    ranks = np.flatnonzero(flags) + 1
    precision_at_hits = np.arange(1, len(ranks) + 1) / ranks
    return float(precision_at_hits.sum() / total)


@dataclass(frozen=True)
class RetrievalScores:
    queries: int  # queries that had at least one relevant image
    mean_average_precision: float
    recall_at: dict[int, float]
    precision_at: dict[int, float]

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {"queries": self.queries, "mAP": self.mean_average_precision}
        out.update({f"recall@{k}": v for k, v in self.recall_at.items()})
        out.update({f"precision@{k}": v for k, v in self.precision_at.items()})
        return out


def score_rankings(
    query_labels: Sequence[str],
    ranked_labels: Sequence[Sequence[str]],
    relevant_counts: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> RetrievalScores:
    """Scores for queries whose results (the query itself left out) have ``ranked_labels``;
    ``relevant_counts[i]`` is how many images in the collection are relevant to query i."""
    aps, recalls, precisions = [], {k: [] for k in ks}, {k: [] for k in ks}
    for label, ranked, total in zip(query_labels, ranked_labels, relevant_counts, strict=True):
        if total == 0:
            continue
        flags = np.array([r == label for r in ranked], dtype=bool)
        aps.append(average_precision(flags, total))
        for k in ks:
            recalls[k].append(bool(flags[:k].any()))
            precisions[k].append(flags[:k].sum() / k)
    n = len(aps)
    return RetrievalScores(
        queries=n,
        mean_average_precision=float(np.mean(aps)) if n else 0.0,
        recall_at={k: float(np.mean(v)) if n else 0.0 for k, v in recalls.items()},
        precision_at={k: float(np.mean(v)) if n else 0.0 for k, v in precisions.items()},
    )


# ------------------------------------------------------------------------------------------------
# Approximate search against exact search, on the user's own index


@dataclass(frozen=True)
class TuneRow:
    """One query-time setting of an index, measured on sample queries."""

    setting: str  # e.g. "nprobe=16", "ef_search=128", "exact"
    params: dict[str, int]
    recall: float  # recall@k against an exact search of the stored vectors
    p50_ms: float  # single-query latency, end to end (search + exact re-scoring + rows)
    p99_ms: float
    batch_qps: float  # queries per second when all are searched in one call

    def as_dict(self) -> dict[str, object]:
        return {
            "setting": self.setting,
            **self.params,
            "recall": self.recall,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "batch_qps": self.batch_qps,
        }


def tune(index: Any, queries: int = 200, k: int = 10, seed: int = 0) -> list[TuneRow]:
    """Recall@k and latency of ``index`` (an :class:`imgindex.Index`) for a range of nprobe /
    ef_search values, against exact search over the stored vectors. Query vectors are stored
    vectors of a random sample of the indexed images (each finds itself too, in both searches)."""
    import time

    store = index._store
    store.refresh()
    vector_index = store.vector_index
    spec = vector_index.spec
    metric = "l2" if spec.metric in ("both", "l2") else "cosine"
    live = vector_index.ids()
    if not len(live):
        return []
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(live, size=min(queries, len(live)), replace=False))
    q = store.vectors(sample.tolist())
    truth = exact_neighbors(store, live, q, k, metric)

    if spec.exact:
        settings: list[dict[str, int]] = [{}]
    elif spec.kind == "hnsw" or "HNSW" in spec.factory_string():
        settings = [{"ef_search": ef} for ef in (16, 32, 64, 128, 256, 512)]
    else:
        nlist = int(spec.params.get("nlist", 0)) or _nlist_of(vector_index)
        settings = [{"nprobe": p} for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist]
    rows = []
    for params in settings:
        latencies = []
        found = []
        for vector in q:
            started = time.perf_counter()
            hits = index.search_by_vector(vector, k=k, metric=metric, **params)
            latencies.append(time.perf_counter() - started)
            found.append({h.id for h in hits})
        started = time.perf_counter()
        index.search_by_vector(q, k=k, metric=metric, **params)
        batch_seconds = time.perf_counter() - started
        recall = float(np.mean([len(f & t) / k for f, t in zip(found, truth, strict=True)]))
        name = ", ".join(f"{key}={value}" for key, value in params.items()) or "exact"
        rows.append(
            TuneRow(
                setting=name,
                params=params,
                recall=recall,
                p50_ms=float(np.percentile(latencies, 50) * 1e3),
                p99_ms=float(np.percentile(latencies, 99) * 1e3),
                batch_qps=len(q) / batch_seconds,
            )
        )
    return rows


def exact_neighbors(
    store: Any, ids: np.ndarray, queries: np.ndarray, k: int, metric: str
) -> list[set[int]]:
    """The ids of the exact ``k`` nearest stored vectors for each query (streamed from SQLite in
    chunks, so any index kind can be checked)."""
    from imgindex.ann import _BestK

    q64 = queries.astype(np.float64)
    if metric == "cosine":
        q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
    best = _BestK(len(queries), k)
    for start in range(0, len(ids), 20_000):
        part = ids[start : start + 20_000]
        v = store.vectors(part.tolist()).astype(np.float64)
        if metric == "l2":
            scores = (v * v).sum(1)[None, :] - 2 * q64 @ v.T
        else:
            scores = -(q64 @ (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)).T)
        best.offer(scores.astype(np.float32), part)
    return [set(row.tolist()) for row in best.result()]


def _nlist_of(vector_index: Any) -> int:
    from imgindex.ann import _ivf_of

    ivf = _ivf_of(vector_index.base)
    return int(ivf.nlist) if ivf is not None else 1
