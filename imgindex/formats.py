"""Which image format a file holds, judged by its first bytes (not its name), and the formats
Pillow cannot read alone: HEIC/HEIF (pillow-heif), JPEG XL (pillow-jxl-plugin) and camera RAW
(rawpy, LibRaw), each an optional extra. A file in a format whose extra is not installed is
refused with the command that installs it, before it is read whole.

RAW files are turned into pictures one of two ways, recorded with the image: the JPEG (or
bitmap) preview the camera embedded, when its short side is at least what the preset resizes
to, else LibRaw's half-size demosaic (a quarter of the sensor's pixels, white balance as shot).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgindex.errors import ImageError

# What each format needs beyond Pillow: the extra to install, and its module.
EXTRAS = {
    "HEIF": ("heif", "pillow_heif", "HEIC support"),
    "JPEG XL": ("jxl", "pillow_jxl", "JPEG XL support"),
    "RAW": ("raw", "rawpy", "camera RAW support"),
}
RAW_SUFFIXES = frozenset(
    {".dng", ".cr2", ".cr3", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2",
     ".pef", ".srw", ".raw", ".rwl", ".3fr", ".iiq", ".erf", ".kdc", ".mrw"}
)  # fmt: skip
SUFFIXES = frozenset({".heic", ".heif", ".hif", ".avif", ".jxl"}) | RAW_SUFFIXES
HEAD_BYTES = 64  # enough for every signature below

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1",
                b"msf1", b"mif2"}  # fmt: skip
_AVIF_BRANDS = {b"avif", b"avis"}


def sniff(head: bytes, suffix: str = "") -> str | None:
    """The format ``head`` (a file's first bytes) announces: "JPEG", "PNG", "GIF", "BMP",
    "TIFF", "WEBP", "HEIF", "AVIF", "JPEG XL", "RAW", or None. TIFF-based RAW files (DNG, NEF,
    ARW, ...) start like a TIFF and are told apart by their suffix; CR2, CR3, RAF, ORF and RW2
    by their own signatures."""
    suffix = suffix.lower()
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "JPEG XL"
    if head[4:8] == b"ftyp":
        brands = {head[8:12]} | {head[i : i + 4] for i in range(16, min(len(head), 48), 4)}
        if b"crx " in brands:
            return "RAW"  # Canon CR3
        if brands & _AVIF_BRANDS:
            return "AVIF"
        if brands & _HEIF_BRANDS:
            return "HEIF"
        return None
    if head.startswith(b"FUJIFILMCCD-RAW"):
        return "RAW"
    if head[:4] in (b"IIRO", b"IIRS", b"MMOR", b"IIU\x00"):
        return "RAW"  # Olympus ORF, Panasonic RW2
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        if head[8:10] == b"CR" or suffix in RAW_SUFFIXES:
            return "RAW"
        return "TIFF"
    return None


class MissingSupport(ImageError):
    """A file in a format this installation cannot read (an extra is missing). Not recorded
    with the file's state, so that the build after the extra is installed reads it."""


def require(kind: str | None, name: str) -> None:
    """Refuse (ImageError, with the install command) a format whose extra is missing; register
    the Pillow plugin of one that is installed."""
    if kind == "AVIF" and not _pillow_reads_avif():
        raise MissingSupport(name, "this Pillow cannot read AVIF: pip install -U 'pillow>=11.3'")
    if kind not in EXTRAS:
        return
    extra, _module, what = EXTRAS[kind]
    if not available(kind):
        raise MissingSupport(name, f"{what} not installed: pip install 'imgindex[{extra}]'")


@functools.cache
def available(kind: str) -> bool:
    """Whether the extra for ``kind`` is installed (its Pillow plugin registered, once)."""
    module = EXTRAS[kind][1]
    try:
        if module == "pillow_heif":
            import pillow_heif

            pillow_heif.register_heif_opener()
        elif module == "pillow_jxl":
            import pillow_jxl  # noqa: F401 - importing it registers the plugin
        else:
            import rawpy  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _pillow_reads_avif() -> bool:
    from PIL import features

    return bool(features.check("avif"))


def register_installed() -> None:
    """Register the plugins of every installed extra (for code that opens images itself)."""
    for kind in EXTRAS:
        available(kind)


# -- JPEG XL -----------------------------------------------------------------------------------

_JXL_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}


def jxl_size(data: bytes) -> tuple[int, int] | None:
    """The (width, height) a JPEG XL file's SizeHeader declares, read from its first bytes (a
    bare codestream, or the ``jxlc`` / first ``jxlp`` box of a container), without decoding:
    Pillow's plugin decodes the whole picture just to open it. None if no header is found."""
    stream = _jxl_codestream(data)
    if stream is None or not stream.startswith(b"\xff\x0a"):
        return None
    bits = _Bits(stream[2:66])
    try:
        small = bits.u(1)
        height = (bits.u(5) + 1) * 8 if small else _jxl_u32(bits)
        ratio = bits.u(3)
        if ratio:
            numerator, denominator = _JXL_RATIOS[ratio]
            width = height * numerator // denominator
        else:
            width = (bits.u(5) + 1) * 8 if small else _jxl_u32(bits)
    except IndexError:
        return None
    return width, height


