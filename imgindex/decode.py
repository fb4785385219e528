"""Bytes to RGB pixels: the one place that knows about image formats.

Everything that can go wrong with a file (unreadable, not an image, truncated, too large, an odd
colour mode) is decided here and raised as :class:`~imgindex.errors.ImageError` with a reason a
user can read. What comes out is always an upright ``H x W x 3`` uint8 RGB array, converted the
way OpenCV's ``imread(..., IMREAD_COLOR)`` (which imgsim uses) would: EXIF orientation applied,
alpha dropped, 16-bit samples reduced to their high byte, palettes expanded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgindex import formats
from imgindex.errors import ImageError
from imgindex.photofacts import PhotoFacts, photo_facts

EXIF_ORIENTATION = 0x0112  # the EXIF tag: 1 upright, 2-8 mirrored and/or rotated

# Pillow's own default decompression-bomb limit (about 89.5 megapixels, 0.27 GB as RGB).
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass(frozen=True)
class ImageFile:
    """A decoded image file: its pixels and the facts about the file that the index records."""

    path: Path
    pixels: np.ndarray  # H x W x 3 uint8 RGB, upright
    sha256: str
    size: int  # bytes
    mtime: float
    width: int  # after EXIF orientation
    height: int


def read_image_file(
    path: str | os.PathLike[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_to: int | None = None,
    min_side: int = 350,
) -> ImageFile:
    """Read, hash and decode one file. Raises ImageError naming the file and the reason."""
    path = Path(path)
    data, st = read_file(path, max_pixels)
    pixels = decode_image_bytes(data, os.fsdecode(path), max_pixels, draft_to, min_side)
    return ImageFile(
        path=path,
        pixels=pixels,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        mtime=st.st_mtime,
        width=pixels.shape[1],
        height=pixels.shape[0],
    )


# What reading a file may cost before it is known to be an image within the pixel limit. The
# header is parsed from the file itself, reading at most HEADER_BYTES (JPEG markers, PNG chunks
# before the pixels, a TIFF directory); then the whole file is read only if it is no larger than
# an image within the limit can plausibly be: 8 bytes a pixel (uncompressed 16-bit RGBA) and
# 64 MB of metadata, thumbnails or further frames. A 4 GB file named .jpg that is not an image
# is refused after a few bytes, one that is a video after its header.
HEADER_BYTES = 32 << 20
BYTES_PER_PIXEL = 8
SLACK_BYTES = 64 << 20


def plausible_file_size(max_pixels: int) -> int:
    """The largest file accepted as an image of at most ``max_pixels`` pixels."""
    return max_pixels * BYTES_PER_PIXEL + SLACK_BYTES


def read_file(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, os.stat_result]:
    """The bytes of an image file and its status, read through one open file handle (so the
    time and size describe the bytes even if the file is being replaced). Its header is checked
    first (an image Pillow can read, within ``max_pixels``) and its size then capped
    (:func:`plausible_file_size`), so a huge file that is not a plausible image is refused
    without being read whole. Raises ImageError (with ``stat`` once the file was opened)."""
    name = os.fsdecode(path)
    st = None
    try:
        # Opening a named pipe would wait for a writer, and /dev/zero never ends: look first
        # (a link is followed, as for opening).
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            raise ImageError(name, "not a regular file (a pipe, socket or device)")
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_size == 0:
                raise ImageError(name, "empty file (0 bytes)")
            limit = plausible_file_size(max_pixels)
            budget = HEADER_BYTES
            kind = formats.sniff(fh.read(formats.HEAD_BYTES), formats.suffix_of(name))
            formats.require(kind, name)  # refused with the install command, unread
            if kind in _WHOLE_FILE_FORMATS:
                if st.st_size > limit:
                    raise _too_large(name, st.st_size, max_pixels)
                budget = limit + 1
            fh.seek(0)
            if kind == "RAW":
                data = fh.read(limit + 1)
                width, height = formats.raw_size(data, name)
                check_pixel_count((width // 2, height // 2), name, max_pixels)  # decoded at most
            elif kind == "JPEG XL":  # (its Pillow plugin decodes the picture to open it)
                data = fh.read(limit + 1)
                check_pixel_count(_jxl_size(data, name), name, max_pixels)
            else:
                check_pixel_count(_read_header(fh, name, budget), name, max_pixels)
                if st.st_size > limit:
                    raise _too_large(name, st.st_size, max_pixels)
                fh.seek(0)
                data = fh.read(limit + 1)
    except formats.MissingSupport:
        raise  # (without the file's state: read again once the extra is installed)
    except ImageError as exc:
        exc.stat = st
        raise
    except IsADirectoryError:
        raise ImageError(name, "is a folder, not a file") from None
    except FileNotFoundError:
        raise ImageError(name, "file not found (deleted, or a broken link)") from None
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except OSError as exc:
        error = ImageError(name, f"cannot read file ({exc.strerror or exc})")
        error.stat = st
        raise error from None
    if len(data) > limit:  # it grew while being read
        error = _too_large(name, len(data), max_pixels)
        error.stat = st
        raise error
    if not data:
        error = ImageError(name, "empty file (0 bytes)")
        error.stat = st
        raise error
    return data, st


def _too_large(name: str, size: int, max_pixels: int) -> ImageError:
    return ImageError(
        name,
        f"file of {size / 1e9:.1f} GB: larger than an image of at most {max_pixels / 1e6:.1f} "
        "MP can plausibly be, refused unread (a video or an archive named as an image?); "
        "raise --max-pixels to read it anyway",
    )


class _Budget(io.RawIOBase):
    """A read-only view of an open file that refuses to read more than ``budget`` bytes in
    all, so that parsing a hostile header cannot read (and keep) a whole huge file."""

    def __init__(self, fh: Any, budget: int):
        self._fh = fh
        self._left = budget

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            raise _HeaderTooLarge
        data = self._fh.read(min(len(buffer), self._left))
        self._left -= len(data)
        buffer[: len(data)] = data
        return len(data)


class _HeaderTooLarge(Exception):
    pass


# Formats whose decoders read the whole file just to open it (libwebp, libheif, libavif,
# libjxl, LibRaw parse it whole), so that a header cannot be read apart: the file's size is
# capped before it is opened.
_WHOLE_FILE_FORMATS = frozenset({"WEBP", "HEIF", "AVIF", "JPEG XL", "RAW"})


def _read_header(fh: Any, name: str, budget: int = HEADER_BYTES) -> tuple[int, int]:
    """The pixel size an image file's header claims, parsed from the open file ``fh`` reading
    at most ``budget`` bytes. Raises ImageError for what is not an image Pillow can read."""
    try:
        with Image.open(io.BufferedReader(_Budget(fh, budget))) as im:
            return im.size
    except _HeaderTooLarge:
        raise ImageError(
            name, f"an image header of more than {budget >> 20} MB: refused unread"
        ) from None
    except Exception as exc:
        raise _header_error(name, exc) from None


def _header_error(name: str, exc: Exception) -> ImageError:
    """What Pillow failing to open an image's header means, as an ImageError."""
    if isinstance(exc, UnidentifiedImageError):
        return ImageError(name, "not an image, or a format imgindex cannot read")
    if isinstance(exc, Image.DecompressionBombError):
        return ImageError(
            name, f"refused before decoding by Pillow's own limit (PIL.Image.MAX_IMAGE_PIXELS, "
            f"which the imgindex command lifts; in Python, set it yourself): {exc}",
        )  # fmt: skip
    return ImageError(name, f"cannot read image header ({_describe(exc)})")


