"""Training AugNet on CPU: tiny configurations on real images (ResNet18 from scratch at 64
pixels), so every property is checked in seconds; one slow test fine-tunes the real AugNet."""

import itertools
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import imgindex
from imgindex.augment import photometric
from imgindex.cli import cli
from imgindex.errors import IncompatibleIndexError, WeightsError
from imgindex.evaluate import evaluate_vectors
from imgindex.files import walk_images
from imgindex.model import Vectorizer
from imgindex.train import EvalSet, TrainOptions, last_path, train
from imgindex.weights import AUGNET_SHA256, build_network, read_checkpoint

from .conftest import DATA, random_image

TINY = {"arch": "resnet18", "init": "scratch", "crop_size": 64, "views_per_image": 2}


def images(*folders):
    return sorted(walk_images([DATA / f for f in folders]))


def state_of(path):
    return read_checkpoint(Path(path)).state


@pytest.mark.parametrize("loss", ["contrastive", "softmax"])
def test_a_few_steps_reduce_the_loss(tmp_path, loss):
    # The same 12 photos every step (in new augmented views): the network learns to tell them
    # apart, so the loss falls.
    options = TrainOptions(**TINY, images_per_step=12, loss=loss, lr=1e-3, seed=0,
                           warmup_steps=1)  # fmt: skip
    losses = []
    report = train(
        images("pizza", "stop_sign"),
        tmp_path / "ft.pth",
        options,
        steps=12,
        device="cpu",
        on_progress=lambda p: losses.append(p.loss),
    )
    assert report.steps == 12 and len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses
    assert report.views_per_second > 0


def test_checkpoint_round_trip(tmp_path):
    out = tmp_path / "ft.pth"
    paths = images("pizza", "bonsai")
    report = train(paths, out, TrainOptions(**TINY, images_per_step=4, seed=3), steps=2,
                   device="cpu")  # fmt: skip
    assert report.out == out and report.last == tmp_path / "ft.last.pth"
    checkpoint = read_checkpoint(out)
    meta = checkpoint.meta
    assert checkpoint.arch == "resnet18" and checkpoint.training is None
    assert meta["steps"] == 2 and meta["views_seen"] == 2 * 4 * 2
    assert meta["init"] == "scratch" and meta["base_weights_sha256"] is None
    assert meta["data"]["images"] == 12 and len(meta["data"]["fingerprint"]) == 64
    assert meta["preprocessing"]["short_side"] == 350 and meta["options"]["seed"] == 3
    assert read_checkpoint(report.last).training["step"] == 2

    # The checkpoint, loaded as weights, embeds like the network it holds.
    vectorizer = Vectorizer(device="cpu", weights=out)
    assert vectorizer.fingerprint()["model"] == "augnet-resnet18-768"
    network = build_network("resnet18")
    network.load_state_dict(checkpoint.state)
    network.eval()
    image = paths[0]
    with torch.inference_mode():
        x = vectorizer.preprocessing.normalize(vectorizer.prepare(image)[None])
        expected = network(x).numpy()[0]
    assert np.abs(vectorizer.vectorize(image) - expected).max() < 1e-5


def test_tampered_checkpoints_are_refused(tmp_path):
    out = tmp_path / "ft.pth"
    train(images("pizza"), out, TrainOptions(**TINY, images_per_step=4, seed=0), steps=1,
          device="cpu")  # fmt: skip
    payload = torch.load(out, weights_only=True)
    payload["state_dict"]["0.fc.bias"][0] += 0.5  # one number changed, digest kept
    changed = tmp_path / "changed.pth"
    torch.save(payload, changed)
    with pytest.raises(WeightsError, match="recorded digest"):
        Vectorizer(device="cpu", weights=changed)

    payload = torch.load(out, weights_only=True)
    payload["meta"] = payload["meta"].replace('"steps": 1', '"steps": 1000')
    torch.save(payload, changed)
    with pytest.raises(WeightsError, match="recorded digest"):
        read_checkpoint(changed)

    # A checkpoint that would run code when unpickled is not loaded at all.
    torch.save({"format": "imgindex-augnet-checkpoint", "hook": os.getcwd}, changed)
    with pytest.raises(
        WeightsError, match="not a loadable PyTorch state dict: it holds objects other than tensors"
    ):
        read_checkpoint(changed)

    changed.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(WeightsError, match="not a loadable"):
        Vectorizer(device="cpu", weights=changed)


