"""imgindex export / import: records and vectors as Parquet (see imgindex.parquet)."""

from __future__ import annotations

from pathlib import Path

import click

from imgindex.cli.app import cli, index_option, json_option, open_index, user_errors
from imgindex.cli.output import StatusLine, counted, print_json, shown


@cli.command()
@click.argument("out", type=click.Path(path_type=Path, dir_okay=False))
@index_option
@click.option(
    "--format",
    "file_format",
    type=click.Choice(["parquet"]),
    default="parquet",
    show_default=True,
    help="The file format.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@json_option
@user_errors
def export(out: Path, index_path: Path | None, file_format: str, force: bool,
           as_json: bool) -> None:  # fmt: skip
    """Write the index's records and vectors to OUT, one row per image: path, sha256, size,
    mtime, width, height and the vector (768 float32); the weights' checksum and the preset are
    in the file's metadata. Readable by pandas, DuckDB, Spark; `imgindex import` reads it back.
    """
    from imgindex import parquet
    from imgindex.errors import ImgIndexError

    if out.exists() and not force:
        raise ImgIndexError(f"{out} exists; give --force to replace it")
    with open_index(index_path) as index:
        status = StatusLine(not as_json, 0.5)
        rows = parquet.export(index, out, lambda n: status.show(f"exported {n} rows"))
        status.clear()
    if as_json:
        print_json({"out": str(out), "rows": rows, "format": file_format})
    else:
        click.echo(f"Exported {counted(rows, 'image')} to {shown(str(out))}.")


@cli.command(name="import")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(path_type=Path, dir_okay=False, exists=True))  # fmt: skip
@index_option
@click.option("--wait", type=click.FloatRange(0), default=0.0,
              help="Seconds to wait for another process writing to the index.")  # fmt: skip
@json_option
@user_errors
def import_(files: tuple[Path, ...], index_path: Path | None, wait: float, as_json: bool) -> None:
    """Index the records and vectors of Parquet FILES (as `imgindex export` writes them) without
    embedding anything; the index is created if missing. Vectors of other weights or another
    preset than the index's (or than each other's) are refused."""
    from imgindex import parquet
    from imgindex.index import Index, default_index_path

    path = index_path or default_index_path()
    files_ = list(files)
    created = Index.state(path) != "complete"
    if created:
        index = Index.create(path, fingerprint=parquet.check_files(files_, None), wait=wait)
    else:
        index = Index.open(path, wait=wait)
    with index:
        if not created:
            parquet.check_files(files_, index.fingerprint())
        status = StatusLine(not as_json, 0.5)
        rows = parquet.import_into(index, files_, lambda n: status.show(f"imported {n} rows"))
        status.clear()
        total = index.count()
    if as_json:
        print_json({"index": str(path), "rows": rows, "images": total})
    else:
        click.echo(f"Imported {counted(rows, 'image')} into {shown(str(path))} ({total} in all).")
