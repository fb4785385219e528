"""Compute reference vectors with imgsim 0.1.2 itself, for tests/test_faithfulness.py.

imgsim needs OpenCV, which imgindex does not, so this runs in an environment that has both:

    pip install --no-deps imgsim==0.1.2
    pip install opencv-python-headless
    python scripts/make_imgsim_reference.py

It embeds every image under data/ and tests/fixtures/extra/ exactly as imgsim's README does
(``cv2.imread`` then ``Vectorizer().vectorize``, one image at a time, on the CPU) and writes
tests/reference/imgsim_vectors.npz with the relative paths, the vectors and the versions used.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import cv2
import imgsim
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "data", ROOT / "tests" / "fixtures" / "extra"]
OUT = ROOT / "tests" / "reference" / "imgsim_vectors.npz"


def main() -> None:
    paths = sorted(p for src in SOURCES for p in src.rglob("*.jpg"))
    vectorizer = imgsim.Vectorizer(device="cpu")
    vectors = []
    for path in paths:
        image = cv2.imread(str(path))
        if image is None:
            sys.exit(f"{path}: OpenCV could not read it")
        vectors.append(np.asarray(vectorizer.vectorize(image), dtype=np.float32))
        print(f"{path.relative_to(ROOT)}  {image.shape[1]}x{image.shape[0]}", flush=True)
    about = {
        "made_by": "scripts/make_imgsim_reference.py",
        "imgsim": "0.1.2",
        "opencv": cv2.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT,
        paths=np.array([str(p.relative_to(ROOT)) for p in paths]),
        vectors=np.stack(vectors),
        about=np.array(json.dumps(about)),
    )
    print(f"wrote {len(paths)} vectors to {OUT.relative_to(ROOT)}: {about}")


if __name__ == "__main__":
    main()
