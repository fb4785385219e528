"""imgindex's vectors against imgsim 0.1.2's own (tests/reference/imgsim_vectors.npz, made on the
CPU by scripts/make_imgsim_reference.py) on any device and precision: how far a GPU, bf16 or
the fast preset moves the vectors. Prints a table.

    python benchmarks/faithfulness.py [--device auto] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import imgindex

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    reference = np.load(ROOT / "tests" / "reference" / "imgsim_vectors.npz")
    paths = [ROOT / str(p) for p in reference["paths"]]
    theirs = reference["vectors"].astype(np.float64)
    their_distances = np.linalg.norm(theirs[:, None] - theirs[None], axis=-1)
    pairs = np.triu_indices(len(paths), 1)
    print(f"{len(paths)} images; imgsim 0.1.2's vectors computed on the CPU in fp32")
    print(f"{'device':<8}{'preset':<8}{'precision':<11}{'min cosine':>12}{'mean cosine':>13}"
          f"{'max abs diff':>14}{'max rel dist':>14}")  # fmt: skip
    for preset in ("exact", "fast"):
        for precision in args.precisions.split(","):
            vectorizer = imgindex.Vectorizer(device=args.device, precision=precision, preset=preset)
            ours = vectorizer.vectorize(paths).astype(np.float64)
            cos = np.diag(imgindex.cosine_similarity(ours, theirs))
            distances = np.linalg.norm(ours[:, None] - ours[None], axis=-1)
            relative = np.abs(distances - their_distances)[pairs] / their_distances[pairs]
            print(
                f"{vectorizer.device:<8}{preset:<8}{precision:<11}{cos.min():>12.6f}"
                f"{cos.mean():>13.6f}{np.abs(ours - theirs).max():>14.2e}{relative.max():>14.2e}"
            )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"torch {torch.__version__}, GPU {gpu}")


if __name__ == "__main__":
    main()
