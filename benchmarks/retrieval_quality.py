"""Retrieval quality of imgindex on a labelled collection (default: caltech101-dev).

Indexes every image (or reuses --index if it already holds them), then queries with each image's
stored vector, leaving the image itself out, and ranks the whole collection by L2 distance and by
cosine similarity. Two images are relevant to each other when they share a folder. Prints mAP,
recall@1/10 and precision@10 (definitions in imgindex/evaluate.py).

    python benchmarks/retrieval_quality.py [--dataset DIR] [--index DIR] [--device auto]
        [--preset exact|fast] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import imgindex
from imgindex.evaluate import score_rankings

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = ROOT.parent / "shared" / "datasets" / "caltech101-dev"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--index", type=Path, help="index folder to build or reuse")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--preset", default="exact", choices=["exact", "fast"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    if not args.dataset.is_dir():
        sys.exit(f"{args.dataset}: dataset folder not found (pass --dataset)")

    with tempfile.TemporaryDirectory() as scratch:
        index_path = args.index or Path(scratch) / "index"
        with imgindex.Index.open(
            index_path,
            create=True,
            device=args.device,
            batch_size=args.batch_size,
            preset=args.preset,
            precision=args.precision,
        ) as index:
            report = index.add(args.dataset, progress=_progress)
            print(file=sys.stderr)
            dataset = str(args.dataset.resolve()) + os.sep
            records = [r for r in index.records() if r.path.startswith(dataset)]
            labels = {r.id: Path(r.path).parent.name for r in records}
            counts = collections.Counter(labels.values())
            ids = [r.id for r in records]
            vectors = index.vectors(ids)
            rows = []
            for metric in ("l2", "cosine"):
                started = time.perf_counter()
                results = index.search_by_vector(vectors, k=len(ids), metric=metric)
                seconds = time.perf_counter() - started
                ranked = [
                    [labels[h.id] for h in hits if h.id != query_id]
                    for query_id, hits in zip(ids, results, strict=True)
                ]
                query_labels = [labels[i] for i in ids]
                scores = score_rankings(
                    query_labels, ranked, [counts[label] - 1 for label in query_labels], (1, 10)
                )
                rows.append((metric, scores, seconds))
            device = index.vectorizer.device
            precision = index.vectorizer.precision

    print(
        f"\nRetrieval quality on {args.dataset.name}: {len(ids)} images, {len(counts)} labels "
        "(folder = label), every image a query, ranked against all others"
    )
    print(
        f"Index: {report.embedded} images embedded in {report.seconds:.0f} s "
        f"({report.images_per_second:.1f} images/s) on {device}, preset {args.preset}, "
        f"precision {precision}; {len(report.skipped)} skipped"
    )
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(f"{'metric':<8}{'mAP':>8}{'R@1':>8}{'R@10':>8}{'P@10':>8}{'search s':>10}")
    for metric, s, seconds in rows:
        print(
            f"{metric:<8}{s.mean_average_precision:>8.4f}{s.recall_at[1]:>8.4f}"
            f"{s.recall_at[10]:>8.4f}{s.precision_at[10]:>8.4f}{seconds:>10.2f}"
        )


def _progress(state: imgindex.ingest.Progress) -> None:
    print(
        f"\rembedding {state.done}/{state.total}  {state.images_per_second:.1f} images/s",
        end="",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    main()
