"""The network, its weights, preprocessing and the Vectorizer's inputs."""

import importlib.metadata
import pickle
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import imgindex
from imgindex.errors import ImageError, WeightsError
from imgindex.preprocessing import Preprocessing, opencv_bilinear_resize
from imgindex.weights import AUGNET_SHA256, default_weights_path, load_network, resolve_weights

from .conftest import DATA

# -- preprocessing ------------------------------------------------------------------------------


def test_resize_is_bit_exact_with_opencv():
    rng = np.random.default_rng(7)
    sizes = [(1, 1), (2, 3), (128, 256), (350, 350), (700, 1000), (3000, 4000), (351, 349)]
    sizes += [tuple(int(v) for v in rng.integers(1, 1200, size=2)) for _ in range(40)]
    for h, w in sizes:
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        for new_w, new_h in [Preprocessing().target_size(w, h), (max(1, w // 3), h + 5)]:
            expected = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            # Both backends: numpy (CPU decoding) and torch (GPU decoding, here on the CPU).
            ours = opencv_bilinear_resize(image, new_w, new_h)
            assert np.array_equal(ours, expected), (h, w, new_w, new_h)
            ours = opencv_bilinear_resize(torch.from_numpy(image), new_w, new_h).numpy()
            assert np.array_equal(ours, expected), (h, w, new_w, new_h)
            # Channels first, as the network takes them; a second call reuses the buffers.
            first = opencv_bilinear_resize(image, new_w, new_h, channels_first=True)
            assert np.array_equal(first, expected.transpose(2, 0, 1)), (h, w, new_w, new_h)
            assert first.flags.c_contiguous and first.flags.writeable


def test_target_size_matches_imgsim():
    import imgsim.imgsim as reference  # imports cv2, available in the test environment

    pre = Preprocessing()
    for h, w in [(128, 256), (480, 640), (300, 225), (350, 351), (1000, 3), (7, 7), (333, 1001)]:
        expected = reference.resize_short(np.zeros((h, w, 3), np.uint8), 350).shape[:2]
        new_w, new_h = pre.target_size(w, h)
        assert (new_h, new_w) == expected


def test_resize_gives_channels_first_tensor_with_short_side_350():
    out = Preprocessing().resize(np.zeros((128, 256, 3), np.uint8))
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 350, 700)
    image = np.random.default_rng(3).integers(0, 256, (350, 420, 3), dtype=np.uint8)
    image.flags.writeable = False  # as Pillow hands its pixels over
    for pixels in (image, torch.from_numpy(image.copy())):
        out = Preprocessing().resize(pixels)  # already the size: only the layout changes
        assert out.is_contiguous() and torch.equal(out, torch.tensor(image).permute(2, 0, 1))


def test_resize_outputs_do_not_share_the_threads_buffers():
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (300, 400, 3), dtype=np.uint8) for _ in range(3)]
    outs = [Preprocessing().resize(image) for image in images]
    for image, out in zip(images, outs, strict=True):
        expected = cv2.resize(image, (466, 350), interpolation=cv2.INTER_LINEAR)
        assert torch.equal(out, torch.from_numpy(expected).permute(2, 0, 1))


def test_extreme_aspect_ratio_is_refused():
    with pytest.raises(ImageError, match="aspect ratio 10000:1"):
        Preprocessing().resize(np.zeros((1, 10000, 3), np.uint8), "thin.png")


# -- weights ------------------------------------------------------------------------------------


def test_default_weights_are_found_without_importing_imgsim_and_verified():
    weights = resolve_weights()
    assert weights.path == default_weights_path()
    assert weights.path.name == "model.pth" and weights.path.parent.name == "imgsim"
    assert weights.sha256 == AUGNET_SHA256 and weights.is_default


