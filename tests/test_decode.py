"""Decoding: every colour mode comes out as OpenCV's imread would give it (imgsim reads with
OpenCV), and every kind of broken file is refused with a reason."""

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from imgindex.decode import decode_image_bytes, pil_to_rgb_array, read_image_file
from imgindex.errors import ImageError

from .conftest import random_image


def smooth(width=40, height=30, seed=0):
    """A smooth RGB picture (JPEG artefacts stay small on it)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6, size=3)
    channels = [127 + 120 * np.sin(x / 7 + y / 11 + p) for p in phase]
    return np.stack(channels, axis=2).astype(np.uint8)


def opencv_rgb(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]


@pytest.mark.parametrize(
    "mode, save",
    [
        ("RGB", {}),
        ("L", {}),
        ("LA", {}),
        ("1", {}),
        ("RGBA", {}),
        ("P", {}),
        ("P", {"transparency": 0}),
        ("I;16", {}),
    ],
)
def test_png_modes_convert_like_opencv(tmp_path, mode, save):
    rgb = smooth()
    if mode == "I;16":
        im = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257 + 3)
        assert im.mode == "I;16"
    elif mode == "P":
        im = Image.fromarray(rgb).quantize(16)
    else:
        im = Image.fromarray(rgb).convert(mode)
    path = tmp_path / f"img-{mode.replace(';', '')}.png"
    im.save(path, **save)
    ours = read_image_file(path).pixels
    assert ours.dtype == np.uint8 and ours.shape == (30, 40, 3)
    np.testing.assert_array_equal(ours, opencv_rgb(path))


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(smooth()).convert("CMYK").save(path, quality=95)
    ours = read_image_file(path).pixels.astype(int)
    assert ours.shape == (30, 40, 3)
    assert np.abs(ours - opencv_rgb(path).astype(int)).max() <= 2


def test_exif_orientation_is_applied(tmp_path):
    rgb = smooth(40, 30)
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: show rotated 90 degrees clockwise
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    decoded = read_image_file(path)
    assert (decoded.width, decoded.height) == (30, 40)
    upright = np.rot90(rgb, k=-1)
    assert np.abs(decoded.pixels.astype(int) - upright.astype(int)).mean() < 3
    np.testing.assert_array_equal(decoded.pixels, opencv_rgb(path))


def test_every_exif_orientation_is_applied_as_opencv_does(tmp_path):
    rgb = smooth(40, 30)
    for orientation in range(0, 10):  # 0 and 9 are out of range: kept as stored
        path = tmp_path / f"o{orientation}.jpg"
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(rgb).save(path, exif=exif, quality=95)
        np.testing.assert_array_equal(read_image_file(path).pixels, opencv_rgb(path))


def test_a_callers_pil_image_is_not_modified():
    exif = Image.Exif()
    exif[0x0112] = 8
    im = Image.fromarray(smooth(40, 30))
    im.info["exif"] = exif.tobytes()
    before = np.array(im)
    assert pil_to_rgb_array(im).shape == (40, 30, 3)  # rotated
    np.testing.assert_array_equal(np.asarray(im), before)
    assert im.size == (40, 30)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 10), colour) for colour in ("red", "blue", "green")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    pixels = read_image_file(path).pixels
    assert tuple(pixels[5, 5]) == (255, 0, 0)


def test_records_hash_size_and_mtime(tmp_path):
    path = random_image(tmp_path / "a.png")
    decoded = read_image_file(path)
    import hashlib

    assert decoded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert decoded.size == path.stat().st_size
    assert decoded.mtime == path.stat().st_mtime
    assert (decoded.width, decoded.height) == (64, 48)


def png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header says it is ``width x height``."""
    raw = b"\x00\x00\x00\x00"  # one row of one grey pixel, filter byte first
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("hello, I am not a picture\n"), "not an image"),
        (lambda p: p.write_bytes(png_claiming(30000, 30000)), "refused before decoding"),
        (lambda p: p.write_bytes(png_claiming(12000, 8000)), "refused before decoding"),
    ],
    ids=["zero-bytes", "text-named-jpg", "bomb-30000x30000", "bomb-96MP"],
)
def test_bad_files_are_refused_with_a_reason(tmp_path, make, reason):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageError) as info:
        read_image_file(path)
    assert info.value.path == str(path)
    assert reason in info.value.reason
    assert str(path) in str(info.value)


def test_pixel_limit_is_configurable(tmp_path):
    path = random_image(tmp_path / "a.png", size=(100, 100))
    with pytest.raises(ImageError, match=r"over the limit of 0\.0 MP"):
        read_image_file(path, max_pixels=9_999)
    assert read_image_file(path, max_pixels=10_000).width == 100


def test_truncated_jpeg_is_refused(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(smooth(200, 150)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        read_image_file(path)


def test_corrupt_png_chunk_is_refused(tmp_path):
    path = random_image(tmp_path / "a.png", size=(50, 50))
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start : start + 20] = b"\xff" * 20
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="corrupt"):
        read_image_file(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        read_image_file(tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match="folder"):
        read_image_file(tmp_path)


def test_decode_bytes_directly():
    import io

    buffer = io.BytesIO()
    Image.fromarray(smooth()).save(buffer, format="PNG")
    np.testing.assert_array_equal(decode_image_bytes(buffer.getvalue(), "mem"), smooth())
