"""The Vectorizer: images in, AugNet vectors out.

Images of different shapes cannot share a batch without changing their vectors, so batches are
formed from images of the same resized shape; ``PaddedForward`` lets differently shaped images
share one padded batch while giving each the vector it would have alone.

The network runs on torch, or on a CPU on ONNX Runtime (``imgindex.onnxrt``: no torch start-up);
the weights live in ``imgindex.weights``, the preprocessing in ``imgindex.preprocessing`` and the
device handling in ``imgindex.devices``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgindex import onnxrt
from imgindex.decode import (
    DEFAULT_MAX_PIXELS,
    decode_image_bytes,
    pil_to_rgb_array,
    read_image_file,
)
from imgindex.devices import PRECISIONS, default_precision, resolve_device, to_device
from imgindex.errors import ImageError, WeightsError
from imgindex.preprocessing import PRESETS
from imgindex.weights import (
    EMBEDDING_DIM,
    MODEL_NAME,
    Weights,
    load_network,
    network_arch,
    resolve_weights,
)

if TYPE_CHECKING:
    import torch


class PaddedForward:
    """AugNet on a batch of images of different sizes, zero-padded to one shape, with the same
    result for each image as a forward pass at its own size.

    On a GPU every new input shape costs cuDNN a new execution plan for each of ResNet50's 53
    convolutions, and its plan cache of 10,000 entries thrashes on a collection of many aspect
    ratios, which then runs many times slower than one shape (the README's GPU section). So
    images are padded to a few shapes (multiples of ``BUCKET`` pixels) and the padding is kept
    exactly zero wherever a convolution could see it: a convolution's own zero padding then looks
    the same as the padded area, and valid outputs are unchanged. Only the inputs of 3x3 and
    7x7 convolutions and of the max-pool need it (1x1 convolutions read a single position; after
    a ReLU, zeros pool like max-pool's -inf padding), and the average pool divides by the valid
    area.
    """

    BUCKET = 32

    def __init__(self, network: torch.nn.Module):
        self.backbone = network[0]
        self.head = network[1]

    @classmethod
    def bucket_shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The padded shape of a ``3 x h x w`` image."""
        b = cls.BUCKET
        return (shape[0], -(-shape[1] // b) * b, -(-shape[2] // b) * b)

    def __call__(self, x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """``x``: normalised ``N x 3 x H x W`` batch; ``sizes``: ``N x 2`` valid (h, w)."""
        import torch

        net = self.backbone
        x = _zero_outside(x, sizes)
        x = net.relu(net.bn1(net.conv1(x)))
        sizes = _conv_size(sizes, 7, 2, 3)
        x = net.maxpool(_zero_outside(x, sizes))
        sizes = _conv_size(sizes, 3, 2, 1)
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                x, sizes = _block(block, x, sizes)
        x = _zero_outside(x, sizes)
        area = (sizes[:, 0] * sizes[:, 1]).to(x.dtype).view(-1, 1)
        pooled = x.sum((2, 3)) / area
        return self.head(net.fc(torch.flatten(pooled, 1)))


def _is_augnet(network: Any) -> bool:
    """Whether ``network`` has the ResNet structure PaddedForward knows (a test stand-in may
    not)."""
    import torch

    return (
        isinstance(network, torch.nn.Sequential)
        and len(network) == 2
        and hasattr(network[0], "layer4")
    )


def _conv_size(sizes: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    return (sizes + 2 * padding - kernel) // stride + 1


def _zero_outside(x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    import torch

    rows = torch.arange(x.shape[2], device=x.device).view(1, -1) < sizes[:, :1]
    cols = torch.arange(x.shape[3], device=x.device).view(1, -1) < sizes[:, 1:]
    return x * (rows[:, None, :, None] & cols[:, None, None, :]).to(x.dtype)


def _block(block: Any, x: torch.Tensor, sizes: torch.Tensor) -> tuple[Any, Any]:
    """One torchvision residual block (Bottleneck or BasicBlock) with zeros kept where its
    3x3 convolutions look."""
    identity = x if block.downsample is None else block.downsample(x)
    if hasattr(block, "conv3"):  # Bottleneck: 1x1, 3x3 (strided), 1x1
        out = block.relu(block.bn1(block.conv1(x)))
        out = _zero_outside(out, sizes)
        stride = block.conv2.stride[0]
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:  # BasicBlock: 3x3 (strided), 3x3
        stride = block.conv1.stride[0]
        out = block.relu(block.bn1(block.conv1(_zero_outside(x, sizes))))
        out = block.bn2(block.conv2(_zero_outside(out, _conv_size(sizes, 3, stride, 1))))
    return block.relu(out + identity), _conv_size(sizes, 3, stride, 1)


class Vectorizer:
    """Turns images into AugNet vectors; a drop-in for ``imgsim.Vectorizer``.

    ``vectorize(x)`` takes an image path, a PIL image, a uint8 ``H x W x 3`` array (BGR unless
    ``channels="rgb"``), or a list / ``N x H x W x 3`` array of those. One image gives a float32
    vector of 768 numbers, a batch gives an ``N x 768`` matrix. Batches give the same vectors as
    one-by-one calls. ``pad_batches`` (default: on GPUs) lets images of different sizes share a
    batch, padded, with unchanged vectors (:class:`PaddedForward`).
    """

    model_name = MODEL_NAME

    def __init__(
        self,
        device: str = "auto",
        weights: str | os.PathLike[str] | None = None,
        batch_size: int | None = None,
        max_pixels: int | None = None,
        preset: str = "exact",
        precision: str | None = None,
        pad_batches: bool | None = None,
        runtime: str | None = None,
        threads: int | None = None,
    ):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        if precision not in (*PRECISIONS, "int8", None, "auto"):
            raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16, int8 or auto")
        self.device = resolve_device(device)
        # On a CPU, batches larger than 2 run no faster (measured in benchmarks/ingest.py, 2
        # cores); a GPU wants many images at once.
        default_batch = 2 if self.device == "cpu" else 64
        self.batch_size = max(1, int(batch_size or default_batch))
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.preprocessing = PRESETS[preset]
        self.weights = self._resolve_weights(weights)
        # Where starting took its time (seconds by stage), for --verbose.
        self.timings: dict[str, float] = {}
        # Compute threads (default: the runtime's own choice, every core); a Ray actor sharing
        # a node with others gets its share.
        self.threads = threads
        runtime = runtime or os.environ.get(onnxrt.RUNTIME_ENV) or "auto"
        if runtime == "auto" and pad_batches:
            runtime = "torch"  # padded batches are torch's (PaddedForward)
        if precision in (*PRECISIONS, "int8"):
            self.precision = precision
        elif self._int8_by_default(preset, runtime):
            self.precision = "int8"
        else:
            self.precision = default_precision(preset, self.device)
        self.runtime = self._choose_runtime(runtime)
        if self.runtime == "onnx":
            self.pad_batches = False
            self._padded = None
            self.network = self._onnx_network()
            return
        started = time.perf_counter()
        import torch  # timed apart: its import is most of a CPU query's start-up

        self.timings["importing torch"] = time.perf_counter() - started
        if threads:
            torch.set_num_threads(threads)
        # Padded batches by default on GPUs, where each new input shape is expensive (see
        # PaddedForward); CPUs run exact shapes, each as fast as it comes.
        self.pad_batches = self.device != "cpu" if pad_batches is None else pad_batches
        network = self._build_network().eval()
        self._padded = None
        if self.pad_batches and _is_augnet(network):
            self.network, self._input_format = self._optimize(network, script=False)
            self._padded = PaddedForward(self.network)
        else:
            self.network, self._input_format = self._optimize(network)

    @classmethod
    def around(
        cls, network: torch.nn.Module, device: str, precision: str = "fp32", batch_size: int = 64
    ) -> Vectorizer:
        """A Vectorizer embedding with ``network`` as it is (one being trained, say) on
        ``device``: exact preprocessing, no weights file, padded batches on a GPU as usual."""
        import torch

        self = cls.__new__(cls)
        self.runtime = "torch"
        self.device = device
        self.batch_size = batch_size
        self.max_pixels = DEFAULT_MAX_PIXELS
        self.preprocessing = PRESETS["exact"]
        self.precision = precision
        self.weights = Weights(path=Path("<in memory>"), sha256="", is_default=False)
        self.pad_batches = device != "cpu" and _is_augnet(network)
        self.network = network
        self._padded = PaddedForward(network) if self.pad_batches else None
        on_gpu = device != "cpu"
        self._input_format = torch.channels_last if on_gpu else torch.contiguous_format
        return self

    def _optimize(self, network: torch.nn.Module, script: bool = True) -> tuple[Any, Any]:
        """The network prepared for fast inference on this device, and the memory format its
        input should have. Either way the vectors move by less than 1e-5.

        On a CPU in fp32, TorchScript freezing folds batch norm into the convolutions and runs
        them in oneDNN's own layout, faster than eager channels_last (benchmarks/ingest.py
        measures both against imgsim). Elsewhere, and should scripting fail, channels_last
        lets oneDNN / cuDNN pick their fastest kernels.
        """
        import torch

        network = network.to(self.device)
        if script and self.device == "cpu" and self.precision == "fp32":
            try:
                # TorchScript is deprecated in favour of torch.compile, which would compile
                # anew for every image shape; the warning says nothing the user can act on.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    frozen = torch.jit.freeze(torch.jit.script(network))
                    return torch.jit.optimize_for_inference(frozen), torch.contiguous_format
            except Exception:  # an older or newer TorchScript: eager is fine too
                pass
        return network.to(memory_format=torch.channels_last), torch.channels_last

    def _int8_by_default(self, preset: str, runtime: str) -> bool:
        """The fast preset on a CPU computes in INT8 on the onnx runtime by default: it keeps
        the fp32 fast preset's retrieval quality (the README's table) at a fraction of the
        time. Overridden by the test stand-in, whose network is not quantized."""
        return (
            preset == "fast"
            and self.device == "cpu"
            and runtime in ("auto", "onnx")
            and onnxrt.available()
        )

    def _choose_runtime(self, runtime: str) -> str:
        """ "torch" or "onnx" for ``runtime`` (auto, torch or onnx): auto is ONNX Runtime for fp32
        on a CPU when it is installed (no torch start-up), else torch; GPU work stays on torch."""
        if runtime not in onnxrt.RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose auto, torch or onnx")
        if runtime not in ("auto", "onnx") and self.precision == "int8":
            raise ValueError("int8 runs on the onnx runtime (on the CPU): use --runtime onnx")
        fits = self.device == "cpu" and self.precision in ("fp32", "int8")
        if runtime == "onnx" or self.precision == "int8":
            if not fits:
                raise ValueError(
                    "the onnx runtime computes in fp32 or int8 on the CPU; use --runtime torch "
                    f"for {self.device} / {self.precision}"
                )
            if not onnxrt.available():
                raise WeightsError("the onnx runtime needs ONNX Runtime: pip install onnxruntime")
            return "onnx"
        if runtime == "auto":
            return "onnx" if fits and onnxrt.available() else "torch"
        return runtime

    def _onnx_network(self) -> onnxrt.OnnxNetwork:
        """The network exported to ONNX (from the cache, else exported now: needs torch)."""
        preset = self.preprocessing.preset
        key = onnxrt.NetworkKey(self.weights.sha256, preset, "fp32")
        found = onnxrt.cached(key)
        started = time.perf_counter()
        if found is None:
            network = self._build_network().eval()  # sets model_name for this network
            found = onnxrt.export(key, network, self.model_name)
            self.timings["exporting to ONNX (once)"] = time.perf_counter() - started
        if self.precision == "int8":
            int8 = onnxrt.NetworkKey(self.weights.sha256, preset, "int8")
            fp32, found = found, onnxrt.cached(int8)
            if found is None:
                started = time.perf_counter()
                found = onnxrt.quantize(int8, *fp32)
                self.timings["quantizing to INT8 (once)"] = time.perf_counter() - started
        path, record = found
        self.model_name = record["model"]
        started = time.perf_counter()
        network = onnxrt.OnnxNetwork(path, self.threads)
        self.timings["loading the ONNX network"] = time.perf_counter() - started
        return network

    # Overridden by a test stand-in; see tests/conftest.py. A class method: an index checks an
    # existing index's weights with it before deciding whether the model is needed at all.
    @classmethod
    def _resolve_weights(cls, weights: str | os.PathLike[str] | None) -> Weights:
        return resolve_weights(weights)

    def _build_network(self) -> torch.nn.Module:
        network = load_network(self.weights)
        self.model_name = f"augnet-{network_arch(network)}-{EMBEDDING_DIM}"
        return network

    @property
    def dim(self) -> int:
        return EMBEDDING_DIM

    def fingerprint(self) -> dict[str, Any]:
        """What an index records about the vectors it holds; two vectorizers with equal
        fingerprints produce comparable vectors."""
        return {
            "model": self.model_name,
            "weights_sha256": self.weights.sha256,
            "dim": self.dim,
            "preprocessing": self.preprocessing.describe(),
        }

    # -- public API -------------------------------------------------------------------------

    def vectorize(self, images: Any, channels: str = "bgr") -> np.ndarray:
        """Vector(s) for one image or a batch; see the class docstring."""
        single, items = _split_batch(images)
        vectors = self.vectorize_many(items, channels=channels)
        return vectors[0] if single else vectors

    def vectorize_many(self, images: Iterable[Any], channels: str = "bgr") -> np.ndarray:
        """``N x 768`` float32 vectors for an iterable of single images."""
        if channels.lower() not in ("bgr", "rgb"):
            raise ValueError(f"channels must be 'bgr' or 'rgb', not {channels!r}")
        chunks = []
        pending: list[torch.Tensor] = []
        for item in images:
            pending.append(self.prepare(item, channels))
            # Bounded memory for long lists; chunking never changes a vector.
            if len(pending) >= 8 * self.batch_size:
                chunks.append(self.embed_tensors(pending))
                pending = []
        if pending or not chunks:
            chunks.append(self.embed_tensors(pending))
        return np.concatenate(chunks)

    def prepare(self, image: Any, channels: str = "bgr") -> torch.Tensor:
        """One image -> its resized ``3 x h x w`` uint8 tensor (the network's input before
        normalisation; a numpy array on the onnx runtime)."""
        rgb, name = self._to_rgb(image, channels)
        return self.resize(rgb, name)

    def resize(self, pixels: Any, name: str = "<image>") -> Any:
        """Decoded ``H x W x 3`` RGB pixels -> what :meth:`prepare` gives."""
        if self.runtime == "onnx":
            return self.preprocessing.resize_array(pixels, name)
        return self.preprocessing.resize(pixels, name)

    def group_key(self, tensor: torch.Tensor) -> tuple[int, ...]:
        """Images with equal keys can share a batch: equal shapes, or on a GPU, equal padded
        shapes (see :class:`PaddedForward`)."""
        shape = tuple(tensor.shape)
        return PaddedForward.bucket_shape(shape) if self._padded is not None else shape

    def embed_group(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        """Embed prepared tensors that share a :meth:`group_key`, in one batch."""
        return self.start_group(tensors).result()

    def start_group(self, tensors: Sequence[torch.Tensor]) -> PendingVectors:
        """Start embedding prepared tensors that share a :meth:`group_key`, in one batch; on a
        GPU this returns before the vectors are computed, so the caller can prepare the next
        batch (or store the last one) meanwhile."""
        if self.runtime == "onnx":
            return self.start_batch(np.stack(list(tensors)))
        import torch

        if self._padded is None:
            return self.start_batch(torch.stack(list(tensors)))
        # The batch is padded too, to a power of two (at most the batch size): cuDNN's plans
        # depend on the batch size as well as the image shape. It is assembled in pinned memory,
        # from which it is copied to the GPU asynchronously.
        rows = max(min(1 << (len(tensors) - 1).bit_length(), self.batch_size), len(tensors))
        _, height, width = self.group_key(tensors[0])
        first = tensors[0]
        on_gpu = self.device != "cpu" and first.device.type == "cpu"
        shape = (rows, 3, height, width)
        batch = torch.zeros(shape, dtype=first.dtype, device=first.device, pin_memory=on_gpu)
        sizes = np.ones((rows, 2), dtype=np.int64)
        for i, t in enumerate(tensors):
            batch[i, :, : t.shape[1], : t.shape[2]] = t
            sizes[i] = t.shape[1:]
        return self.start_batch(batch, sizes, count=len(tensors))

    def embed_tensors(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        """Embed prepared tensors of any mix of shapes; batches are formed per group key. On a
        GPU, each batch is started before the previous one's vectors are collected."""
        out = np.empty((len(tensors), self.dim), dtype=np.float32)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, t in enumerate(tensors):
            groups[self.group_key(t)].append(i)
        chunks = [
            indices[start : start + self.batch_size]
            for indices in groups.values()
            for start in range(0, len(indices), self.batch_size)
        ]
        previous: tuple[list[int], PendingVectors] | None = None
        for chunk in chunks:
            pending = self.start_group([tensors[i] for i in chunk])
            if previous is not None:
                out[previous[0]] = previous[1].result()
            previous = chunk, pending
        if previous is not None:
            out[previous[0]] = previous[1].result()
        return out

    def embed_batch(self, batch: torch.Tensor, sizes: Any = None) -> np.ndarray:
        """``N x 3 x h x w`` uint8 tensor (one shape) -> ``N x 768`` float32 vectors. With
        ``sizes`` (``N x 2``), each image is only its top-left ``h x w`` (the rest is padding)."""
        return self.start_batch(batch, sizes).result()

    def start_batch(
        self, batch: torch.Tensor, sizes: Any = None, count: int | None = None
    ) -> PendingVectors:
        """:meth:`embed_batch`, started: the vectors of the first ``count`` images (default:
        all) come from the returned object's ``result()``. Nothing on the way makes the CPU wait
        for the GPU (no synchronous copies), so the GPU can still be busy with earlier batches."""
        if self.runtime == "onnx":
            x = self.preprocessing.normalize_array(np.asarray(batch))
            return ReadyVectors(self.network(x)[:count])
        import torch

        with torch.inference_mode():
            batch = to_device(batch, self.device)  # no-op if decoded there
            x = self.preprocessing.normalize(batch).contiguous(memory_format=self._input_format)
            with torch.autocast(
                device_type=torch.device(self.device).type,
                dtype=torch.bfloat16,
                enabled=self.precision == "bf16",
            ):
                if sizes is not None:
                    vectors = self._padded(x, to_device(torch.as_tensor(sizes), self.device))
                else:
                    vectors = self.network(x)
            return PendingVectors(vectors[:count].float())

    # -- input handling ---------------------------------------------------------------------

    def _to_rgb(self, image: Any, channels: str) -> tuple[np.ndarray, str]:
        from PIL import Image

        if isinstance(image, (str, os.PathLike)):
            name = os.fsdecode(image)
            p = self.preprocessing
            pixels = read_image_file(image, self.max_pixels, p.draft_to, p.short_side).pixels
            return pixels, name
        if isinstance(image, Image.Image):
            name = getattr(image, "filename", "") or "<PIL image>"
            return pil_to_rgb_array(image, name), name
        if isinstance(image, (bytes, bytearray, memoryview)):  # an encoded file, as read
            data = bytes(image)
            p = self.preprocessing
            pixels = decode_image_bytes(data, "<bytes>", self.max_pixels, p.draft_to, p.short_side)
            return pixels, "<bytes>"
        if isinstance(image, np.ndarray):
            return _array_to_rgb(image, channels), "<array>"
        raise TypeError(
            "expected an image path, encoded image bytes, a PIL image or a uint8 numpy array, "
            f"got {type(image).__name__}"
        )


class PendingVectors:
    """Vectors being computed: ``result()`` waits for them and returns them as ``N x 768``
    float32 numpy. From a GPU they come back through pinned memory, copied asynchronously
    behind the forward pass; a CUDA event says when they have arrived."""

    def __init__(self, vectors: torch.Tensor):
        import torch

        self._event = None
        if vectors.device.type == "cuda":
            host = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
            host.copy_(vectors, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            vectors = host
        self._vectors = vectors

    def result(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._vectors.numpy()


class ReadyVectors:
    """Vectors computed already (the onnx runtime): ``result()`` as for PendingVectors."""

    def __init__(self, vectors: np.ndarray):
        self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)

    def result(self) -> np.ndarray:
        return self._vectors


def _split_batch(images: Any) -> tuple[bool, list[Any]]:
    """(is_single, items): a batch is a list/tuple or an N x H x W x C array."""
    if isinstance(images, (list, tuple)):
        return False, list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return False, list(images)
    return True, [images]


def _array_to_rgb(array: np.ndarray, channels: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ImageError(
            "<array>", f"pixels must be uint8 (0-255), got {array.dtype}; convert the array first"
        )
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(
            "<array>",
            "expected shape H x W x 3 (or H x W, H x W x 4), got "
            + " x ".join(map(str, array.shape)),
        )
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    rgb = array[:, :, :3]
    return rgb[:, :, ::-1] if channels.lower() == "bgr" else rgb
