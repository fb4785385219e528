"""The index folder on disk: the names of its files, making it safely, the one-writer lock.

Nothing in the folder is written through a link: the lock file is opened without following one,
temporary files are created exclusively under unpredictable names (:mod:`imgindex.atomic`), and
a writer refuses database files that are links and folders that belong to another user.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imgindex.errors import ImgIndexError, IndexLockedError
from imgindex.schema import DB_NAME

FAISS_NAME = "vectors.faiss"
LOCK_NAME = "write.lock"


# Files in the index folder are opened without following a symbolic link in their place: a
# link planted there must not make imgindex write through it to a file elsewhere.
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
TRUST_ENV = "IMGINDEX_TRUST_FOLDER"


def make_folder(path: Path, private: bool) -> None:
    """Make the index folder ``path`` and the folders above it that are missing: 0700 with
    ``private`` or when the nearest existing folder above is private (no access for group and
    others), else as the umask says."""
    missing = []
    existing = path
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not private and existing.is_dir():
        private = existing.stat().st_mode & 0o077 == 0
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made by another process meanwhile
            # Never writable by others, whatever the umask (see check_folder_for_writing).
            folder.mkdir(mode=0o700 if private else 0o775)


def check_folder_for_writing(path: Path) -> None:
    """Refuse to write into an index folder that this user cannot write, that another user
    owns or that anyone may write (either could plant links in it; ``$IMGINDEX_TRUST_FOLDER=1``
    allows it), or where imgindex's own files are not plain files of their own (links, hard
    links, folders, pipes: SQLite would write through them, or block on them)."""
    if not os.access(path, os.W_OK):
        raise ImgIndexError(
            f"{path}: the index folder cannot be written (permissions, or a read-only "
            "mount); commands that only read it still work"
        )
    st = path.stat()
    trusted = os.environ.get(TRUST_ENV) == "1"
    how = (
        "imgindex writes only into folders its user owns and others cannot write (set "
        f"{TRUST_ENV}=1 to write there anyway)"
    )
    if st.st_uid != os.geteuid() and not trusted:
        raise ImgIndexError(
            f"{path}: the index folder belongs to another user (uid {st.st_uid}), who could "
            f"plant links in it for imgindex to write through; {how}"
        )
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX and not trusted:
        raise ImgIndexError(
            f"{path}: anyone may write the index folder (mode {stat.S_IMODE(st.st_mode):o}) and "
            f"plant links in it for imgindex to write through; make it yours alone (chmod o-w "
            f"FOLDER), or: {how}"
        )
    check_index_files(path, (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", FAISS_NAME, LOCK_NAME))


def check_index_files(path: Path, names: Sequence[str]) -> None:
    """Refuse if any of the files ``names`` in the index folder exists as something other than
    a plain file with one name (readers check SQLite's shared files: SQLite writes them)."""
    for name in names:
        file = path / name
        try:
            st = os.lstat(file)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            what = "a symbolic link"
        elif not stat.S_ISREG(st.st_mode):
            what = "not a plain file (a folder, a pipe or a device)"
        elif st.st_nlink > 1:
            what = "a hard link shared with another file (copied with `cp -al`?)"
        else:
            continue
        raise ImgIndexError(
            f"{file}: {what} where imgindex keeps its own file; refusing to write through it "
            "(remove it if you did not make it; copy index folders with `cp -a`)"
        )


def take_lock(path: Path, wait: float, on_wait: Any) -> Any:
    """The index's write lock (an flock on ``write.lock``, released by closing the file). The
    file is opened without following a link and must be a plain file of its own (one name):
    its contents are replaced by the holder's pid."""
    lock_path = path / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
    except OSError as exc:
        if lock_path.is_symlink():
            raise ImgIndexError(
                f"{lock_path}: a symbolic link where imgindex keeps its lock file; refusing to "
                "write through it (remove it if you did not make it)"
            ) from None
        raise ImgIndexError(f"{lock_path}: cannot open the lock file ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise ImgIndexError(
            f"{lock_path}: not a plain file of its own (a device, or a hard link to another "
            "file); refusing to write to it (remove it if you did not make it)"
        )
    fh = os.fdopen(fd, "r+b", buffering=0)
    deadline = time.monotonic() + max(0.0, wait)
    told = False
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = lock_holder(fh)
            if time.monotonic() >= deadline:
                fh.close()
                waited = f" after waiting {wait:g} s" if wait > 0 else ""
                if holder == f"pid {os.getpid()}":
                    who = "another Index object of this process is writing to this index"
                else:
                    who = f"another imgindex process ({holder}) is writing to this index"
                raise IndexLockedError(
                    f"{path}: {who}{waited}; let it finish, or wait for it "
                    "(--wait SECONDS; in Python, wait=SECONDS)"
                ) from None
            if on_wait is not None and not told:
                on_wait(holder)
                told = True
            time.sleep(0.1)
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}".encode())
    return fh


def lock_holder(fh: Any) -> str:
    """Who holds the lock, as its file says ("pid N"); anything else is not repeated."""
    fh.seek(0)
    text = fh.read(64).decode("ascii", "replace").strip()
    return text if re.fullmatch(r"pid \d+", text) else "another process"


def disk_usage(path: Path) -> dict[str, int]:
    """Bytes of each file of the index folder ``path`` (the write-ahead log while it is open)."""
    sizes = {}
    for name in (DB_NAME, DB_NAME + "-wal", FAISS_NAME):
        with contextlib.suppress(FileNotFoundError):
            sizes[name] = (path / name).stat().st_size
    return sizes


def temporary_files(path: Path) -> list[Path]:
    """Temporary FAISS files a writer left in ``path`` (killed before renaming one into place).
    Only files and links: anything else of that name is no file of ours (and no obstacle, the
    names being unpredictable)."""
    found = path.glob(f".{FAISS_NAME}.*.tmp")
    return sorted(p for p in found if p.is_symlink() or p.is_file())
