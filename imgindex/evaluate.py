"""Retrieval-quality metrics for labelled collections: mAP, recall@k, precision@k.

Each image in turn is the query; every other image is ranked; an image is relevant to the query
when it has the same label (for example, the same folder). Definitions follow the usual
image-retrieval conventions (as in the deep-metric-learning literature, e.g. Musgrave et al.,
"A Metric Learning Reality Check", ECCV 2020):

* average precision (AP): the mean, over the relevant images, of the precision at the rank where
  each appears; mAP is its mean over queries that have at least one relevant image. A relevant
  image beyond the ranked depth counts as never found.
* recall@k: the fraction of those queries with at least one relevant image in the top k.
* precision@k: the fraction of the top k that is relevant, averaged over those queries (always
  divided by k, so it stays below 1 when a label has fewer than k other images).

Re-identification data adds *groups* (cameras): an image with the query's label and the query's
group is neither relevant nor irrelevant but left out of the ranking, as in the Market-1501
protocol (Zheng et al., ICCV 2015), so that a person is found again only across cameras.

Labels come from folder names (``labels_from_folders``) or from a CSV file
(``labels_from_csv``); rankings come from exact search over vectors (``exact_rankings``) or from
an index's own search (``evaluate_index``, behind the ``eval`` command).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from imgindex.ann import IndexSpec
from imgindex.errors import ImgIndexError
from imgindex.files import is_under, resolve
from imgindex.scoring import BestK, normalized, ranking_keys, squared_norms

DEFAULT_KS = (1, 5, 10)


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
    return _summarize(
        (
            (np.array([r == label for r in ranked], dtype=bool), total)
            for label, ranked, total in zip(
                query_labels, ranked_labels, relevant_counts, strict=True
            )
        ),
        ks,
    )


def _summarize(queries: Iterable[tuple[np.ndarray, int]], ks: Sequence[int]) -> RetrievalScores:
    """Scores from each query's relevance flags (best first) and its count of relevant images
    in the collection; queries with none are left out."""
    aps, recalls, precisions = [], {k: [] for k in ks}, {k: [] for k in ks}
    for flags, total in queries:
        if total == 0:
            continue
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
# Labels


@dataclass(frozen=True)
class Labels:
    """Labels (and optional groups) of images, keyed by absolute path."""

    label: dict[str, str]
    group: dict[str, str]
    source: str  # "folders" or the CSV file's path

    def __len__(self) -> int:
        return len(self.label)

    def under(self, roots: Sequence[str | os.PathLike[str]]) -> Labels:
        """Only the images that lie under one of ``roots``."""
        texts = [str(resolve(r)) for r in roots] + [os.path.abspath(os.fsdecode(r)) for r in roots]
        keep = {p: v for p, v in self.label.items() if any(is_under(p, r) for r in texts)}
        return replace(self, label=keep)


def labels_from_folders(paths: Iterable[str], roots: Sequence[str | os.PathLike[str]]) -> Labels:
    """Each image's label is its folder relative to the root it lies under (``cats/x.jpg`` ->
    ``cats``; ``animals/cats/x.jpg`` -> ``animals/cats``); without roots, its folder's name.
    Images directly in a root take the root's own name."""
    resolved = [str(resolve(r)).rstrip(os.sep) for r in roots]  # as builds index them
    out = {}
    for path in paths:
        folder = os.path.dirname(path)
        root = next((r for r in resolved if is_under(folder, r)), None)
        if root is None:
            out[path] = os.path.basename(folder)
        else:
            rel = os.path.relpath(folder, root)
            out[path] = os.path.basename(root) if rel == "." else rel.replace(os.sep, "/")
    return Labels(label=out, group={}, source="folders")


def require_a_repeated_label(labels: Sequence[str]) -> None:
    """Refuse labels that no two images share: no query would have anything to find, and every
    score would be 0 (a set with one image per label measures nothing)."""
    if len(set(labels)) == len(labels):
        raise ImgIndexError(
            f"each of the {len(labels)} labelled images has a label of its own: a query needs "
            "another image of its label to find, so nothing can be measured"
        )


