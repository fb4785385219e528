"""Teaching AugNet a user's own collection, without labels.

AugNet (Chen et al., arXiv:2106.06250) learns from unlabelled pictures alone: augmented views of
one picture are pulled together in the embedding space and views of different pictures pushed
apart. Fine-tuning the stock weights (trained on ImageNet photos) on the user's collection adapts
them to what it looks like: players on a pitch, product shots, scans.

One training step, following one batch from files to weights (:class:`Trainer` runs them):

1. :class:`~imgindex.augment.Batches` picks P images; :class:`~imgindex.augment.ViewSource` (in
   DataLoader worker processes) decodes each once and cuts K views from it: random crops at
   several scales and shapes, flips, small rotations and JPEG artefacts, as ``P x K`` uint8
   crops of ``crop_size`` pixels.
2. :func:`~imgindex.augment.photometric` changes colour (brightness, contrast, saturation, hue),
   turns some views grey, blurs, adds noise and drops out patches, on the training device, a
   whole batch at once (so a GPU is never left waiting on CPU image operations).
3. The network embeds the views (bf16 autocast and channels_last on a GPU); ``augnet_loss``
   compares each view with the centre of its own image's views and with the other images'
   centres; AdamW updates the weights.

Checkpoints (``weights.write_checkpoint``) are written atomically, record how they were made, and
load through the same safe loader as the stock weights; the ``.last.pth`` one also holds the
optimizer, so an interrupted run resumes where it stopped. With an evaluation set, mAP is
measured before training and at every checkpoint, and the best weights are kept.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import hashlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgindex.ann import available_memory
from imgindex.augment import AUGMENTATIONS, Batches, ViewSource, collate
from imgindex.decode import read_image_file
from imgindex.devices import memory_format, resolve_device
from imgindex.errors import ImageError, ImgIndexError, WeightsError
from imgindex.evaluate import RetrievalScores, evaluate_vectors, require_a_repeated_label
from imgindex.ingest import default_workers
from imgindex.model import Vectorizer
from imgindex.objective import train_step
from imgindex.preprocessing import PRESETS
from imgindex.weights import (
    ARCHS,
    EMBEDDING_DIM,
    build_network,
    load_network,
    network_arch,
    read_checkpoint,
    resolve_weights,
    write_checkpoint,
)

if TYPE_CHECKING:
    import torch

LOSSES = ("contrastive", "softmax")


@dataclass(frozen=True)
class TrainOptions:
    """How to train. The defaults fine-tune the stock ResNet50 the way the issue's prototype
    did (48 images x 8 views of 224 pixels per step, AdamW at 2e-4)."""

    arch: str = "resnet50"
    init: str = "stock"  # "stock" (imgsim's weights), "scratch", or a checkpoint path
    images_per_step: int = 48  # P
    views_per_image: int = 8  # K
    crop_size: int = 224
    loss: str = "contrastive"
    temperature: float = 0.1  # softmax form
    margin: float = 1.0  # contrastive form, in RMS-per-dimension units (see augnet_loss)
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20
    # Batch-norm statistics: frozen when fine-tuning (the augmented crops would pull them away
    # from the clean, full images that are embedded later), updated when training from scratch.
    freeze_bn: bool | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ImgIndexError(f"unknown backbone {self.arch!r}; choose: {', '.join(ARCHS)}")
        if self.loss not in LOSSES:
            raise ImgIndexError(f"unknown loss {self.loss!r}; choose: {', '.join(LOSSES)}")
        if self.init == "stock" and self.arch != "resnet50":
            raise ImgIndexError(
                f"the stock weights are a resnet50; train a {self.arch} with --init scratch "
                "(or from a checkpoint of that backbone)"
            )
        if self.images_per_step < 2 or self.views_per_image < 2:
            raise ImgIndexError("a step needs at least 2 images and 2 views of each")
        if self.crop_size < 32:
            raise ImgIndexError("--crop-size must be at least 32 pixels")

    @property
    def bn_frozen(self) -> bool:
        return self.init != "scratch" if self.freeze_bn is None else self.freeze_bn


# What a training step holds in memory on a CPU (fp32): a fixed part (the network, its
# gradients, AdamW's two moments, PyTorch itself) and the activations kept for the backward
# pass, per view and per pixel of its crop: fitted to the peak memory of real steps, which
# benchmarks/train_memory.py measures against this estimate (it overestimates large crops a
# little).
STEP_FIXED_BYTES = 1_100_000_000
STEP_BYTES_PER_VIEW_PIXEL = {"resnet50": 2_400, "resnet34": 900, "resnet18": 600}
# A CPU step may take this share of the memory available; the rest is for the view workers,
# the evaluation set's embedding, and the other programs of the machine.
STEP_MEMORY_SHARE = 0.7
# Step sizes when none are given. On a GPU, the prototype's (48 images x 8 views of 224
# pixels); on a CPU, one that fits a laptop's memory (what steps cost is measured by
# benchmarks/train_memory.py and shown in the README).
GPU_STEP = {"images_per_step": 48, "views_per_image": 8, "crop_size": 224}
CPU_STEP = {"images_per_step": 16, "views_per_image": 4, "crop_size": 96}


def step_memory(arch: str, images: int, views_per_image: int, crop_size: int) -> int:
    """Bytes a training step of ``images`` x ``views_per_image`` crops holds on a CPU."""
    pixels = images * views_per_image * crop_size**2
    return STEP_FIXED_BYTES + STEP_BYTES_PER_VIEW_PIXEL[arch] * pixels


def default_step(device: str, arch: str, images: int) -> dict[str, int]:
    """Step sizes for a run on ``device`` when none are given: GPU_STEP on a GPU; on a CPU,
    CPU_STEP with fewer images per step if need be to fit the memory available (never fewer
    than 2; :func:`check_step_memory` then refuses)."""
    if resolve_device(device) != "cpu":
        return dict(GPU_STEP)
    sizes = dict(CPU_STEP)
    budget = STEP_MEMORY_SHARE * available_memory()
    while sizes["images_per_step"] > 2 and budget < step_memory(
        arch, min(sizes["images_per_step"], images), sizes["views_per_image"], sizes["crop_size"]
    ):
        sizes["images_per_step"] //= 2
    return sizes


def check_step_memory(options: TrainOptions, images: int) -> int:
    """Refuse, on a CPU, a step that would not fit in the memory available (it would be
    killed, or swap for hours); returns the bytes the step needs. ``images``: per step."""
    need = step_memory(options.arch, images, options.views_per_image, options.crop_size)
    have = available_memory()
    if need <= STEP_MEMORY_SHARE * have:
        return need
    cpu = CPU_STEP
    fits = step_memory(options.arch, cpu["images_per_step"], cpu["views_per_image"],
                       cpu["crop_size"])  # fmt: skip
    raise ImgIndexError(
        f"a training step of {images} images x {options.views_per_image} views of "
        f"{options.crop_size} pixels needs about {need / 1e9:.1f} GB of memory on a CPU, more "
        f"than this machine can give it ({have / 1e9:.1f} GB available); use fewer images per "
        "step, fewer views or smaller crops, for example --images-per-step "
        f"{cpu['images_per_step']} --views-per-image {cpu['views_per_image']} --crop-size "
        f"{cpu['crop_size']} (about {fits / 1e9:.1f} GB; in Python, the same TrainOptions)"
    )


@dataclass
class TrainProgress:
    """Where a run stands, for progress lines."""

    step: int
    total_steps: int | None
    loss: float
    views_per_second: float
    elapsed: float  # seconds of this run
    lr: float


@dataclass
class EvalResult:
    step: int
    scores: dict[str, RetrievalScores]
    best: bool

    @property
    def mean_average_precision(self) -> float:
        return self.scores["l2"].mean_average_precision

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "best": self.best,
            **{f"mAP_{m}": s.mean_average_precision for m, s in self.scores.items()},
            **{f"recall@10_{m}": s.recall_at.get(10) for m, s in self.scores.items()},
        }


@dataclass
class TrainReport:
    out: Path
    last: Path
    steps: int  # total, including steps of runs this one resumed
    steps_this_run: int
    views_per_second: float  # training steps only (evaluation and checkpoints left out)
    seconds: float
    stopped_by: str  # "steps", "minutes" or "interrupt"
    workers: int = 0  # processes that cut views (0: the main process)
    evaluations: list[EvalResult] = field(default_factory=list)  # this run's
    history: list[dict[str, Any]] = field(default_factory=list)  # every run's, oldest first
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    # Stopped at once (a second Ctrl-C) during a step: that step and those since the last
    # checkpoint were dropped; ``steps`` is what the files hold.
    cut_short: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "last": str(self.last),
            "steps": self.steps,
            "steps_this_run": self.steps_this_run,
            "views_per_second": self.views_per_second,
            "seconds": self.seconds,
            "stopped_by": self.stopped_by,
            "cut_short": self.cut_short,
            "workers": self.workers,
            "evaluations": self.history,
            "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
        }


def last_path(out: Path) -> Path:
    """Where the resumable checkpoint of ``out`` lives: ``ft.pth`` -> ``ft.last.pth``."""
    return out.with_name(out.stem + ".last" + (out.suffix or ".pth"))


def data_fingerprint(paths: Sequence[Path]) -> str:
    """SHA-256 of the sorted (path, size, mtime) of the training files: which collection, in
    which state, a checkpoint learnt from (cheap: no file is read)."""
    digest = hashlib.sha256()
    for path in sorted(os.fsdecode(p) for p in paths):
        try:
            st = os.stat(path)
            digest.update(f"{path}\0{st.st_size}\0{int(st.st_mtime)}\n".encode(errors="replace"))
        except OSError:
            digest.update(f"{path}\0missing\n".encode(errors="replace"))
    return digest.hexdigest()


# -- evaluation during training ------------------------------------------------------------------


class EvalSet:
    """Labelled images for measuring retrieval quality while training, prepared once (exact
    preprocessing, as imgindex embeds them) and kept in memory."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[str],
        groups: Sequence[str | None] | None = None,
        threads: int | None = None,
    ):
        preprocessing = PRESETS["exact"]

        def prepare(path: Path) -> Any:
            try:
                return preprocessing.resize(read_image_file(path).pixels, os.fsdecode(path))
            except (ImageError, OSError):
                return None

        with cf.ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            tensors = list(pool.map(prepare, paths))
        keep = [i for i, t in enumerate(tensors) if t is not None]
        if len(keep) < 2:
            raise ImgIndexError("the evaluation set needs at least two readable labelled images")
        require_a_repeated_label([labels[i] for i in keep])
        self.tensors = [tensors[i] for i in keep]
        self.labels = [labels[i] for i in keep]
        self.groups = [groups[i] for i in keep] if groups else None
        self.unreadable = len(paths) - len(keep)

    def __len__(self) -> int:
        return len(self.tensors)

    def embed(self, network: torch.nn.Module, device: str, bf16: bool) -> Any:
        """Vectors of the evaluation images by ``network`` as it is now, the way imgindex
        embeds them (exact preprocessing, batches by shape)."""
        import torch

        vectorizer = Vectorizer.around(network, device, "bf16" if bf16 else "fp32")
        was_training = network.training
        network.eval()
        # cuDNN's autotuner would re-tune for every one of the many image shapes: off here.
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False
        try:
            return vectorizer.embed_tensors(self.tensors)
        finally:
            torch.backends.cudnn.benchmark = benchmark
            network.train(was_training)

    def score(self, network: torch.nn.Module, device: str, bf16: bool) -> dict[str, Any]:
        vectors = self.embed(network, device, bf16)
        return {
            metric: evaluate_vectors(vectors, self.labels, self.groups, metric, (1, 5, 10))
            for metric in ("l2", "cosine")
        }