def _jxl_codestream(data: bytes) -> bytes | None:
    if data.startswith(b"\xff\x0a"):
        return data
    position = 0
    while position + 8 <= len(data):
        size = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        start = position + 8
        if size == 1:
            size = int.from_bytes(data[start : start + 8], "big")
            start += 8
        end = len(data) if size == 0 else position + size
        if kind == b"jxlc":
            return data[start:end]
        if kind == b"jxlp":
            return data[start + 4 : end]
        if end <= position:
            return None
        position = end
    return None


def _jxl_u32(bits: _Bits) -> int:
    return bits.u((9, 13, 18, 30)[bits.u(2)]) + 1


class _Bits:
    """Bits of ``data``, least significant first (as JPEG XL packs them)."""

    def __init__(self, data: bytes):
        self.data = data
        self.position = 0

    def u(self, count: int) -> int:
        value = 0
        for i in range(count):
            byte = self.data[self.position >> 3]
            value |= ((byte >> (self.position & 7)) & 1) << i
            self.position += 1
        return value


# -- RAW ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawPicture:
    """A RAW file as a picture: upright RGB pixels and how they were made."""

    pixels: np.ndarray
    source: str  # "embedded preview" or "half-size demosaic"
    exif: Any = None  # the preview's EXIF (a PIL Exif) when it had one


def raw_size(data: bytes, name: str) -> tuple[int, int]:
    """The sensor's picture size (width, height as LibRaw crops it) of a RAW file's bytes."""
    with _opened_raw(data, name) as raw:
        sizes = raw.sizes
        return int(sizes.width), int(sizes.height)


def decode_raw(data: bytes, name: str, min_side: int, max_pixels: int) -> RawPicture:
    """The picture in a RAW file's bytes: its embedded preview when the preview's short side is
    at least ``min_side`` (and it has at most ``max_pixels``), else a half-size demosaic;
    upright either way. A preview that cannot be used, for whatever reason, is passed over."""
    import rawpy

    with _opened_raw(data, name) as raw:
        flip = int(raw.sizes.flip)
        preview = None
        with contextlib.suppress(Exception):  # LibRaw, Pillow: any failure means no preview
            preview = _preview(raw, min_side, max_pixels)
        if preview is not None:
            return RawPicture(_flipped(preview[0], flip), "embedded preview", preview[1])
        try:
            rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
        except (rawpy.LibRawError, ValueError, MemoryError, NotImplementedError) as exc:
            raise ImageError(name, f"cannot demosaic RAW data ({_describe(exc)})") from None
        return RawPicture(np.ascontiguousarray(rgb), "half-size demosaic")


def raw_source(data: bytes, name: str, min_side: int, max_pixels: int) -> tuple[str, Any]:
    """How :func:`decode_raw` would make the picture ("embedded preview" or "half-size
    demosaic") and the preview's EXIF, without decoding the preview or demosaicing."""
    with _opened_raw(data, name) as raw:
        with contextlib.suppress(Exception):
            found = _preview(raw, min_side, max_pixels, load=False)
            if found is not None:
                return "embedded preview", found[1]
        return "half-size demosaic", None


def _preview(
    raw: Any, min_side: int, max_pixels: int, load: bool = True
) -> tuple[np.ndarray | None, Any] | None:
    """The embedded preview as upright-to-be RGB uint8 pixels and its EXIF, if it is large
    enough for the preset and within the pixel limit (its size checked before it is decoded);
    else None. With ``load=False`` the pixels are not decoded (None)."""
    import rawpy
    from PIL import Image

    thumb = raw.extract_thumb()
    if thumb.format == rawpy.ThumbFormat.BITMAP:
        pixels = np.asarray(thumb.data)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if pixels.dtype == np.uint16:
            pixels = (pixels >> 8).astype(np.uint8)
        if pixels.dtype != np.uint8 or pixels.shape[2] not in (1, 3):
            return None
        if pixels.shape[2] == 1:
            pixels = np.repeat(pixels, 3, axis=2)
        height, width = pixels.shape[:2]
        if min(width, height) < min_side or width * height > max_pixels:
            return None
        return np.ascontiguousarray(pixels), None
    if thumb.format != rawpy.ThumbFormat.JPEG:
        return None
    with Image.open(io.BytesIO(thumb.data)) as im:
        width, height = im.size
        if min(width, height) < min_side or width * height > max_pixels:
            return None
        exif = im.getexif()
        if not load:
            return None, exif
        im.load()
        return np.asarray(im.convert("RGB")), exif


def _flipped(pixels: np.ndarray, flip: int) -> np.ndarray:
    """LibRaw's orientation (0 none, 3 half a turn, 5 a quarter turn left, 6 right) applied."""
    if flip == 3:
        return np.ascontiguousarray(pixels[::-1, ::-1])
    if flip == 5:
        return np.ascontiguousarray(np.rot90(pixels, 1))
    if flip == 6:
        return np.ascontiguousarray(np.rot90(pixels, -1))
    return pixels


@contextlib.contextmanager
def _opened_raw(data: bytes, name: str) -> Any:
    import rawpy

    try:
        raw = rawpy.imread(io.BytesIO(data))
    except (rawpy.LibRawError, ValueError, OSError) as exc:
        raise ImageError(name, f"not a RAW file LibRaw can read ({_describe(exc)})") from None
    try:
        yield raw
    finally:
        raw.close()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def suffix_of(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def raw_name(name: str) -> str:
    """The RAW format a file's suffix names (DNG, CR2, NEF, ...), or RAW."""
    suffix = suffix_of(name)
    return suffix[1:].upper() if suffix in RAW_SUFFIXES else "RAW"
