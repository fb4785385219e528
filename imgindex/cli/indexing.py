"""Commands that build and look after an index: build, add, remove, check, repair, info."""

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
    model_options,
    open_index,
    preset_option,
    require_existing,
    say_waiting,
    user_errors,
    verbose_option,
    wait_option,
)
from imgindex.cli.output import (
    ProgressLine,
    StageTimer,
    counted,
    display_path,
    human_size,
    print_json,
    shown,
)
from imgindex.files import path_text


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
                "--keep-gps",
                is_flag=True,
                help="Also store the GPS position photos carry (personal data: off by default; "
                "without it, none is stored or shown).",
            ),
            click.option(
                "--engine",
                type=click.Choice(["local", "ray"]),
                default="local",
                show_default=True,
                help="ray: read and embed on a Ray cluster (pip install 'imgindex[ray]'); this "
                "process plans and commits. The paths must be readable on every node.",
            ),
            click.option(
                "--ray-address",
                default=None,
                metavar="auto|HOST:PORT",
                help="The Ray cluster to join (default: $RAY_ADDRESS, else a new one on this "
                "machine).",
            ),
            click.option(
                "--ray-actors",
                default=None,
                type=click.IntRange(1),
                help="Embedding actors on the Ray cluster. Default: one per GPU, else one per "
                "node.",
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
    from imgindex.weights import EMBEDDING_DIM

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
    engine: str,
    ray_address: str | None,
    ray_actors: int | None,
    keep_gps: bool,
    index_type: Any = None,
) -> None:
    from imgindex.index import Index, default_index_path

    timer = StageTimer(verbose)

    require_existing(paths, "PATHS")
    location = index_path or default_index_path()
    _check_engine(engine, ray_address, ray_actors, workers, decode)
    if dry_run:
        new = Index.state(location) != "complete"
        _dry_run(paths, location, new, remove_missing, retry_skipped, as_json)
        return
    args = {"weights": weights, "device": device, "batch_size": batch_size}
    args.update({"precision": precision, "preset": preset})
    spec = None if index_type == "auto" else index_type
    index = Index.open(location, create=True, index_type=spec, wait=wait, on_wait=say_waiting,
                       private=private, **args)  # fmt: skip
    created = index.created
    if not created and index_type is not None:  # (a new index was created of that kind)
        index.set_index_type(spec, wait=wait, on_wait=say_waiting)
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
                on_wait=say_waiting,
                retry_skipped=retry_skipped,
                engine=engine,
                ray_address=ray_address,
                ray_actors=ray_actors,
                keep_gps=keep_gps,
            )
        except KeyboardInterrupt:
            bar.clear()
            # Every batch committed before the interruption is kept (and its FAISS file saved).
            click.echo(
                f"\nInterrupted. The index keeps what was committed "
                f"({counted(index.count(), 'image')} now); the same command goes on from there.",
                err=True,
            )
            sys.exit(130)
        finally:
            bar.clear()
        timer.done("walk, read, embed and commit")
        if verbose:
            on_gpu = engine == "local" and report.embedded  # (Ray's actors have their own)
            _print_stages(report, index.vectorizer.device if on_gpu else "cpu")
    if as_json:
        print_json({"index": str(location), **report.as_dict()})
    else:
        # Measured once closed: closing folds the write-ahead log into the database.
        _print_report(report, location, sum(Index.disk_usage(location).values()))
    if strict and report.skipped:
        raise click.ClickException(f"--strict: {len(report.skipped)} file(s) were skipped")


def _check_engine(
    engine: str, address: str | None, actors: int | None, workers: int | None, decode: str
) -> None:
    """Refuse options that do not go together, and a Ray engine that cannot run (not installed,
    nothing at the address), before an index is created for nothing."""
    if engine == "local" and (address or actors):
        raise click.UsageError("--ray-address and --ray-actors are for --engine ray")
    if engine != "ray":
        return
    from imgindex.distributed import LOCAL_ONLY, check_reachable, import_ray

    if workers is not None or decode != "cpu":
        raise click.UsageError(LOCAL_ONLY)

    import_ray()
    check_reachable(address or os.environ.get("RAY_ADDRESS"))


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
                f"read {counted(len(found), 'file')}. Nothing was changed."
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
        f"Dry run: {counted(len(report.to_read), 'file')} to read (new, changed or moved), "
        f"{counted(len(report.to_remove), 'entry')} for files that no longer exist (a build "
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


