"""Make imgindex/calibration/: the images INT8 networks are calibrated on (imgindex.onnxrt).

64 photos of Caltech-101 (CC BY 4.0; see imgindex/calibration/ATTRIBUTION.md), the first two or
three of each folder of the caltech101-dev subset, each resized as the fast preset resizes it
(short side 224) and cut to its central 224 x 224 square, saved as JPEG quality 92. Fixed-size
crops let the calibration collect histograms of every activation over all of them.

    python scripts/make_calibration_set.py /path/to/caltech101-dev
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from imgindex.decode import read_image_file
from imgindex.preprocessing import PRESETS

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "imgindex" / "calibration"
COUNT = 64


def main() -> None:
    source = Path(sys.argv[1])
    folders = sorted(p for p in source.iterdir() if p.is_dir())
    per_folder = -(-COUNT // len(folders))
    picked = [f for folder in folders for f in sorted(folder.glob("*.jpg"))[:per_folder]][:COUNT]
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*.jpg"):
        old.unlink()
    fast = PRESETS["fast"]
    for path in picked:
        rgb = read_image_file(path).pixels
        resized = fast.resize_array(rgb, str(path)).transpose(1, 2, 0)
        h, w = resized.shape[:2]
        top, left = (h - 224) // 2, (w - 224) // 2
        crop = Image.fromarray(resized[top : top + 224, left : left + 224])
        crop.save(OUT / f"{path.parent.name}_{path.stem}.jpg", quality=92)
    print(f"{len(picked)} crops in {OUT}")


if __name__ == "__main__":
    main()
