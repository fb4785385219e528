"""The ``imgindex`` command: parsing options and formatting output, nothing else.

Every command maps the library's :class:`~imgindex.errors.ImgIndexError` to one line on stderr
and exit status 1 (click's usage errors exit 2, an interrupt 130). Heavy modules (torch, faiss)
are imported only by the commands that need them, so ``--help`` and ``info`` start quickly.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import click

from imgindex.errors import ImageError, ImgIndexError
from imgindex.model import DEVICE_NAME
from imgindex.store import path_text

# ---------------------------------------------------------------------------------------------
# Shared options


def index_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--index",
        "index_path",
        type=click.Path(path_type=Path, file_okay=False),
        envvar="IMGINDEX_INDEX",
        show_envvar=True,
        help="Index folder. Default: ~/.local/share/imgindex/default.",
    )(fn)


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--weights",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar="IMGINDEX_WEIGHTS",
        show_envvar=True,
        help="AugNet checkpoint to use instead of imgsim 0.1.2's model.pth.",
    )(fn)
    fn = click.option(
        "--device",
        default="auto",
        show_default=True,
        callback=_check_device,
        help="Where to run the network: auto (a GPU when there is one), cpu, cuda, cuda:N.",
    )(fn)
    fn = click.option(
        "--precision",
        type=click.Choice(["auto", "fp32", "bf16"]),
        default="auto",
        show_default=True,
        help="bf16 is faster on GPUs and on CPUs with bf16 units (vectors move by a cosine of "
        "about 5e-5). auto: fp32 for the exact preset, bf16 for fast where supported.",
    )(fn)
    return fn


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not DEVICE_NAME.fullmatch(value):
        raise click.BadParameter(f"{value!r}: use auto, cpu, cuda or cuda:N")
    return value


def preset_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--preset",
        type=click.Choice(["exact", "fast"]),
        default=None,
        help="exact: imgsim's preprocessing (short side 350). fast: short side 224 and reduced "
        "JPEG decoding, about 2.5 times faster. Default: the index's own, else exact.",
    )(fn)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)


def metric_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--metric",
        type=click.Choice(["l2", "cosine"]),
        default="l2",
        show_default=True,
        help="l2: Euclidean distance (smaller is closer); cosine: similarity (larger is closer).",
    )(fn)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr; never show a traceback for them."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImgIndexError as exc:
            raise click.ClickException(shown(str(exc))) from None
        except BrokenPipeError:
            # The reader went away (`imgindex eval | head`): stop quietly, as other tools do.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(1)
        except (OSError, sqlite3.Error) as exc:
            # The environment failed (a full disk, a read-only folder, a vanished mount): say
            # so in one line. What was committed before stays committed.
            message = f"{type(exc).__name__}: {exc}"
            if type(exc) is sqlite3.DatabaseError:  # "malformed", "not a database"
                from imgindex.store import DAMAGED, DB_NAME

                message += f" (the index's {DB_NAME} {DAMAGED})"
            raise click.ClickException(shown(message)) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            sys.exit(130)

    return wrapper


# Characters a file name may hold that a terminal acts on: C0 and C1 controls (escape sequences,
# newlines, carriage returns, backspace) and the marks that reorder text (bidirectional
# overrides and isolates, which can make a name read as another).
# Also lone surrogates: the bytes of a name that is not UTF-8, as Python reads a command
# line; printed, they would be those raw bytes again (0x9b is a terminal's CSI).
_REORDERING = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_TERMINAL_CONTROLS = re.compile(f"[\x00-\x1f\x7f-\x9f{_REORDERING}\ud800-\udfff]")
_NOT_ESCAPED_BY_JSON = re.compile(f"[\x7f-\x9f{_REORDERING}\ud800-\udfff]")  # C0 it does


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a name: shown as path_text does
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: str) -> str:
    """``text`` as it may be printed for a person: control characters in it are written as
    ``\\xNN`` / ``\\uNNNN``, so that a file name can neither drive the terminal (clear the
    screen, retitle the window) nor forge lines of a report. Every file name, reason and
    message from the library is printed through this; JSON is exact instead (:func:`print_json`)."""
    return _TERMINAL_CONTROLS.sub(_escape, text)


def display_path(path: str) -> str:
    """A path relative to the current folder when it lies inside it, else absolute; shown
    safely (:func:`shown`)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return shown(path)
    return shown(path if rel.startswith("..") else rel)


def print_json(data: Any) -> None:
    """JSON on stdout. Strings keep every character; those a terminal acts on are written as
    JSON escapes (JSON escapes C0 controls itself; C1 controls and text-reordering marks too,
    here), which decode to the same text."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    click.echo(_NOT_ESCAPED_BY_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


def verbose_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-v", "--verbose", is_flag=True, help="Say on stderr how long each stage took."
    )(fn)


class StageTimer:
    """With --verbose, one line on stderr per finished stage: its name and seconds."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        if self.enabled:
            click.echo(f"{stage}: {now - self._last:.3f} s", err=True)
        self._last = now


# ---------------------------------------------------------------------------------------------
# Progress


class StatusLine:
    """A status line on stderr: rewritten in place on a terminal, at most every ``interval``
    seconds; elsewhere (a log file, a job scheduler) printed as a plain line every ``log_every``
    seconds, or not at all without it."""

    def __init__(self, enabled: bool, interval: float, log_every: float | None = None):
        self.terminal = sys.stderr.isatty()
        self.enabled = enabled and (self.terminal or log_every is not None)
        self.interval = interval if self.terminal else (log_every or 0.0)
        self._last = 0.0
        self._width = 0

    def due(self, force: bool = False) -> bool:
        """Whether to show a new line now (always with ``force``)."""
        now = time.monotonic()
        if not self.enabled or (now - self._last < self.interval and not force):
            return False
        self._last = now
        return True

    def show(self, text: str) -> None:
        if self.terminal:
            click.echo("\r" + text.ljust(self._width), nl=False, err=True)
            self._width = len(text)
        else:
            click.echo(text, err=True)

    def clear(self) -> None:
        if self.enabled and self._width:
            click.echo("\r" + " " * self._width + "\r", nl=False, err=True)
            self._width = 0


class ProgressLine(StatusLine):
    """Embedding progress with a bar, images/s and the time left, on a terminal only."""

    def __init__(self, enabled: bool):
        super().__init__(enabled, interval=0.2)

    def __call__(self, state: Any) -> None:
        if not self.due(force=state.done >= state.total or state.loading_model):
            return
        if state.loading_model:
            self.show(f"Loading the model ... ({_count(state.total, 'file')} to read)")
            return
        rate = state.images_per_second
        remaining = state.total - state.done
        eta = f"  ETA {_duration(remaining / rate)}" if rate > 0 and remaining else ""
        width = 24
        filled = int(width * state.done / state.total) if state.total else width
        bar = "#" * filled + "-" * (width - filled)
        speed = f"  {rate:.1f} images/s" if rate > 0 else ""  # none until one is measured
        self.show(
            f"Embedding [{bar}] {state.done}/{state.total}{speed}  {_duration(state.elapsed)}{eta}"
        )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# ---------------------------------------------------------------------------------------------
# Commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imgindex")
def cli() -> None:
    """Find similar images with AugNet vectors in a FAISS index.

    \b
    imgindex build ~/Pictures           index a folder (again: only what changed)
    imgindex query photo.jpg            the 10 most similar indexed images
    imgindex distance a.jpg b.jpg c.jpg pairwise distances, no index needed
    imgindex info                       what an index holds
    imgindex similar 42                 images like indexed image 42 (no model loaded)
    imgindex duplicates                 groups of near-identical images
    imgindex check                      verify an index (repair fixes it)
    imgindex eval labelled/             retrieval quality (mAP, recall@k) on labelled images
    imgindex train pics/ --out ft.pth   fine-tune AugNet on a collection, no labels needed
    """
    # Our own pixel limit (--max-pixels), checked on every header before decoding, is the one
    # that applies: Pillow's (a warning at 89 MP, a refusal at 179 MP) would only add noise,
    # or refuse what the user allowed with --max-pixels.
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None


def max_pixels_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--max-pixels",
        default=None,
        type=click.IntRange(1),
        help="Refuse images larger than this many pixels, before decoding. Default: 89,478,485.",
    )(fn)


def ingest_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option(
                "--batch-size",
                default=None,
                type=click.IntRange(1),
                help="Images per forward pass. Default: 2 on a CPU, 64 on a GPU.",
            ),
            click.option(
                "--workers",
                default=None,
                type=click.IntRange(0),
                help="Threads reading and decoding images ahead of the network. Default: 0 on "
                "a CPU (read between forward passes), all cores but two (up to 16) with a GPU.",
            ),
            click.option(
                "--decode",
                type=click.Choice(["cpu", "device"]),
                default="cpu",
                show_default=True,
                help="device: decode JPEGs in batches where the network runs (nvJPEG on a GPU; "
                "vectors move by a cosine of about 5e-5). Other formats are decoded on the CPU.",
            ),
            max_pixels_option,
            click.option(
                "--strict", is_flag=True, help="Exit with status 1 if any file was skipped."
            ),
            click.option("--progress/--no-progress", default=True, help="Progress on a terminal."),
            click.option(
                "--retry-skipped",
                is_flag=True,
                help="Read again the files earlier builds skipped (by default only those whose "
                "size or times changed since, or with a higher --max-pixels).",
            ),
            click.option(
                "--private",
                is_flag=True,
                help="Make the index folder readable by you alone (0700): it holds the full "
                "paths of your images. New index folders are private anyway when the folder "
                "they are made in is.",
            ),
            click.option(
                "--dry-run",
                is_flag=True,
                help="Say what would be read and removed; change nothing (reads no image).",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def wait_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--wait",
        default=0.0,
        type=click.FloatRange(0),
        metavar="SECONDS",
        help="If another process is writing to the index, wait this long for it. Default: 0.",
    )(fn)