def decode_image_bytes(
    data: bytes,
    name: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_to: int | None = None,
    min_side: int = 350,
) -> np.ndarray:
    """Decode encoded image bytes to an upright H x W x 3 uint8 RGB array (see
    :func:`decode_photo`)."""
    return decode_photo(data, name, max_pixels, draft_to, min_side).pixels


@dataclass(frozen=True)
class Photo:
    """A decoded picture and what its file says about it."""

    pixels: np.ndarray  # H x W x 3 uint8 RGB, upright
    facts: PhotoFacts


def decode_photo(
    data: bytes,
    name: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_to: int | None = None,
    min_side: int = 350,
) -> Photo:
    """Decode encoded image bytes (any format of :mod:`imgindex.formats`, judged by content) to
    upright RGB pixels, with the photo's own facts (format, EXIF date, camera, lens, GPS).

    With ``draft_to``, a JPEG whose short side is at least twice that is decoded at a reduced
    scale (1/2, 1/4 or 1/8, chosen by libjpeg) that keeps its short side at ``draft_to`` or more.
    A RAW file gives its embedded preview if that has a short side of ``min_side`` or more (the
    preset's), else a half-size demosaic. A file of several pictures (a burst, pages, frames)
    gives its first, or the one it marks as primary (HEIF).
    """
    kind = formats.sniff(data[: formats.HEAD_BYTES], formats.suffix_of(name))
    formats.require(kind, name)
    if kind == "RAW":
        picture = formats.decode_raw(data, name, min_side, max_pixels)
        check_pixel_count((picture.pixels.shape[1], picture.pixels.shape[0]), name, max_pixels)
        return Photo(picture.pixels, _raw_facts(data, name, picture.exif, picture.source))
    if kind == "JPEG XL":
        check_pixel_count(_jxl_size(data, name), name, max_pixels)
    try:
        # Pillow warns above its own limit and refuses at twice that; the CLI silences the warning
        # because check_pixel_count below gives the user the real answer.
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError) as exc:  # fmt: skip
        raise _header_error(name, exc) from None
    check_pixel_count(im.size, name, max_pixels)
    if draft_to and im.format == "JPEG" and min(im.size) >= 2 * draft_to:
        width, height = im.size
        scale = draft_to / min(width, height)
        im.draft(im.mode, (math.ceil(width * scale), math.ceil(height * scale)))
    try:
        im.load()
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise ImageError(name, f"corrupt or truncated image data ({_describe(exc)})") from None
    return Photo(pil_to_rgb_array(im, name), photo_facts(_exif(im), kind or im.format, None))


