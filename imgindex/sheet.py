"""Contact sheets: an answer as one picture, for reports, tickets and CI logs.

A sheet is a grid of thumbnails: the query first (framed), then each result, each labelled with
its rank, score and file name (in a font that exists on the machine, or Pillow's own). Cells of
images that cannot be read are grey, with the reason as their label.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CELL = 200  # thumbnail pixels
LABEL_LINES = 2
COLUMNS = 5
_PAD = 8
_LINE = 16
_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:/Windows/Fonts/arial.ttf",
)


@dataclass
class Cell:
    """One picture of the sheet and the lines under it."""

    image: Image.Image | None  # None: a grey cell
    lines: list[str]
    framed: bool = False  # the query (an example to be like)
    unlike: bool = False  # framed in red: an example to be unlike


def font(size: int = 13) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for path in _FONTS:
        if os.path.exists(path):
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    try:
        return ImageFont.load_default(size=size)  # Pillow 10.1+: a scalable font of its own
    except TypeError:
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: object, width: int) -> str:
    """``text`` shortened in its middle (a file name's end matters) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:  # type: ignore[arg-type]
        return text
    keep = len(text)
    while keep > 3:
        keep -= 1
        head, tail = text[: keep // 2], text[len(text) - (keep - keep // 2) :]
        short = f"{head}...{tail}"
        if draw.textlength(short, font=font) <= width:  # type: ignore[arg-type]
            return short
    return "..."


def draw_sheet(cells: Sequence[Cell], columns: int = COLUMNS, cell: int = CELL) -> Image.Image:
    """The grid of ``cells``, ``columns`` wide (fewer if there are fewer cells)."""
    columns = max(1, min(columns, len(cells) or 1))
    rows = max(1, math.ceil(len(cells) / columns))
    width = columns * (cell + _PAD) + _PAD
    height = rows * (cell + LABEL_LINES * _LINE + 2 * _PAD) + _PAD
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    label_font = font()
    for n, item in enumerate(cells):
        x = _PAD + (n % columns) * (cell + _PAD)
        y = _PAD + (n // columns) * (cell + LABEL_LINES * _LINE + 2 * _PAD)
        if item.image is None:
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(224, 224, 224))
        else:
            picture = item.image.copy()
            picture.thumbnail((cell, cell))
            sheet.paste(
                picture, (x + (cell - picture.width) // 2, y + (cell - picture.height) // 2)
            )
        if item.framed:
            draw.rectangle(
                [x - 3, y - 3, x + cell + 2, y + cell + 2], outline=(20, 90, 200), width=3
            )
        for line_number, line in enumerate(item.lines[:LABEL_LINES]):
            where = (x, y + cell + _PAD // 2 + line_number * _LINE)
            text = _fit(draw, line, label_font, cell)
            draw.text(where, text, fill=(30, 30, 30), font=label_font)
    return sheet


def save_sheet(path: str | os.PathLike[str], cells: Sequence[Cell]) -> Path:
    """Draw ``cells`` and write the sheet (format from the suffix: JPEG, PNG, WebP, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = draw_sheet(cells)
    options = {"quality": 90} if path.suffix.lower() in (".jpg", ".jpeg", ".webp") else {}
    image.save(path, **options)
    return path