def _say_waiting(holder: str) -> None:
    click.echo(f"Waiting for the index lock, held by {shown(holder)} ...", err=True)


@cli.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option
@model_options
@preset_option
@ingest_options
@verbose_option
@click.option(
    "--keep-missing",
    is_flag=True,
    help="Keep the entries of files that no longer exist (default: remove them).",
)
@click.option(
    "--index-type",
    default=None,
    help="auto (default for a new index), flat (exact), hnsw, ivf-flat, ivf-pq, with optional "
    "parameters (hnsw:M=48, ivf-pq:nlist=4096,m=32), or factory:STRING for a FAISS factory "
    "string. Changing it on an existing index rebuilds the vector index without re-embedding.",
)
@click.option(
    "--index-metric",
    type=click.Choice(["l2", "cosine"]),
    default="l2",
    show_default=True,
    help="The metric an approximate index is built for (the flat index serves both).",
)
@wait_option
@json_option
@user_errors
def build(
    folders: tuple[Path, ...],
    keep_missing: bool,
    index_type: str | None,
    index_metric: str,
    **options: Any,
) -> None:
    """Index the images in FOLDERS (recursively; files may be named too).

    Creates the index if it does not exist. Running it again brings the index up to date:
    new and changed files are embedded, moved or copied files reuse their stored vectors, and
    entries of files that no longer exist under FOLDERS are removed (see --keep-missing).
    Unreadable files are skipped and listed at the end; they never stop the build.
    """
    try:
        spec = None if index_type is None else _parse_index_type(index_type, index_metric)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--index-type") from None
    _ingest(folders, remove_missing=not keep_missing, index_type=spec, **options)


def _parse_index_type(text: str, metric: str) -> Any:
    from imgindex.ann import parse_index_type
    from imgindex.model import EMBEDDING_DIM

    parsed = parse_index_type(text, metric)
    if parsed is not None:
        parsed.check(EMBEDDING_DIM)  # every AugNet backbone embeds in 768 numbers
    return "auto" if parsed is None else parsed


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option
@model_options
@preset_option
@ingest_options
@verbose_option
@wait_option
@json_option
@user_errors
def add(paths: tuple[Path, ...], **options: Any) -> None:
    """Add or update the images in PATHS (files or folders); removes nothing."""
    _ingest(paths, remove_missing=False, **options)


def _ingest(
    paths: tuple[Path, ...],
    *,
    remove_missing: bool,
    index_path: Path | None,
    weights: Path | None,
    device: str,
    precision: str,
    preset: str | None,
    batch_size: int | None,
    workers: int | None,
    decode: str,
    max_pixels: int | None,
    strict: bool,
    progress: bool,
    wait: float,
    verbose: bool,
    as_json: bool,
    retry_skipped: bool,
    private: bool,
    dry_run: bool,
    index_type: Any = None,
) -> None:
    from imgindex.errors import IndexExistsError
    from imgindex.index import Index, default_index_path
    from imgindex.store import database_state, disk_usage

    timer = StageTimer(verbose)

    _require_existing(paths, "PATHS")
    location = index_path or default_index_path()
    created = database_state(location) != "complete"
    if dry_run:
        _dry_run(paths, location, created, remove_missing, retry_skipped, as_json)
        return
    args = {"weights": weights, "device": device, "batch_size": batch_size}
    args.update({"precision": precision, "preset": preset})
    spec = None if index_type == "auto" else index_type
    if created:
        try:
            index = Index.create(
                location, index_type=spec, wait=wait, on_wait=_say_waiting, private=private,
                **args,
            )  # fmt: skip
        except IndexExistsError:
            created = False  # another process created it a moment ago
    if not created:
        index = Index.open(location, create=True, private=private, **args)
        if index_type is not None:
            index.set_index_type(spec, wait=wait, on_wait=_say_waiting)
    with index:
        if created and not as_json:
            click.echo(f"Created index {shown(str(location))}", err=True)
        # A new index loads the model to record its weights; an existing one loads it only if
        # some file needs reading (the breakdown below says how long that took).
        timer.done("create index and load the model" if created else "open index")
        bar = ProgressLine(progress and not as_json)
        try:
            report = index.sync(
                paths,
                progress=bar,
                workers=workers,
                max_pixels=max_pixels,
                remove_missing=remove_missing,
                decode=decode,
                wait=wait,
                on_wait=_say_waiting,
                retry_skipped=retry_skipped,
            )
        except KeyboardInterrupt:
            bar.clear()
            # Every batch committed before the interruption is kept (and its FAISS file saved).
            click.echo(
                f"\nInterrupted. The index keeps what was committed "
                f"({_count(index.count(), 'image')} now); the same command goes on from there.",
                err=True,
            )
            sys.exit(130)
        finally:
            bar.clear()
        timer.done("walk, read, embed and commit")
        if verbose:
            _print_stages(report, index.vectorizer.device if report.embedded else "cpu")
    if as_json:
        print_json({"index": str(location), **report.as_dict()})
    else:
        # Measured once closed: closing folds the write-ahead log into the database.
        _print_report(report, location, sum(disk_usage(location).values()))
    if strict and report.skipped:
        raise click.ClickException(f"--strict: {len(report.skipped)} file(s) were skipped")


def _dry_run(
    paths: tuple[Path, ...],
    location: Path,
    new: bool,
    remove_missing: bool,
    retry_skipped: bool,
    as_json: bool,
) -> None:
    """--dry-run: what a build (or add) would read and remove; nothing is changed."""
    from imgindex.files import resolve_roots, walk_images
    from imgindex.index import Index

    if new:
        found = [path_text(p) for p in walk_images(resolve_roots(paths)[0])]
        if as_json:
            print_json({"index": str(location), "dry_run": True, "new_index": True,
                        "to_read": found, "to_remove": []})  # fmt: skip
        else:
            click.echo(
                f"Dry run: no index at {shown(str(location))} yet; a build would create it and "
                f"read {_count(len(found), 'file')}. Nothing was changed."
            )
        return
    with Index.open(location) as index:
        report = index.sync(
            paths, remove_missing=remove_missing, retry_skipped=retry_skipped, dry_run=True
        )
    if as_json:
        print_json({"index": str(location), **report.as_dict()})
        return
    click.echo(
        f"Dry run: {_count(len(report.to_read), 'file')} to read (new, changed or moved), "
        f"{_count(len(report.to_remove), 'entry')} for files that no longer exist (a build "
        f"removes them, but for moved files, which keep theirs), {report.unchanged} unchanged, "
        f"{len(report.skipped)} skipped ({report.skipped_unchanged} of them unchanged since an "
        "earlier build). Nothing was changed."
    )
    for title, names in (("To read", report.to_read), ("Gone", report.to_remove)):
        if names:
            click.echo(f"{title}:")
            for name in names[:20]:
                click.echo(f"  {display_path(name)}")
            if len(names) > 20:
                click.echo(f"  ... and {len(names) - 20} more (--json lists all)")


def _require_existing(paths: Iterable[Path], param_hint: str) -> None:
    """A usage error naming the first of ``paths`` that does not exist (a broken link exists)."""
    for path in paths:
        if not os.path.lexists(path):
            raise click.BadParameter(
                f"{shown(str(path))}: no such file or folder", param_hint=param_hint
            )


def _print_stages(report: Any, device: str) -> None:
    """--verbose: where the building thread's time went, and what limited the build."""
    from imgindex.ingest import STAGES

    stages = report.stage_seconds
    for stage in STAGES:
        if stage in stages:
            click.echo(f"  {stage}: {stages[stage]:.3f} s", err=True)
    other = report.seconds - sum(stages.values())
    click.echo(f"  other (walking, comparing with the index, removing): {other:.3f} s", err=True)
    reading, network = stages.get("reading", 0.0), stages.get("network", 0.0)
    if device != "cpu" and report.embedded and reading > max(network, 0.25 * report.seconds):
        click.echo(
            "  Reading the files limited this build, not the network: try more --workers, "
            "or --decode device for JPEGs.",
            err=True,
        )


def _count(n: int, noun: str) -> str:
    """``1 image``, ``2 images``; ``1 entry``, ``2 entries``."""
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{n} {noun if n == 1 else plural}"


