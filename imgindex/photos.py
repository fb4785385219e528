"""Photo facts in the index (the ``photo_facts`` table): storing them, filling them in for
images an older imgindex indexed, filtering by them, and summing them up.

A :class:`PhotoFilter` (date range, camera, format, minimum size) becomes one parameterised SQL
query over the table: nothing a user types is ever SQL. The ids it selects are handed to the
vector search as the only ids it may return (as ``--under`` does), so ``k`` results come back
whenever ``k`` matching images exist.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from imgindex.photofacts import PhotoFacts

COLUMNS = tuple(f.name for f in fields(PhotoFacts))
# Formats as the index names them, and the names users may also type for them.
FORMAT_ALIASES = {"JPG": "JPEG", "HEIC": "HEIF", "JXL": "JPEG XL", "TIF": "TIFF"}


def insert(db: Any, image_id: int, facts: PhotoFacts) -> None:
    values = [getattr(facts, c) for c in COLUMNS]
    db.execute(
        f"INSERT OR REPLACE INTO photo_facts (id, {', '.join(COLUMNS)}) "
        f"VALUES (?, {', '.join('?' * len(COLUMNS))})",
        [image_id, *values],
    )


def of(db: Any, ids: Iterable[int]) -> dict[int, PhotoFacts]:
    """The stored facts of ``ids`` (those that have them)."""
    ids = [int(i) for i in ids]
    found: dict[int, PhotoFacts] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        rows = db.execute(
            f"SELECT id, {', '.join(COLUMNS)} FROM photo_facts "
            f"WHERE id IN ({', '.join('?' * len(chunk))})",
            chunk,
        ).fetchall()
        for row in rows:
            found[row[0]] = PhotoFacts(*row[1:])
    return found


def missing(db: Any) -> list[tuple[int, bytes]]:
    """(id, file name's bytes) of the images without facts yet, by id."""
    rows = db.execute(
        "SELECT images.id, images.raw_path FROM images LEFT JOIN photo_facts "
        "ON photo_facts.id = images.id WHERE photo_facts.id IS NULL ORDER BY images.id"
    ).fetchall()
    return [(i, bytes(raw)) for i, raw in rows]


# -- filters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoFilter:
    """Which images a search (or a duplicate search) may return; every condition given must
    hold. Dates are the photo's own (EXIF DateTimeOriginal, local time as taken): ``taken_after``
    and ``taken_before`` take ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD`` or a full ISO time, and
    include the whole period named (``taken_before="2024"`` is up to the end of 2024). ``camera``
    matches make or model, ignoring case (``"canon"``, ``"iphone 15"``). ``formats`` as
    ``info`` lists them (JPEG, PNG, HEIF, AVIF, JPEG XL, DNG, ...). An image without the fact a
    condition asks about does not match it."""

    taken_after: str | None = None
    taken_before: str | None = None
    camera: str | None = None
    formats: tuple[str, ...] = ()
    min_width: int | None = None
    min_height: int | None = None

    def __post_init__(self) -> None:
        for name in ("taken_after", "taken_before"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _period(value, end=name == "taken_before"))
        formats = tuple(FORMAT_ALIASES.get(f.upper(), f.upper()) for f in self.formats)
        object.__setattr__(self, "formats", formats)

    @property
    def empty(self) -> bool:
        return not any(
            (self.taken_after, self.taken_before, self.camera, self.formats, self.min_width,
             self.min_height)
        )  # fmt: skip

    def sql(self) -> tuple[str, list[Any]]:
        """The WHERE clause over ``images`` joined with ``photo_facts``, and its parameters."""
        where, params = [], []
        if self.taken_after:
            where.append("f.taken_at >= ?")
            params.append(self.taken_after)
        if self.taken_before:
            where.append("f.taken_at <= ?")
            params.append(self.taken_before)
        if self.camera:
            where.append(
                "(lower(coalesce(f.camera_make, '') || ' ' || coalesce(f.camera_model, '')) "
                "LIKE ? ESCAPE '\\')"
            )
            params.append(f"%{_like_escaped(self.camera.lower())}%")
        if self.formats:
            where.append(f"f.format IN ({', '.join('?' * len(self.formats))})")
            params += list(self.formats)
        if self.min_width:
            where.append("i.width >= ?")
            params.append(int(self.min_width))
        if self.min_height:
            where.append("i.height >= ?")
            params.append(int(self.min_height))
        return " AND ".join(where) or "1", params


def matching(db: Any, where: PhotoFilter) -> np.ndarray:
    """The ids (sorted) of the images ``where`` selects."""
    clause, params = where.sql()
    rows = db.execute(
        "SELECT i.id FROM images i LEFT JOIN photo_facts f ON f.id = i.id "
        f"WHERE {clause} ORDER BY i.id",
        params,
    ).fetchall()
    return np.array([r[0] for r in rows], dtype=np.int64)


def _period(text: str, end: bool) -> str:
    """``2024`` / ``2024-05`` / ``2024-05-01`` / an ISO time -> the first (or, with ``end``, the
    last) second it names, as the index stores times."""
    text = text.strip()
    match = re.fullmatch(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?", text)
    if match:
        year, month, day = match.groups()
        try:
            dt.date(int(year), int(month or 1), int(day or 1))
        except ValueError:
            raise ValueError(f"not a date: {text!r} (no such month or day)") from None
        if not end:
            return f"{year}-{month or '01'}-{day or '01'}T00:00:00"
        if month is None:
            return f"{year}-12-31T23:59:59"
        if day is None:
            first_of_next = dt.date(int(year) + int(month) // 12, int(month) % 12 + 1, 1)
            last = first_of_next - dt.timedelta(days=1)
            return f"{last.isoformat()}T23:59:59"
        return f"{year}-{month}-{day}T23:59:59"
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"not a date: {text!r} (expected YYYY, YYYY-MM, YYYY-MM-DD or an ISO time)"
        ) from None
    return moment.replace(tzinfo=None).isoformat(timespec="seconds")


def _like_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# -- summary ----------------------------------------------------------------------------------


def summary(db: Any, top: int = 10) -> dict[str, Any]:
    """Formats and cameras (most common first, at most ``top`` cameras) and the range of dates
    taken, over the images with facts; how many have none yet."""
    formats = db.execute(
        "SELECT coalesce(format, 'unknown'), count(*) FROM photo_facts GROUP BY 1 "
        "ORDER BY 2 DESC, 1"
    ).fetchall()
    cameras = db.execute(
        "SELECT trim(coalesce(camera_make, '') || ' ' || coalesce(camera_model, '')), count(*) "
        "FROM photo_facts WHERE camera_make IS NOT NULL OR camera_model IS NOT NULL "
        "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?",
        [top],
    ).fetchall()
    first, last, dated = db.execute(
        "SELECT min(taken_at), max(taken_at), count(taken_at) FROM photo_facts"
    ).fetchone()
    with_gps = db.execute(
        "SELECT count(*) FROM photo_facts WHERE gps_latitude IS NOT NULL"
    ).fetchone()[0]
    return {
        "formats": {name: n for name, n in formats},
        "cameras": {name: n for name, n in cameras},
        "taken": {"first": first, "last": last, "images": dated},
        "with_gps": with_gps,
        "without_facts": db.execute(
            "SELECT count(*) FROM images WHERE id NOT IN (SELECT id FROM photo_facts)"
        ).fetchone()[0],
    }