def _print_report(report: Any, location: Path, bytes_on_disk: int) -> None:
    counts = (
        f"{report.added} added, {report.updated} updated, {report.renamed} renamed, "
        f"{report.removed} removed, {report.unchanged} unchanged, {len(report.skipped)} skipped"
    )
    if report.embedded:
        click.echo(
            f"Embedded {counted(report.embedded, 'image')} in {report.seconds:.1f} s "
            f"({report.images_per_second:.1f} images/s): {counts}."
        )
    else:
        click.echo(f"Nothing to embed ({report.seconds:.1f} s): {counts}.")
    if report.reused:
        click.echo(f"Reused the stored vectors of {report.reused} moved or copied files.")
    if report.facts_filled:
        filled = counted(report.facts_filled, "image")
        click.echo(
            f"Read the photo facts (date taken, camera, format) of {filled} indexed before "
            "imgindex kept them; nothing was embedded again."
        )
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
        f"Index {shown(str(location))}: {counted(report.total, 'image')}, "
        f"{human_size(bytes_on_disk)} on disk."
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
    with open_index(index_path) as index:
        going = index.remove(paths, dry_run=True)
        total = index.count()
        if not dry_run and going and going == total and not yes:
            _confirm_removing_everything(index, total)
        removed = going if dry_run else index.remove(paths, wait=wait, on_wait=say_waiting)
        remaining = index.count()
    if as_json:
        print_json({"removed": removed, "total": remaining, "dry_run": dry_run})
    elif dry_run:
        click.echo(
            f"Dry run: {counted(removed, 'entry')} would be removed; "
            f"{counted(total - removed, 'image')} would remain. Nothing was changed."
        )
    else:
        click.echo(f"Removed {counted(removed, 'entry')}; {counted(remaining, 'image')} remain.")
        if not removed:
            click.echo("(Nothing indexed is under those paths: imgindex info shows the index.)")


def _confirm_removing_everything(index: Any, total: int) -> None:
    question = f"This removes all {counted(total, 'entry')} of {shown(str(index.path))}. Go on?"
    if not sys.stdin.isatty():
        raise click.UsageError(
            f"this would remove all {counted(total, 'entry')} of the index; add --yes to do so"
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
    from imgindex.index import Index

    with open_index(index_path, weights=weights) as index:
        report = index.check(check_files=not no_files)
        location = index.path
    if as_json:
        print_json({"index": str(location), **report.as_dict()})
    else:
        faiss_file = "none" if report.faiss_file is None else str(report.faiss_file)
        click.echo(
            f"Index {shown(str(location))}: {report.images} images, {report.vectors} stored "
            f"vectors, {faiss_file} in {Index.vectors_name}"
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
    with open_index(index_path) as index:
        done = index.repair(remove_missing=remove_missing, wait=wait, on_wait=say_waiting)
        remaining = index.count()
    if as_json:
        print_json({**done, "total": remaining})
        return
    for key, value in done.items():
        click.echo(f"{key.replace('_', ' ')}: {value}")
    if done["rows_without_vector_removed"]:
        click.echo("Run `imgindex build` on their folders to embed the removed images again.")
    click.echo(f"Repaired; {remaining} images.")


@cli.command()
@index_option
@click.option("--skipped", is_flag=True, help="List the files the builds skipped, and why.")
@json_option
@user_errors
def info(index_path: Path | None, skipped: bool, as_json: bool) -> None:
    """Describe an index: images, model, weights, index type, size on disk."""
    with open_index(index_path) as index:
        details = index.info()
        details["photos"] = index.photo_summary()
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
    files = ", ".join(f"{name} {human_size(n)}" for name, n in details["files"].items())
    weights_note = " (imgsim 0.1.2 model.pth)" if _is_default(details["weights_sha256"]) else ""
    rows = [
        ("Index", shown(details["path"])),
        ("Images", f"{details['images']} ({counted(details['skipped'], 'file')} skipped)"),
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
        (
            "In memory",
            f"{human_size(details['vector_index_bytes_in_memory'])} for the vector index",
        ),
        ("Created", details["created_at"]),
        ("On disk", f"{human_size(details['bytes_on_disk'])} ({files})"),
        *_photo_rows(details["photos"]),
    ]
    for name, value in rows:
        click.echo(f"{name + ':':<15}{value}")


def _photo_rows(photos: dict[str, Any]) -> list[tuple[str, str]]:
    """info: the formats, cameras and dates of the collection."""

    def listed(counts: dict[str, int]) -> str:
        return ", ".join(f"{shown(name)} {n}" for name, n in counts.items()) or "none recorded"

    taken = photos["taken"]
    dates = (
        f"{taken['first'][:10]} to {taken['last'][:10]} ({counted(taken['images'], 'photo')} dated)"
        if taken["images"]
        else "none recorded"
    )
    rows = [("Formats", listed(photos["formats"])), ("Cameras", listed(photos["cameras"])),
            ("Taken", dates)]  # fmt: skip
    if photos["with_gps"]:
        rows.append(("GPS", f"kept for {counted(photos['with_gps'], 'photo')} (--keep-gps)"))
    if photos["without_facts"]:
        rows.append(("Photo facts", f"not read yet for {counted(photos['without_facts'], 'image')}"
                     " (indexed by an older imgindex; the next build reads them)"))  # fmt: skip
    return rows


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
    from imgindex.weights import AUGNET_SHA256

    return sha == AUGNET_SHA256