def _print_report(report: Any, location: Path, bytes_on_disk: int) -> None:
    counts = (
        f"{report.added} added, {report.updated} updated, {report.renamed} renamed, "
        f"{report.removed} removed, {report.unchanged} unchanged, {len(report.skipped)} skipped"
    )
    if report.embedded:
        click.echo(
            f"Embedded {_count(report.embedded, 'image')} in {report.seconds:.1f} s "
            f"({report.images_per_second:.1f} images/s): {counts}."
        )
    else:
        click.echo(f"Nothing to embed ({report.seconds:.1f} s): {counts}.")
    if report.reused:
        click.echo(f"Reused the stored vectors of {report.reused} moved or copied files.")
    if report.skipped:
        again = ""
        if report.skipped_unchanged:
            again = (
                f" ({report.skipped_unchanged} skipped before and unchanged since, not read "
                "again; --retry-skipped reads them)"
            )
        click.echo(f"Skipped {len(report.skipped)} file(s){again}:")
        for item in report.skipped[:20]:
            click.echo(f"  {display_path(item.path)}: {shown(item.reason)}")
        if len(report.skipped) > 20:
            click.echo(f"  ... and {len(report.skipped) - 20} more (imgindex info --skipped)")
    for warning in report.warnings:
        click.echo(f"Warning: {shown(warning)}")
    for note in report.notes:
        click.echo(f"Note: {shown(note)}")
    click.echo(
        f"Index {shown(str(location))}: {_count(report.total, 'image')}, "
        f"{_size(bytes_on_disk)} on disk."
    )


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option
@wait_option
@click.option("--dry-run", is_flag=True, help="Say how many entries would go; change nothing.")
@click.option("--yes", is_flag=True, help="Remove every entry without asking, if PATHS say so.")
@json_option
@user_errors
def remove(
    paths: tuple[Path, ...],
    index_path: Path | None,
    wait: float,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Remove the entries of PATHS (files, or folders: all entries under them) from the index.

    The files themselves are not touched, and need not exist any more. Removing every entry
    (`imgindex remove /`, say) asks first, or needs --yes.
    """
    with _open_index(index_path) as index:
        going = index.remove(paths, dry_run=True)
        total = index.count()
        if not dry_run and going and going == total and not yes:
            _confirm_removing_everything(index, total)
        removed = going if dry_run else index.remove(paths, wait=wait, on_wait=_say_waiting)
        remaining = index.count()
    if as_json:
        print_json({"removed": removed, "total": remaining, "dry_run": dry_run})
    elif dry_run:
        click.echo(
            f"Dry run: {_count(removed, 'entry')} would be removed; "
            f"{_count(total - removed, 'image')} would remain. Nothing was changed."
        )
    else:
        click.echo(f"Removed {_count(removed, 'entry')}; {_count(remaining, 'image')} remain.")
        if not removed:
            click.echo("(Nothing indexed is under those paths: imgindex info shows the index.)")


def _confirm_removing_everything(index: Any, total: int) -> None:
    question = f"This removes all {_count(total, 'entry')} of {shown(str(index.path))}. Go on?"
    if not sys.stdin.isatty():
        raise click.UsageError(
            f"this would remove all {_count(total, 'entry')} of the index; add --yes to do so"
        )
    if not click.confirm(question, default=False, err=True):
        raise click.ClickException("nothing was removed")


@cli.command()
@index_option
@click.option(
    "--weights",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="IMGINDEX_WEIGHTS",
    help="The weights queries will use (checked against the index).",
)
@click.option("--no-files", is_flag=True, help="Do not check that the indexed files exist.")
@json_option
@user_errors
def check(index_path: Path | None, weights: Path | None, no_files: bool, as_json: bool) -> None:
    """Verify an index: rows against vectors, the FAISS file, the weights, missing files.

    Exits with status 1 if anything is wrong; `imgindex repair` fixes what it can.
    """
    from imgindex.store import FAISS_NAME

    with _open_index(index_path, weights=weights) as index:
        report = index.check(check_files=not no_files)
        location = index.path
    if as_json:
        print_json({"index": str(location), **report.as_dict()})
    else:
        faiss_file = "none" if report.faiss_file is None else str(report.faiss_file)
        click.echo(
            f"Index {shown(str(location))}: {report.images} images, {report.vectors} stored "
            f"vectors, {faiss_file} in {FAISS_NAME}"
        )
        for problem in report.problems:
            click.echo(f"  problem: {shown(problem)}")
        for warning in report.warnings:
            click.echo(f"  warning: {shown(warning)}")
        if report.missing_files:
            click.echo(
                f"  problem: {len(report.missing_files)} indexed files no longer exist "
                "(`imgindex build` on their folder or `imgindex repair --remove-missing` "
                "removes their entries):"
            )
            for text in report.missing_files[:20]:
                click.echo(f"    {display_path(text)}")
            if len(report.missing_files) > 20:
                click.echo(f"    ... and {len(report.missing_files) - 20} more")
        click.echo("OK" if report.ok else "The index has problems.")
    if not report.ok:
        sys.exit(1)


@cli.command()
@index_option
@click.option(
    "--remove-missing", is_flag=True, help="Also remove the entries of files that no longer exist."
)
@wait_option
@json_option
@user_errors
def repair(index_path: Path | None, remove_missing: bool, wait: float, as_json: bool) -> None:
    """Fix what can be fixed without re-embedding: rebuild the FAISS file from the stored
    vectors, drop rows without a usable vector and vectors without a row, delete leftover
    temporary files."""
    with _open_index(index_path) as index:
        done = index.repair(remove_missing=remove_missing, wait=wait, on_wait=_say_waiting)
        remaining = index.count()
    if as_json:
        print_json({**done, "total": remaining})
        return
    for key, value in done.items():
        click.echo(f"{key.replace('_', ' ')}: {value}")
    if done["rows_without_vector_removed"]:
        click.echo("Run `imgindex build` on their folders to embed the removed images again.")
    click.echo(f"Repaired; {remaining} images.")


def search_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("-k", "--top", "k", default=10, show_default=True, type=click.IntRange(1)),
            click.option(
                "--max-distance",
                type=click.FloatRange(0),
                help="Only results at most this L2 distance away (l2).",
            ),
            click.option(
                "--min-similarity",
                type=click.FloatRange(-1, 1),
                help="Only results at least this similar (cosine).",
            ),
            click.option(
                "--under",
                type=click.Path(path_type=Path),
                help="Only images whose path is under this folder (or is this file).",
            ),
            click.option(
                "--nprobe",
                type=click.IntRange(1),
                help="IVF indexes: lists to visit (more: better recall, slower).",
            ),
            click.option(
                "--ef-search",
                type=click.IntRange(1),
                help="HNSW indexes: candidates to keep while searching (more: better recall).",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _warn_if_missing(under: Path | None) -> None:
    if under is not None and not os.path.lexists(under):
        click.echo(
            f"Warning: --under {shown(str(under))}: no such folder or file; only images indexed "
            "under that name can match",
            err=True,
        )


def example_options(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--like / --unlike (``kind``: what an example is) and --sheet."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(
            [
                click.option(
                    "--like",
                    "like",
                    multiple=True,
                    help=f"Another example to be like ({kind}; repeatable): one query combined "
                    "from all of them and IMAGES.",
                ),
                click.option(
                    "--unlike",
                    "unlike",
                    multiple=True,
                    help=f"An example to be unlike ({kind}; repeatable). The combined query is "
                    "(1 + w) mean(like) - w mean(unlike), w = 0.5 (see the README).",
                ),
                click.option(
                    "--sheet",
                    type=click.Path(path_type=Path, dir_okay=False),
                    help="Also write the answer as a contact sheet (JPEG or PNG): the query, "
                    "then each result with rank, score and file name. Several queries: "
                    "SHEET-1.jpg, SHEET-2.jpg, ...",
                ),
            ]
        ):
            fn = option(fn)
        return fn

    return decorate


def _search_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """The library's search options from the command's; warns of an --under that names
    nothing on disk (a typo would otherwise just give no results)."""
    _warn_if_missing(options["under"])
    if options["max_distance"] is not None and options["metric"] != "l2":
        raise click.UsageError("--max-distance goes with --metric l2; use --min-similarity")
    if options["min_similarity"] is not None and options["metric"] != "cosine":
        raise click.UsageError("--min-similarity goes with --metric cosine; use --max-distance")
    return {
        key: options[key]
        for key in ("k", "metric", "max_distance", "min_similarity", "under", "nprobe", "ef_search")
    }


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option
@model_options
@max_pixels_option
@metric_option
@search_options
@example_options("an image file")
@verbose_option
@json_option
@user_errors
def query(
    images: tuple[Path, ...],
    index_path: Path | None,
    weights: Path | None,
    device: str,
    precision: str,
    max_pixels: int | None,
    verbose: bool,
    as_json: bool,
    like: tuple[str, ...],
    unlike: tuple[str, ...],
    sheet: Path | None,
    **options: Any,
) -> None:
    """Show the K indexed images most similar to each of IMAGES.

    With --like / --unlike (more image files), one query is made of them all: images like
    IMAGES and the --like ones, and unlike the --unlike ones.
    """
    search = _search_kwargs(options)
    timer = StageTimer(verbose)
    model = {"weights": weights, "device": device, "precision": precision, "max_pixels": max_pixels}
    combined = bool(like or unlike)
    examples = [*images, *(Path(p) for p in like), *(Path(p) for p in unlike)]
    if combined:
        _require_existing(examples, "--like/--unlike")
    with _open_index(index_path, **model) as index:
        timer.done("open index")
        index.vectorizer  # noqa: B018 - load the model now, so its time is reported apart
        timer.done("load model")
        asked = examples if combined else list(images)
        vectors, failed = _embed_each(index.vectorizer, asked)
        timer.done(f"embed {len(asked)} image(s)")
        if combined and failed:
            for n in sorted(failed):
                click.echo(f"Error: {shown(str(failed[n]))}", err=True)
            raise ImgIndexError("an example could not be read: no combined query was made")
        if combined:
            from imgindex.search import combine_examples

            positives = len(images) + len(like)
            vectors = combine_examples(vectors[:positives], vectors[positives:], search["metric"])
        hits = index.search_by_vector(vectors[None, :] if combined else vectors, **search) \
            if len(vectors) else []  # fmt: skip
        timer.done("search")
        total = index.count()
        sheets = []
        if sheet is not None:
            queries = [examples[0]] if combined else [images[n] for n in range(len(images))
                                                       if n not in failed]  # fmt: skip
            shown_examples = (
                examples[: len(images) + len(like)],
                examples[len(images) + len(like) :],
            )
            sheets = _write_sheets(sheet, index, queries, hits, search["metric"],
                                   shown_examples if combined else None)  # fmt: skip
    if combined:
        names = [path_text(os.path.abspath(p)) for p in examples]
        positive, negative = names[: len(images) + len(like)], names[len(images) + len(like) :]
        _print_combined(positive, negative, hits, total, search["metric"], as_json)
        _say_written(sheets)
        return
    good = [n for n in range(len(images)) if n not in failed]
    queries = [path_text(os.path.abspath(images[n])) for n in good]
    errors = {n: {"query": path_text(os.path.abspath(images[n])), "error": failed[n].reason}
              for n in failed}  # fmt: skip
    labels = [shown(str(images[n])) for n in good]
    _print_hits(queries, labels, hits, total, search["metric"], as_json, errors)
    _say_written(sheets)
    for n in sorted(failed):
        click.echo(f"Error: {shown(str(failed[n]))}", err=True)
    if failed:
        sys.exit(1)


def _say_written(sheets: list[Path]) -> None:
    for sheet in sheets:
        click.echo(f"Wrote the contact sheet {shown(str(sheet))}", err=True)


def _print_combined(
    like: list[str], unlike: list[str], hits: list[Any], total: int, metric: str, as_json: bool
) -> None:
    """The answer to one query combined from examples, named ``like a.jpg, b.jpg; unlike
    c.jpg`` (in JSON, with the lists of examples as ``like`` and ``unlike``)."""

    def name(show: Callable[[str], str]) -> str:
        text = "like " + ", ".join(show(p) for p in like)
        return text + ("; unlike " + ", ".join(show(p) for p in unlike) if unlike else "")

    extra = [{"like": like, "unlike": unlike}]
    _print_hits([name(str)], [name(display_path)], hits, total, metric, as_json, extra=extra)


def _write_sheets(
    path: Path,
    index: Any,
    queries: list[Any],
    hits: list[Any],
    metric: str,
    examples: tuple[list[Any], list[Any]] | None = None,
) -> list[Path]:
    """A contact sheet per answer (SHEET, or SHEET-1, SHEET-2, ... for several): the query's
    picture (a file to read, or an indexed id), or for a combined query each of its examples
    (``examples``: to be like, to be unlike), then each hit's thumbnail and labels. Returns
    the files written."""
    import io

    from PIL import Image

    from imgindex.sheet import Cell, save_sheet
    from imgindex.thumbnails import render_file

    def indexed(image_id: int) -> Any:
        thumbnail = index.thumbnail(image_id)
        return None if thumbnail.problem and thumbnail.content_type != "image/jpeg" \
            else Image.open(io.BytesIO(thumbnail.data))  # fmt: skip

    column = "distance" if metric == "l2" else "similarity"
    written = []

    def example(query: Any) -> tuple[Any, str]:
        if isinstance(query, int):
            return indexed(query), index.get(query).path
        try:
            return render_file(query, 256, index.vectorizer.max_pixels), str(query)
        except ImgIndexError:
            return None, str(query)

    for n, (query, found) in enumerate(zip(queries, hits, strict=True), start=1):
        if examples is None:
            picture, name = example(query)
            cells = [Cell(picture, ["query", os.path.basename(name)], framed=True)]
        else:
            cells = []
            for kind, group in zip(("like", "unlike"), examples, strict=True):
                for item in group:
                    picture, name = example(item)
                    cells.append(Cell(picture, [kind, os.path.basename(name)],
                                      framed=kind == "like", unlike=kind == "unlike"))  # fmt: skip
        cells += [Cell(indexed(h.id), [f"{h.rank}. {column} {h.score:.4f}",
                                       os.path.basename(h.path)]) for h in found]  # fmt: skip
        target = path if len(queries) == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        save_sheet(target, cells)
        written.append(target)
    return written


def _embed_each(vectorizer: Any, images: Sequence[Path]) -> tuple[Any, dict[int, ImageError]]:
    """Vectors of the readable ``images`` and the error of each other one (by position): one
    unreadable query image does not cost the answers for the others."""
    import numpy as np

    try:
        return vectorizer.vectorize(list(images)), {}
    except ImageError:
        pass
    rows, failed = [], {}
    for n, image in enumerate(images):
        try:
            rows.append(vectorizer.vectorize(image))
        except ImageError as exc:
            failed[n] = exc
    return (np.stack(rows) if rows else np.empty((0, vectorizer.dim), np.float32)), failed


@cli.command()
@click.argument("images", nargs=-1, required=True)
@index_option
@metric_option
@search_options
@example_options("an id or an indexed path")
@verbose_option
@json_option
@user_errors
def similar(
    images: tuple[str, ...],
    index_path: Path | None,
    verbose: bool,
    as_json: bool,
    like: tuple[str, ...],
    unlike: tuple[str, ...],
    sheet: Path | None,
    **options: Any,
) -> None:
    """Show the images most similar to indexed IMAGES, given by id or path.

    Uses their stored vectors (nothing is embedded, no model is loaded) and leaves each image
    out of its own results. With --like / --unlike (more indexed images), one query is made of
    them all, leaving every example out of the results.
    """
    search = _search_kwargs(options)
    timer = StageTimer(verbose)
    with _open_index(index_path) as index:
        timer.done("open index")
        if like or unlike:
            _similar_combined(index, [*images, *like], list(unlike), search, as_json, sheet)
            return
        found, keys, labels, errors, ids = [], [], [], {}, []
        for n, image in enumerate(images):
            record = _indexed(index, image)
            if record is None:
                # Named as given; the others are answered (as query does for unreadable images).
                errors[n] = f"not in the index {index.path} (give an id or an indexed path)"
                continue
            found.append(index.similar(record.id, **search))
            ids.append(record.id)
            # Named as the index names it, in JSON as in the results; by id: with its path too.
            keys.append(record.path)
            text = display_path(record.path)
            labels.append(f"{shown(image)} ({text})" if _is_id(image) else text)
        timer.done("search")
        total = index.count()
        sheets = _write_sheets(sheet, index, ids, found, search["metric"]) if sheet else []
    entries = {n: {"query": images[n], "error": reason} for n, reason in errors.items()}
    _print_hits(keys, labels, found, total, search["metric"], as_json, entries)
    _say_written(sheets)
    for n in sorted(errors):
        click.echo(f"Error: {shown(images[n])}: {shown(errors[n])}", err=True)
    if errors:
        sys.exit(1)


def _indexed(index: Any, image: str) -> Any:
    """The record of an indexed image named by id (ASCII digits) or path, or None."""
    try:
        return index.get(int(image)) if _is_id(image) else index.find(image)
    except KeyError:
        return None


def _similar_combined(
    index: Any, like: list[str], unlike: list[str], search: dict[str, Any], as_json: bool,
    sheet: Path | None,
) -> None:  # fmt: skip
    records = {name: _indexed(index, name) for name in [*like, *unlike]}
    unknown = [name for name, record in records.items() if record is None]
    if unknown:
        raise ImgIndexError(
            f"{', '.join(shown(n) for n in unknown)}: not in the index {index.path} (give ids "
            "or indexed paths); no combined query was made"
        )
    options = {key: value for key, value in search.items() if key not in ("k", "metric")}
    hits = index.search_like(
        [records[n].id for n in like], [records[n].id for n in unlike], k=search["k"],
        metric=search["metric"], **options,
    )  # fmt: skip
    sheets = []
    if sheet is not None:
        sheets = _write_sheets(sheet, index, [records[like[0]].id], [hits], search["metric"])
    total = index.count()
    like_paths, unlike_paths = [records[n].path for n in like], [records[n].path for n in unlike]
    _print_combined(like_paths, unlike_paths, [hits], total, search["metric"], as_json)
    _say_written(sheets)


def _is_id(text: str) -> bool:
    """Whether ``similar`` takes ``text`` as an image id: ASCII digits only (Python's int()
    would also read other scripts' digits)."""
    return text.isascii() and text.isdigit()


def _print_hits(
    keys: list[str],
    labels: list[str],
    hits: list[Any],
    total: int,
    metric: str,
    as_json: bool,
    errors: dict[int, dict[str, str]] | None = None,
    extra: list[dict[str, Any]] | None = None,
) -> None:
    """Results per query; ``errors`` are the entries, by position among all queries, of those
    that could not be read (--json lists them in their place); ``extra``, more keys for each
    query's JSON entry."""
    if as_json:
        entries = [
            {"query": key, **(extra[n] if extra else {}), "metric": metric,
             "results": [h.as_dict() for h in found]}
            for n, (key, found) in enumerate(zip(keys, hits, strict=True))
        ]  # fmt: skip
        for position in sorted(errors or {}):
            entries.insert(position, (errors or {})[position])
        print_json(entries)
        return
    column = "distance" if metric == "l2" else "similarity"
    for n, (label, found) in enumerate(zip(labels, hits, strict=True)):
        if n:
            click.echo()
        click.echo(f"Query {label} ({metric}, {len(found)} nearest of {total})")
        if not found:
            click.echo("  (no results)" if total else "  (the index is empty)")
            continue
        click.echo(f"{'rank':>4}  {column:>10}  {'id':>6}  path")
        for hit in found:
            click.echo(f"{hit.rank:>4}  {hit.score:>10.4f}  {hit.id:>6}  {display_path(hit.path)}")


@cli.command()
@index_option
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="L2 distance at most this (default 6.0), or cosine similarity at least this "
    "(default 0.97). See the README for what these mean on real photos.",
)
@metric_option
@click.option("--under", type=click.Path(path_type=Path), help="Only images under this folder.")
@click.option(
    "--neighbors",
    default=16,
    show_default=True,
    type=click.IntRange(1),
    help="Approximate indexes: neighbours each image asks for.",
)
@click.option("--csv", "as_csv", is_flag=True, help="One line per image: group,id,path.")
@click.option(
    "--all",
    "include_reviewed",
    is_flag=True,
    help="Also the groups already decided on (imgindex review), and images marked for removal.",
)
@click.option(
    "--sheet",
    "sheet_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Also write a contact sheet of each group into this folder (group-001.jpg, ...).",
)
@json_option
@user_errors
def duplicates(
    index_path: Path | None,
    threshold: float | None,
    metric: str,
    under: Path | None,
    neighbors: int,
    as_csv: bool,
    include_reviewed: bool,
    sheet_dir: Path | None,
    as_json: bool,
) -> None:
    """Find groups of near-identical images in the index (resized, recompressed, lightly
    cropped copies), with the distances inside each group.

    Groups decided on with `imgindex review` (or on the web page) are not shown again; --all
    shows them too.
    """
    if threshold is None:
        threshold = DUPLICATE_THRESHOLDS[metric]
    from imgindex.duplicates import check_threshold

    try:
        check_threshold(threshold, metric)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--threshold") from None
    _warn_if_missing(under)
    with _open_index(index_path) as index:
        groups = index.duplicates(
            threshold, metric, under=under, neighbors=neighbors, include_reviewed=include_reviewed
        )
        sheets = _group_sheets(index, groups, sheet_dir, metric) if sheet_dir else []
    if as_json:
        print_json(
            {
                "metric": metric,
                "threshold": threshold,
                "groups": [g.as_dict() for g in groups],
            }
        )
        return
    if as_csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")  # a line as other output is
        writer.writerow(["group", "id", "path"])
        # Exact names for a file or a pipe; on a terminal, shown safely like everything else.
        name = shown if sys.stdout.isatty() else str
        for number, group in enumerate(groups, start=1):
            for image_id, path in zip(group.ids, group.paths, strict=True):
                writer.writerow([number, image_id, name(path)])
        return
    kind = "distance" if metric == "l2" else "similarity"
    comparison = "<=" if metric == "l2" else ">="
    images = sum(len(g.ids) for g in groups)
    counts = f"{_count(len(groups), 'group')}, {_count(images, 'image')}"
    click.echo(f"{counts} ({kind} {comparison} {threshold:g})")
    for number, group in enumerate(groups, start=1):
        decided = " (decided)" if group.reviewed else ""
        click.echo(f"\nGroup {number}: {len(group.ids)} images{decided}")
        for image_id, path in zip(group.ids, group.paths, strict=True):
            mark = ""
            if image_id in group.marked:
                mark = f"  (marked for removal, keep {group.marked[image_id]})"
            click.echo(f"  {image_id:>6}  {display_path(path)}{mark}")
        for a, b, value in group.pairs[:50]:
            click.echo(f"    {a} ~ {b}: {value:.4f}")
        if len(group.pairs) > 50:
            click.echo(f"    ... and {len(group.pairs) - 50} more pairs (--json lists all)")
    if any(not g.reviewed for g in groups) and not as_json:
        click.echo(
            "\nDecide on a group: imgindex review keep ID (the others are marked for removal) "
            "or imgindex review different ID."
        )
    _say_written(sheets)


def _group_sheets(index: Any, groups: list[Any], folder: Path, metric: str) -> list[Path]:
    """A contact sheet per duplicate group: its images, each with its id and file name."""
    import io

    from PIL import Image

    from imgindex.sheet import Cell, save_sheet

    written = []
    for number, group in enumerate(groups, start=1):
        cells = []
        for image_id, path in zip(group.ids, group.paths, strict=True):
            thumbnail = index.thumbnail(image_id)
            picture = Image.open(io.BytesIO(thumbnail.data)) if thumbnail.content_type == \
                "image/jpeg" else None  # fmt: skip
            cells.append(Cell(picture, [f"id {image_id}", os.path.basename(path)]))
        written.append(save_sheet(folder / f"group-{number:03d}.jpg", cells))
    return written


# What the thresholds mean is measured by benchmarks/duplicates.py and shown in the README.
DUPLICATE_THRESHOLDS = {"l2": 6.0, "cosine": 0.97}


@cli.group()
def review() -> None:
    """Decide on duplicate groups; decisions are kept in the index.

    \b
    imgindex review keep 42             42's group: keep 42, mark the others for removal
    imgindex review keep 42 57 61       the group 42, 57, 61: keep 42
    imgindex review different 42        42's group is not duplicates
    imgindex review undo 42             forget the decisions on 42 (its group comes back)
    imgindex review list --csv          the files marked for removal, and what is kept
    imgindex review move ~/to-delete    move those files there (nothing is deleted)

    A group is the one `imgindex duplicates` shows with the same --threshold and --metric.
    """


def review_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            index_option,
            click.option("--threshold", type=float, default=None,
                         help="As for imgindex duplicates (default 6.0 l2, 0.97 cosine)."),
            metric_option,
            wait_option,
            json_option,
        ]
    ):  # fmt: skip
        fn = option(fn)
    return fn


