"""Shared fixtures: sample images, a temporary index location, a fast stand-in for AugNet, and
the real AugNet (loaded once per session, for the tests marked ``slow``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import imgindex
from imgindex.model import Vectorizer
from imgindex.weights import EMBEDDING_DIM, Weights

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


class TinyNet(torch.nn.Module):
    """A deterministic stand-in for AugNet: pooled colour layout -> fixed projection -> tanh.

    Similar pictures get similar vectors, different shapes of input are fine, and it runs in
    milliseconds, so pipeline tests do not pay for a ResNet50.
    """

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1234)
        self.projection = torch.nn.Parameter(
            torch.randn(3 * 4 * 4, EMBEDDING_DIM, generator=generator), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return torch.tanh(pooled @ self.projection)


class FakeVectorizer(Vectorizer):
    """The real Vectorizer (input handling, preprocessing, batching) around TinyNet."""

    model_name = "test-tinynet-768"

    @classmethod
    def _resolve_weights(cls, weights):
        return Weights(path=Path("tinynet"), sha256="0" * 64, is_default=False)

    def _int8_by_default(self, preset, runtime):
        return False

    def _choose_runtime(self, runtime):
        # The pipeline tests patch and inspect the torch network; ONNX has tests of its own.
        return "onnx" if runtime == "onnx" else "torch"

    def _build_network(self):
        return TinyNet().eval()


@pytest.fixture
def fake_vectorizer() -> FakeVectorizer:
    return FakeVectorizer(device="cpu", batch_size=4)


@pytest.fixture
def use_fake_model(monkeypatch: pytest.MonkeyPatch) -> type[FakeVectorizer]:
    """Make every Vectorizer the library or the CLI creates in this process a FakeVectorizer."""
    monkeypatch.setattr(imgindex.index, "Vectorizer", FakeVectorizer)
    monkeypatch.setattr(imgindex.model, "Vectorizer", FakeVectorizer)
    return FakeVectorizer


@pytest.fixture
def run(use_fake_model):
    """Run the command line in this process (with the stand-in model): ``run("build", path)``.
    Checks the exit status is 0 unless ``ok=False``; returns click's result."""
    from click.testing import CliRunner

    from imgindex.cli import cli

    runner = CliRunner()

    def invoke(*args, ok=True):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output + result.stderr
        return result

    return invoke


@pytest.fixture(scope="session")
def augnet() -> Vectorizer:
    """The real AugNet with imgsim's weights, on the CPU."""
    return Vectorizer(device="cpu")


@pytest.fixture(scope="session", autouse=True)
def _onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Networks exported to ONNX go to one folder for the session, not the user's cache."""
    import os

    os.environ["IMGINDEX_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads or writes the user's default index or picks up their weights."""
    monkeypatch.setenv("IMGINDEX_INDEX", str(tmp_path / "default-index"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("IMGINDEX_WEIGHTS", raising=False)
    monkeypatch.delenv("IMGINDEX_RUNTIME", raising=False)  # (--runtime sets it)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A writable copy of data/ (36 photos in six labelled folders)."""
    target = tmp_path / "photos"
    shutil.copytree(DATA, target, ignore=shutil.ignore_patterns("*.md"))
    return target


def random_image(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0, **save) -> Path:
    """Write a small random RGB image (format from the suffix) and return its path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **save)
    return path


def refuse_listing(monkeypatch, folder_name: str) -> None:
    """Make listing any folder called ``folder_name`` fail as it would without permission
    (chmod 000 does not stop root, which CI may run as)."""
    import os

    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == folder_name:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
