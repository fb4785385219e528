"""The CPU runtime on ONNX Runtime: its vectors against torch's, the cache of exported networks,
the choice of runtime, and a query process that never imports torch (imgsim's reference vectors
on both runtimes are in test_faithfulness)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgindex import onnxrt
from imgindex.model import Vectorizer

from .conftest import DATA, ROOT

IMAGES = sorted(DATA.glob("*/*.jpg"))[:8]


def test_a_runtime_is_checked_before_any_network_is_loaded():
    with pytest.raises(ValueError, match="unknown runtime"):
        Vectorizer(device="cpu", runtime="tensorrt")
    with pytest.raises(ValueError, match="computes in fp32 or int8 on the CPU"):
        Vectorizer(device="cpu", precision="bf16", runtime="onnx")


@pytest.mark.slow
def test_onnx_vectors_equal_torch_vectors_and_the_runtime_is_onnx_by_default():
    default = Vectorizer(device="cpu")
    torch_runtime = Vectorizer(device="cpu", runtime="torch")
    assert default.runtime == "onnx" and torch_runtime.runtime == "torch"
    assert default.fingerprint() == torch_runtime.fingerprint()  # an index sees no difference
    ours, theirs = default.vectorize(IMAGES), torch_runtime.vectorize(IMAGES)
    assert np.abs(ours - theirs).max() <= 1e-5
    one_by_one = np.stack([default.vectorize(p) for p in IMAGES])
    np.testing.assert_allclose(one_by_one, ours, atol=1e-5)
    fast = Vectorizer(device="cpu", preset="fast", precision="fp32")
    fast_torch = Vectorizer(device="cpu", preset="fast", precision="fp32", runtime="torch")
    assert fast.runtime == "onnx"
    assert np.abs(fast.vectorize(IMAGES) - fast_torch.vectorize(IMAGES)).max() <= 1e-5


@pytest.mark.slow
def test_the_exported_network_is_cached_checked_and_exported_again_when_damaged(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("IMGINDEX_CACHE", str(tmp_path / "cache"))
    told = []
    monkeypatch.setattr(onnxrt, "on_export", told.append)
    first = Vectorizer(device="cpu").vectorize(IMAGES[0])
    assert len(told) == 1 and "exporting the network to ONNX" in told[0]
    [network] = (tmp_path / "cache" / "onnx").glob("*.onnx")
    record = json.loads(network.with_suffix(".json").read_text())
    assert record["weights_sha256"] == Vectorizer._resolve_weights(None).sha256
    assert record["preset"] == "exact" and record["precision"] == "fp32"
    assert network.name.startswith(f"augnet-{record['weights_sha256'][:16]}-exact-fp32-")
    again = Vectorizer(device="cpu").vectorize(IMAGES[0])
    assert len(told) == 1  # loaded from the cache
    np.testing.assert_array_equal(first, again)
    data = bytearray(network.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: never run, exported again
    network.write_bytes(bytes(data))
    repaired = Vectorizer(device="cpu").vectorize(IMAGES[0])
    assert len(told) == 2
    np.testing.assert_array_equal(first, repaired)
    assert not [p for p in network.parent.iterdir() if p.name.endswith(".tmp")]


QUERY = """
import sys
from imgindex.cli import main
sys.argv = ["imgindex", "query", sys.argv[1], "--index", sys.argv[2], "-k", "3", "--json"]
try:
    main()
finally:
    sys.stderr.write("torch imported: %s\\n" % ("torch" in sys.modules))
"""


@pytest.mark.slow
def test_a_query_process_does_not_import_torch_once_the_network_is_cached(tmp_path):
    index = tmp_path / "idx"
    env = {**os.environ, "IMGINDEX_RUNTIME": "torch"}
    built = subprocess.run(
        [sys.executable, "-m", "imgindex", "build", str(DATA / "pizza"), "--index", str(index)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    answers = []
    for runtime in ("torch", "auto", "auto"):  # the first auto query may export the network
        done = subprocess.run(
            [sys.executable, "-c", QUERY, str(IMAGES[0]), str(index)],
            capture_output=True, text=True, cwd=ROOT, timeout=600,
            env={**os.environ, "IMGINDEX_RUNTIME": runtime},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        answers.append((json.loads(done.stdout), done.stderr))
    (on_torch, _), _, (on_onnx, stderr) = answers
    assert "torch imported: False" in stderr
    onnx_hits, torch_hits = on_onnx[0]["results"], on_torch[0]["results"]
    assert [h["id"] for h in onnx_hits] == [h["id"] for h in torch_hits] and len(onnx_hits) == 3
    for a, b in zip(onnx_hits, torch_hits, strict=True):
        assert abs(a["distance"] - b["distance"]) < 1e-3


def test_int8_runs_on_the_onnx_runtime_only():
    with pytest.raises(ValueError, match="int8 runs on the onnx runtime"):
        Vectorizer(device="cpu", precision="int8", runtime="torch")


@pytest.mark.slow
def test_the_fast_preset_is_int8_on_a_cpu_recorded_apart_and_kept_by_its_index(tmp_path):
    import imgindex

    int8 = Vectorizer(device="cpu", preset="fast")
    fp32 = Vectorizer(device="cpu", preset="fast", precision="fp32")
    assert (int8.runtime, int8.precision) == ("onnx", "int8")
    assert int8.fingerprint()["model"] == fp32.fingerprint()["model"] + "-int8"
    a, b = int8.vectorize(IMAGES), fp32.vectorize(IMAGES)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.median(cosine) > 0.95, cosine
    [record] = (Path(os.environ["IMGINDEX_CACHE"]) / "onnx").glob("*-fast-int8-*.json")
    assert "layer4" in " ".join(json.loads(record.read_text())["kept_in_fp32"])

    with imgindex.Index.create(tmp_path / "i8", preset="fast", device="cpu") as index:
        index.add([DATA / "pizza"])
    with imgindex.Index.open(tmp_path / "i8", device="cpu") as index:
        assert index.vectorizer.precision == "int8"  # an int8 index is queried in int8
        pizza = DATA / "pizza" / "image_0001.jpg"
        [hit] = index.search(pizza, k=1)
        assert hit.path == str(pizza) and hit.score < 1e-3  # the same int8 vector
    with imgindex.Index.create(tmp_path / "f", preset="fast", precision="fp32", device="cpu") as ix:
        ix.add([DATA / "pizza"])
    with imgindex.Index.open(tmp_path / "f", device="cpu") as index:
        assert index.vectorizer.precision != "int8"  # a float index stays float
    with (
        imgindex.Index.open(tmp_path / "i8", precision="fp32", device="cpu") as index,
        pytest.raises(imgindex.errors.IncompatibleIndexError, match="int8"),
    ):
        index.search(IMAGES[0])