def _group_of(index: Any, image: str, threshold: float | None, metric: str) -> list[int]:
    """The ids of the undecided duplicate group that ``image`` (an id or a path) is in."""
    record = _indexed(index, image)
    if record is None:
        raise ImgIndexError(f"{image}: not in the index {index.path} (give an id or a path)")
    threshold = DUPLICATE_THRESHOLDS[metric] if threshold is None else threshold
    for group in index.duplicates(threshold, metric):
        if record.id in group.ids:
            return group.ids
    raise ImgIndexError(
        f"{image} is in no undecided duplicate group at {metric} threshold {threshold:g} "
        "(imgindex duplicates --all shows every group; or name the group's ids)"
    )


def _decide(images: tuple[str, ...], keep: bool, index_path: Path | None, threshold: float | None,
            metric: str, wait: float, as_json: bool) -> None:  # fmt: skip
    with _open_index(index_path) as index:
        if len(images) == 1:
            ids = _group_of(index, images[0], threshold, metric)
        else:
            records = [_indexed(index, image) for image in images]
            unknown = [shown(i) for i, r in zip(images, records, strict=True) if r is None]
            if unknown:
                raise ImgIndexError(f"{', '.join(unknown)}: not in the index {index.path}")
            ids = [r.id for r in records]
        kept = _indexed(index, images[0]).id if keep else None
        index.review_duplicates(ids, keep=kept, wait=wait, on_wait=_say_waiting)
    if as_json:
        print_json({"ids": sorted(ids), "keep": kept, "duplicates": keep})
    elif keep:
        others = [i for i in sorted(ids) if i != kept]
        click.echo(
            f"Kept {kept}; marked {_count(len(others), 'image')} for removal "
            f"({', '.join(map(str, others))}). Files are not touched: imgindex review list / move."
        )
    else:
        click.echo(f"Recorded {', '.join(map(str, sorted(ids)))} as not duplicates.")


