"""Small JPEG previews of indexed images, for the web page and contact sheets.

A thumbnail is made on first request from the indexed file, read as a build reads it (the header
checked, the size capped, ``--max-pixels`` applied), decoded upright (EXIF orientation, any colour
mode to RGB, JPEGs decoded at a reduced scale), and cached on disk keyed by the content's SHA-256:
a renamed file keeps its thumbnail, a changed file gets a new one. The cache lives in the index
folder (``thumbnails/``), or, for an index whose folder cannot be written, in the user's cache
folder. A file that is missing or cannot be read gives a placeholder and the reason, never an
exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from imgindex.atomic import write_file
from imgindex.decode import DEFAULT_MAX_PIXELS, decode_image_bytes, read_file
from imgindex.errors import ImageError

THUMBNAIL_SIZE = 256  # pixels of the longer side
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Thumbnail:
    """A preview to serve: its bytes, their type, and why it is a placeholder if it is."""

    data: bytes
    content_type: str
    problem: str | None = None


def placeholder(reason: str, size: int = THUMBNAIL_SIZE) -> Thumbnail:
    """A grey square saying why there is no picture (the reason also goes with it, as text)."""
    import textwrap

    from PIL import ImageDraw

    from imgindex.sheet import font

    image = Image.new("RGB", (size, size), (224, 224, 224))
    draw = ImageDraw.Draw(image)
    lines = ["No picture:", *textwrap.wrap(reason, width=max(10, size // 9))][:10]
    for n, line in enumerate(lines):
        draw.text((10, 10 + 16 * n), line, fill=(90, 90, 90), font=font(12))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Thumbnail(buffer.getvalue(), "image/png", reason)


def render(data: bytes, name: str, size: int, max_pixels: int) -> Image.Image:
    """An upright RGB image of ``data`` whose longer side is at most ``size``. Raises
    ImageError."""
    pixels = decode_image_bytes(data, name, max_pixels, draft_to=size, min_side=size)
    image = Image.fromarray(pixels)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def render_file(path: str | bytes | os.PathLike[str], size: int, max_pixels: int) -> Image.Image:
    """:func:`render` of the file at ``path``, read under the build's limits."""
    data, _ = read_file(Path(os.fsdecode(path)), max_pixels)
    return render(data, os.fsdecode(path), size, max_pixels)


def user_cache_folder() -> Path:
    """``$XDG_CACHE_HOME/imgindex/thumbnails`` (``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "imgindex" / "thumbnails"


class ThumbnailCache:
    """Thumbnails of ``size`` pixels, cached in ``folder`` by content hash."""

    def __init__(
        self, folder: Path, size: int = THUMBNAIL_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
    ):
        self.folder = folder
        self.size = size
        self.max_pixels = max_pixels

    @classmethod
    def for_index(cls, index_path: Path, **kwargs: int) -> ThumbnailCache:
        """The cache of the index at ``index_path``: in its folder, or in the user's cache
        folder when that cannot be written (thumbnails are keyed by content, so indexes can
        share it)."""
        if os.access(index_path, os.W_OK):
            return cls(index_path / "thumbnails", **kwargs)
        return cls(user_cache_folder(), **kwargs)

    def get(
        self, raw_path: bytes, sha256: str, size: int | None = None, mtime: float | None = None
    ) -> Thumbnail:
        """The thumbnail of the indexed file at ``raw_path`` whose content was ``sha256`` (and
        whose size and time were ``size`` and ``mtime``: a file that changed since is read
        again, a file that is gone gets a placeholder, whatever the cache holds)."""
        name = os.fsdecode(raw_path)
        try:
            st = os.stat(raw_path)
        except FileNotFoundError:
            return placeholder("file not found (deleted or moved since it was indexed)", self.size)
        except OSError as exc:
            return placeholder(f"cannot look at the file ({exc.strerror})", self.size)
        unchanged = size is None or (st.st_size, st.st_mtime) == (size, mtime)
        cached = self._cached(sha256) if unchanged else None
        if cached is not None:
            return cached
        try:
            data, _ = read_file(Path(name), self.max_pixels)
            image = render(data, name, self.size, self.max_pixels)
        except ImageError as exc:
            return placeholder(exc.reason, self.size)
        except Exception as exc:  # a decoder's surprise: a placeholder, not a failed request
            return placeholder(f"cannot make a thumbnail ({type(exc).__name__})", self.size)
        if hashlib.sha256(data).hexdigest() != sha256:
            # Only the indexed content is shown: the file may have been swapped for another
            # (a link to a picture elsewhere, say), which is not for the server to show.
            return placeholder(
                "the file changed since it was indexed: build again to index it as it is now",
                self.size,
            )
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        self._keep(sha256, buffer.getvalue())
        return Thumbnail(buffer.getvalue(), "image/jpeg")

    def _file(self, sha256: str) -> Path | None:
        if not _SHA256.fullmatch(sha256):  # (the name comes from the index, but still)
            return None
        return self.folder / sha256[:2] / f"{sha256}-{self.size}.jpg"

    def _cached(self, sha256: str) -> Thumbnail | None:
        file = self._file(sha256)
        if file is None:
            return None
        try:
            return Thumbnail(file.read_bytes(), "image/jpeg")
        except OSError:
            return None

    def _keep(self, sha256: str, data: bytes) -> None:
        """Keep a thumbnail for next time: written aside and renamed into place, so a reader
        never sees half of one. A cache that cannot be written is no error."""
        file = self._file(sha256)
        if file is None:
            return
        with contextlib.suppress(OSError):
            file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_file(file, lambda fh: fh.write(data), durable=False)