def test_resume_continues_from_the_saved_step_like_an_uninterrupted_run(tmp_path):
    paths = images("pizza", "sea_horse")
    options = TrainOptions(**TINY, images_per_step=4, seed=7)
    straight = train(paths, tmp_path / "a.pth", options, steps=4, device="cpu")
    assert straight.steps == 4

    # The same run, interrupted after 2 of its 4 steps (as Ctrl-C would), then resumed.
    done = []
    first = train(paths, tmp_path / "b.pth", options, steps=4, device="cpu",
                  on_progress=done.append, stop=lambda: len(done) >= 2)  # fmt: skip
    assert first.steps == 2 and first.stopped_by == "interrupt"
    # Resuming takes the saved options (a different --lr here is ignored) and the saved step.
    resumed = train(paths, tmp_path / "b.pth", TrainOptions(**TINY, lr=1.0), steps=4,
                    device="cpu", resume=True)  # fmt: skip
    assert resumed.steps == 4 and resumed.steps_this_run == 2
    a, b = state_of(tmp_path / "a.pth"), state_of(tmp_path / "b.pth")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    # (Another seed gives weights that differ by far more than that.)
    other = train(paths, tmp_path / "c.pth", TrainOptions(**TINY, images_per_step=4, seed=8),
                  steps=4, device="cpu")  # fmt: skip
    c = state_of(other.out)
    assert max((a[k].float() - c[k].float()).abs().max() for k in a) > 1e-2

    with pytest.raises(imgindex.ImgIndexError, match="no checkpoint to resume from"):
        train(paths, tmp_path / "d.pth", options, steps=2, device="cpu", resume=True)


def test_interrupt_keeps_a_resumable_checkpoint(tmp_path):
    paths = images("bonsai")
    progress = []
    report = train(paths, tmp_path / "ft.pth", TrainOptions(**TINY, images_per_step=3, seed=1),
                   steps=50, device="cpu", on_progress=progress.append,
                   stop=lambda: len(progress) >= 2)  # fmt: skip
    assert report.stopped_by == "interrupt" and report.steps == 2
    assert read_checkpoint(last_path(tmp_path / "ft.pth")).training["step"] == 2


def test_eval_set_keeps_the_best_weights(tmp_path):
    paths = images("pizza", "stop_sign", "Leopards")
    eval_paths = images("airplanes", "bonsai", "sea_horse")
    eval_set = EvalSet(eval_paths, [p.parent.name for p in eval_paths])
    evals = []
    report = train(paths, tmp_path / "ft.pth", TrainOptions(**TINY, images_per_step=6, seed=2,
                   lr=3e-3), steps=6, device="cpu", eval_set=eval_set, checkpoint_every=2,
                   on_eval=evals.append)  # fmt: skip
    assert [e.step for e in evals] == [0, 2, 4, 6]
    assert [e["step"] for e in report.history] == [0, 2, 4, 6]
    best = max(evals, key=lambda e: e.mean_average_precision)
    assert sum(e.best for e in evals) >= 1 and evals[0].best
    assert read_checkpoint(tmp_path / "ft.pth").meta["steps"] == best.step
    assert read_checkpoint(report.last).meta["steps"] == 6
    # The recorded mAP is what `imgindex eval` measures with these weights.
    vectors = Vectorizer(device="cpu", weights=tmp_path / "ft.pth").vectorize(eval_paths)
    labels = [p.parent.name for p in eval_paths]
    assert evaluate_vectors(vectors, labels).mean_average_precision == pytest.approx(
        best.mean_average_precision, abs=1e-4
    )


