"""Duplicates and the decisions on them: imgindex duplicates, imgindex review ..."""

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
    metric_option,
    open_index,
    say_waiting,
    user_errors,
    wait_option,
)
from imgindex.cli.output import counted, display_path, print_json, shown
from imgindex.cli.searching import (
    indexed_record,
    photo_filter,
    photo_filter_options,
    say_written,
    warn_if_missing,
)
from imgindex.duplicates import DEFAULT_THRESHOLDS
from imgindex.errors import ImgIndexError


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
@photo_filter_options
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
    **filters: Any,
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
    warn_if_missing(under)
    where = photo_filter(filters)
    with open_index(index_path) as index:
        groups = index.duplicates(
            threshold, metric, under=under, neighbors=neighbors,
            include_reviewed=include_reviewed, where=where,
        )  # fmt: skip
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
    counts = f"{counted(len(groups), 'group')}, {counted(images, 'image')}"
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
    say_written(sheets)


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


DUPLICATE_THRESHOLDS = DEFAULT_THRESHOLDS  # (the library's: imgindex.duplicates)


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
    record = indexed_record(index, image)
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
    with open_index(index_path) as index:
        if len(images) == 1:
            ids = _group_of(index, images[0], threshold, metric)
        else:
            records = [indexed_record(index, image) for image in images]
            unknown = [shown(i) for i, r in zip(images, records, strict=True) if r is None]
            if unknown:
                raise ImgIndexError(f"{', '.join(unknown)}: not in the index {index.path}")
            ids = [r.id for r in records]
        kept = indexed_record(index, images[0]).id if keep else None
        index.review_duplicates(ids, keep=kept, wait=wait, on_wait=say_waiting)
    if as_json:
        print_json({"ids": sorted(ids), "keep": kept, "duplicates": keep})
    elif keep:
        others = [i for i in sorted(ids) if i != kept]
        click.echo(
            f"Kept {kept}; marked {counted(len(others), 'image')} for removal "
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
    with open_index(index_path) as index:
        records = [indexed_record(index, image) for image in images]
        unknown = [shown(i) for i, r in zip(images, records, strict=True) if r is None]
        if unknown:
            raise ImgIndexError(f"{', '.join(unknown)}: not in the index {index.path}")
        gone = index.forget_reviews([r.id for r in records], wait=wait, on_wait=say_waiting)
    if as_json:
        print_json({"forgotten": gone})
    else:
        click.echo(f"Forgot {counted(gone, 'decision')}.")


@review.command(name="list")
@index_option
@click.option("--csv", "as_csv", is_flag=True, help="CSV: id,path,keep_id,keep_path.")
@json_option
@user_errors
def review_list(index_path: Path | None, as_csv: bool, as_json: bool) -> None:
    """The files marked for removal, each with the one kept in its place."""
    with open_index(index_path) as index:
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
    with open_index(index_path) as index:
        moves = index.move_marked(folder, dry_run=dry_run, wait=wait, on_wait=say_waiting)
    if as_json:
        print_json({"dry_run": dry_run, "moved": [{"from": a, "to": b} for a, b in moves]})
        return
    verb = "Would move" if dry_run else "Moved"
    click.echo(f"{verb} {counted(len(moves), 'file')} into {shown(str(folder))}.")
    for source, target in moves:
        click.echo(f"  {display_path(source)} -> {display_path(target)}")