# -- training --------------------------------------------------------------------------------


def _start_network(options: TrainOptions) -> tuple[torch.nn.Module, str | None]:
    """The network to start from and the SHA-256 of the weights it came from (None: scratch)."""
    if options.init == "scratch":
        return build_network(options.arch), None
    if options.init != "stock" and not os.path.exists(options.init):
        raise ImgIndexError(
            f"--init {options.init}: no such checkpoint (give stock, scratch or a weights file)"
        )
    weights = resolve_weights(None if options.init == "stock" else options.init)
    network = load_network(weights)
    if network_arch(network) != options.arch:
        raise WeightsError(
            f"{weights.path}: a {network_arch(network)} checkpoint, but --arch is {options.arch}"
        )
    return network, weights.sha256


def train(
    images: Sequence[Path],
    out: Path,
    options: TrainOptions = TrainOptions(),
    *,
    steps: int | None = None,
    minutes: float | None = None,
    eval_set: EvalSet | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    checkpoint_minutes: float = 2.0,
    checkpoint_every: int | None = None,
    on_progress: Callable[[TrainProgress], None] | None = None,
    on_eval: Callable[[EvalResult], None] | None = None,
    on_unreadable: Callable[[str, str], None] | None = None,
    stop: Callable[[], bool] | None = None,
    on_interrupt: Callable[[], None] | None = None,
) -> TrainReport:
    """Train AugNet on ``images`` until ``steps`` steps in all (counting resumed ones) or
    ``minutes`` of this run, writing ``out`` (the best weights with ``eval_set``, else the
    latest) and its resumable ``.last.pth`` at every checkpoint and at the end. An existing
    ``out`` is only replaced with ``resume`` or ``overwrite``. See :class:`Trainer` (this is
    ``Trainer(...).run(...)``).

    Ctrl-C (SIGINT, when called from the main thread) stops after the step under way, which is
    then saved, so a resumed run goes on exactly where this one stopped; ``on_interrupt`` is
    called when it arrives. A second Ctrl-C stops at once and keeps the last checkpoint: a step
    cut short would leave the network half-updated. So does a KeyboardInterrupt from elsewhere
    that arrives during a step."""
    budget = Budget(steps, minutes, checkpoint_minutes, checkpoint_every)
    trainer = Trainer(
        images, out, options, eval_set=eval_set, resume=resume, overwrite=overwrite,
        device=device, precision=precision, workers=workers,
    )  # fmt: skip
    return trainer.run(budget, on_progress, on_eval, on_unreadable, stop, on_interrupt)