def test_an_index_refuses_another_checkpoint(tmp_path):
    paths = images("pizza")
    for seed in (0, 1):
        train(paths, tmp_path / f"m{seed}.pth", TrainOptions(**TINY, images_per_step=3,
              seed=seed), steps=1, device="cpu")  # fmt: skip
    with imgindex.Index.create(tmp_path / "idx", weights=tmp_path / "m0.pth", device="cpu") as ix:
        ix.add(paths)
    other = imgindex.Index.open(tmp_path / "idx", weights=tmp_path / "m1.pth", device="cpu")
    with other, pytest.raises(IncompatibleIndexError, match="built with weights"):
        other.search(paths[0])
    with imgindex.Index.open(tmp_path / "idx", weights=tmp_path / "m0.pth", device="cpu") as ix:
        assert ix.search(paths[0], k=1)[0].path == str(paths[0])


def test_photometric_augmentation():
    views = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = photometric(views, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    again = photometric(views, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    changed = (out - views.float() / 255).abs().amax((1, 2, 3))
    assert (changed > 0.01).sum() >= 10  # most views are changed, each in its own way


def test_a_rotated_view_is_the_crop_of_the_rotated_picture():
    from PIL import Image

    from imgindex.augment import _MEAN_RGB, _random_box, _rotated_crop

    rng = random.Random(3)
    photo = Image.open(DATA / "Leopards" / "image_0002.jpg").convert("RGB")
    for size in (32, 224):
        for _ in range(12):
            angle, box = rng.uniform(-20, 20), _random_box(*photo.size, rng)
            whole = photo.rotate(angle, resample=Image.BILINEAR, fillcolor=_MEAN_RGB)
            expected = np.asarray(whole.resize((size, size), Image.BILINEAR, box=box), int)
            got = np.asarray(_rotated_crop(photo, angle, box, size), int)
            assert np.abs(got - expected).max() <= 1 and np.abs(got - expected).mean() < 0.1


def test_augnet_loss_against_a_direct_computation():
    from imgindex.objective import augnet_loss

    images, views, margin = 3, 4, 1.0
    e = torch.randn(images * views, 768, generator=torch.Generator().manual_seed(1)) * 0.05
    centres = [e[i * views : (i + 1) * views].mean(0) for i in range(images)]
    pull, push = [], []
    for row in range(images * views):
        for image, centre in enumerate(centres):
            squared = float(((e[row] - centre) ** 2).sum()) / 768
            if image == row // views:
                pull.append(squared)
            else:
                push.append(max(0.0, margin - squared**0.5) ** 2)
    expected = np.mean(pull) + np.mean(push)
    assert abs(float(augnet_loss(e, images, "contrastive", margin=margin)) - expected) < 1e-5


def test_hue_rotation_keeps_luma_and_a_full_turn_is_the_identity():
    from imgindex.augment import _rotate_hue

    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    turned = _rotate_hue(x, torch.tensor([0.3, -0.2, 1.0, 2.0]))
    assert not torch.allclose(turned, x, atol=1e-3)
    assert torch.allclose((turned * luma).sum(1), (x * luma).sum(1), atol=1e-5)
    assert torch.allclose(_rotate_hue(x, torch.full((4,), 2 * np.pi)), x, atol=1e-5)


def test_train_command(tmp_path, photos):
    (photos / "pizza" / "broken.jpg").write_text("not a picture")
    out = tmp_path / "ft.pth"
    args = ["train", photos / "pizza", photos / "stop_sign", "--out", out, "--arch", "resnet18",
            "--init", "scratch", "--crop-size", "64", "--images-per-step", "4",
            "--views-per-image", "2", "--steps", "3", "--eval", photos, "--seed", "0",
            "--device", "cpu", "--json"]  # fmt: skip
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert report["steps"] == 3 and report["stopped_by"] == "steps"
    assert [e["step"] for e in report["evaluations"]] == [0, 3]
    assert report["unreadable"][0]["path"].endswith("broken.jpg")
    assert "Evaluation set: 37 images" not in result.stderr  # broken.jpg is not labelled data
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr
    assert out.exists() and last_path(out).exists()

    again = CliRunner().invoke(cli, [str(a) for a in args[:-1]])
    assert again.exit_code == 1
    assert f"{out} exists: resume that run (--resume) or start over" in again.stderr
    forced = CliRunner().invoke(cli, [str(a) for a in [*args, "--force"]])
    assert forced.exit_code == 0, forced.stderr
    resumed = CliRunner().invoke(
        cli, [str(a) for a in [*args[:-9], "--steps", "4", "--lr", "1", "--resume", "--json"]]
    )
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == 4
    assert (
        "Resuming with the run's own options: --arch, --init, --images-per-step" in resumed.stderr
    )
    assert "--lr ignored" in resumed.stderr

    again = CliRunner().invoke(cli, [str(a) for a in ["train", photos, "--out", out, "--arch",
                               "resnet18"]])  # fmt: skip
    assert again.exit_code == 1
    assert "the stock weights are a resnet50; train a resnet18 with --init scratch" in again.stderr
    typo = CliRunner().invoke(cli, [str(a) for a in ["train", photos, "--out", tmp_path / "t.pth",
                              "--init", "Scratch", "--steps", "1"]])  # fmt: skip
    assert typo.exit_code == 1 and "--init Scratch: no such checkpoint" in typo.stderr


@pytest.mark.slow
def test_fine_tuning_the_real_augnet(tmp_path):
    out = tmp_path / "ft.pth"
    options = TrainOptions(images_per_step=4, views_per_image=2, crop_size=96, seed=0)
    report = train(images("pizza", "bonsai"), out, options, steps=2, device="cpu")
    meta = read_checkpoint(out).meta
    assert report.steps == 2 and meta["base_weights_sha256"] == AUGNET_SHA256
    stock = read_checkpoint(imgindex.weights.default_weights_path()).state
    tuned = read_checkpoint(out).state
    # Batch-norm statistics stay frozen when fine-tuning; the weights move.
    assert torch.equal(stock["0.bn1.running_mean"], tuned["0.bn1.running_mean"])
    assert not torch.equal(stock["0.fc.weight"], tuned["0.fc.weight"])
    vector = Vectorizer(device="cpu", weights=out).vectorize(DATA / "pizza" / "image_0001.jpg")
    assert vector.shape == (768,) and np.isfinite(vector).all()


def test_workers_fit_the_shared_memory(monkeypatch):
    import shutil
    from collections import namedtuple

    from imgindex.train import _fit_shared_memory

    usage = namedtuple("usage", "total used free")
    batch = 48 * 8 * 224 * 224 * 3  # 58 MB
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(64 << 20, 0, 64 << 20))
    assert _fit_shared_memory(14, batch) == 0  # a container's 64 MB: cut views in-process
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 30, 0, 1 << 30))
    assert _fit_shared_memory(14, batch) == 4
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(64 << 30, 0, 64 << 30))
    assert _fit_shared_memory(14, batch) == 14


