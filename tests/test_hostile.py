"""A folder of hostile files: the build finishes with status 0, indexes what can be indexed,
and says for every other file why (stand-in network, real CLI)."""

from __future__ import annotations

import builtins
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import imgindex.decode
from imgindex.cli import cli

from .conftest import random_image
from .test_decode import png_claiming, smooth

READABLE = {
    "cmyk.jpg",
    "grey16.png",
    "palette-transparent.png",
    "animated.gif",
    "rotated.jpg",
    "with space.png",
    "ünïcødé.png",
    "caf\udce9.png",  # the bytes b"caf\xe9.png", not UTF-8
    "ok.png",
}
EXPECTED_SKIPS = {
    "empty.jpg": "empty file (0 bytes)",
    "text.jpg": "not an image",
    "truncated.jpg": "corrupt or truncated image data",
    "corrupt-chunk.png": "corrupt or truncated image data",
    "bomb.png": "refused before decoding",
    "thin.png": "aspect ratio 10000:1",
    "broken-link.jpg": "file not found",
    "locked.png": "permission denied",
    "loop": "symbolic link loop",
    "pipe.jpg": "not a regular file",  # opening it would wait for a writer for ever
    "endless.jpg": "not a regular file",  # a link to /dev/zero: reading it never ends
}


def make_hostile_folder(root: Path) -> Path:
    d = root / "hostile"
    d.mkdir()
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is a shopping list\n")
    Image.fromarray(smooth(300, 200)).save(d / "truncated.jpg", quality=90)
    data = (d / "truncated.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    random_image(d / "corrupt-chunk.png", size=(60, 60))
    png = bytearray((d / "corrupt-chunk.png").read_bytes())
    start = png.index(b"IDAT") + 8
    png[start : start + 30] = b"\x00" * 30
    (d / "corrupt-chunk.png").write_bytes(bytes(png))
    (d / "bomb.png").write_bytes(png_claiming(30000, 30000))
    random_image(d / "thin.png", size=(10000, 1))
    Image.fromarray(smooth()).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(smooth()[:, :, 0].astype(np.uint16) * 250).save(d / "grey16.png")
    Image.fromarray(smooth()).quantize(8).save(d / "palette-transparent.png", transparency=0)
    frames = [Image.new("RGB", (20, 10), c) for c in ("red", "blue")]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(smooth(40, 30)).save(d / "rotated.jpg", exif=exif)
    random_image(d / "with space.png", seed=1)
    random_image(d / "ünïcødé.png", seed=2)
    with open(os.path.join(os.fsencode(d), b"caf\xe9.png"), "wb") as fh:
        buffer = io.BytesIO()
        Image.fromarray(smooth(20, 20, seed=3)).save(buffer, format="PNG")
        fh.write(buffer.getvalue())
    random_image(d / "ok.png", seed=4)
    random_image(d / "locked.png", seed=5)
    os.symlink(d / "nowhere.jpg", d / "broken-link.jpg")
    os.symlink(d, d / "loop")  # a folder linking to its parent
    os.mkfifo(d / "pipe.jpg")
    os.symlink("/dev/zero", d / "endless.jpg")
    (d / "empty-folder").mkdir()
    (d / "no-images").mkdir()
    (d / "no-images" / "notes.txt").write_text("nothing to see")
    return d


@pytest.fixture
def refuse_locked(monkeypatch):
    """Reading locked.png fails as it would without read permission. (chmod 000 does not stop
    root, which CI may run as; test_unreadable_file_for_real covers the real thing.)"""

    def guarded_open(file, *args, **kwargs):
        if os.fsdecode(file).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", os.fsdecode(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(imgindex.decode, "open", guarded_open, raising=False)


def test_hostile_folder_builds_with_reasons(tmp_path, use_fake_model, refuse_locked):
    folder = make_hostile_folder(tmp_path)
    runner = CliRunner()
    index = tmp_path / "idx"
    result = runner.invoke(cli, ["build", str(folder), "--index", str(index), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(reasons) == set(EXPECTED_SKIPS)
    for name, fragment in EXPECTED_SKIPS.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert report["added"] == len(READABLE) == report["total"]

    listed = runner.invoke(cli, ["info", "--index", str(index), "--skipped", "--json"])
    queryable = {Path(s["path"]).name for s in json.loads(listed.stdout)["skipped_files"]}
    assert queryable == set(EXPECTED_SKIPS)

    with imgindex.Index.open(index, vectorizer=use_fake_model(device="cpu")) as opened:
        names = {
            Path(os.fsencode(r.path).decode("utf-8", "surrogateescape")).name
            for r in opened.records()
        }
        assert names == {n.replace("\udce9", "\\xe9") for n in READABLE}
        rotated = opened.find(folder / "rotated.jpg")
        assert (rotated.width, rotated.height) == (30, 40)  # indexed upright
        assert opened.find(os.path.join(os.fsencode(folder), b"caf\xe9.png")) is not None

    text = runner.invoke(cli, ["build", str(folder), "--index", str(index)])
    assert text.exit_code == 0
    assert "thin.png: aspect ratio 10000:1" in text.stdout


def test_strict_makes_any_skip_an_error(tmp_path, use_fake_model):
    folder = tmp_path / "mixed"
    random_image(folder / "good.png")
    (folder / "bad.jpg").write_bytes(b"")
    runner = CliRunner()
    result = runner.invoke(cli, ["build", str(folder), "--index", str(tmp_path / "i"), "--strict"])
    assert result.exit_code == 1
    assert "--strict: 1 file(s) were skipped" in result.stderr
    assert "bad.jpg: empty file (0 bytes)" in result.stdout
    info = runner.invoke(cli, ["info", "--index", str(tmp_path / "i"), "--json"])
    assert json.loads(info.stdout)["images"] == 1  # what could be indexed still was


def test_pixel_limit_option(tmp_path, use_fake_model):
    folder = tmp_path / "sizes"
    random_image(folder / "small.png", size=(50, 50))
    random_image(folder / "large.png", size=(200, 200))
    result = CliRunner().invoke(
        cli, ["build", str(folder), "--index", str(tmp_path / "i"), "--max-pixels", "10000"]
    )
    assert result.exit_code == 0
    assert "large.png: 200 x 200 pixels (0.0 MP) is over the limit of 0.0 MP" in result.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_unreadable_file_for_real(tmp_path, use_fake_model):
    folder = tmp_path / "perm"
    locked = random_image(folder / "locked.png")
    locked.chmod(0)
    result = CliRunner().invoke(cli, ["build", str(folder), "--index", str(tmp_path / "i")])
    assert result.exit_code == 0
    assert "locked.png: permission denied" in result.stdout
