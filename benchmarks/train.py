"""Fine-tuning AugNet on an unlabelled collection: retrieval quality before and after, and speed.

Trains on every image of the dataset (default: caltech101-dev) without its labels, for a fixed
budget, from imgsim's stock weights, and measures mAP / recall@10 by folder label (the labels
are used for nothing else) before training and at every checkpoint. Also measures, in the same
run, the two stages that bound training speed: the view pipeline alone (decoding and
augmentation in worker processes, no network) and the training step alone (the network on
views already on the device), so the table says which one limits the full run.

    python benchmarks/train.py [--dataset DIR] [--minutes 10 | --steps N] [--device auto]
        [--checkpoint-minutes 1] [--images-per-step 48] [--views-per-image 8] [--crop-size 224]
        [--loss contrastive|softmax] [--lr 2e-4] [--workers N] [--out ft.pth]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from imgindex.augment import Batches, ViewSource, collate
from imgindex.devices import memory_format, resolve_device
from imgindex.files import walk_images
from imgindex.objective import train_step
from imgindex.train import EvalSet, TrainOptions, _default_workers, _start_network, train

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = ROOT.parent / "shared" / "datasets" / "caltech101-dev"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--checkpoint-minutes", type=float, default=1.0)
    parser.add_argument("--images-per-step", type=int, default=48)
    parser.add_argument("--views-per-image", type=int, default=8)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--loss", default="contrastive", choices=["contrastive", "softmax"])
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="checkpoint (default: temporary)")
    parser.add_argument(
        "--stage-seconds", type=float, default=15, help="time for each stage-alone measurement"
    )
    args = parser.parse_args()
    if args.minutes is None and args.steps is None:
        args.minutes = 10.0
    if not args.dataset.is_dir():
        sys.exit(f"{args.dataset}: dataset folder not found (pass --dataset)")
    device = resolve_device(args.device)
    workers = _default_workers(device) if args.workers is None else args.workers
    options = TrainOptions(
        images_per_step=args.images_per_step,
        views_per_image=args.views_per_image,
        crop_size=args.crop_size,
        loss=args.loss,
        lr=args.lr,
        seed=args.seed,
    )

    paths = sorted(walk_images([args.dataset]))
    started = time.perf_counter()
    eval_set = EvalSet(paths, [p.parent.name for p in paths])
    print(
        f"{len(paths)} images, {len(set(eval_set.labels))} labels; evaluation set prepared in "
        f"{time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )

    loader_rate = step_rate = None
    if args.stage_seconds > 0:
        loader_rate = measure_loader(paths, options, workers, args.stage_seconds)
        step_rate = measure_steps(options, device, args.stage_seconds)

    def show(result) -> None:
        s = result.scores
        print(
            f"  step {result.step:>6}: mAP l2 {s['l2'].mean_average_precision:.4f} cosine "
            f"{s['cosine'].mean_average_precision:.4f}",
            file=sys.stderr,
            flush=True,
        )

    last_print = [0.0]

    def progress(state) -> None:
        if time.monotonic() - last_print[0] > 15:
            last_print[0] = time.monotonic()
            print(
                f"  step {state.step}: loss {state.loss:.4f}, {state.views_per_second:.0f} "
                f"views/s, {state.elapsed:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch) / "ft.pth"
        report = train(
            paths,
            out,
            options,
            steps=args.steps,
            minutes=args.minutes,
            eval_set=eval_set,
            device=device,
            workers=workers,
            checkpoint_minutes=args.checkpoint_minutes,
            on_progress=progress,
            on_eval=show,
        )

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "none"
    print(
        f"\nFine-tuning on {args.dataset.name}: {len(paths)} images, labels used only to "
        f"evaluate; {report.steps} steps in {report.seconds:.0f} s ({report.stopped_by} budget)"
    )
    print(
        f"Options: {options.arch} from {options.init}, {options.images_per_step} images x "
        f"{options.views_per_image} views of {options.crop_size} px per step, loss {options.loss},"
        f" lr {options.lr}, batch norm {'frozen' if options.bn_frozen else 'updated'}, seed "
        f"{options.seed}"
    )
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, GPU {gpu}, torch "
        f"{torch.__version__}; device {device}, {report.workers} view workers\n"
    )
    print(f"{'step':>7}{'mAP l2':>9}{'mAP cos':>9}{'R@10 l2':>9}{'P@10 l2':>9}")
    for e in report.evaluations:
        s = e.scores
        print(
            f"{e.step:>7}{s['l2'].mean_average_precision:>9.4f}"
            f"{s['cosine'].mean_average_precision:>9.4f}{s['l2'].recall_at[10]:>9.4f}"
            f"{s['l2'].precision_at[10]:>9.4f}"
        )
    first = report.evaluations[0]
    best = max(report.evaluations, key=lambda e: e.mean_average_precision)
    print(
        f"\nmAP (l2): {first.mean_average_precision:.4f} -> {best.mean_average_precision:.4f} "
        f"(gain {best.mean_average_precision - first.mean_average_precision:+.4f}, best at "
        f"step {best.step})"
    )
    print(f"\n{'throughput (views/s)':<44}{'views/s':>10}{'vs training':>13}")
    rows = [
        ("view pipeline alone (workers, no network)", loader_rate),
        ("training step alone (views on the device)", step_rate),
        ("training (end to end, evaluation excluded)", report.views_per_second),
    ]
    for name, rate in rows:
        if rate is None:
            continue
        ratio = rate / report.views_per_second if report.views_per_second else 0
        print(f"{name:<44}{rate:>10.0f}{ratio:>12.2f}x")


def measure_loader(paths, options: TrainOptions, workers: int, seconds: float) -> float:
    """Views/s the DataLoader delivers on its own (decoding and geometric augmentation)."""
    source = ViewSource(paths, options.views_per_image, options.crop_size, 0)
    loader = torch.utils.data.DataLoader(
        source,
        batch_sampler=Batches(len(paths), options.images_per_step, 0),
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers else None,
    )
    batches = iter(loader)
    next(batches)  # workers started
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        views, _ = next(batches)
        count += views.shape[0] * views.shape[1]
    rate = count / (time.perf_counter() - started)
    del batches
    return rate


def measure_steps(options: TrainOptions, device: str, seconds: float) -> float:
    """Views/s of the training step alone: photometric augmentation, forward, loss, backward
    and update, on random views already on the device."""
    network, _ = _start_network(options)
    on_gpu = device.startswith("cuda")
    network = network.to(device).to(memory_format=memory_format(device)).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-6)
    n = options.images_per_step * options.views_per_image
    size = options.crop_size
    views = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    torch.backends.cudnn.benchmark = True

    def step() -> torch.Tensor:
        return train_step(network, optimizer, views, options.images_per_step, options, generator,
                          bf16=on_gpu)  # fmt: skip

    float(step().detach())  # warm up
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        loss = step()
        count += n
        if count % (10 * n) == 0:  # as training does: the device may run a few steps behind
            float(loss.detach())
    float(loss.detach())  # wait for the device to finish them all
    return count / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