def test_missing_imgsim_gives_an_install_hint(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(WeightsError, match=r"pip install --no-deps imgsim==0.1.2"):
        resolve_weights()


def test_tampered_default_weights_are_refused(monkeypatch, tmp_path):
    copy = tmp_path / "imgsim" / "model.pth"
    copy.parent.mkdir()
    shutil.copyfile(default_weights_path(), copy)
    with open(copy, "r+b") as fh:
        fh.seek(5_000_000)
        fh.write(b"\x00\x01\x02\x03")
    monkeypatch.setattr(imgindex.weights, "default_weights_path", lambda: copy)
    with pytest.raises(WeightsError, match="expected c2cb3cac"):
        resolve_weights()


def test_weights_from_option_and_environment(monkeypatch, tmp_path):
    other = tmp_path / "other.pth"
    shutil.copyfile(default_weights_path(), other)
    assert resolve_weights(other).path == other
    monkeypatch.setenv("IMGINDEX_WEIGHTS", str(other))
    assert resolve_weights().path == other
    with pytest.raises(WeightsError, match=r"weights file not found$"):
        resolve_weights(tmp_path / "nope.pth")


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match="not an AugNet resnet50-768 checkpoint"):
        load_network(resolve_weights(path))


class Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(EXPLOIT_MARKER),))


EXPLOIT_MARKER = ""


def test_loading_never_runs_code_from_the_file(tmp_path):
    global EXPLOIT_MARKER
    EXPLOIT_MARKER = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth"
    torch.save({"x": Exploit()}, path, pickle_module=pickle)
    with pytest.raises(WeightsError, match="not a loadable PyTorch state dict"):
        load_network(resolve_weights(path))
    assert not Path(EXPLOIT_MARKER).exists()


def test_imgsim_checkpoint_loads_into_the_augnet_shape():
    network = load_network(resolve_weights())
    assert network[0].fc.out_features == 768
    assert isinstance(network[1], torch.nn.Tanh)


# -- inputs -------------------------------------------------------------------------------------


def test_all_input_kinds_give_the_same_vector(fake_vectorizer):
    path = DATA / "pizza" / "image_0001.jpg"
    rgb = np.asarray(Image.open(path).convert("RGB"))
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    from_path = fake_vectorizer.vectorize(path)
    assert from_path.shape == (768,) and from_path.dtype == np.float32
    np.testing.assert_array_equal(fake_vectorizer.vectorize(str(path)), from_path)
    np.testing.assert_array_equal(fake_vectorizer.vectorize(Image.open(path)), from_path)
    np.testing.assert_array_equal(fake_vectorizer.vectorize(bgr), from_path)
    np.testing.assert_array_equal(fake_vectorizer.vectorize(rgb, channels="rgb"), from_path)
    assert not np.array_equal(fake_vectorizer.vectorize(rgb), from_path)  # RGB read as BGR


def test_batches_list_and_array(fake_vectorizer):
    paths = [*sorted((DATA / "Leopards").glob("*.jpg"))[:3], DATA / "pizza" / "image_0002.jpg"]
    matrix = fake_vectorizer.vectorize(paths)
    assert matrix.shape == (4, 768)
    for path, row in zip(paths, matrix, strict=True):
        np.testing.assert_allclose(row, fake_vectorizer.vectorize(path), atol=1e-6)
    same_size = np.stack([np.asarray(Image.open(p))[:, :, ::-1] for p in paths[:3]])
    np.testing.assert_allclose(fake_vectorizer.vectorize(same_size), matrix[:3], atol=1e-6)
    assert fake_vectorizer.vectorize([]).shape == (0, 768)


