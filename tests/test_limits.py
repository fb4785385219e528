"""Issue 12's resources part: a huge file costs what its header does, a file that failed once is
not read (nor the model loaded) again until it changes, and training on a CPU fits the machine."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import imgindex
import imgindex.decode
import imgindex.ingest
import imgindex.train
from imgindex.errors import ImageError, ImgIndexError

from .conftest import ROOT, FakeVectorizer, random_image

# -- 11. the header is read first, and what is read is capped -------------------------------------


def sparse(path: Path, size: int, head: bytes = b"") -> Path:
    """A file of ``size`` bytes that takes no room on disk but its first bytes."""
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)
    return path


def jpeg_bytes(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_huge_files_are_refused_from_their_header(tmp_path):
    zeros = sparse(tmp_path / "zeros.jpg", 4 << 30)
    with pytest.raises(ImageError, match="not an image"):
        imgindex.decode.read_file(zeros)
    video = sparse(tmp_path / "video.jpg", 2 << 30, jpeg_bytes())  # an image, then 2 GB
    with pytest.raises(ImageError, match=r"larger than an image of at most 89\.5 MP") as refused:
        imgindex.decode.read_file(video)
    assert refused.value.stat is not None and refused.value.stat.st_size == 2 << 30
    # A higher pixel limit allows a larger file, as the message says.
    limit = (2 << 30) // imgindex.decode.BYTES_PER_PIXEL
    data, _ = imgindex.decode.read_file(sparse(tmp_path / "v2.jpg", 1 << 20, jpeg_bytes()), limit)
    assert len(data) == 1 << 20


def test_a_header_that_never_ends_is_not_read_whole(tmp_path, monkeypatch):
    """A JPEG whose markers go on for ever (every one a valid 64 KB comment) is refused after
    HEADER_BYTES, not read to its end."""
    monkeypatch.setattr(imgindex.decode, "HEADER_BYTES", 1 << 20)
    comment = b"\xff\xfe\xff\xff" + b"x" * 65533
    path = tmp_path / "endless.jpg"
    path.write_bytes(b"\xff\xd8" + comment * 64)  # 4 MB of comments, no image
    with pytest.raises(ImageError, match="header of more than 1 MB"):
        imgindex.decode.read_file(path)


def test_a_build_beside_huge_files_stays_small(tmp_path):
    """A 4 GB sparse file named .jpg took 5.2 GB of memory before "not an image"; a large
    video with an image's name was read whole on every rerun."""
    folder = tmp_path / "pics"
    folder.mkdir()
    sparse(folder / "big.jpg", 4 << 30)
    sparse(folder / "video.jpg", 2 << 30, jpeg_bytes())
    random_image(folder / "ok.png")
    command = [sys.executable, "-m", "tests.crash_helper", "none", "0", "--", "build",
               str(folder), "--index", str(tmp_path / "idx"), "--json"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert "not an image" in reasons["big.jpg"]
    assert "refused unread" in reasons["video.jpg"]
    assert report["added"] == 1


def test_the_build_child_peak_memory(tmp_path):
    """The same build in a child whose peak memory is measured alone: well under the 2 GB it
    would take to hold the video file (the stand-in network and PyTorch take about 0.7 GB)."""
    folder = tmp_path / "pics"
    folder.mkdir()
    sparse(folder / "big.jpg", 4 << 30)
    sparse(folder / "video.jpg", 2 << 30, jpeg_bytes())
    script = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    build = ["build", str(folder), "--index", str(tmp_path / "idx")]
    command = [sys.executable, "-c", script, sys.executable, "-m", "tests.crash_helper",
               "none", "0", "--", *build]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) < 1.5e9


# -- 12. a skipped file is not read again until it changes ----------------------------------------


