"""The ``imgindex`` command group, the options its commands share, and how library errors become
one line on stderr and an exit status."""

from __future__ import annotations

import functools
import os
import sqlite3
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from imgindex.cli.output import shown
from imgindex.devices import DEVICE_NAME
from imgindex.errors import ImgIndexError


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
        callback=check_device,
        help="Where to run the network: auto (a GPU when there is one), cpu, cuda, cuda:N.",
    )(fn)
    fn = click.option(
        "--precision",
        type=click.Choice(["auto", "fp32", "bf16", "int8"]),
        default="auto",
        show_default=True,
        help="bf16 is faster on GPUs and on CPUs with bf16 units (vectors move by a cosine of "
        "about 5e-5); int8 (onnx runtime, CPU) faster still, its vectors recorded apart. auto: "
        "fp32 for the exact preset; for fast, int8 on a CPU, bf16 on a GPU that has it. An "
        "existing index keeps the precision it was built with.",
    )(fn)
    fn = click.option(
        "--runtime",
        type=click.Choice(["auto", "torch", "onnx"]),
        default=None,
        envvar="IMGINDEX_RUNTIME",
        show_envvar=True,
        expose_value=False,
        callback=_set_runtime,
        help="What runs the network. onnx: ONNX Runtime, fp32 on the CPU, started without "
        "PyTorch (the network is exported once and cached). auto (default): onnx for fp32 on "
        "a CPU, else torch.",
    )(fn)
    return fn


def _set_runtime(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Every Vectorizer this command makes uses ``value`` (see imgindex.onnxrt)."""
    if value is not None:
        from imgindex.onnxrt import RUNTIME_ENV

        os.environ[RUNTIME_ENV] = value


def check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
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
                from imgindex.errors import DAMAGED
                from imgindex.index import Index

                message += f" (the index's {Index.database_name} {DAMAGED})"
            raise click.ClickException(shown(message)) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            sys.exit(130)

    return wrapper


def verbose_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-v", "--verbose", is_flag=True, help="Say on stderr how long each stage took."
    )(fn)


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


def wait_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--wait",
        default=0.0,
        type=click.FloatRange(0),
        metavar="SECONDS",
        help="If another process is writing to the index, wait this long for it. Default: 0.",
    )(fn)


def say_waiting(holder: str) -> None:
    click.echo(f"Waiting for the index lock, held by {shown(holder)} ...", err=True)


def require_existing(paths: Iterable[Path], param_hint: str) -> None:
    """A usage error naming the first of ``paths`` that does not exist (a broken link exists)."""
    for path in paths:
        if not os.path.lexists(path):
            raise click.BadParameter(
                f"{shown(str(path))}: no such file or folder", param_hint=param_hint
            )


def open_index(index_path: Path | None, **kwargs: Any) -> Any:
    from imgindex.errors import IndexNotFoundError
    from imgindex.index import Index, default_index_path

    path = index_path or default_index_path()
    if Index.state(path) == "none":
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


def main() -> None:
    from imgindex import onnxrt

    onnxrt.on_export = lambda message: click.echo(f"imgindex: {message}", err=True)
    cli(prog_name="imgindex")
