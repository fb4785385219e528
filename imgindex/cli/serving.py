"""imgindex serve: the web page and JSON API (see imgindex.server)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from imgindex.cli.app import (
    cli,
    index_option,
    max_pixels_option,
    model_options,
    open_index,
    user_errors,
)
from imgindex.cli.output import counted, shown
from imgindex.errors import ImgIndexError


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
    with open_index(index_path, **model) as index:
        count = index.count()

        def ready(url: str) -> None:
            click.echo(f"Serving {shown(str(index.path))} ({counted(count, 'image')}) at {url}")
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