@review.command(name="keep")
@click.argument("images", nargs=-1, required=True)
@review_options
@user_errors
def review_keep(images: tuple[str, ...], **options: Any) -> None:
    """Keep the first of IMAGES (an id or a path); the other members of its group (or the
    other IMAGES given) are duplicates, marked for removal."""
    _decide(images, True, **options)


@review.command(name="different")
@click.argument("images", nargs=-1, required=True)
@review_options
@user_errors
def review_different(images: tuple[str, ...], **options: Any) -> None:
    """Record the group of IMAGES (one image: its group) as not duplicates."""
    _decide(images, False, **options)


@review.command(name="undo")
@click.argument("images", nargs=-1, required=True)
@index_option
@wait_option
@json_option
@user_errors
def review_undo(images: tuple[str, ...], index_path: Path | None, wait: float,
                as_json: bool) -> None:  # fmt: skip
    """Forget the decisions on IMAGES: their groups are offered again."""
    with _open_index(index_path) as index:
        records = [_indexed(index, image) for image in images]
        unknown = [shown(i) for i, r in zip(images, records, strict=True) if r is None]
        if unknown:
            raise ImgIndexError(f"{', '.join(unknown)}: not in the index {index.path}")
        gone = index.forget_reviews([r.id for r in records], wait=wait, on_wait=_say_waiting)
    if as_json:
        print_json({"forgotten": gone})
    else:
        click.echo(f"Forgot {_count(gone, 'decision')}.")


