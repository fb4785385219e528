"""Files written whole or not at all: the one way imgindex writes a file others may read.

A file is written under a new, unpredictable name beside its target (created exclusively, never
through a link planted there), every byte through Python's own writes (so a full disk raises),
flushed to disk, its size on disk checked, and only then renamed over the target: a reader or a
crash sees the old file or the new one, never half of one. Its size and CRC-32 are known at the
end (:class:`FileDigest`), for whoever records them to check the file when it is read back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL
NEW_FILE |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class FileDigest:
    """The size and CRC-32 of a file, recorded when it is written and checked when it is read:
    a file damaged on disk (flipped bits, a torn write) is then known to be damaged."""

    size: int
    crc32: int

    def as_dict(self) -> dict[str, int]:
        return {"bytes": self.size, "crc32": self.crc32}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileDigest:
        return cls(int(data["bytes"]), int(data["crc32"]))

    @classmethod
    def of_file(cls, path: Path, expected_size: int | None = None) -> FileDigest | None:
        """The digest of the file at ``path`` (None if it cannot be read). A file whose size is
        not ``expected_size`` is not read: its digest cannot match."""
        crc = 0
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if expected_size is not None and size != expected_size:
                    return cls(size, -1)
                while block := fh.read(1 << 22):
                    crc = zlib.crc32(block, crc)
        except OSError:
            return None
        return cls(size, crc)


class _Sink:
    """A write-only file object over a file descriptor that completes short writes and keeps
    the size and CRC-32 of what it was given."""

    def __init__(self, fd: int):
        self.fd = fd
        self.size = 0
        self.crc32 = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.size += len(view)
        self.crc32 = zlib.crc32(view, self.crc32)
        while view:
            view = view[os.write(self.fd, view) :]
        return self.size

    def flush(self) -> None:
        pass

    # What file-object wrappers (pyarrow's PythonFile) ask of a writable file.
    closed = False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size


def temporary_name(target: Path) -> Path:
    """The name a new version of ``target`` is written under: hidden, unpredictable."""
    return target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")


def write_new(
    target: Path, write: Callable[[Any], None], durable: bool = True
) -> tuple[Path, FileDigest]:
    """Write a new file beside ``target`` by calling ``write(fh)`` (``fh.write(bytes)``), make
    it durable (unless ``durable`` is False: caches), and return its path and digest, for the
    caller to record and rename (:func:`replace`). On any error the new file is removed."""
    temp = temporary_name(target)
    fd = os.open(temp, NEW_FILE, 0o644)
    sink = _Sink(fd)
    try:
        try:
            write(sink)
            if durable:
                os.fsync(fd)
            on_disk = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if on_disk != sink.size:
            raise OSError(errno.EIO, f"{on_disk} bytes on disk where {sink.size} were written")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    return temp, FileDigest(sink.size, sink.crc32)


def replace(temp: Path, target: Path, durable: bool = True) -> None:
    """Rename the new file ``temp`` over ``target`` (and make the rename durable); ``temp`` is
    gone afterwards, whether or not the rename happened."""
    try:
        os.replace(temp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    if durable:
        fsync_folder(target.parent)


def write_file(target: Path, write: Callable[[Any], None], durable: bool = True) -> FileDigest:
    """Write ``target`` whole or not at all (see the module's docstring); returns its digest."""
    temp, digest = write_new(target, write, durable)
    replace(temp, target, durable)
    return digest


def fsync_folder(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
