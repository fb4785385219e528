"""Tiny DNG files written here (with tifffile) for the RAW tests: a smooth picture as an RGGB
mosaic, optionally with an RGB preview in the first directory, as cameras write them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DNG_TAGS = [
    (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion
    (50707, "B", 4, (1, 1, 0, 0), True),  # DNGBackwardVersion
    (50708, "s", 0, "imgindex test camera", True),  # UniqueCameraModel
    (271, "s", 0, "Imgindex", True),  # Make
    (272, "s", 0, "TestCam 1", True),  # Model
    (306, "s", 0, "2023:07:14 09:15:00", True),  # DateTime
]
CFA_TAGS = [
    (33421, "H", 2, (2, 2), True),  # CFARepeatPatternDim
    (33422, "B", 4, (0, 1, 1, 2), True),  # CFAPattern: RGGB
    (50717, "I", 1, (65535,), True),  # WhiteLevel
]
IDENTITY_MATRIX = (50721, "2i", 9, (10000, 10000, 0, 1, 0, 1, 0, 1, 10000, 10000, 0, 1, 0, 1,
                                     0, 1, 10000, 10000), True)  # fmt: skip


def picture(width: int, height: int) -> np.ndarray:
    """A smooth RGB picture (uint8): horizontal red, vertical green, a blue disc."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    red = xx / width
    green = yy / height
    blue = ((xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (min(width, height) / 3) ** 2) * 0.8
    return (np.stack([red, green, blue], axis=2) * 255).astype(np.uint8)


def write_dng(path: Path, width: int = 256, height: int = 192, preview: int | None = None) -> Path:
    """A DNG of a ``width`` x ``height`` sensor; with ``preview``, an RGB preview of that many
    pixels on its short side too."""
    import tifffile

    rgb = picture(width, height).astype(np.uint16) * 257
    cfa = np.zeros((height, width), np.uint16)
    cfa[0::2, 0::2] = rgb[0::2, 0::2, 0]
    cfa[0::2, 1::2] = rgb[0::2, 1::2, 1]
    cfa[1::2, 0::2] = rgb[1::2, 0::2, 1]
    cfa[1::2, 1::2] = rgb[1::2, 1::2, 2]
    tags = [*DNG_TAGS, IDENTITY_MATRIX]
    with tifffile.TiffWriter(path) as tif:
        if preview is None:
            tif.write(cfa, photometric=32803, subfiletype=0, extratags=tags + CFA_TAGS)
        else:
            scale = preview / min(width, height)
            small = picture(round(width * scale), round(height * scale))
            tif.write(small, photometric="rgb", subfiletype=1, subifds=1, extratags=tags)
            tif.write(cfa, photometric=32803, subfiletype=0, extratags=CFA_TAGS)
    return path