@review.command(name="list")
@index_option
@click.option("--csv", "as_csv", is_flag=True, help="CSV: id,path,keep_id,keep_path.")
@json_option
@user_errors
def review_list(index_path: Path | None, as_csv: bool, as_json: bool) -> None:
    """The files marked for removal, each with the one kept in its place."""
    with _open_index(index_path) as index:
        marked = index.marked_for_removal()
    rows = [{"id": r.id, "path": r.path, "keep_id": k.id if k else None,
             "keep_path": k.path if k else None} for r, k in marked]  # fmt: skip
    if as_json:
        print_json({"marked_for_removal": rows})
        return
    if as_csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["id", "path", "keep_id", "keep_path"])
        name = shown if sys.stdout.isatty() else str
        for row in rows:
            writer.writerow([row["id"], name(row["path"]), row["keep_id"],
                             name(row["keep_path"] or "")])  # fmt: skip
        return
    if not rows:
        click.echo("No files are marked for removal.")
    for row in rows:
        kept = f"keep {row['keep_id']} {display_path(row['keep_path'])}" if row["keep_id"] \
            else "the one kept left the index"  # fmt: skip
        click.echo(f"{row['id']:>6}  {display_path(row['path'])}  ({kept})")


@review.command(name="move")
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False))
@index_option
@click.option("--dry-run", is_flag=True, help="Say what would be moved; move nothing.")
@wait_option
@json_option
@user_errors
def review_move(folder: Path, index_path: Path | None, dry_run: bool, wait: float,
                as_json: bool) -> None:  # fmt: skip
    """Move the files marked for removal into FOLDER (made if missing), to look at before you
    delete them yourself; imgindex never deletes a file. Their index entries follow them."""
    with _open_index(index_path) as index:
        moves = index.move_marked(folder, dry_run=dry_run, wait=wait, on_wait=_say_waiting)
    if as_json:
        print_json({"dry_run": dry_run, "moved": [{"from": a, "to": b} for a, b in moves]})
        return
    verb = "Would move" if dry_run else "Moved"
    click.echo(f"{verb} {_count(len(moves), 'file')} into {shown(str(folder))}.")
    for source, target in moves:
        click.echo(f"  {display_path(source)} -> {display_path(target)}")


