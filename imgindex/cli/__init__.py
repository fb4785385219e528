"""The ``imgindex`` command: parsing options and formatting output, nothing else.

Every command maps the library's :class:`~imgindex.errors.ImgIndexError` to one line on stderr
and exit status 1 (click's usage errors exit 2, an interrupt 130). Heavy modules (torch, faiss)
are imported only by the commands that need them, so ``--help`` and ``info`` start quickly.
The commands live in one module per group (indexing, searching, reviewing, quality, serving);
``app`` holds the group and the shared options, ``output`` what is printed. They use the library
through :class:`~imgindex.Index` only.
"""

from imgindex.cli import (  # noqa: F401 - commands
    exchange,
    indexing,
    quality,
    reviewing,
    searching,
    serving,
)
from imgindex.cli.app import cli, main
from imgindex.cli.output import ProgressLine, shown
from imgindex.cli.reviewing import DUPLICATE_THRESHOLDS

__all__ = ["DUPLICATE_THRESHOLDS", "ProgressLine", "cli", "main", "shown"]
