"""Presets (exact, fast) and precision (fp32, bf16): what they change, and that an index keeps
to the one it was built with."""

import numpy as np
import pytest
from PIL import Image

import imgindex
from imgindex.decode import read_image_file
from imgindex.errors import IncompatibleIndexError

from .conftest import FakeVectorizer, random_image
from .test_decode import smooth


def big_jpeg(path, size=(1000, 800)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(smooth(*size)).save(path, quality=92)
    return path


def test_jpeg_draft_decodes_large_jpegs_at_reduced_scale(tmp_path):
    path = big_jpeg(tmp_path / "big.jpg")
    assert read_image_file(path).pixels.shape == (800, 1000, 3)
    assert read_image_file(path, draft_to=224).pixels.shape == (400, 500, 3)  # 1/2, not 1/4
    assert read_image_file(path, draft_to=350).pixels.shape == (400, 500, 3)
    assert read_image_file(path, draft_to=401).pixels.shape == (800, 1000, 3)  # < 2x: full
    png = random_image(tmp_path / "big.png", size=(1000, 800))
    assert read_image_file(png, draft_to=224).pixels.shape == (800, 1000, 3)  # JPEG only


def test_fast_preset_is_recorded_and_used_for_queries(tmp_path):
    folder = tmp_path / "pics"
    big_jpeg(folder / "big.jpg")
    for i in range(3):
        random_image(folder / f"{i}.png", size=(300, 240), seed=i)
    fast = FakeVectorizer(device="cpu", preset="fast")
    exact = FakeVectorizer(device="cpu")
    assert fast.prepare(folder / "0.png").shape == (3, 224, 280)
    assert exact.prepare(folder / "0.png").shape == (3, 350, 437)
    with imgindex.Index.create(tmp_path / "idx", vectorizer=fast) as index:
        index.sync(folder)
        assert index.info()["preprocessing"]["preset"] == "fast"
    with pytest.raises(IncompatibleIndexError, match="preprocessing"):
        imgindex.Index.open(tmp_path / "idx", vectorizer=exact)
    with imgindex.Index.open(tmp_path / "idx") as index:
        assert index.preset == "fast"


def test_unknown_preset_and_precision_are_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        FakeVectorizer(device="cpu", preset="turbo")
    with pytest.raises(ValueError, match="unknown precision"):
        FakeVectorizer(device="cpu", precision="fp8")


def test_bf16_vectors_stay_close_to_fp32(tmp_path):
    path = random_image(tmp_path / "a.png", size=(120, 90))
    fp32 = FakeVectorizer(device="cpu").vectorize(path)
    bf16 = FakeVectorizer(device="cpu", precision="bf16").vectorize(path)
    assert bf16.dtype == np.float32
    assert 0 < np.abs(bf16 - fp32).max() < 0.05
    assert imgindex.cosine_similarity(bf16, fp32) > 0.999


@pytest.mark.slow
def test_fast_preset_with_augnet_stays_near_exact(augnet):
    from .conftest import DATA

    fast = imgindex.Vectorizer(device="cpu", preset="fast")
    paths = sorted(DATA.glob("*/image_0001.jpg"))
    similarity = imgindex.cosine_similarity(fast.vectorize(paths), augnet.vectorize(paths))
    # Same pictures at 224 instead of 350 pixels: close, not equal.
    assert 0.8 < np.diag(similarity).min() < 0.9999