def _parse_ks(ctx: click.Context, param: click.Parameter, text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of numbers like 1,5,10") from None
    if not ks or ks[0] < 1:
        raise click.BadParameter("give positive numbers, like 1,5,10")
    return ks


@cli.command(name="eval")
@click.argument("folders", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--index",
    "index_path",
    type=click.Path(path_type=Path, file_okay=False),
    help="Evaluate this existing index. Default: embed FOLDERS (or the CSV's files) into a "
    "temporary index.",
)
@click.option(
    "--labels",
    "labels_csv",
    type=click.Path(path_type=Path, dir_okay=False),
    help="CSV file with a header naming path and label columns (relative paths are relative to "
    "the CSV). Default: each image's label is its folder under FOLDERS.",
)
@click.option(
    "--group-column",
    default="group",
    show_default=True,
    help="CSV column of ignore groups (e.g. the camera): images with the query's label and "
    "group are left out of its results, as in person re-identification.",
)
@click.option(
    "--metric",
    "metrics",
    type=click.Choice(["l2", "cosine"]),
    multiple=True,
    help="Metric(s) to rank by. Default: every metric the index serves.",
)
@click.option(
    "--at",
    "ks",
    default="1,5,10",
    show_default=True,
    callback=_parse_ks,
    help="The k of recall@k and precision@k.",
)
@click.option(
    "--depth",
    type=click.IntRange(1),
    help="Rank this many results per query (mAP counts relevant images beyond it as missed). "
    "Default: all images, up to 20,000 images; then 1,000.",
)
@model_options
@preset_option
@click.option("--batch-size", default=None, type=click.IntRange(1), help="Images per pass.")
@click.option("--progress/--no-progress", default=True, help="Progress on a terminal.")
@json_option
@user_errors
def evaluate(
    folders: tuple[Path, ...],
    index_path: Path | None,
    labels_csv: Path | None,
    group_column: str,
    metrics: tuple[str, ...],
    ks: tuple[int, ...],
    depth: int | None,
    weights: Path | None,
    device: str,
    precision: str,
    preset: str | None,
    batch_size: int | None,
    progress: bool,
    as_json: bool,
) -> None:
    """Measure retrieval quality on labelled images: mAP, recall@k and precision@k.

    Each labelled image is a query; the others are ranked by the index's search, and those
    with the same label are the right answers. Labels are folder names under FOLDERS, or come
    from --labels CSV. Without --index, the images are embedded into a temporary index first
    (with --weights and --preset), so checkpoints and presets can be compared.
    """
    import tempfile

    from imgindex.evaluate import evaluate_index, labels_from_csv, labels_from_folders
    from imgindex.index import Index

    _require_existing(folders, "FOLDERS")
    if not folders and labels_csv is None and index_path is None:
        raise click.UsageError("give FOLDERS of labelled images, --labels CSV, or --index")
    csv_labels = labels_from_csv(labels_csv, group_column) if labels_csv else None
    model_args = {"weights": weights, "device": device, "precision": precision}

    def run(index: Any, skipped: int) -> None:
        if csv_labels is not None:
            labels = csv_labels.under(folders) if folders else csv_labels
        else:
            labels = labels_from_folders([r.path for r in index.records()], folders)
            labels = labels.under(folders) if folders else labels
        result = evaluate_index(index, labels, metrics or None, ks, depth)
        if as_json:
            print_json({"index": index_path and str(index_path), "labels_from": labels.source,
                        "skipped_files": skipped, **result.as_dict()})  # fmt: skip
            return
        source = "folders" if labels.source == "folders" else display_path(labels.source)
        groups = ", ignore groups from the CSV" if labels.group else ""
        click.echo(
            f"Evaluated {result.images} images with {result.labels} labels (labels from "
            f"{source}{groups}); each image a query, {result.depth} results ranked."
        )
        if result.not_indexed:
            click.echo(
                f"{_count(result.not_indexed, 'labelled image')} not in the index (missing "
                "files, or files that could not be read): left out."
            )
        if skipped:
            click.echo(f"{_count(skipped, 'file')} could not be read: skipped.")
        header = f"{'metric':<8}{'queries':>8}{'mAP':>8}"
        header += "".join(f"{'R@' + str(k):>8}" for k in ks)
        header += "".join(f"{'P@' + str(k):>8}" for k in ks)
        click.echo(header)
        for metric, s in result.scores.items():
            line = f"{metric:<8}{s.queries:>8}{s.mean_average_precision:>8.4f}"
            line += "".join(f"{s.recall_at[k]:>8.4f}" for k in ks)
            line += "".join(f"{s.precision_at[k]:>8.4f}" for k in ks)
            click.echo(line)

    if index_path is not None:
        with _open_index(index_path, **model_args) as index:
            if weights is not None:
                # The stored vectors are scored; other weights would need another index.
                index._check_without_the_model()
            run(index, 0)
        return
    # Files the CSV names but that do not exist are reported as "not in the index".
    sources = list(folders) or [
        Path(p)
        for p in sorted(csv_labels.label)  # type: ignore[union-attr]
        if os.path.lexists(p)
    ]
    with (
        tempfile.TemporaryDirectory(prefix="imgindex-eval-") as scratch,
        Index.create(
            Path(scratch) / "index", preset=preset, batch_size=batch_size, **model_args
        ) as index,
    ):
        bar = ProgressLine(progress and not as_json)
        try:
            report = index.sync(sources, progress=bar, remove_missing=False)
        finally:
            bar.clear()
        run(index, len(report.skipped))


@cli.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Checkpoint to write (use it with --weights). With --eval it holds the best weights "
    "so far; OUT's .last.pth beside it holds the latest, for --resume.",
)
@click.option("--minutes", type=click.FloatRange(0, min_open=True), help="Train this long.")
@click.option("--steps", type=click.IntRange(1), help="Train until this many steps in all.")
@click.option(
    "--eval",
    "eval_dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Labelled images (a folder per label) to measure mAP on before training and at every "
    "checkpoint; the best weights are kept.",
)
@click.option(
    "--eval-labels",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Labels of the --eval images from a CSV (path,label[,group]) instead of folders.",
)
@click.option("--resume", is_flag=True, help="Continue from OUT's .last.pth checkpoint.")
@click.option("--force", is_flag=True, help="Start over, replacing an existing OUT.")
@click.option("--seed", type=int, help="Fix the random choices, for a reproducible run.")
@click.option(
    "--arch",
    type=click.Choice(["resnet50", "resnet34", "resnet18"]),
    default="resnet50",
    show_default=True,
    help="Backbone; the smaller ones are for training from scratch on modest hardware.",
)
@click.option(
    "--init",
    default="stock",
    show_default=True,
    help="Start from: stock (imgsim's weights), scratch, or a checkpoint file.",
)
@click.option(
    "--images-per-step",
    type=click.IntRange(2),
    help="Images whose views make one step. Default: 48 on a GPU; 16 on a CPU (fewer if the "
    "memory is short).",
)
@click.option("--views-per-image", type=click.IntRange(2), help="Default: 8 on a GPU, 4 on a CPU.")
@click.option(
    "--crop-size",
    type=click.IntRange(32),
    help="Pixels of each view's side. Default: 224 on a GPU, 96 on a CPU.",
)
@click.option(
    "--loss",
    type=click.Choice(["contrastive", "softmax"]),
    default="contrastive",
    show_default=True,
    help="contrastive: views pulled to their image's centre, pushed past a margin from the "
    "others'. softmax: each view classified among the step's images by cosine similarity.",
)
@click.option("--lr", default=2e-4, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option(
    "--freeze-bn/--update-bn",
    default=None,
    help="Keep batch-norm statistics fixed. Default: frozen when fine-tuning, updated from "
    "scratch.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=_check_device,
    help="auto (a GPU when there is one), cpu, cuda, cuda:N.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="auto: bf16 autocast on a GPU that has it, else fp32.",
)
@click.option(
    "--workers",
    type=click.IntRange(0),
    help="Processes cutting views. Default: 0 on a CPU, most cores beside a GPU.",
)
@click.option(
    "--checkpoint-minutes",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Write a checkpoint (and evaluate) this often.",
)
@click.option("--checkpoint-every", type=click.IntRange(1), help="... or every this many steps.")
@click.option("--progress/--no-progress", default=True, help="Progress on a terminal.")
@json_option
@user_errors
def train(
    folders: tuple[Path, ...],
    out: Path,
    minutes: float | None,
    steps: int | None,
    eval_dir: Path | None,
    eval_labels: Path | None,
    resume: bool,
    force: bool,
    seed: int | None,
    arch: str,
    init: str,
    images_per_step: int | None,
    views_per_image: int | None,
    crop_size: int | None,
    loss: str,
    lr: float,
    freeze_bn: bool | None,
    device: str,
    precision: str,
    workers: int | None,
    checkpoint_minutes: float,
    checkpoint_every: int | None,
    progress: bool,
    as_json: bool,
) -> None:
    """Fine-tune AugNet on the images in FOLDERS: no labels needed.

    Each step cuts several augmented views (crops, flips, rotations, colour, blur, noise, JPEG
    artefacts, dropped patches) from each of a few images and teaches the network to keep views
    of one image together and apart from the others. Stops after --minutes or --steps (default:
    10 minutes); Ctrl-C stops early and keeps a checkpoint. Index with the result:
    `imgindex build FOLDER --weights OUT`.
    """
    from imgindex.files import walk_images
    from imgindex.model import resolve_device
    from imgindex.train import TrainOptions, default_step, step_memory
    from imgindex.train import train as run_training

    _require_existing(folders, "FOLDERS")
    if minutes is None and steps is None:
        minutes = 10.0
    images = list(walk_images(list(folders)))
    sizes = default_step(device, arch, len(images))
    given = {"images_per_step": images_per_step, "views_per_image": views_per_image,
             "crop_size": crop_size}  # fmt: skip
    sizes.update({name: value for name, value in given.items() if value is not None})
    options = TrainOptions(
        arch=arch, init=init, loss=loss, lr=lr, freeze_bn=freeze_bn, seed=seed, **sizes
    )
    say = functools.partial(click.echo, err=True)
    eval_set = None
    if eval_dir is not None or eval_labels is not None:
        eval_set = _eval_set(eval_dir, eval_labels)
        labels = _count(len(set(eval_set.labels)), "label")
        say(f"Evaluation set: {_count(len(eval_set), 'image')}, {labels}.")
    say(f"Training on {len(images)} images (no labels used).")
    on_cpu = resolve_device(device) == "cpu"
    if resume:
        context = click.get_current_context()
        training_options = ("arch", "init", "images_per_step", "views_per_image", "crop_size")
        training_options += ("loss", "lr", "freeze_bn", "seed")
        given = [
            f"--{name.replace('_', '-')}"
            for name in training_options
            if context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        ]
        if given:
            say(f"Resuming with the run's own options: {', '.join(given)} ignored.")
    else:
        per_step = min(options.images_per_step, len(images))
        cost = ""
        if on_cpu:
            need = step_memory(arch, per_step, options.views_per_image, options.crop_size)
            cost = f", about {need / 1e9:.1f} GB of memory"
        say(
            f"Each step: {per_step} images x {options.views_per_image} views of "
            f"{options.crop_size} pixels{cost}."
        )
        if on_cpu and arch == "resnet50":
            say(
                "No GPU: a ResNet50 trains at about 24 views/s on 2 CPU cores with 96-pixel "
                "crops (an H100: 2,500 at 224); --arch resnet18 --init scratch is faster."
            )
    line = TrainProgressLine(progress and not as_json, say_first_step=not as_json)

    def on_eval(result: Any) -> None:
        line.clear()
        scores = result.scores
        say(
            f"step {result.step}: mAP l2 {scores['l2'].mean_average_precision:.4f}, cosine "
            f"{scores['cosine'].mean_average_precision:.4f}, recall@10 "
            f"{scores['l2'].recall_at[10]:.4f}" + ("  (best so far)" if result.best else "")
        )

    def on_unreadable(path: str, reason: str) -> None:
        line.clear()
        say(f"skipped {display_path(path)}: {shown(reason)}")

    def on_interrupt() -> None:
        line.clear()
        say("Stopping after this step, which is saved (Ctrl-C again: at once, without it).")

    try:
        report = run_training(
            images, out, options, steps=steps, minutes=minutes, eval_set=eval_set,
            resume=resume, overwrite=force, device=device, precision=precision, workers=workers,
            checkpoint_minutes=checkpoint_minutes, checkpoint_every=checkpoint_every,
            on_progress=line, on_eval=on_eval, on_unreadable=on_unreadable,
            on_interrupt=on_interrupt,
        )  # fmt: skip
    finally:
        line.clear()
    if as_json:
        print_json(report.as_dict())
        if report.stopped_by == "interrupt":
            sys.exit(130)
        return
    how = {"steps": "step budget reached", "minutes": "time budget reached"}
    how["interrupt"] = "interrupted"
    if report.cut_short:
        how["interrupt"] = "interrupted during a step; kept the last checkpoint"
    click.echo(
        f"Trained {_count(report.steps_this_run, 'step')} ({report.steps} in all) in "
        f"{_duration(report.seconds)}, {report.views_per_second:.0f} views/s with "
        f"{report.workers} view workers ({how[report.stopped_by]})."
    )
    if report.history:
        first = report.history[0]
        top = max(report.history, key=lambda e: e["mAP_l2"])
        click.echo(
            f"mAP (l2) {first['mAP_l2']:.4f} at step {first['step']} -> {top['mAP_l2']:.4f} at "
            f"step {top['step']} (the weights in {shown(str(out))})."
        )
    if not report.last.exists():
        click.echo("Nothing was saved: interrupted before the first checkpoint.")
    else:
        click.echo(f"Weights: {shown(str(out))}; resumable state: {shown(str(report.last))}.")
        click.echo(f"Use them: imgindex build FOLDER --weights {shown(str(out))}")
    if report.stopped_by == "interrupt":
        sys.exit(130)


def _eval_set(eval_dir: Path | None, eval_labels: Path | None) -> Any:
    from imgindex.evaluate import labels_from_csv, labels_from_folders
    from imgindex.files import walk_images
    from imgindex.train import EvalSet

    if eval_labels is not None:
        labels = labels_from_csv(eval_labels)
        if eval_dir is not None:
            labels = labels.under([eval_dir])
        paths = sorted(labels.label)
    else:
        paths = [os.path.abspath(p) for p in walk_images([eval_dir])]
        labels = labels_from_folders(paths, [eval_dir])
    groups = [labels.group.get(p) for p in paths] if labels.group else None
    return EvalSet([Path(p) for p in paths], [labels.label[p] for p in paths], groups)


class TrainProgressLine(StatusLine):
    """Training progress: on a terminal, one line rewritten twice a second; in a log, a plain
    line every 30 seconds, so a long run is never silent."""

    def __init__(self, enabled: bool, log_every: float = 30.0, say_first_step: bool = False):
        super().__init__(enabled, interval=0.5, log_every=log_every)
        self._last = time.monotonic()
        self._say_first_step = say_first_step

    def __call__(self, state: Any) -> None:
        if self._say_first_step:
            # What a step costs here, measured: the first one (with the view workers' start).
            import resource

            self._say_first_step = False
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.clear()
            click.echo(
                f"The first step took {state.elapsed:.1f} s; peak memory so far "
                f"{peak / 1e9:.1f} GB.",
                err=True,
            )
        if not self.due():
            return
        total = f"/{state.total_steps}" if state.total_steps else ""
        self.show(
            f"Training step {state.step}{total}  loss {state.loss:.4f}  "
            f"{state.views_per_second:.0f} views/s  lr {state.lr:.1e}  {_duration(state.elapsed)}"
        )


@cli.command()
@index_option
@click.option("--queries", default=200, show_default=True, type=click.IntRange(1))
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1))
@json_option
@user_errors
def tune(index_path: Path | None, queries: int, k: int, as_json: bool) -> None:
    """Measure recall@K and latency of the index against exact search, for a range of
    query-time settings, on a sample of the indexed images."""
    from imgindex.evaluate import tune as measure

    with _open_index(index_path) as index:
        rows = measure(index, queries=queries, k=k)
        described = index.info()["index_type"]
        total = index.count()
    if not total and not as_json:
        raise ImgIndexError(f"{index.path}: the index is empty; there is nothing to tune")
    if as_json:
        print_json({"index_type": described, "k": k, "rows": [r.as_dict() for r in rows]})
        return
    sampled = min(queries, total)
    click.echo(f"{described}: recall@{k} against exact search, {sampled} sample queries")
    click.echo(f"{'setting':<16}{'recall':>8}{'p50 ms':>9}{'p99 ms':>9}{'batch q/s':>11}")
    for row in rows:
        click.echo(
            f"{row.setting:<16}{row.recall:>8.3f}{row.p50_ms:>9.2f}{row.p99_ms:>9.2f}"
            f"{row.batch_qps:>11.1f}"
        )


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@model_options
@preset_option
@max_pixels_option
@metric_option
@verbose_option
@json_option
@user_errors
def distance(
    images: tuple[Path, ...],
    weights: Path | None,
    device: str,
    precision: str,
    preset: str | None,
    max_pixels: int | None,
    metric: str,
    verbose: bool,
    as_json: bool,
) -> None:
    """Pairwise distances (or similarities) between IMAGES, no index needed."""
    from imgindex.model import Vectorizer
    from imgindex.search import score

    timer = StageTimer(verbose)
    vectorizer = Vectorizer(
        device=device, weights=weights, precision=precision, preset=preset or "exact",
        max_pixels=max_pixels,
    )  # fmt: skip
    timer.done("load model")
    vectors = vectorizer.vectorize(list(images))
    timer.done(f"embed {len(images)} image(s)")
    matrix = score(vectors, vectors, metric)
    if as_json:
        print_json(
            {
                "metric": metric,
                "images": [path_text(os.path.abspath(p)) for p in images],
                "matrix": [[round(float(v), 6) for v in row] for row in matrix],
            }
        )
        return
    labels = [f"[{i}]" for i in range(1, len(images) + 1)]
    width = max(8, *(len(label) for label in labels))
    kind = "L2 distance" if metric == "l2" else "cosine similarity"
    click.echo(f"{kind} between {len(images)} images")
    click.echo(" " * 5 + "".join(label.rjust(width) for label in labels))
    for label, row in zip(labels, matrix, strict=True):
        click.echo(label.ljust(5) + "".join(f"{v:{width}.4f}" for v in row))
    click.echo()
    for label, path in zip(labels, images, strict=True):
        click.echo(f"{label} {shown(str(path))}")


