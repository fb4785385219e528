"""Images a person marked for removal (``Index.review_duplicates``), and moving their files aside.

Nothing is ever deleted: marked files are moved into a folder where a person can look at them
first, never over another file, and their index entries follow them (same ids and vectors).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from imgindex.catalog import ImageRecord, NewImage
from imgindex.errors import ImgIndexError
from imgindex.files import path_text


def marked_records(store: Any) -> list[tuple[ImageRecord, ImageRecord | None]]:
    """Each image marked for removal, with the one kept in its place (None if that one has
    left the index)."""
    store.refresh()
    marked = store.marked_for_removal()
    records = store.get_many({*marked, *(k for k in marked.values() if k is not None)})
    return [(records[i], records.get(k) if k is not None else None)
            for i, k in marked.items() if i in records]  # fmt: skip


def move_marked(store: Any, target: Path, dry_run: bool = False) -> list[tuple[str, str]]:
    """Move the marked files of ``store`` into the folder ``target`` (made if missing), a
    taken name getting a number, and their entries with them; returns (from, to) for each
    (with ``dry_run``, what would be moved). The caller holds the write lock."""
    store.refresh()
    records = store.get_many(store.marked_for_removal())
    moves = []
    taken: set[str] = set()
    for record in sorted(records.values(), key=lambda r: r.id):
        raw = store.raw_path(record.id)
        moves.append((record, raw, _free_name(target, os.path.basename(raw), taken)))
    if dry_run:
        return [(r.path, path_text(d)) for r, _raw, d in moves]
    done = []
    for record, raw, destination in moves:
        moved = _move_file(raw, destination)
        store.rename(record.id, NewImage(moved, record.sha256, record.size,
                                         os.stat(moved).st_mtime, record.width,
                                         record.height))  # fmt: skip
        done.append((record.path, path_text(moved)))
    store.save_vector_index()
    return done


def _free_name(folder: Path, name: bytes, taken: set[str]) -> Path:
    """``folder/name``, or ``name (2)``, ``name (3)``, ... when that is taken (on disk, or by
    another file of the same move)."""
    stem, suffix = os.path.splitext(os.fsdecode(name))
    candidate, n = folder / f"{stem}{suffix}", 1
    while str(candidate) in taken or os.path.lexists(candidate):
        n += 1
        candidate = folder / f"{stem} ({n}){suffix}"
    taken.add(str(candidate))
    return candidate


def _move_file(source: bytes, destination: Path) -> Path:
    """Move a file without ever replacing one: a new hard link, then the old name removed (the
    same file system), or an exclusive copy, flushed, then the old name removed."""
    import shutil

    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise ImgIndexError(
                f"{os.fsdecode(source)}: cannot move it to {destination} ({exc.strerror})"
            ) from None
        with open(source, "rb") as src, open(destination, "xb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copystat(source, destination)
    os.unlink(source)
    return destination