def test_bad_array_inputs_are_explained(fake_vectorizer):
    with pytest.raises(ImageError, match="uint8"):
        fake_vectorizer.vectorize(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ImageError, match="H x W x 3"):
        fake_vectorizer.vectorize(np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(TypeError, match="expected an image path"):
        fake_vectorizer.vectorize(42)
    with pytest.raises(ValueError, match="channels"):
        fake_vectorizer.vectorize(np.zeros((10, 10, 3), np.uint8), channels="xyz")


@pytest.mark.slow
def test_real_batches_equal_one_by_one(augnet):
    # Leopards are all 192 x 128, so they share batches; the others are singletons.
    paths = sorted((DATA / "Leopards").glob("*.jpg")) + sorted((DATA / "bonsai").glob("*.jpg"))[:3]
    one_by_one = np.stack([augnet.vectorize(p) for p in paths])
    batched = augnet.vectorize(paths)
    assert np.abs(batched - one_by_one).max() <= 1e-5


# -- padded batches (GPUs) -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_padded_forward_equals_each_image_at_its_own_size(arch):
    from imgindex.model import PaddedForward
    from imgindex.weights import build_network

    torch.manual_seed(0)
    network = build_network(arch).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so padding would show
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    # Odd sizes exercise every stride's rounding; all fit one 96 x 160 padded shape.
    sizes = [(64, 96), (65, 97), (96, 64), (70, 130), (33, 47), (96, 160)]
    images = [torch.randn(3, h, w, dtype=torch.float64) for h, w in sizes]
    padded = torch.zeros(len(images), 3, 96, 160, dtype=torch.float64)
    for i, image in enumerate(images):
        padded[i, :, : image.shape[1], : image.shape[2]] = image
    network = network.double()
    with torch.inference_mode():
        together = PaddedForward(network)(padded, torch.tensor(sizes))
        alone = torch.cat([network(image[None]) for image in images])
        # In float64 the only difference left is summation order.
        assert (together - alone).abs().max() < 1e-9
        # Whatever lies in the padding stays out of the other images' vectors.
        padded[:, :, 90:, 150:] = 100.0
        garbage = PaddedForward(network)(padded, torch.tensor(sizes))
    assert (garbage[:-1] - alone[:-1]).abs().max() < 1e-9
    assert PaddedForward.bucket_shape((3, 350, 466)) == (3, 352, 480)


@pytest.mark.slow
def test_padded_batches_give_the_vectors_of_exact_shapes(augnet):
    photo = np.asarray(Image.open(DATA / "Leopards" / "image_0001.jpg").convert("RGB"))
    # Crops of one photo that resize to different shapes in the same padded shape.
    crops = [np.ascontiguousarray(photo[:, : photo.shape[1] - cut]) for cut in (0, 3, 7, 12)]
    padded = imgindex.Vectorizer(device="cpu", pad_batches=True, batch_size=16)
    shapes = [tuple(padded.prepare(c, channels="rgb").shape) for c in crops]
    keys = {padded.group_key(padded.prepare(c, channels="rgb")) for c in crops}
    assert len(keys) < len(set(shapes)), (shapes, keys)  # some batches mix shapes
    together = padded.vectorize(crops, channels="rgb")
    alone = np.stack([augnet.vectorize(c, channels="rgb") for c in crops])
    assert np.abs(together - alone).max() < 1e-5


def test_padded_groups_pad_the_batch_size_without_changing_vectors():
    from imgindex.weights import build_network

    from .conftest import FakeVectorizer

    class SmallResNet(FakeVectorizer):
        def _build_network(self):
            torch.manual_seed(0)
            return build_network("resnet18").eval()

    unpadded = SmallResNet(device="cpu", pad_batches=False)
    padded = SmallResNet(device="cpu", pad_batches=True, batch_size=64)
    tensors = [torch.randint(0, 256, (3, 40 + i, 50 + 2 * i), dtype=torch.uint8) for i in range(3)]
    alone = np.stack([unpadded.embed_group([t])[0] for t in tensors])
    shapes = []
    original = padded.start_batch
    padded.start_batch = lambda batch, sizes=None, count=None: (
        shapes.append(tuple(batch.shape)) or original(batch, sizes, count)
    )
    together = padded.embed_group(tensors)
    # Three images of three sizes: one batch of 4 (a power of two), 64 x 64 (multiples of 32).
    assert together.shape == (3, 768) and shapes == [(4, 3, 64, 64)]
    assert np.abs(together - alone).max() < 1e-4


def test_device_constants_are_made_once_and_serve_training_too():
    from imgindex.devices import device_constant

    with torch.inference_mode():  # first asked for while embedding
        first = device_constant((0.5, 2.0), "cpu")
    assert device_constant((0.5, 2.0), "cpu") is first
    weights = torch.ones(2, requires_grad=True)
    (weights * first).sum().backward()  # an inference tensor could not be saved for this
    assert weights.grad.tolist() == [0.5, 2.0]


def test_resize_beyond_the_kept_scratch_memory(monkeypatch):
    from imgindex.preprocessing import _Scratch

    monkeypatch.setattr(_Scratch, "keep_bytes", 100_000)  # less than this image's arrays
    monkeypatch.setattr(_Scratch, "_threads", threading.local())  # this test's own buffers
    image = np.random.default_rng(9).integers(0, 256, (500, 700, 3), dtype=np.uint8)
    for _ in range(2):
        ours = opencv_bilinear_resize(image, 490, 350)
        assert np.array_equal(ours, cv2.resize(image, (490, 350), interpolation=cv2.INTER_LINEAR))
    assert sum(b.nbytes for b in _Scratch.of_this_thread().buffers.values()) <= 100_000