def labels_from_csv(csv_path: str | os.PathLike[str], group_column: str = "group") -> Labels:
    """Labels from a CSV file with a header naming a ``path`` and a ``label`` column (and,
    optionally, ``group_column``). Relative paths are relative to the CSV file's folder, as
    reached; paths are then resolved (symbolic links in their folders followed), as builds
    index them."""
    csv_path = Path(csv_path)
    base = Path(os.path.abspath(csv_path)).parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            missing = [c for c in ("path", "label") if c not in fields]
            if missing:
                raise ImgIndexError(
                    f"{csv_path}: the header must name the columns path and label "
                    f"(found: {', '.join(fields) or 'no header'})"
                )
            if group_column != "group" and group_column not in fields:
                raise ImgIndexError(
                    f"{csv_path}: no column {group_column!r} for the groups "
                    f"(found: {', '.join(fields)})"
                )
            label, group = {}, {}
            for line, row in enumerate(reader, start=2):
                path, value = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                if not path or not value:
                    raise ImgIndexError(f"{csv_path}, line {line}: empty path or label")
                full = str(resolve(os.path.join(base, os.path.expanduser(path))))
                if full in label and label[full] != value:
                    raise ImgIndexError(
                        f"{csv_path}, line {line}: {path} is labelled twice "
                        f"({label[full]!r} and {value!r})"
                    )
                label[full] = value
                if group_column in fields and (row.get(group_column) or "").strip():
                    group[full] = row[group_column].strip()
    except OSError as exc:
        raise ImgIndexError(f"{csv_path}: cannot read labels ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ImgIndexError(f"{csv_path}: not a UTF-8 CSV file ({exc})") from None
    if not label:
        raise ImgIndexError(f"{csv_path}: no labelled images")
    return Labels(label=label, group=group, source=str(csv_path))


# ------------------------------------------------------------------------------------------------
# Scoring rankings


def _codes(values: Sequence[Any]) -> np.ndarray:
    """Integer codes for values (equal values, equal codes); None becomes -1."""
    table: dict[Any, int] = {}
    return np.array(
        [-1 if v is None else table.setdefault(v, len(table)) for v in values], dtype=np.int64
    )


def score_ranked(
    rankings: Iterable[tuple[int, np.ndarray]],
    labels: Sequence[str],
    groups: Sequence[str | None] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> RetrievalScores:
    """Scores for ``(query, ranked)`` pairs, both positions in ``labels``; ``ranked`` lists the
    collection best first, to any depth (the query itself, if present, is ignored). With
    ``groups``, images of the query's label and group are left out (see the module docstring).
    """
    label_codes = _codes(labels)
    group_codes = _codes(groups) if groups is not None else np.full(len(labels), -1)
    per_label = np.bincount(label_codes, minlength=int(label_codes.max(initial=-1)) + 1)
    # How many images share each (label, group): those are left out for a query of that group.
    pair_counts: dict[tuple[int, int], int] = {}
    for lab, grp in zip(label_codes.tolist(), group_codes.tolist(), strict=True):
        if grp >= 0:
            pair_counts[(lab, grp)] = pair_counts.get((lab, grp), 0) + 1

    def queries() -> Iterator[tuple[np.ndarray, int]]:
        for query, ranked in rankings:
            lab, grp = label_codes[query], group_codes[query]
            ranked = np.asarray(ranked, dtype=np.int64)
            keep = ranked != query
            if grp >= 0:
                keep &= ~((label_codes[ranked] == lab) & (group_codes[ranked] == grp))
                total = int(per_label[lab]) - pair_counts[(lab, grp)]
            else:
                total = int(per_label[lab]) - 1
            yield label_codes[ranked[keep]] == lab, total

    return _summarize(queries(), ks)


def exact_rankings(
    vectors: np.ndarray, metric: str = "l2", depth: int | None = None, chunk: int = 256
) -> Iterator[tuple[int, np.ndarray]]:
    """``(query, ranked)`` for every row of ``vectors`` against all the others, best first, by
    exact search in float64 (``depth``: how many to rank, default all)."""
    v = np.asarray(vectors, dtype=np.float64)
    if metric == "cosine":
        v = normalized(v)
    elif metric != "l2":
        raise ValueError(f"unknown metric {metric!r}")
    n = len(v)
    depth = n - 1 if depth is None else min(depth, n - 1)
    squared = squared_norms(v)
    for start in range(0, n, chunk):
        q = v[start : start + chunk]
        # Both metrics as "smaller is better"; the query's own row goes last.
        scores = ranking_keys(q, v, metric, squared)
        rows = np.arange(start, start + len(q))
        scores[rows - start, rows] = np.inf
        if depth < n - 1:
            part = np.argpartition(scores, depth, axis=1)[:, :depth]
            order = np.take_along_axis(scores, part, 1).argsort(1, kind="stable")
            ranked = np.take_along_axis(part, order, 1)
        else:
            ranked = scores.argsort(1, kind="stable")[:, :depth]
        yield from zip(rows.tolist(), ranked, strict=True)


def evaluate_vectors(
    vectors: np.ndarray,
    labels: Sequence[str],
    groups: Sequence[str | None] | None = None,
    metric: str = "l2",
    ks: Sequence[int] = DEFAULT_KS,
    depth: int | None = None,
) -> RetrievalScores:
    """Retrieval quality of ``vectors`` (one row per labelled image) by exact search."""
    return score_ranked(exact_rankings(vectors, metric, depth), labels, groups, ks)


@dataclass(frozen=True)
class Evaluation:
    """Retrieval quality of an index on its labelled images, per metric."""

    images: int  # labelled images in the index, each one a query
    labels: int  # distinct labels among them
    not_indexed: int  # labelled images the index does not hold
    depth: int  # how deep each query's results were ranked
    scores: dict[str, RetrievalScores]

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "labels": self.labels,
            "not_indexed": self.not_indexed,
            "depth": self.depth,
            "metrics": {metric: s.as_dict() for metric, s in self.scores.items()},
        }


# Ranking every image against every other costs N^2; past this many images (or with an
# approximate index, whose search answers a top-k), rank the top 1,000.
FULL_DEPTH_LIMIT = 20_000


def evaluate_index(
    index: Any,
    labels: Labels,
    metrics: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    depth: int | None = None,
    **search_options: Any,
) -> Evaluation:
    """Retrieval quality of ``index`` (an :class:`imgindex.Index`) on the images ``labels``
    names: each labelled image is a query, ranked among the labelled images only, by the
    index's own search for an approximate index type (so it shows what that costs), by exact
    search over the stored vectors (the same ranking) for the flat one. ``metrics`` defaults to
    those the index serves; ``search_options`` go to ``search_by_vector`` (nprobe, ef_search).
    """
    if not labels.label:
        raise ImgIndexError(
            f"no labelled images to evaluate (labels from {labels.source}; of an index, only "
            "the images it holds under the folders given count)"
        )
    records = [r for r in index.records() if r.path in labels.label]
    if len(records) < 2:
        raise ImgIndexError(
            f"the index holds {len(records)} of the {len(labels)} labelled images; at least two "
            "are needed (index them first)"
        )
    require_a_repeated_label([labels.label[r.path] for r in records])
    info = index.info()
    if metrics is None:
        metrics = info["metrics"]
    ids = [r.id for r in records]
    position = {image_id: i for i, image_id in enumerate(ids)}
    names = [labels.label[r.path] for r in records]
    groups = [labels.group.get(r.path) for r in records] if labels.group else None
    n = len(ids)
    exact = bool(info["exact"])
    if depth is None:
        depth = n - 1 if exact and n <= FULL_DEPTH_LIMIT else min(n - 1, 1000)
    depth = max(1, min(depth, n - 1))
    # Other indexed images may come between the labelled ones: ask for enough to skip them.
    fetch = min(index.count(), depth + 1 + index.count() - n)
    vectors = index.vectors(ids)
    scores = {}
    for metric in metrics:
        if exact:
            # The flat index's search is exact (re-scored in float64): rank the same way here,
            # among the labelled images only, without making a result object per pair.
            scores[metric] = evaluate_vectors(vectors, names, groups, metric, ks, depth)
            continue

        def rankings(metric: str = metric) -> Iterator[tuple[int, np.ndarray]]:
            for start in range(0, n, 64):
                hits = index.search_by_vector(
                    vectors[start : start + 64], k=fetch, metric=metric, **search_options
                )
                for query, row in enumerate(hits, start=start):
                    ranked = [position[h.id] for h in row if h.id in position]
                    yield query, np.array([i for i in ranked if i != query][:depth])

        scores[metric] = score_ranked(rankings(), names, groups, ks)
    return Evaluation(
        images=n,
        labels=len(set(names)),
        not_indexed=len(labels) - n,
        depth=depth,
        scores=scores,
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

    index.refresh()
    info = index.vector_index_info()
    spec = IndexSpec(info["kind"], info["metric"], info["params"])
    metric = "l2" if spec.metric in ("both", "l2") else "cosine"
    live = info["ids"]
    if not len(live):
        return []
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(live, size=min(queries, len(live)), replace=False))
    q = index.vectors(sample.tolist())
    truth = exact_neighbors(index.vectors, live, q, k, metric)
    # The exact k-th score of each query: a result as close as that is as right as the true one
    # (duplicates tie; which of them a search returns is arbitrary).
    from imgindex.search import score

    worst = []
    for vector, true_ids in zip(q, truth, strict=True):
        scores = score(vector, index.vectors(sorted(true_ids)), metric)
        worst.append(float(scores.max() if metric == "l2" else scores.min()))

    if spec.exact:
        settings: list[dict[str, int]] = [{}]
    elif spec.kind == "hnsw" or "HNSW" in spec.factory_string():
        settings = [{"ef_search": ef} for ef in (16, 32, 64, 128, 256, 512)]
    else:
        nlist = int(spec.params.get("nlist", 0)) or info["lists"] or 1
        settings = [{"nprobe": p} for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist]
    rows = []
    for params in settings:
        latencies = []
        found = []
        for vector in q:
            started = time.perf_counter()
            hits = index.search_by_vector(vector, k=k, metric=metric, **params)
            latencies.append(time.perf_counter() - started)
            found.append(hits)
        started = time.perf_counter()
        index.search_by_vector(q, k=k, metric=metric, **params)
        batch_seconds = time.perf_counter() - started
        recall = float(
            np.mean(
                [
                    _recall(hits, t, w, metric)
                    for hits, t, w in zip(found, truth, worst, strict=True)
                ]
            )
        )
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


def _recall(hits: list[Any], truth: set[int], worst: float, metric: str) -> float:
    """Share of the true neighbours found (of as many as there are, when fewer than k), a
    result tied with the k-th true one counting as found."""
    tolerance = 1e-6 * max(1.0, abs(worst))
    good = sum(
        1
        for h in hits
        if h.id in truth
        or (h.score <= worst + tolerance if metric == "l2" else h.score >= worst - tolerance)
    )
    return min(good, len(truth)) / len(truth)


def exact_neighbors(
    vectors_of: Callable[[list[int]], np.ndarray],
    ids: np.ndarray,
    queries: np.ndarray,
    k: int,
    metric: str,
) -> list[set[int]]:
    """The ids of the exact ``k`` nearest of the stored vectors of ``ids`` for each query
    (read through ``vectors_of`` in chunks, so any index kind can be checked)."""
    q64 = queries.astype(np.float64)
    if metric == "cosine":
        q64 = normalized(q64)
    best = BestK(len(queries), k)
    for start in range(0, len(ids), 20_000):
        part = ids[start : start + 20_000]
        v = vectors_of(part.tolist()).astype(np.float64)
        best.offer(ranking_keys(q64, v, metric).astype(np.float32), part)
    return [set(row.tolist()) for row in best.result()]