def test_training_on_unreadable_images_stops_with_a_reason(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_text("not a picture")
    (folder / "b.jpg").write_bytes(b"")
    random_image(folder / "c.png")
    with pytest.raises(imgindex.ImgIndexError, match="fewer than two of the 3 training images"):
        train(sorted(folder.iterdir()), tmp_path / "ft.pth", TrainOptions(**TINY, seed=0),
              steps=5, device="cpu")  # fmt: skip


def test_ctrl_c_stops_between_steps_and_a_second_one_keeps_the_last_checkpoint(
    tmp_path, monkeypatch
):
    """The first SIGINT ends the run after the step under way (saved, so resuming matches an
    uninterrupted run); an interrupt that cuts a step short saves nothing of it: the files keep
    the last checkpoint, never a half-updated network."""
    import signal

    import imgindex.train

    paths = images("pizza", "sea_horse")
    options = TrainOptions(**TINY, images_per_step=4, seed=7)
    straight = train(paths, tmp_path / "a.pth", options, steps=4, device="cpu")
    asked = []

    def ctrl_c(progress):
        if progress.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    first = train(paths, tmp_path / "b.pth", options, steps=4, device="cpu",
                  on_progress=ctrl_c, on_interrupt=lambda: asked.append(1))  # fmt: skip
    assert (first.steps, first.stopped_by, first.cut_short, asked) == (2, "interrupt", False, [1])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    train(paths, tmp_path / "b.pth", options, steps=4, device="cpu", resume=True)

    original = imgindex.train.train_step
    calls = []

    def step_cut_short(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)  # the network is updated...
        if len(calls) == 3:
            raise KeyboardInterrupt  # ...and the step never finishes
        return loss

    monkeypatch.setattr(imgindex.train, "train_step", step_cut_short)
    cut = train(paths, tmp_path / "c.pth", options, steps=4, device="cpu", checkpoint_every=2)
    assert (cut.steps, cut.stopped_by, cut.cut_short) == (2, "interrupt", True)
    assert read_checkpoint(cut.last).training["step"] == 2
    monkeypatch.setattr(imgindex.train, "train_step", original)
    train(paths, tmp_path / "c.pth", options, steps=4, device="cpu", resume=True)
    a = state_of(straight.out)
    for resumed in (state_of(tmp_path / "b.pth"), state_of(tmp_path / "c.pth")):
        for key in a:
            assert torch.allclose(a[key].float(), resumed[key].float(), atol=1e-6), key


def test_a_resumable_state_that_was_changed_is_refused(tmp_path):
    """The training state (optimizer, step) lies outside the checkpoint's digest: a step that
    disagrees with the signed metadata, or a missing optimizer, is refused with a message."""
    out = tmp_path / "ft.pth"
    train(images("pizza"), out, TrainOptions(**TINY, images_per_step=3, seed=0), steps=1,
          device="cpu")  # fmt: skip
    last = last_path(out)
    payload = torch.load(last, weights_only=True)
    payload["training"]["step"] = 1000
    torch.save(payload, last)
    with pytest.raises(imgindex.ImgIndexError, match="says step 1000, its metadata 1"):
        train(images("pizza"), out, steps=2, device="cpu", resume=True)
    del payload["training"]["optimizer"]
    torch.save(payload, last)
    with pytest.raises(imgindex.ImgIndexError, match="not a resumable checkpoint"):
        train(images("pizza"), out, steps=2, device="cpu", resume=True)


def test_resume_after_skipped_batches_cuts_the_same_views(tmp_path):
    """A batch without two readable images is skipped: the sampler moves on, the step does not.
    The resumable state records the sampler's position, so a resumed run still matches an
    uninterrupted one."""
    from imgindex.augment import Batches as _Batches

    folder = tmp_path / "pics"
    folder.mkdir()
    for path in images("pizza")[:4]:
        shutil.copy(path, folder / path.name)
    (folder / "x-broken-1.jpg").write_text("not a picture")
    (folder / "x-broken-2.jpg").write_text("not a picture either")
    paths = sorted(folder.iterdir())
    broken = {4, 5}  # their places in sorted order
    # A seed whose first batches include one of only the two broken images.
    first_batches = [list(itertools.islice(_Batches(6, 2, s), 2)) for s in range(100)]
    seed = next(s for s, batches in enumerate(first_batches)
                if any({i for _, i in b} == broken for b in batches))  # fmt: skip
    options = TrainOptions(**TINY, images_per_step=2, seed=seed)
    straight = train(paths, tmp_path / "a.pth", options, steps=4, device="cpu")
    done = []
    first = train(paths, tmp_path / "b.pth", options, steps=4, device="cpu",
                  on_progress=done.append, stop=lambda: len(done) >= 2)  # fmt: skip
    assert first.steps == 2
    train(paths, tmp_path / "b.pth", options, steps=4, device="cpu", resume=True)
    a, b = state_of(straight.out), state_of(tmp_path / "b.pth")
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
