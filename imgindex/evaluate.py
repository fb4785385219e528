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