@dataclass(frozen=True)
class Budget:
    """How long a run trains (``steps`` in all, counting resumed ones, or ``minutes`` of this
    run, whichever comes first) and how often it writes a checkpoint (every
    ``checkpoint_minutes``, and every ``checkpoint_every`` steps if given)."""

    steps: int | None = None
    minutes: float | None = None
    checkpoint_minutes: float = 2.0
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ImgIndexError("give a budget: steps or minutes")

    def spent(self, step: int, elapsed: float) -> str | None:
        """What the budget stops at, if it is spent: "steps" or "minutes"."""
        if self.steps is not None and step >= self.steps:
            return "steps"
        if self.minutes is not None and elapsed >= self.minutes * 60:
            return "minutes"
        return None

    def progress(self, step: int, elapsed: float) -> float:
        """How much of the budget is spent, 0 to 1 (for the learning-rate schedule)."""
        fractions = []
        if self.steps:
            fractions.append(step / self.steps)
        if self.minutes:
            fractions.append(elapsed / (self.minutes * 60))
        return min(1.0, max(fractions)) if fractions else 0.0

    def checkpoint_due(self, since_checkpoint: float, steps_since: int) -> bool:
        if since_checkpoint >= self.checkpoint_minutes * 60:
            return True
        return bool(self.checkpoint_every and steps_since >= self.checkpoint_every)