def test_unchanged_skipped_files_are_not_read_again_nor_the_model_loaded(
    run, tmp_path, monkeypatch
):
    folder = tmp_path / "pics"
    random_image(folder / "ok.png")
    (folder / "bad.jpg").write_bytes(b"this is not a picture")
    index = tmp_path / "idx"
    reads, loads = [], []
    real_read = imgindex.ingest.read_file
    monkeypatch.setattr(
        imgindex.ingest,
        "read_file",
        lambda path, *a: reads.append(path.name) or real_read(path, *a),
    )
    real_init = FakeVectorizer.__init__

    def init(self, *args, **kwargs):
        loads.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(FakeVectorizer, "__init__", init)
    first = json.loads(run("build", folder, "--index", index, "--json").stdout)
    assert [Path(s["path"]).name for s in first["skipped"]] == ["bad.jpg"]
    assert sorted(reads) == ["bad.jpg", "ok.png"]

    reads.clear(), loads.clear()
    again = json.loads(run("build", folder, "--index", index, "--json").stdout)
    assert reads == [] and loads == []  # was: read again, and the model loaded for it
    assert [Path(s["path"]).name for s in again["skipped"]] == ["bad.jpg"]
    assert again["skipped_unchanged"] == 1 and "not an image" in again["skipped"][0]["reason"]
    text = run("build", folder, "--index", index).stdout
    assert "skipped before and unchanged since, not read again; --retry-skipped" in text

    reads.clear()
    run("build", folder, "--index", index, "--retry-skipped")
    assert reads == ["bad.jpg"]
    reads.clear()
    os.utime(folder / "bad.jpg", (1, 1))  # changed: read again
    run("build", folder, "--index", index)
    assert reads == ["bad.jpg"]
    reads.clear()
    random_image(folder / "bad.jpg")  # now readable: indexed, no longer skipped
    fixed = json.loads(run("build", folder, "--index", index, "--json").stdout)
    assert fixed["added"] == 1 and fixed["skipped"] == []


def test_a_file_refused_under_a_pixel_limit_is_read_under_a_higher_one(tmp_path):
    random_image(tmp_path / "pics" / "big.png", size=(200, 100))
    with imgindex.Index.create(tmp_path / "idx", vectorizer=FakeVectorizer(device="cpu")) as ix:
        assert ix.add(tmp_path / "pics", max_pixels=10_000).skipped
        assert ix.add(tmp_path / "pics", max_pixels=5_000).skipped_unchanged == 1
        assert ix.add(tmp_path / "pics").added == 1  # the default limit is higher


# -- 13. training on a CPU fits the machine -------------------------------------------------------


def test_cpu_training_defaults_fit_the_memory(monkeypatch):
    from imgindex.train import CPU_STEP, GPU_STEP, default_step, step_memory

    monkeypatch.setattr(imgindex.train, "available_memory", lambda: 24 << 30)
    assert default_step("cpu", "resnet50", 1000) == CPU_STEP
    assert step_memory("resnet50", 48, 8, 224) > 24 << 30  # the GPU's step: 47 GB
    monkeypatch.setattr(imgindex.train, "available_memory", lambda: 3 << 30)
    small = default_step("cpu", "resnet50", 1000)
    assert small["images_per_step"] < CPU_STEP["images_per_step"]
    assert step_memory("resnet50", small["images_per_step"], 4, 96) <= 0.7 * (3 << 30)
    assert GPU_STEP["images_per_step"] == 48


def test_a_training_step_too_large_for_the_cpu_is_refused_before_anything_runs(
    tmp_path, monkeypatch
):
    from imgindex.train import TrainOptions, train

    monkeypatch.setattr(imgindex.train, "available_memory", lambda: 24 << 30)
    for i in range(60):
        random_image(tmp_path / "pics" / f"{i}.png", seed=i)
    paths = sorted((tmp_path / "pics").iterdir())
    with pytest.raises(ImgIndexError) as refused:  # the prototype's GPU step, on a CPU
        train(paths, tmp_path / "ft.pth", TrainOptions(), steps=1, device="cpu")
    message = str(refused.value)
    assert "needs about 47" in message and "--images-per-step 16" in message
    assert not (tmp_path / "ft.pth").exists()


def test_cli_training_on_a_cpu_says_what_a_step_costs(tmp_path, run):
    for i in range(6):
        random_image(tmp_path / "pics" / f"{i}.png", size=(120, 100), seed=i)
    result = run("train", tmp_path / "pics", "--out", tmp_path / "ft.pth", "--steps", "1",
                 "--arch", "resnet18", "--init", "scratch", "--device", "cpu")  # fmt: skip
    assert "Each step: 6 images x 4 views of 96 pixels, about 1.2 GB of memory." in result.stderr
    assert "The first step took" in result.stderr and "peak memory so far" in result.stderr


def test_webp_larger_than_the_header_budget_is_read(tmp_path, monkeypatch):
    """Pillow reads a WebP file whole to open it, so its size is capped instead of its header
    (a 36 MB lossless WebP was refused as "an image header of more than 32 MB")."""
    import numpy as np

    monkeypatch.setattr(imgindex.decode, "HEADER_BYTES", 4096)
    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.webp", lossless=True)
    assert (tmp_path / "big.webp").stat().st_size > 4096
    data, _ = imgindex.decode.read_file(tmp_path / "big.webp")
    assert len(data) == (tmp_path / "big.webp").stat().st_size
    sparse(tmp_path / "huge.webp", 4 << 30, (tmp_path / "big.webp").read_bytes()[:30])
    with pytest.raises(ImageError, match="refused unread"):
        imgindex.decode.read_file(tmp_path / "huge.webp")
