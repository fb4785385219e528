"""The exceptions imgindex raises. The library raises these; only the CLI turns them into messages.

Every message is one line that a user can act on: it names the file (or index) and the reason.
"""

from __future__ import annotations

import os

# What to say of an index database SQLite finds damaged; SQLite is the truth, so it is lost.
DAMAGED = (
    "is damaged or not an SQLite database: restore the index folder from a backup, or build "
    "a new index from the images"
)


class ImgIndexError(Exception):
    """Base class for every error imgindex raises on purpose."""


class ImageError(ImgIndexError):
    """An image could not be read, decoded or accepted.

    ``path`` is the file (or a short description of an in-memory input); ``reason`` says why.
    ``stat`` is the file's status when it was opened, if the error came after that (a build
    remembers it, so as not to read the same unchanged file again).
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.stat: os.stat_result | None = None


class WeightsError(ImgIndexError):
    """The AugNet weights are missing, tampered with, or not of the expected shape."""


class IndexNotFoundError(ImgIndexError):
    """There is no index at the given location."""


class IncompatibleIndexError(ImgIndexError):
    """The index was made by other weights or preprocessing, or by a newer imgindex."""


class IndexExistsError(IncompatibleIndexError):
    """An index was to be created where one already exists."""


class IndexLockedError(ImgIndexError):
    """Another process is writing to the index."""


class DamagedIndexError(ImgIndexError):
    """Data of the index failed its checksum (damaged on disk); ``imgindex repair`` mends it."""