@cli.command()
@index_option
@click.option("--skipped", is_flag=True, help="List the files the builds skipped, and why.")
@json_option
@user_errors
def info(index_path: Path | None, skipped: bool, as_json: bool) -> None:
    """Describe an index: images, model, weights, index type, size on disk."""
    with _open_index(index_path) as index:
        details = index.info()
        skipped_files = index.skipped() if skipped else []
    if as_json:
        if skipped:
            details["skipped_files"] = [{"path": p, "reason": r} for p, r in skipped_files]
        print_json(details)
        return
    if skipped:
        for path, reason in skipped_files:
            click.echo(f"{display_path(path)}: {shown(reason)}")
        if not skipped_files:
            click.echo("No skipped files.")
        return
    pre = details["preprocessing"]
    files = ", ".join(f"{name} {_size(n)}" for name, n in details["files"].items())
    weights_note = " (imgsim 0.1.2 model.pth)" if _is_default(details["weights_sha256"]) else ""
    rows = [
        ("Index", shown(details["path"])),
        ("Images", f"{details['images']} ({_count(details['skipped'], 'file')} skipped)"),
        ("Model", f"{details['model']} ({details['dim']}-number vectors)"),
        ("Weights", f"sha256 {details['weights_sha256']}{weights_note}"),
        (
            "Preprocessing",
            f"{pre.get('preset', 'exact')} preset: short side {pre['short_side']}, "
            f"{pre['interpolation']}{', JPEG draft decoding' if pre.get('jpeg_draft') else ''}, "
            "no crop, RGB, ImageNet mean/std",
        ),
        ("Index type", _index_type_line(details)),
        ("Metrics", ", ".join(METRIC_NAMES[m] for m in details["metrics"])),
        ("In memory", f"{_size(details['vector_index_bytes_in_memory'])} for the vector index"),
        ("Created", details["created_at"]),
        ("On disk", f"{_size(details['bytes_on_disk'])} ({files})"),
    ]
    for name, value in rows:
        click.echo(f"{name + ':':<15}{value}")


METRIC_NAMES = {"l2": "l2 (Euclidean distance)", "cosine": "cosine (similarity)"}


def _index_type_line(details: dict[str, Any]) -> str:
    requested = details["index_requested"]
    asked = "auto" if requested == "auto" else requested["kind"]
    search = "exact search" if details["exact"] else "approximate search, exact re-scoring"
    line = f"{details['index_type']} ({search}; asked for: {asked})"
    if details.get("index_note"):
        line += f"\n{'':15}{details['index_note']}"
    return line


def _is_default(sha: str) -> bool:
    from imgindex.model import AUGNET_SHA256

    return sha == AUGNET_SHA256


def _open_index(index_path: Path | None, **kwargs: Any) -> Any:
    from imgindex.errors import IndexNotFoundError
    from imgindex.index import Index, default_index_path
    from imgindex.store import database_state

    path = index_path or default_index_path()
    if database_state(path) == "none":
        source = click.get_current_context().get_parameter_source("index_path")
        if source == click.core.ParameterSource.COMMANDLINE:
            hint = f"build one with `imgindex build FOLDER --index {path}`"
            where = f"at {path}"
        elif source == click.core.ParameterSource.ENVIRONMENT:
            hint = "build one with `imgindex build FOLDER`"
            where = f"at {path} (from $IMGINDEX_INDEX)"
        else:
            hint = "build one with `imgindex build FOLDER`, or pass --index PATH"
            where = f"at the default location {path}"
        raise IndexNotFoundError(f"no index {where}; {hint}")
    return Index.open(path, **kwargs)


@cli.command()
@index_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Any but the loopback needs an access token.")  # fmt: skip
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--token",
    envvar="IMGINDEX_TOKEN",
    show_envvar=True,
    help="Access token required on every request (default: none on the loopback; generated "
    "and printed for any other address).",
)
@click.option(
    "--allow-host",
    "allowed_hosts",
    multiple=True,
    help="Another name the server may be reached by (the Host header is checked against the "
    "address it serves).",
)
@click.option(
    "--max-upload-mb", default=50, show_default=True, type=click.IntRange(1),
    help="Largest uploaded image.",
)  # fmt: skip
@click.option("--max-files", default=16, show_default=True, type=click.IntRange(1),
              help="Images in one upload.")  # fmt: skip
@max_pixels_option
@model_options
@user_errors
def serve(
    index_path: Path | None,
    host: str,
    port: int,
    token: str | None,
    allowed_hosts: tuple[str, ...],
    max_upload_mb: int,
    max_files: int,
    max_pixels: int | None,
    weights: Path | None,
    device: str,
    precision: str,
) -> None:
    """Start a local web page (and JSON API) on the index: search by image, browse, review
    duplicates. Prints its URL; Ctrl-C stops it."""
    try:
        from imgindex.server import ServeSettings, new_token
        from imgindex.server import serve as run_server
    except ImportError as exc:
        raise ImgIndexError(
            f"the web app needs {exc.name}: pip install 'imgindex[serve]'"
        ) from None
    from imgindex.decode import DEFAULT_MAX_PIXELS

    if token is not None and not re.fullmatch(r"[A-Za-z0-9_-]{16,}", token):
        raise click.BadParameter(
            "give at least 16 letters, digits, '-' or '_' (it goes into a URL and a cookie)",
            param_hint="--token",
        )
    settings = ServeSettings(
        host=host, port=port, token=token, allowed_hosts=allowed_hosts,
        max_upload_bytes=max_upload_mb << 20, max_files=max_files,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
    )  # fmt: skip
    if not settings.loopback and not settings.token:
        settings.token = new_token()
    model = {"weights": weights, "device": device, "precision": precision,
             "max_pixels": settings.max_pixels}  # fmt: skip
    with _open_index(index_path, **model) as index:
        count = index.count()

        def ready(url: str) -> None:
            click.echo(f"Serving {shown(str(index.path))} ({_count(count, 'image')}) at {url}")
            if not settings.loopback:
                click.echo("Anyone who can reach this address needs the token in that URL.")
            click.echo("Press Ctrl-C to stop.")

        try:
            run_server(index, settings, ready)
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a server is stopped: uvicorn has shut down cleanly
        except OSError as exc:
            raise ImgIndexError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    click.echo("Stopped.")


def main() -> None:
    cli(prog_name="imgindex")
