"""Which files are images, and in what order: walking the folders a user points at.

Walking is deterministic (sorted at every level) so two builds of the same folders see the files in
the same order. Symbolic links to folders are followed after the real folders, once: a folder
reached both directly and through a link is indexed under its own path, and a link back into a
folder it is in (a loop) is not followed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, AnyStr

from imgindex import formats

# Formats Pillow decodes that people keep photos in. Matching is case-insensitive.
IMAGE_SUFFIXES = (
    frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
    | formats.SUFFIXES
)  # HEIC, AVIF, JPEG XL, camera RAW


def is_image_name(path: str | os.PathLike[str]) -> bool:
    """True when the file name has one of the image suffixes imgindex reads."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_SUFFIXES


def is_under(path: AnyStr, root: AnyStr) -> bool:
    """True when ``path`` is ``root`` or lies inside it (both absolute; both text or both the
    names' bytes)."""
    sep: Any = os.sep if isinstance(path, str) else os.fsencode(os.sep)
    root = root.rstrip(sep)
    return path == root or path.startswith(root + sep)


def path_text(path: str | os.PathLike[str]) -> str:
    """The text form of a path stored and shown by imgindex.

    File names are bytes on Linux and need not be UTF-8; such bytes are written as ``\\xNN`` so the
    text is always valid (the exact bytes are kept beside it in ``raw_path``).
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def resolve(path: str | bytes | os.PathLike[Any]) -> Path:
    """The path under which imgindex indexes and looks up ``path``: absolute, with symbolic
    links and ``..`` resolved in its folders (a folder reached through a link is indexed under
    its real path, however it was named). A file's own name is kept, link or not, as walking
    keeps the names of links to files."""
    absolute = os.path.abspath(os.fsdecode(path))
    if os.path.isdir(absolute):
        return Path(os.path.realpath(absolute))
    folder, name = os.path.split(absolute)
    return Path(os.path.realpath(folder)) / name


def resolve_roots(roots: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[str]]:
    """The roots a build walks: each one resolved (:func:`resolve`), less those that lie in
    another root (a folder given twice, through a link, or inside another one given), which are
    walked as part of it. Also returns a note for each root left out. A file given by name is
    left out only if walking its folder finds it (it has an image suffix)."""
    given = list(roots)
    resolved = [resolve(r) for r in given]
    kept: list[Path] = []
    notes = []
    for n, (name, real) in enumerate(zip(given, resolved, strict=True)):
        if os.path.lexists(real) and (real.is_dir() or is_image_name(real)):
            cover = next(
                (
                    other
                    for m, other in enumerate(resolved)
                    if m != n
                    and other.is_dir()
                    and is_under(str(real), str(other))
                    and (other != real or m < n)
                ),
                None,
            )
        else:
            cover = None
        if cover is None:
            if real not in kept:
                kept.append(real)
            continue
        if cover == real and str(cover) == os.fsdecode(os.path.abspath(name)):
            notes.append(f"{cover} is given twice: walked once")
        elif cover == real:
            notes.append(f"{os.fsdecode(name)} is {cover}, given already: walked once")
        else:
            notes.append(f"{os.fsdecode(name)} lies in {cover}: walked as part of it")
    return kept, notes


OnError = Callable[[Path, str], None]


def walk_images(
    roots: Iterable[str | os.PathLike[str]], on_error: OnError | None = None
) -> Iterator[Path]:
    """Yield the absolute path of every image file under ``roots``, without duplicates.

    A root may be a folder (walked recursively) or a single file (yielded as given, whatever its
    suffix, since the user named it). Roots that do not exist raise ``FileNotFoundError`` before
    anything is yielded, so a typo is reported instead of silently indexing nothing. Folders that
    cannot be listed, and symbolic-link loops, are reported to ``on_error(path, reason)``.
    """
    roots = [Path(os.path.abspath(r)) for r in roots]
    for root in roots:
        if not os.path.lexists(root):
            raise FileNotFoundError(f"{root}: no such file or folder")
    seen: set[Path] = set()
    walked: dict[tuple[int, int], Path] = {}  # shared: two roots may reach one folder
    for root in roots:
        if root.is_dir():
            for path in _walk_dir(root, on_error or (lambda path, reason: None), walked):
                if path not in seen:
                    seen.add(path)
                    yield path
        elif root not in seen:
            seen.add(root)
            yield root


def _walk_dir(root: Path, on_error: OnError, walked: dict[tuple[int, int], Path]) -> Iterator[Path]:
    # ``walked``: (device, inode) of every folder walked -> the path it was walked under.
    # Symbolic links to folders are followed after everything else, so a folder reached both
    # directly and through a link is indexed under its own path.
    links: list[Path] = []

    def walk(folder: Path) -> Iterator[Path]:
        try:
            st = folder.stat()
        except OSError as exc:
            on_error(folder, f"cannot open folder ({exc.strerror or exc})")
            return
        key = (st.st_dev, st.st_ino)
        if key in walked:
            target = os.path.realpath(folder)
            if is_under(os.path.realpath(folder.parent), target):
                on_error(folder, "links to a folder it is in (symbolic link loop), not followed")
            else:
                on_error(folder, f"links to a folder indexed as {walked[key]}, not followed")
            return
        walked[key] = folder
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            on_error(folder, f"cannot list folder ({exc.strerror or exc})")
            return
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir and entry.is_symlink():
                links.append(Path(entry.path))
            elif is_dir:
                yield from walk(Path(entry.path))
            elif is_image_name(entry.name):
                yield Path(entry.path)  # reading refuses what is not a regular file

    yield from walk(root)
    while links:
        yield from walk(links.pop(0))


def is_gone(path: str | bytes | os.PathLike[Any]) -> bool:
    """True only when ``path`` is known not to exist: it, or a folder above it, is missing.
    Any other error (permission denied, an I/O error on a network mount that hiccups) says
    nothing of the file, which is then not gone."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False
