"""The sync rules: what a build does with each file, decided without reading an image.

A :class:`SyncPlanner` knows the index's entries (as the catalog lists them: id, name, size,
modification time, content hash) and what earlier builds skipped, and asks the file system only
whether a file exists and what its status says. It reads no image, embeds nothing and writes
nothing, so it can be tested without a network or an index, and every ingest engine (the local
pipeline of :mod:`imgindex.ingest`, a distributed one) follows the same rules:

* **unchanged**: a known path with the same size and modification time is not opened;
* **still skipped**: a file an earlier build skipped, with the same size and times, read under
  no lower a pixel limit, would fail again: it is reported without being read;
* after a file is read and hashed (:meth:`SyncPlanner.decide`):

  - **touched**: a known path with the same content keeps its entry (new size and time);
  - **renamed**: content stored under an entry whose file is gone moves that entry (same id and
    vector) to the new path;
  - **copy**: content stored under an entry whose file still exists gets a new entry with that
    stored vector;
  - **new** / **changed**: anything else is embedded (a changed file replaces its entry);

* **gone**: entries under the folders given whose files no longer exist are removed (unless the
  caller keeps them), but only for a file known not to exist: one that exists but could not be
  read, or lies under a folder that could not be listed, or under a root folder that is empty
  (more likely a drive not mounted than a collection deleted), keeps its entry.

The caller tells the planner what it did (:meth:`touched`, :meth:`moved`, :meth:`added`) so that
later decisions of the same build see it, and the planner counts each outcome (:attr:`counts`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from imgindex.catalog import FileState, NewImage
from imgindex.files import is_gone, is_under, path_text, resolve


class Entry(NamedTuple):
    """An indexed file, as the planner knows it."""

    id: int
    text: str
    size: int
    mtime: float
    sha: str


@dataclass(frozen=True)
class Decision:
    """What to do with a file that was read: ``action`` is "touched" (``entry`` is its entry),
    "renamed" (``entry`` is the entry to move to it), "copy" (``entry`` is the entry whose stored
    vector to copy) or "embed". ``replaces`` is the entry at the file's path, if any: a copy or
    an embedding replaces it."""

    action: str
    entry: int | None = None
    replaces: Entry | None = None


@dataclass
class Counts:
    """What a build did, by outcome (see :class:`~imgindex.ingest.BuildReport`)."""

    added: int = 0
    updated: int = 0
    renamed: int = 0
    unchanged: int = 0
    reused: int = 0
    skipped_unchanged: int = 0


@dataclass
class SyncPlanner:
    """The sync rules over one build (see the module's docstring). ``entries`` are the index's,
    by the file name's bytes; ``skipped_before`` maps the name of a file an earlier build skipped
    to (its state then, the pixel limit it was read under, the reason); ``remove_missing`` says
    whether entries of gone files are removed (else a moved file found by its content leaves
    its old entry to whatever removes it)."""

    entries: dict[bytes, Entry]
    skipped_before: dict[bytes, tuple[FileState | None, int | None, str]] = field(
        default_factory=dict
    )
    remove_missing: bool = True
    counts: Counts = field(default_factory=Counts)
    gone: dict[int, bytes] = field(default_factory=dict)  # id -> name, of entries to remove
    unlisted: list[Path] = field(default_factory=list)  # folders walking could not list
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.raw_of = {entry.id: raw for raw, entry in self.entries.items()}
        self.by_sha: dict[str, set[int]] = {}
        for entry in self.entries.values():
            self.by_sha.setdefault(entry.sha, set()).add(entry.id)

    @classmethod
    def of_rows(
        cls,
        rows: Iterable[tuple[int, str, bytes, int, float, str]],
        skipped_before: dict[bytes, tuple[FileState | None, int | None, str]] | None = None,
        remove_missing: bool = True,
    ) -> SyncPlanner:
        """A planner for the catalog's ``file_rows()``: (id, text, raw name, size, mtime,
        sha256)."""
        entries = {bytes(raw): Entry(i, text, size, mtime, sha)
                   for i, text, raw, size, mtime, sha in rows}  # fmt: skip
        return cls(entries, skipped_before or {}, remove_missing)

    # -- before reading ---------------------------------------------------------------------

    def unchanged(self, path: Path) -> bool:
        """Whether ``path`` is indexed with its current size and modification time (counted)."""
        entry = self.entries.get(os.fsencode(path))
        if entry is None:
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False  # reading it will say why
        if (st.st_size, st.st_mtime) != (entry.size, entry.mtime):
            return False
        self.counts.unchanged += 1
        return True

    def still_skipped(self, path: Path, read_limit: int) -> str | None:
        """The reason an earlier build skipped ``path``, if it has not changed since and this
        build reads under no higher a pixel limit (it would fail the same way); counted."""
        state, limit, reason = self.skipped_before.get(os.fsencode(path), (None, None, ""))
        if state is None or limit is None or limit < read_limit:
            return None
        try:
            if FileState.of(os.stat(path)) != state:
                return None
        except OSError:
            return None
        self.counts.skipped_unchanged += 1
        return reason

    def find_gone(self, roots: list[Path], walked: set[bytes]) -> None:
        """Find the entries under ``roots`` whose files are gone (see the module's docstring;
        folders that could not be listed are in :attr:`unlisted`). An entry under another name
        of a walked file (a root given through a link) counts as gone, to move to the walked
        name."""
        unlisted = [path_text(f) for f in self.unlisted]
        kept_unlisted = 0
        for raw, entry in self.entries.items():
            if raw in walked or not under(entry.text, roots):
                continue
            if any(is_under(entry.text, folder) for folder in unlisted):
                kept_unlisted += 1
            elif is_gone(raw) or os.fsencode(resolve(os.fsdecode(raw))) in walked:
                self.gone[entry.id] = raw
        if kept_unlisted:
            self.warnings.append(
                f"{kept_unlisted} indexed images are in folders that could not be listed (see "
                "the skipped folders); their entries are kept"
            )
        for root in roots:
            if not _is_empty_folder(root):
                continue
            kept = [i for i, raw in self.gone.items() if under(self.entries[raw].text, [root])]
            for image_id in kept:
                del self.gone[image_id]
            if kept:
                self.warnings.append(
                    f"{path_text(root)} is empty, but {len(kept)} indexed images were in it; "
                    "they are kept (is a drive not mounted?). To drop them: imgindex remove "
                    f"{path_text(root)}"
                )

    def known_shas(self) -> frozenset[str]:
        """The content hashes stored now: a file with one of them need not be decoded."""
        return frozenset(self.by_sha)

    def shas_by_size(self) -> dict[int, set[str]]:
        """The stored content hashes by file size: a file can only have one of the hashes of
        its size (what the Ray engine sends with each path, instead of every hash)."""
        by_size: dict[int, set[str]] = {}
        for entry in self.entries.values():
            by_size.setdefault(entry.size, set()).add(entry.sha)
        return by_size

    def may_all_be_stored(self, todo: list[Path]) -> bool:
        """Whether every file of ``todo`` has the size of an indexed one: perhaps all moved or
        were copied, and no network is needed."""
        sizes = {entry.size for entry in self.entries.values()}
        try:
            return all(os.stat(path).st_size in sizes for path in todo)
        except OSError:
            return False

    # -- after reading ----------------------------------------------------------------------

    def decide(self, path: Path, sha256: str) -> Decision:
        """What to do with the file ``path`` whose content hash is ``sha256``."""
        here = self.entries.get(os.fsencode(path))
        if here is not None and here.sha == sha256:
            return Decision("touched", here.id)
        twins = self.by_sha.get(sha256)
        if not twins:
            return Decision("embed", replaces=here)
        moved = next((i for i in sorted(twins) if i in self.gone), None)
        if moved is None and self.remove_missing:
            # Moved from outside the folders given (a renamed top folder, say): its old file is
            # gone too, and an entry left at that path would only be a stale duplicate.
            moved = next((i for i in sorted(twins) if self._file_is_gone(i)), None)
        if moved is not None:
            return Decision("renamed", moved, here)
        return Decision("copy", min(twins), here)

    def touched(self, entry_id: int, image: NewImage) -> None:
        """The entry ``entry_id`` got ``image``'s size and time (same content)."""
        raw = os.fsencode(image.path)
        self.entries[raw] = self.entries[raw]._replace(size=image.size, mtime=image.mtime)
        self.counts.unchanged += 1

    def moved(self, decision: Decision, image: NewImage) -> None:
        """The entry ``decision.entry`` now names ``image.path``."""
        assert decision.entry is not None
        if decision.replaces is not None:
            self._forget(decision.replaces)
        self.gone.pop(decision.entry, None)
        self.entries.pop(self.raw_of[decision.entry], None)
        self._remember(decision.entry, image)
        self.counts.renamed += 1
        self.counts.reused += 1

    def added(self, new_id: int, image: NewImage, copied: bool = False) -> None:
        """``image`` was indexed under the new id ``new_id`` (embedded, or ``copied``),
        replacing the entry at its path if there was one."""
        previous = self.entries.get(os.fsencode(image.path))
        if previous is not None:
            self._forget(previous)
        self._remember(new_id, image)
        if previous is None:
            self.counts.added += 1
        else:
            self.counts.updated += 1
        if copied:
            self.counts.reused += 1

    def gone_texts(self) -> list[str]:
        """The names of the entries to remove, sorted."""
        return sorted(self.entries[raw].text for raw in self.gone.values())

    def _file_is_gone(self, image_id: int) -> bool:
        raw = self.raw_of.get(image_id)
        return raw is not None and raw in self.entries and is_gone(raw)

    def _remember(self, image_id: int, image: NewImage) -> None:
        raw = os.fsencode(image.path)
        self.entries[raw] = Entry(
            image_id, path_text(image.path), image.size, image.mtime, image.sha256
        )
        self.raw_of[image_id] = raw
        self.by_sha.setdefault(image.sha256, set()).add(image_id)

    def _forget(self, entry: Entry) -> None:
        """The entry was replaced; its vector can no longer be reused."""
        self.by_sha.get(entry.sha, set()).discard(entry.id)
        self.gone.pop(entry.id, None)


def under(text: str, roots: list[Path]) -> bool:
    """Whether the indexed name ``text`` is at or under one of ``roots``."""
    return any(is_under(text, path_text(root)) for root in roots)


def _is_empty_folder(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False  # not a folder, or not listable (walking reported that)
