"""AugNet on ONNX Runtime: exported once with torch, cached, then loaded without torch.

Importing torch takes seconds, far longer than embedding one query image; ONNX Runtime starts in
a fraction of that, and on a CPU runs the fp32 network as fast as TorchScript does
(benchmarks/startup.py measures both). So on a CPU the network is exported to ONNX the first time
it is needed and kept in the user's cache folder (``$IMGINDEX_CACHE``, else
``$XDG_CACHE_HOME/imgindex``, else ``~/.cache/imgindex``), under a name made of what decides its
numbers: the weights' SHA-256, the preset, the precision, the export format and the version of
torch that exported it. Next to it, a small JSON file records the network's own SHA-256 (checked
before every load: a damaged or replaced file is exported again, never run) and the model's name.
Both are written atomically (:mod:`imgindex.atomic`).

The exported graph is the network alone (``N x 3 x H x W`` float32 in, ``N x 768`` out, any
batch and size): preprocessing stays in :mod:`imgindex.preprocessing`, shared with torch, so the
vectors agree with torch's to float rounding.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgindex.atomic import write_file
from imgindex.errors import WeightsError

# Bumped when the exported graph changes (its opset, its inputs), so older files are not used.
EXPORT_FORMAT = 1
OPSET = 17
CACHE_ENV = "IMGINDEX_CACHE"
RUNTIMES = ("auto", "torch", "onnx")
# The runtime a Vectorizer uses when none is given.
RUNTIME_ENV = "IMGINDEX_RUNTIME"

# Told when a network is being exported (the first use on this machine takes a few seconds more):
# the command line prints it; a library user may set it.
on_export: Callable[[str], None] | None = None


def available() -> bool:
    """Whether ONNX Runtime is installed."""
    try:
        importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def cache_folder() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "imgindex"


@dataclass(frozen=True)
class NetworkKey:
    """What an exported network's numbers depend on."""

    weights_sha256: str
    preset: str
    precision: str

    def stem(self) -> str:
        try:
            exporter = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            exporter = "none"
        return (
            f"augnet-{self.weights_sha256[:16]}-{self.preset}-{self.precision}"
            f"-f{EXPORT_FORMAT}-torch{exporter}"
        )

    def paths(self) -> tuple[Path, Path]:
        """(the network, its record)."""
        folder = cache_folder() / "onnx"
        return folder / f"{self.stem()}.onnx", folder / f"{self.stem()}.json"


def cached(key: NetworkKey) -> tuple[Path, dict[str, Any]] | None:
    """The exported network for ``key`` and its record, if there is one and its checksum is
    the recorded one."""
    network, record_path = key.paths()
    try:
        record = json.loads(record_path.read_text())
        if record.get("weights_sha256") != key.weights_sha256:
            return None
        if _sha256(network) != record.get("sha256"):
            return None
    except (OSError, ValueError):
        return None
    return network, record


def export(key: NetworkKey, network: Any, model_name: str) -> tuple[Path, dict[str, Any]]:
    """Export the torch ``network`` (AugNet, eval mode) for ``key`` into the cache."""
    import torch

    if on_export is not None:
        on_export(f"exporting the network to ONNX for fast CPU start-up (once): {key.paths()[0]}")
    buffer = io.BytesIO()
    example = torch.zeros(1, 3, 64, 64)
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated for the torch.export one, which needs
        # onnxscript; the graph it writes for a ResNet is the same.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network.eval(),
            (example,),
            buffer,
            input_names=["images"],
            output_names=["vectors"],
            dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}, "vectors": {0: "n"}},
            opset_version=OPSET,
            dynamo=False,
        )
    record = {
        "weights_sha256": key.weights_sha256,
        "preset": key.preset,
        "precision": key.precision,
        "model": model_name,
        "export_format": EXPORT_FORMAT,
        "opset": OPSET,
        "torch": torch.__version__,
    }
    return _keep(key, buffer.getvalue(), record)


CALIBRATION = Path(__file__).resolve().parent / "calibration"


def quantize(
    key: NetworkKey, fp32: Path, fp32_record: dict[str, Any]
) -> tuple[Path, dict[str, Any]]:
    """Quantize the exported fp32 network ``fp32`` to INT8 for ``key`` (static quantization:
    int8 weights per output channel, uint8 activations whose ranges are calibrated on the
    bundled photos, :data:`CALIBRATION`, at the 99.999th percentile), into the cache.

    The first convolution, the last stage and the projection to 768 stay in fp32: quantizing
    them moves the vectors most (benchmarks/startup.py's quality table measures what is kept)."""
    import tempfile

    import onnx
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if on_export is not None:
        on_export(
            f"quantizing the network to INT8, calibrated on {CALIBRATION} (once): {key.paths()[0]}"
        )
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        nodes = onnx.load(str(prepared)).graph.node
        keep = [n.name for n in nodes if _kept_in_fp32(n)]
        quantized = Path(scratch) / "int8.onnx"
        # (onnxruntime prints its calibration settings on stdout, which is the user's output.)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            q.quantize_static(
                str(prepared),
                str(quantized),
                _Calibration(key.preset),
                quant_format=q.QuantFormat.QDQ,
                per_channel=True,
                weight_type=q.QuantType.QInt8,
                activation_type=q.QuantType.QUInt8,
                calibrate_method=q.CalibrationMethod.Percentile,
                nodes_to_exclude=keep,
            )
        data = quantized.read_bytes()
    record = {
        **fp32_record,
        "precision": "int8",
        "model": f"{fp32_record['model']}-int8",
        "calibration": sorted(p.name for p in CALIBRATION.glob("*.jpg")),
        "kept_in_fp32": keep,
    }
    return _keep(key, data, record)


def _keep(key: NetworkKey, data: bytes, record: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Write the network ``data`` for ``key`` into the cache, then its record with its SHA-256
    (each file whole or not at all); the record last, so a network without one is never used."""
    path, record_path = key.paths()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda fh: fh.write(data))
    record = {**record, "sha256": hashlib.sha256(data).hexdigest()}
    text = json.dumps(record, indent=1, sort_keys=True)
    write_file(record_path, lambda fh: fh.write(text.encode()))
    return path, record


def _kept_in_fp32(node: Any) -> bool:
    name = node.name
    return (
        node.op_type in ("Gemm", "MatMul", "Tanh")
        or "layer4" in name
        or (name.endswith("/conv1/Conv") and "layer" not in name)
    )


class _Calibration:
    """The calibration photos as the preset's network input (onnxruntime's data reader)."""

    def __init__(self, preset: str):
        from imgindex.decode import read_image_file
        from imgindex.preprocessing import PRESETS

        self.preprocessing = PRESETS[preset]
        self.paths = iter(sorted(CALIBRATION.glob("*.jpg")))
        self.read = read_image_file

    def get_next(self) -> dict[str, np.ndarray] | None:
        path = next(self.paths, None)
        if path is None:
            return None
        pixels = self.read(path).pixels
        side = self.preprocessing.short_side
        resized = self.preprocessing.resize_array(pixels, str(path))[:, :side, :side]
        return {"images": self.preprocessing.normalize_array(np.ascontiguousarray(resized[None]))}

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def rewind(self) -> None:
        self.paths = iter(sorted(CALIBRATION.glob("*.jpg")))


class OnnxNetwork:
    """An exported network in an ONNX Runtime session on the CPU: ``network(batch)`` takes
    ``N x 3 x H x W`` float32 and gives ``N x 768`` float32."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise WeightsError(f"{path}: ONNX Runtime cannot load it ({exc})") from None
        self.path = path

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": np.ascontiguousarray(batch, np.float32)})[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