@dataclass
class RunState:
    """The counters of one run's loop."""

    step: int
    started: float = field(default_factory=time.monotonic)
    last_checkpoint: float = field(default_factory=time.monotonic)
    steps_since_checkpoint: int = 0
    paused: float = 0.0  # seconds spent evaluating and writing checkpoints
    views_done: int = 0
    stopped_by: str = "steps"
    in_step: bool = False  # an interrupt now would leave the network half-updated
    cut_short: bool = False


class Trainer:
    """One training run of AugNet on ``images``, writing ``out`` (see :func:`train`), with its
    state explicit: the network and its optimizer, the step reached (``start_step`` when
    resumed), the sampler's position (``drawn``: ahead of the step by the batches skipped for
    want of two readable images), the best mAP and the evaluation history, the step the
    checkpoint files hold (``saved_step``) and the files that could not be read."""

    def __init__(
        self,
        images: Sequence[Path],
        out: Path,
        options: TrainOptions = TrainOptions(),
        *,
        eval_set: EvalSet | None = None,
        resume: bool = False,
        overwrite: bool = False,
        device: str = "auto",
        precision: str = "auto",
        workers: int | None = None,
    ):
        import torch

        self.images = sorted(Path(p) for p in images)
        if len(self.images) < 2:
            raise ImgIndexError(f"training needs at least two images, found {len(self.images)}")
        self.device = resolve_device(device)
        self.on_gpu = self.device.startswith("cuda")
        self.bf16 = precision == "bf16" or (
            precision == "auto" and self.on_gpu and torch.cuda.is_bf16_supported()
        )
        self.out, self.last = out, last_path(out)
        if not resume and not overwrite and (out.exists() or self.last.exists()):
            raise ImgIndexError(
                f"{out if out.exists() else self.last} exists: resume that run (--resume) or "
                "start over and replace it (--force)"
            )
        state = _resume_state(self.last, resume)
        if state is not None:
            options = state["options"]
        seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
        self.options = options = TrainOptions(**{**asdict(options), "seed": seed})
        self.seed = seed
        self.per_step = min(options.images_per_step, len(self.images))
        if not self.on_gpu:
            check_step_memory(options, self.per_step)
        torch.manual_seed(seed)
        self._start(state)
        workers = _default_workers(self.device) if workers is None else workers
        batch_bytes = self.per_step * options.views_per_image * options.crop_size**2 * 3
        self.workers = _fit_shared_memory(workers, batch_bytes)
        self.eval_set = eval_set
        self.evaluations: list[EvalResult] = []
        self.saved_step: int | None = None
        self.unreadable: dict[str, str] = {}
        self.fingerprint = data_fingerprint(self.images)
        self.on_eval: Callable[[EvalResult], None] | None = None

    def _start(self, state: dict[str, Any] | None) -> None:
        """The network, optimizer and counters: fresh, or where the resumed run stopped."""
        import torch

        options = self.options
        self.resumed = state is not None
        if state is not None:
            network = build_network(options.arch)
            network.load_state_dict(state["checkpoint"].state)
            self.base_sha = state["meta"].get("base_weights_sha256")
        else:
            network, self.base_sha = _start_network(options)
        self.network = network.to(self.device).to(memory_format=memory_format(self.device))
        _training_mode(self.network, options.bn_frozen)
        self.optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=options.lr, weight_decay=options.weight_decay
        )
        self.start_step, self.best, self.drawn = 0, -1.0, 0
        self.history: list[dict[str, Any]] = []
        if state is not None:
            training = state["training"]
            self.optimizer.load_state_dict(training["optimizer"])
            self.start_step = int(training["step"])
            self.history = list(state["meta"].get("eval", []))
            self.best = float(training.get("best", -1.0))
            # Each step's views are cut from its batch's position, so a resumed run goes on
            # from there.
            self.drawn = int(training.get("batches", self.start_step))

    def _loader(self) -> Any:
        import torch

        return torch.utils.data.DataLoader(
            ViewSource(
                self.images, self.options.views_per_image, self.options.crop_size, self.seed
            ),
            batch_sampler=Batches(len(self.images), self.per_step, self.seed, self.drawn),
            num_workers=self.workers,
            collate_fn=collate,
            pin_memory=self.on_gpu,
            prefetch_factor=2 if self.workers else None,
            persistent_workers=bool(self.workers),
            worker_init_fn=_ignore_interrupts,  # Ctrl-C reaches them too; the loop decides
        )

    # -- checkpoints ----------------------------------------------------------------------------

    def meta(self, step: int) -> dict[str, Any]:
        """What a checkpoint at ``step`` records of how it was made."""
        import torch

        import imgindex

        options = self.options
        return {
            "arch": options.arch,
            "dim": EMBEDDING_DIM,
            "model": f"augnet-{options.arch}-{EMBEDDING_DIM}",
            "init": options.init,
            "base_weights_sha256": self.base_sha,
            "steps": step,
            "views_seen": step * self.per_step * options.views_per_image,
            "data": {"images": len(self.images), "fingerprint": self.fingerprint},
            "preprocessing": PRESETS["exact"].describe(),
            "options": asdict(options),
            "augmentation": AUGMENTATIONS,
            "eval": self.history,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "imgindex": imgindex.__version__,
            "torch": torch.__version__,
        }

    def evaluate(self, step: int) -> bool:
        """Score the network on the evaluation set (if any); whether it is the best yet."""
        if self.eval_set is None:
            return False
        scores = self.eval_set.score(self.network, self.device, self.bf16)
        _training_mode(self.network, self.options.bn_frozen)
        is_best = scores["l2"].mean_average_precision > self.best
        if is_best:
            self.best = scores["l2"].mean_average_precision
        result = EvalResult(step, scores, is_best)
        self.evaluations.append(result)
        self.history.append(result.as_dict())
        if self.on_eval:
            self.on_eval(result)
        return is_best

    def save(self, step: int, improved: bool) -> None:
        """Write the resumable checkpoint, and ``out`` (without an evaluation set, or when
        ``improved``)."""
        self.saved_step = step
        training = {
            "optimizer": self.optimizer.state_dict(),
            "step": step,
            "best": self.best,
            "batches": self.drawn,
        }
        write_checkpoint(self.last, self.network, self.meta(step), training)
        if self.eval_set is None or improved:
            write_checkpoint(self.out, self.network, self.meta(step))

    # -- the run ----------------------------------------------------------------------------

    def run(
        self,
        budget: Budget,
        on_progress: Callable[[TrainProgress], None] | None = None,
        on_eval: Callable[[EvalResult], None] | None = None,
        on_unreadable: Callable[[str, str], None] | None = None,
        stop: Callable[[], bool] | None = None,
        on_interrupt: Callable[[], None] | None = None,
    ) -> TrainReport:
        """Train within ``budget`` (see :func:`train` for the callbacks and Ctrl-C)."""
        import torch

        self.on_eval = on_eval
        # Restored when training ends: the caller's process may embed images of many shapes next.
        saved_flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
        if self.on_gpu:
            torch.backends.cudnn.benchmark = True  # one input shape for the whole run
            torch.backends.cuda.matmul.allow_tf32 = True
        loader = self._loader()
        self.generator = torch.Generator(device=self.device)
        if not self.resumed and self.evaluate(0):
            write_checkpoint(self.out, self.network, self.meta(0))
        run = RunState(step=self.start_step)
        batches = iter(loader)
        interrupts = _Interrupts(on_interrupt)
        try:
            interrupts.install()
            self._loop(run, batches, budget, interrupts, stop, on_progress, on_unreadable)
        except KeyboardInterrupt:
            run.stopped_by, run.cut_short = "interrupt", run.in_step
        finally:
            interrupts.uninstall()
            del batches
            torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = saved_flags
        if self.on_gpu:
            torch.cuda.synchronize()
        return self._finish(run)

    def _loop(
        self,
        run: RunState,
        batches: Iterator[Any],
        budget: Budget,
        interrupts: _Interrupts,
        stop: Callable[[], bool] | None,
        on_progress: Callable[[TrainProgress], None] | None,
        on_unreadable: Callable[[str, str], None] | None,
    ) -> None:
        # Reading the loss waits for the device; on a GPU, only every few steps, so the CPU
        # queues the next step's work while the GPU computes this one.
        sync_every = 1 if self.device == "cpu" else 10
        while True:
            elapsed = time.monotonic() - run.started
            spent = budget.spent(run.step, elapsed)
            if spent is not None:
                run.stopped_by = spent
                return
            if interrupts.requested or (stop is not None and stop()):
                run.stopped_by = "interrupt"
                return
            views, failed = next(batches)
            self.drawn += 1
            self._note_unreadable(failed, on_unreadable)
            if views is None or len(views) < 2:
                self._require_two_readable()
                continue
            lr = self._schedule(run.step, budget.progress(run.step, elapsed))
            run.in_step = True
            loss = self._step(run.step, views)
            run.step += 1
            run.in_step = False
            run.views_done += len(views) * self.options.views_per_image
            run.steps_since_checkpoint += 1
            if run.step % sync_every == 0:
                loss_value = float(loss.detach())
                if on_progress:
                    now = time.monotonic()
                    rate = run.views_done / max(now - run.started - run.paused, 1e-9)
                    elapsed = now - run.started
                    on_progress(
                        TrainProgress(run.step, budget.steps, loss_value, rate, elapsed, lr)
                    )
            since = time.monotonic() - run.last_checkpoint
            if budget.checkpoint_due(since, run.steps_since_checkpoint):
                pause = time.monotonic()
                self.save(run.step, self.evaluate(run.step))
                run.last_checkpoint = time.monotonic()
                run.paused += run.last_checkpoint - pause
                run.steps_since_checkpoint = 0

    def _note_unreadable(
        self, failed: list[tuple[int, str]], on_unreadable: Callable[[str, str], None] | None
    ) -> None:
        """Remember the images a batch could not read (and tell ``on_unreadable``)."""
        for i, reason in failed:
            name = os.fsdecode(self.images[i])
            if name not in self.unreadable:
                self.unreadable[name] = reason
                if on_unreadable:
                    on_unreadable(name, reason)

    def _require_two_readable(self) -> None:
        if len(self.unreadable) > len(self.images) - 2:
            first, why = next(iter(self.unreadable.items()))
            raise ImgIndexError(
                f"fewer than two of the {len(self.images)} training images can be read "
                f"(first: {first}: {why})"
            )

    def _schedule(self, step: int, progress: float) -> float:
        """Set and return the learning rate of ``step``: a linear warm-up, then cosine decay."""
        options = self.options
        lr = options.lr * min(1.0, (step + 1) / options.warmup_steps) * _cosine(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _step(self, step: int, views: Any) -> Any:
        """One step on a batch of ``P x K x S x S x 3`` crops; the loss, not yet read."""
        # As N x 3 x S x S, the workers' K x S x S x 3 crops are channels_last.
        x = views.to(self.device, non_blocking=True).flatten(0, 1).permute(0, 3, 1, 2)
        # Seeded per step, so a resumed run makes the same views as an uninterrupted one.
        self.generator.manual_seed(self.seed * 1_000_003 + step)
        return train_step(
            self.network, self.optimizer, x, len(views), self.options, self.generator, self.bf16
        )

    def _finish(self, run: RunState) -> TrainReport:
        train_seconds = time.monotonic() - run.started - run.paused
        if run.cut_short:
            run.step = self.saved_step if self.saved_step is not None else self.start_step
        elif run.stopped_by == "interrupt":
            self.save(run.step, False)  # what was learnt stays; no evaluation on the way out
        elif run.steps_since_checkpoint or not self.last.exists():
            self.save(run.step, self.evaluate(run.step))
        return TrainReport(
            out=self.out,
            last=self.last,
            steps=run.step,
            steps_this_run=run.step - self.start_step,
            views_per_second=run.views_done / train_seconds if train_seconds else 0.0,
            seconds=time.monotonic() - run.started,
            stopped_by=run.stopped_by,
            workers=self.workers,
            evaluations=self.evaluations,
            history=self.history,
            unreadable=sorted(self.unreadable.items()),
            cut_short=run.cut_short,
        )


class _Interrupts:
    """While installed (main thread only), the first SIGINT asks the training loop to stop
    after its step; the second raises KeyboardInterrupt as usual."""

    def __init__(self, on_interrupt: Callable[[], None] | None):
        self.requested = False
        self.on_interrupt = on_interrupt
        self.previous: Any = None

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.on_interrupt is not None:
            self.on_interrupt()


def _ignore_interrupts(worker_id: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _resume_state(last: Path, resume: bool) -> dict[str, Any] | None:
    if not resume:
        return None
    if not last.exists():
        raise ImgIndexError(f"{last}: no checkpoint to resume from (run without --resume)")
    checkpoint = read_checkpoint(last)
    training = checkpoint.training
    if not isinstance(training, dict) or not {"optimizer", "step"} <= training.keys():
        raise ImgIndexError(f"{last}: not a resumable checkpoint (it holds no optimizer state)")
    if training["step"] != checkpoint.meta.get("steps"):
        # The metadata is covered by the checkpoint's digest, the training state is not.
        raise ImgIndexError(
            f"{last}: its training state says step {training['step']}, its metadata "
            f"{checkpoint.meta.get('steps')}: the file was changed; resume from another copy "
            "or start over (--force)"
        )
    saved = dict(checkpoint.meta.get("options", {}))
    known = set(TrainOptions.__dataclass_fields__)
    return {
        "checkpoint": checkpoint,
        "meta": checkpoint.meta,
        "training": checkpoint.training,
        "options": TrainOptions(**{k: v for k, v in saved.items() if k in known}),
    }


def _training_mode(network: torch.nn.Module, bn_frozen: bool) -> None:
    import torch

    network.train()
    if bn_frozen:
        for module in network.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def _fit_shared_memory(workers: int, batch_bytes: int, folder: str = "/dev/shm") -> int:
    """As many workers as the shared memory can carry batches for (each has 2 in flight, plus
    one being copied out). Containers often give /dev/shm only 64 MB, where 14 workers of 58 MB
    batches would crash the run with a bus error minutes in; fewer workers only slow it."""
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return workers
    fitting = int(free * 0.8) // (3 * batch_bytes)
    if workers > fitting:
        if fitting < 1:
            return 0  # views are cut in the main process, which needs no shared memory
        return fitting
    return workers


def _default_workers(device: str) -> int:
    """Worker processes cutting views: as many as a build's reading threads (none on a CPU,
    where the network keeps the cores busy; most of them beside a GPU), and at least 2 then."""
    readers = default_workers(device)
    return max(2, readers) if readers else 0


def _cosine(progress: float) -> float:
    """Cosine decay of the learning rate to a tenth over the budget."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
