"""Checks that need a CUDA GPU (skipped without one): the GPU code paths agree with the CPU's.
Run them on a GPU machine with ``pytest -m gpu``."""

import numpy as np
import pytest
import torch

import imgindex
from imgindex.model import PaddedForward
from imgindex.train import TrainOptions, train
from imgindex.weights import build_network

from .conftest import DATA

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_padded_forward_on_the_gpu_equals_each_image_alone():
    torch.manual_seed(0)
    network = build_network("resnet50").eval().cuda()
    sizes = [(64, 96), (65, 97), (96, 64), (70, 130)]
    images = [torch.randn(3, h, w, device="cuda") for h, w in sizes]
    padded = torch.zeros(len(images), 3, 96, 160, device="cuda")
    for i, image in enumerate(images):
        padded[i, :, : image.shape[1], : image.shape[2]] = image
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            together = PaddedForward(network)(padded, torch.tensor(sizes, device="cuda"))
            alone = torch.cat([network(image[None]) for image in images])
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert (together - alone).abs().max() < 1e-4


def test_gpu_vectors_and_decoding_match_the_cpu(tmp_path, augnet):
    paths = sorted(DATA.rglob("*.jpg"))
    cpu = augnet.vectorize(paths)
    for precision, least in (("fp32", 0.99999), ("bf16", 0.9995)):
        gpu = imgindex.Vectorizer(device="cuda", precision=precision).vectorize(paths)
        assert np.diag(imgindex.cosine_similarity(gpu, cpu)).min() > least, precision
    with imgindex.Index.create(tmp_path / "i", device="cuda") as index:
        report = index.sync(DATA, decode="device")
        assert report.added == len(paths) and not report.skipped
        stored = index.vectors([index.find(p).id for p in paths])
    assert np.diag(imgindex.cosine_similarity(stored, cpu)).min() > 0.9999


def test_a_gpu_build_stores_each_batchs_own_vectors(tmp_path):
    # Batches of 4: each batch is stored while the next one is computed (start_group), so a
    # mix-up between batches would show here.
    paths = sorted(DATA.rglob("*.jpg"))
    vectorizer = imgindex.Vectorizer(device="cuda", precision="fp32", batch_size=4)
    alone = np.stack([vectorizer.vectorize(p) for p in paths])
    with imgindex.Index.create(tmp_path / "i", vectorizer=vectorizer) as index:
        report = index.sync(DATA)
        assert report.added == len(paths) and not report.skipped
        stored = index.vectors([index.find(p).id for p in paths])
    assert np.diag(imgindex.cosine_similarity(stored, alone)).min() > 0.99999
    together = vectorizer.vectorize(paths)  # embed_tensors: also a batch started per stored one
    assert np.diag(imgindex.cosine_similarity(together, alone)).min() > 0.99999


def test_training_steps_on_the_gpu(tmp_path):
    options = TrainOptions(images_per_step=8, views_per_image=4, crop_size=128, seed=0)
    report = train(sorted((DATA / "pizza").glob("*.jpg")) + sorted((DATA / "bonsai").glob("*.jpg")),
                   tmp_path / "ft.pth", options, steps=20, device="cuda", workers=2)  # fmt: skip
    assert report.steps == 20 and report.views_per_second > 0
    vector = imgindex.Vectorizer(device="cuda", weights=tmp_path / "ft.pth").vectorize(
        DATA / "pizza" / "image_0001.jpg"
    )
    assert vector.shape == (768,) and np.isfinite(vector).all()
