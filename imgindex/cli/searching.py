"""Commands that search: query, similar, distance; combined queries and contact sheets."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from imgindex.cli.app import (
    cli,
    index_option,
    json_option,
    max_pixels_option,
    metric_option,
    model_options,
    open_index,
    preset_option,
    require_existing,
    user_errors,
    verbose_option,
)
from imgindex.cli.output import StageTimer, display_path, model_stage, print_json, shown
from imgindex.errors import ImageError, ImgIndexError
from imgindex.files import path_text

FILTER_KEYS = ("taken_after", "taken_before", "camera", "formats", "min_width", "min_height")


def photo_filter_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--taken-after, --taken-before, --camera, --format, --min-width, --min-height."""
    for option in reversed(
        [
            click.option(
                "--taken-after",
                metavar="DATE",
                help="Only photos taken on or after DATE (YYYY, YYYY-MM, YYYY-MM-DD or an ISO "
                "time; the photo's own EXIF date).",
            ),
            click.option(
                "--taken-before",
                metavar="DATE",
                help="Only photos taken on or before DATE (the whole period: 2024 is up to its "
                "end).",
            ),
            click.option(
                "--camera", help="Only photos from this camera (matches make or model, any case)."
            ),
            click.option(
                "--format",
                "formats",
                multiple=True,
                help="Only images of this format (JPEG, PNG, HEIF, AVIF, JPEG XL, DNG, NEF, ...; "
                "repeatable; `imgindex info` lists the index's).",
            ),
            click.option("--min-width", type=click.IntRange(1), help="Only images this wide."),
            click.option("--min-height", type=click.IntRange(1), help="Only images this tall."),
        ]
    ):
        fn = option(fn)
    return fn