def read_facts(data: bytes, name: str, min_side: int = 350) -> PhotoFacts:
    """What :func:`decode_photo` would say of the photo in ``data``, without decoding its
    pixels (for images indexed before imgindex read photo facts)."""
    kind = formats.sniff(data[: formats.HEAD_BYTES], formats.suffix_of(name))
    formats.require(kind, name)
    if kind == "RAW":
        source, exif = formats.raw_source(data, name, min_side, DEFAULT_MAX_PIXELS)
        return _raw_facts(data, name, exif, source)
    if kind == "JPEG XL":
        check_pixel_count(_jxl_size(data, name), name, DEFAULT_MAX_PIXELS)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return photo_facts(_exif(im), kind or im.format, None)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError) as exc:  # fmt: skip
        raise _header_error(name, exc) from None


def _exif(im: Image.Image) -> Any:
    """An opened image's EXIF; None for a broken block (which loses the facts, not the
    picture)."""
    with contextlib.suppress(Exception):
        return im.getexif()
    return None


def _raw_facts(data: bytes, name: str, preview_exif: Any, source: str) -> PhotoFacts:
    """A RAW file's facts: from its preview's EXIF, or (often empty) its first directory's."""
    exif = preview_exif or _tiff_exif(data)
    return photo_facts(exif, formats.raw_name(name), source)


def _jxl_size(data: bytes, name: str) -> tuple[int, int]:
    size = formats.jxl_size(data)
    if size is None:
        raise ImageError(name, "not a JPEG XL file imgindex can read (no size header)")
    return size


def _tiff_exif(data: bytes) -> Any:
    """The EXIF of a TIFF-based RAW file (DNG, NEF, CR2, ARW...): its first directory, parsed
    as an EXIF block (no picture is opened); None for the others."""
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    with contextlib.suppress(Exception):
        exif = Image.Exif()
        exif.load(data)
        return exif
    return None


