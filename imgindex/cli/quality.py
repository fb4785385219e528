"""Measuring and improving retrieval: imgindex eval, tune and train."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from imgindex.cli.app import (
    check_device,
    cli,
    index_option,
    json_option,
    model_options,
    open_index,
    preset_option,
    require_existing,
    user_errors,
)
from imgindex.cli.output import (
    ProgressLine,
    StatusLine,
    counted,
    display_path,
    duration_text,
    print_json,
    shown,
)
from imgindex.errors import ImgIndexError


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

    require_existing(folders, "FOLDERS")
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
                f"{counted(result.not_indexed, 'labelled image')} not in the index (missing "
                "files, or files that could not be read): left out."
            )
        if skipped:
            click.echo(f"{counted(skipped, 'file')} could not be read: skipped.")
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
        with open_index(index_path, **model_args) as index:
            if weights is not None:
                # The stored vectors are scored; other weights would need another index.
                index.check_weights()
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
    callback=check_device,
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
    from imgindex.devices import resolve_device
    from imgindex.files import walk_images
    from imgindex.train import TrainOptions, default_step
    from imgindex.train import train as run_training

    require_existing(folders, "FOLDERS")
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
        labels = counted(len(set(eval_set.labels)), "label")
        say(f"Evaluation set: {counted(len(eval_set), 'image')}, {labels}.")
    say(f"Training on {len(images)} images (no labels used).")
    _say_how_it_trains(say, options, len(images), resume, resolve_device(device) == "cpu")
    line = TrainProgressLine(progress and not as_json, say_first_step=not as_json)
    on_eval, on_unreadable, on_interrupt = _training_callbacks(line, say)
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
    else:
        _say_what_was_trained(report, out)
    if report.stopped_by == "interrupt":
        sys.exit(130)


def _say_how_it_trains(
    say: Callable[[str], None], options: Any, images: int, resume: bool, on_cpu: bool
) -> None:
    """Before training: the options a resumed run ignores, or what each step holds."""
    from imgindex.train import step_memory

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
        return
    per_step = min(options.images_per_step, images)
    cost = ""
    if on_cpu:
        need = step_memory(options.arch, per_step, options.views_per_image, options.crop_size)
        cost = f", about {need / 1e9:.1f} GB of memory"
    say(
        f"Each step: {per_step} images x {options.views_per_image} views of "
        f"{options.crop_size} pixels{cost}."
    )
    if on_cpu and options.arch == "resnet50":
        say(
            "No GPU: a ResNet50 trains slowly on a CPU (the README's training section has "
            "figures); --arch resnet18 --init scratch is faster."
        )


def _training_callbacks(line: Any, say: Callable[[str], None]) -> tuple[Any, Any, Any]:
    """What training reports as it goes: evaluations, unreadable images, a first Ctrl-C."""

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

    return on_eval, on_unreadable, on_interrupt


def _say_what_was_trained(report: Any, out: Path) -> None:
    how = {"steps": "step budget reached", "minutes": "time budget reached"}
    how["interrupt"] = "interrupted"
    if report.cut_short:
        how["interrupt"] = "interrupted during a step; kept the last checkpoint"
    click.echo(
        f"Trained {counted(report.steps_this_run, 'step')} ({report.steps} in all) in "
        f"{duration_text(report.seconds)}, {report.views_per_second:.0f} views/s with "
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
        rate, elapsed = f"{state.views_per_second:.0f} views/s", duration_text(state.elapsed)
        self.show(
            f"Training step {state.step}{total}  loss {state.loss:.4f}  {rate}  lr {state.lr:.1e}  "
            f"{elapsed}"
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

    with open_index(index_path) as index:
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