def photo_filter(options: dict[str, Any]) -> Any:
    """The PhotoFilter the options ask for (taken out of ``options``), or None."""
    from imgindex.photos import PhotoFilter

    values = {key: options.pop(key, None) for key in FILTER_KEYS}
    values["formats"] = tuple(values["formats"] or ())
    try:
        where = PhotoFilter(**values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--taken-after / --taken-before") from None
    return None if where.empty else where


def search_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = photo_filter_options(fn)
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


def warn_if_missing(under: Path | None) -> None:
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
    warn_if_missing(options["under"])
    from imgindex.search import check_cutoffs

    try:  # (before the model loads)
        check_cutoffs(options["metric"], options["max_distance"], options["min_similarity"])
    except ValueError:
        other = "--min-similarity" if options["metric"] == "cosine" else "--max-distance"
        given = "--max-distance" if options["max_distance"] is not None else "--min-similarity"
        raise click.UsageError(
            f"{given} goes with --metric {'l2' if given == '--max-distance' else 'cosine'}; "
            f"use {other}"
        ) from None
    kwargs = {
        key: options[key]
        for key in ("k", "metric", "max_distance", "min_similarity", "under", "nprobe", "ef_search")
    }
    kwargs["where"] = photo_filter(options)
    return kwargs


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
    if like or unlike:
        _query_combined([*images, *map(Path, like)], list(map(Path, unlike)), model, search,
                        sheet, timer, as_json, index_path)  # fmt: skip
        return
    with open_index(index_path, **model) as index:
        timer.done("open index")
        # The model is loaded now, so that its time is reported apart.
        timer.done(model_stage(index.vectorizer))
        answers = index.search_each(list(images), **search)
        timer.done(f"embed {len(images)} image(s) and search")
        total = index.count()
        matching = _matching(index, search)
        good = [n for n, answer in enumerate(answers) if not isinstance(answer, ImageError)]
        hits = [answers[n] for n in good]
        sheets = _write_sheets(sheet, index, [images[n] for n in good], hits,
                               search["metric"]) if sheet else []  # fmt: skip
    failed = {n: a for n, a in enumerate(answers) if isinstance(a, ImageError)}
    queries = [path_text(os.path.abspath(images[n])) for n in good]
    errors = {n: {"query": path_text(os.path.abspath(images[n])), "error": failed[n].reason}
              for n in failed}  # fmt: skip
    labels = [shown(str(images[n])) for n in good]
    _print_hits(queries, labels, hits, total, search["metric"], as_json, errors, matching=matching)
    say_written(sheets)
    for n in sorted(failed):
        click.echo(f"Error: {shown(str(failed[n]))}", err=True)
    if failed:
        sys.exit(1)


def _query_combined(
    like: list[Path], unlike: list[Path], model: dict[str, Any], search: dict[str, Any],
    sheet: Path | None, timer: StageTimer, as_json: bool, index_path: Path | None,
) -> None:  # fmt: skip
    """query --like / --unlike: one query combined from the image files ``like`` and
    ``unlike`` (all must be readable)."""
    require_existing([*like, *unlike], "--like/--unlike")
    options = {key: value for key, value in search.items() if key not in ("k", "metric")}
    with open_index(index_path, **model) as index:
        timer.done("open index")
        hits = index.search_like(like, unlike, k=search["k"], metric=search["metric"], **options)
        timer.done(f"embed {len(like) + len(unlike)} image(s) and search")
        total = index.count()
        sheets = _write_sheets(sheet, index, [like[0]], [hits], search["metric"],
                               (like, unlike)) if sheet else []  # fmt: skip
    names = [path_text(os.path.abspath(p)) for p in like], [path_text(os.path.abspath(p))
                                                           for p in unlike]  # fmt: skip
    _print_combined(*names, [hits], total, search["metric"], as_json)
    say_written(sheets)


def say_written(sheets: list[Path]) -> None:
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
    with open_index(index_path) as index:
        timer.done("open index")
        if like or unlike:
            _similar_combined(index, [*images, *like], list(unlike), search, as_json, sheet)
            return
        found, keys, labels, errors, ids = [], [], [], {}, []
        for n, image in enumerate(images):
            record = indexed_record(index, image)
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
        matching = _matching(index, search)
        sheets = _write_sheets(sheet, index, ids, found, search["metric"]) if sheet else []
    entries = {n: {"query": images[n], "error": reason} for n, reason in errors.items()}
    _print_hits(keys, labels, found, total, search["metric"], as_json, entries, matching=matching)
    say_written(sheets)
    for n in sorted(errors):
        click.echo(f"Error: {shown(images[n])}: {shown(errors[n])}", err=True)
    if errors:
        sys.exit(1)


def indexed_record(index: Any, image: str) -> Any:
    """The record of an indexed image named by id (ASCII digits) or path, or None."""
    try:
        return index.lookup(int(image) if _is_id(image) else image)
    except KeyError:
        return None


def _similar_combined(
    index: Any, like: list[str], unlike: list[str], search: dict[str, Any], as_json: bool,
    sheet: Path | None,
) -> None:  # fmt: skip
    records = {name: indexed_record(index, name) for name in [*like, *unlike]}
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
    say_written(sheets)


def _is_id(text: str) -> bool:
    """Whether ``similar`` takes ``text`` as an image id: ASCII digits only (Python's int()
    would also read other scripts' digits)."""
    return text.isascii() and text.isdigit()


def _matching(index: Any, search: dict[str, Any]) -> int | None:
    """How many images the search's photo filters let through (None: no filters)."""
    return None if search.get("where") is None else len(index.ids_matching(search["where"]))


def _print_hits(
    keys: list[str],
    labels: list[str],
    hits: list[Any],
    total: int,
    metric: str,
    as_json: bool,
    errors: dict[int, dict[str, str]] | None = None,
    extra: list[dict[str, Any]] | None = None,
    matching: int | None = None,
) -> None:
    """Results per query; ``errors`` are the entries, by position among all queries, of those
    that could not be read (--json lists them in their place); ``extra``, more keys for each
    query's JSON entry; ``matching``, how many images the photo filters let through."""
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
        among = f"{total}" if matching is None else f"{total}, {matching} matching the filters"
        click.echo(f"Query {label} ({metric}, {len(found)} nearest of {among})")
        if not found:
            empty = "(no image matches the filters)" if matching == 0 else "(no results)"
            click.echo(f"  {empty}" if total else "  (the index is empty)")
            continue
        click.echo(f"{'rank':>4}  {column:>10}  {'id':>6}  path")
        for hit in found:
            click.echo(f"{hit.rank:>4}  {hit.score:>10.4f}  {hit.id:>6}  {display_path(hit.path)}")


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
    timer.done(model_stage(vectorizer))
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
