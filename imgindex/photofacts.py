"""What a photo says about itself: its format, when it was taken (EXIF DateTimeOriginal, with
its UTC offset when recorded), the camera and lens, where (GPS), and its orientation. Read from
the EXIF block the decoder already has; a missing or broken field is simply absent.

GPS positions are personal data: they are read here, but an index stores them only when its
builds are asked to (``--keep-gps``).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

# EXIF tags (TIFF/EXIF 2.32 numbering).
_MAKE, _MODEL, _ORIENTATION, _DATETIME = 0x010F, 0x0110, 0x0112, 0x0132
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATETIME_ORIGINAL, _DATETIME_DIGITIZED = 0x9003, 0x9004
_OFFSET_TIME_ORIGINAL, _OFFSET_TIME_DIGITIZED = 0x9011, 0x9012
_LENS_MAKE, _LENS_MODEL = 0xA433, 0xA434
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON = 1, 2, 3, 4

_EXIF_TIME = re.compile(r"^(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"^[+-]\d{2}:\d{2}$")
MAX_TEXT = 128  # camera and lens names are short; a longer value is cut


@dataclass(frozen=True)
class PhotoFacts:
    """A photo's own facts (all optional)."""

    format: str | None = None  # JPEG, PNG, HEIF, AVIF, JPEG XL, DNG, NEF, ...
    source: str | None = None  # RAW files: "embedded preview" or "half-size demosaic"
    taken_at: str | None = None  # local time as the camera wrote it, ISO 8601: 2024-05-01T12:30:00
    taken_offset: str | None = None  # its UTC offset when recorded: +02:00
    camera_make: str | None = None
    camera_model: str | None = None
    lens: str | None = None
    gps_latitude: float | None = None  # degrees, north positive
    gps_longitude: float | None = None  # degrees, east positive
    orientation: int | None = None  # EXIF orientation as stored (1-8); pixels are upright

    def without_gps(self) -> PhotoFacts:
        return replace(self, gps_latitude=None, gps_longitude=None)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def photo_facts(exif: Any, format_name: str | None, source: str | None) -> PhotoFacts:
    """The facts in a PIL ``Exif`` (or None), for a picture of ``format_name``."""
    if not exif:
        return PhotoFacts(format=format_name, source=source)
    sub = _ifd(exif, _EXIF_IFD)
    # When the picture was taken; else when it was digitized (a scan); else, for files that
    # record nothing more (many RAW files' first directory), the camera's own DateTime.
    taken, offset = _exif_time(sub.get(_DATETIME_ORIGINAL)), sub.get(_OFFSET_TIME_ORIGINAL)
    if taken is None:
        taken, offset = _exif_time(sub.get(_DATETIME_DIGITIZED)), sub.get(_OFFSET_TIME_DIGITIZED)
    if taken is None:
        taken, offset = _exif_time(exif.get(_DATETIME)), None
    offset = _text(offset) if taken else None
    lat, lon = _gps(_ifd(exif, _GPS_IFD))
    orientation = exif.get(_ORIENTATION)
    return PhotoFacts(
        format=format_name,
        source=source,
        taken_at=taken,
        taken_offset=offset if offset and _OFFSET.match(offset) else None,
        camera_make=_text(exif.get(_MAKE)),
        camera_model=_text(exif.get(_MODEL)),
        lens=_text(sub.get(_LENS_MODEL)) or _text(sub.get(_LENS_MAKE)),
        gps_latitude=lat,
        gps_longitude=lon,
        orientation=orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else None,
    )


def _ifd(exif: Any, tag: int) -> dict[int, Any]:
    with contextlib.suppress(Exception):
        return dict(exif.get_ifd(tag))
    return {}


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = "".join(c for c in value if c.isprintable()).strip().strip("\x00").strip()
    return value[:MAX_TEXT] or None


def _exif_time(value: Any) -> str | None:
    """``2024:05:01 12:30:00`` -> ``2024-05-01T12:30:00``; None for anything else (an empty or
    zeroed field, impossible dates)."""
    text = _text(value)
    match = _EXIF_TIME.match(text or "")
    if not match:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups())
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        return None
    if year < 1800:
        return None
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"


def _gps(gps: dict[int, Any]) -> tuple[float | None, float | None]:
    lat = _degrees(gps.get(_GPS_LAT), gps.get(_GPS_LAT_REF), "S", 90)
    lon = _degrees(gps.get(_GPS_LON), gps.get(_GPS_LON_REF), "W", 180)
    if lat is None or lon is None:
        return None, None
    return lat, lon


def _degrees(value: Any, ref: Any, negative: str, limit: float) -> float | None:
    try:
        d, m, s = (float(x) for x in value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    degrees = d + m / 60 + s / 3600
    if not 0 <= degrees <= limit or degrees != degrees:
        return None
    return round(-degrees if _text(ref) == negative else degrees, 7)
