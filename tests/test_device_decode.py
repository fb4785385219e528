"""`--decode device`: JPEGs decoded in batches by torchvision where the network runs (nvJPEG on a
GPU). On the CPU torchvision's decoder is libjpeg-turbo, like Pillow's, so the vectors must be
the same as with the default CPU decoding; orientation, odd JPEGs and broken files included."""

import io

import numpy as np
import pytest
from PIL import Image

import imgindex
from imgindex.decode import device_decodable_jpeg, orient

from .conftest import random_image


def exif_jpeg(path, orientation, size=(48, 32), seed=0):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    exif = im.getexif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=95, exif=exif)
    return path


def test_orientation_matches_pillow():
    import torch
    from PIL import ImageOps

    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    for o in range(1, 9):
        im = base.copy()
        im.getexif()[0x0112] = o
        want = np.asarray(ImageOps.exif_transpose(im))
        got = orient(torch.from_numpy(np.array(base)), o).numpy()
        assert np.array_equal(want, got), o


def test_which_files_go_to_the_device_decoder(tmp_path):
    jpeg = exif_jpeg(tmp_path / "a.jpg", 6)
    header = device_decodable_jpeg(jpeg.read_bytes(), "a.jpg", 10**9)
    assert (header.width, header.height, header.orientation) == (48, 32, 6)
    png = random_image(tmp_path / "b.png")
    assert device_decodable_jpeg(png.read_bytes(), "b.png", 10**9) is None
    cmyk = io.BytesIO()
    Image.new("CMYK", (8, 8)).save(cmyk, "JPEG")
    assert device_decodable_jpeg(cmyk.getvalue(), "c.jpg", 10**9) is None
    with pytest.raises(imgindex.ImageError, match="over the limit"):
        device_decodable_jpeg(jpeg.read_bytes(), "a.jpg", 100)


def test_device_decoding_gives_the_same_index(tmp_path, photos, fake_vectorizer, monkeypatch):
    # Photos, rotated JPEGs, a greyscale and a CMYK JPEG, a PNG, and a broken JPEG.
    for o in (1, 3, 6, 8):
        exif_jpeg(photos / "rotated" / f"o{o}.jpg", o, seed=o)
    Image.fromarray(np.full((30, 40), 90, np.uint8)).save(photos / "rotated" / "grey.jpg")
    Image.new("CMYK", (40, 30), (10, 200, 30, 5)).save(photos / "rotated" / "cmyk.jpg")
    random_image(photos / "rotated" / "plain.png")
    good = (photos / "pizza" / "image_0001.jpg").read_bytes()
    (photos / "rotated" / "broken.jpg").write_bytes(good[: len(good) // 3])

    import torchvision.io

    real_decode = torchvision.io.decode_jpeg
    batches = []

    def spy(data, **kwargs):
        batches.append(len(data) if isinstance(data, list) else 1)
        return real_decode(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", spy)
    results = {}
    for decode in ("cpu", "device"):
        with imgindex.Index.create(tmp_path / decode, vectorizer=fake_vectorizer) as index:
            report = index.sync(photos, decode=decode, workers=2)
            records = {r.path: r for r in index.records()}
            vectors = index.vectors([records[p].id for p in sorted(records)])
            results[decode] = (report, records, vectors)
    (cpu_report, cpu_records, cpu_vectors), (dev_report, dev_records, dev_vectors) = (
        results["cpu"],
        results["device"],
    )
    assert sorted(cpu_records) == sorted(dev_records) and len(dev_records) == 36 + 7
    assert [(r.width, r.height) for r in cpu_records.values()] == [
        (dev_records[p].width, dev_records[p].height) for p in cpu_records
    ]
    assert np.abs(cpu_vectors - dev_vectors).max() < 1e-6
    # 36 photos and 6 JPEGs (the broken one too) went to the decoder in batches of 4 (the
    # batch with the broken file again one by one); the CMYK JPEG and the PNG never did.
    assert sum(b for b in batches if b > 1) == 42 and max(batches) == 4
    assert [s.path for s in dev_report.skipped] == [s.path for s in cpu_report.skipped]
    assert dev_report.skipped[0].path.endswith("broken.jpg")
    assert "corrupt or truncated" in dev_report.skipped[0].reason


def test_decode_option_on_the_command_line(tmp_path, photos, use_fake_model):
    from click.testing import CliRunner

    from imgindex.cli import cli

    result = CliRunner().invoke(
        cli, ["build", str(photos), "--index", str(tmp_path / "i"), "--decode", "device"]
    )
    assert result.exit_code == 0, result.stderr
    assert "Embedded 36 images" in result.stdout


def test_a_jpeg_the_device_decoder_refuses_is_decoded_on_the_cpu(
    tmp_path, photos, fake_vectorizer, monkeypatch
):
    import torchvision.io

    real_decode = torchvision.io.decode_jpeg
    refused = (photos / "pizza" / "image_0003.jpg").read_bytes()

    def picky(data, **kwargs):  # like nvJPEG meeting a JPEG variant it does not support
        items = data if isinstance(data, list) else [data]
        if any(bytes(t.numpy()) == refused for t in items):
            raise RuntimeError("unsupported JPEG")
        return real_decode(data, **kwargs)

    with imgindex.Index.create(tmp_path / "cpu", vectorizer=fake_vectorizer) as index:
        index.sync(photos / "pizza")
        expected = {r.path: index.vectors([r.id])[0] for r in index.records()}
    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    with imgindex.Index.create(tmp_path / "dev", vectorizer=fake_vectorizer) as index:
        report = index.sync(photos / "pizza", decode="device")
        got = {r.path: index.vectors([r.id])[0] for r in index.records()}
    assert report.added == 6 and not report.skipped
    assert max(np.abs(got[p] - expected[p]).max() for p in expected) < 1e-6