@dataclass(frozen=True)
class JpegHeader:
    """What the reading thread learns of a JPEG that the network's device will decode."""

    width: int  # as stored, before EXIF orientation
    height: int
    orientation: int  # EXIF orientation, 1-8


def device_decodable_jpeg(data: bytes, name: str, max_pixels: int) -> JpegHeader | None:
    """The header of a JPEG that a GPU decoder can take (baseline or progressive, greyscale or
    YCbCr), after the same size checks as :func:`decode_image_bytes`; None for anything else
    (other formats, CMYK), which is decoded on the CPU. Raises ImageError for a bad header."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # let the CPU decoder give the reason
    check_pixel_count(im.size, name, max_pixels)
    if im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return None
    orientation = 1
    with contextlib.suppress(Exception):  # a broken EXIF block: keep the picture as stored
        orientation = int(im.getexif().get(EXIF_ORIENTATION, 1))
    return JpegHeader(im.width, im.height, orientation if 1 <= orientation <= 8 else 1)


def orient(pixels: Any, orientation: int) -> Any:
    """Apply an EXIF orientation to ``H x W x C`` pixels (a torch tensor), as
    ``ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return pixels.flip(1)
    if orientation == 3:
        return pixels.flip(0).flip(1)
    if orientation == 4:
        return pixels.flip(0)
    if orientation == 5:
        return pixels.permute(1, 0, 2)
    if orientation == 6:
        return pixels.permute(1, 0, 2).flip(1)
    if orientation == 7:
        return pixels.permute(1, 0, 2).flip(0).flip(1)
    if orientation == 8:
        return pixels.permute(1, 0, 2).flip(0)
    return pixels


@contextlib.contextmanager
def pillow_block_cache(blocks: int) -> Iterator[None]:
    """Let Pillow keep up to ``blocks`` freed image-memory blocks (16 MB at most each) for the
    next image, while many are decoded, instead of handing each back to the operating system
    and having fresh pages faulted in for the next. It never keeps more than was in use at once.
    Pillow's default is none (``PILLOW_BLOCKS_MAX``); the setting is restored afterwards.
    benchmarks/reading.py measures what it saves."""
    core: Any = Image.core
    try:
        before = core.get_blocks_max()
        core.set_blocks_max(max(before, blocks))
    except (AttributeError, ValueError, TypeError):  # another Pillow: decode as it does
        yield
        return
    try:
        yield
    finally:
        core.set_blocks_max(before)


def check_pixel_count(size: tuple[int, int], name: str, max_pixels: int) -> None:
    """Refuse images whose header claims more pixels than ``max_pixels`` (decompression bombs)."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(name, f"image has no pixels ({width} x {height})")
    if width * height > max_pixels:
        raise ImageError(
            name,
            f"{width} x {height} pixels ({width * height / 1e6:.1f} MP) is over the limit of "
            f"{max_pixels / 1e6:.1f} MP; refused before decoding (raise it with --max-pixels)",
        )


def pil_to_rgb_array(im: Image.Image, name: str = "<image>") -> np.ndarray:
    """Upright RGB uint8 pixels of a PIL image, converted as OpenCV's IMREAD_COLOR would."""
    # A broken EXIF block should not lose the picture: keep it as stored. Only a rotated or
    # mirrored picture goes through exif_transpose, which copies even an upright image (for a
    # 4 MP JPEG, the copy took twice as long as decoding it: benchmarks/reading.py).
    with contextlib.suppress(Exception):
        if im.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9):
            im = ImageOps.exif_transpose(im)
    try:
        return _to_rgb(im)
    except Exception as exc:
        raise ImageError(
            name, f"cannot convert {im.mode} image to RGB ({_describe(exc)})"
        ) from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode.startswith("I;16") or mode == "I":
        # 16-bit (or 32-bit integer) greyscale: keep the high byte, as OpenCV does for 16-bit.
        grey = (np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        grey = np.asarray(im).clip(0, 255).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        # Via RGBA so Pillow expands the palette without warning; the alpha is then dropped.
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
