"""AugNet's weights: finding them, checking them, loading and writing checkpoints.

AugNet (Chen et al., "AugNet: End-to-End Unsupervised Visual Representation Learning with Image
Augmentation", arXiv:2106.06250) is torchvision's ResNet50 with its classifier replaced by
``Linear(2048, 768)`` and a ``tanh``. The pretrained weights are the ``model.pth`` shipped in the
``imgsim`` 0.1.2 wheel (MIT licence). This module finds that file through the installed
distribution's file list (never importing imgsim, which needs OpenCV), checks its SHA-256, and
loads it with ``torch.load(weights_only=True)`` so that a checkpoint cannot run code. Fine-tuned
checkpoints carry their architecture, preprocessing and a digest of their tensors.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgindex.atomic import write_file
from imgindex.errors import WeightsError

if TYPE_CHECKING:
    import torch


MODEL_NAME = "augnet-resnet50-768"

EMBEDDING_DIM = 768

AUGNET_SHA256 = "c2cb3cac82642c5698721bd4c57702c3d2ffab077ee9fc277c60ef7359293add"

WEIGHTS_ENV = "IMGINDEX_WEIGHTS"

INSTALL_HINT = (
    "install the AugNet weights with `pip install --no-deps imgsim==0.1.2`, "
    f"or point --weights / ${WEIGHTS_ENV} at a model.pth"
)


@dataclass(frozen=True)
class Weights:
    """A weights file and its SHA-256. ``is_default`` is True for imgsim's own model.pth."""

    path: Path
    sha256: str
    is_default: bool


def default_weights_path() -> Path:
    """Location of ``imgsim/model.pth`` inside the installed imgsim distribution."""
    try:
        dist = importlib.metadata.distribution("imgsim")
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(f"the AugNet weights are not installed: {INSTALL_HINT}") from None
    for file in dist.files or ():
        if file.name == "model.pth" and file.parent.name == "imgsim":
            return Path(str(dist.locate_file(file)))
    raise WeightsError(f"the imgsim distribution has no imgsim/model.pth: {INSTALL_HINT}")


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(path: str | os.PathLike[str] | None = None) -> Weights:
    """The weights to use: ``path``, else ``$IMGINDEX_WEIGHTS``, else imgsim's model.pth.

    The default weights must match the published checksum; another file is accepted as long as it
    loads into the same network (checked when it is loaded), and its checksum is recorded.
    """
    chosen = path if path is not None else os.environ.get(WEIGHTS_ENV) or None
    if chosen is None:
        resolved = default_weights_path()
        is_default = True
    else:
        resolved = Path(chosen).expanduser()
        is_default = False
    if not resolved.is_file():
        if is_default:
            raise WeightsError(f"{resolved}: weights file not found; {INSTALL_HINT}")
        raise WeightsError(f"{resolved}: weights file not found")
    try:
        sha = sha256_of_file(resolved)
    except OSError as exc:
        raise WeightsError(f"{resolved}: cannot read weights ({exc.strerror or exc})") from None
    if is_default and sha != AUGNET_SHA256:
        raise WeightsError(
            f"{resolved}: SHA-256 is {sha}, expected {AUGNET_SHA256}; the file is damaged or not "
            "imgsim 0.1.2's model.pth (reinstall it with `pip install --force-reinstall --no-deps "
            "imgsim==0.1.2`)"
        )
    return Weights(path=resolved, sha256=sha, is_default=sha == AUGNET_SHA256)


# Backbones a network can have (torchvision ResNets); imgsim's weights are the resnet50 one. The
# smaller two are for training from scratch on modest hardware, as in the AugNet repository.
ARCHS = {"resnet50": 2048, "resnet34": 512, "resnet18": 512}

CHECKPOINT_FORMAT = "imgindex-augnet-checkpoint"


def build_network(arch: str = "resnet50") -> torch.nn.Module:
    """An untrained AugNet: a ResNet whose ``fc`` is ``Linear(features, 768)``, then tanh."""
    import torch
    import torchvision.models

    if arch not in ARCHS:
        raise WeightsError(f"unknown backbone {arch!r}; choose one of: {', '.join(ARCHS)}")
    backbone = getattr(torchvision.models, arch)(weights=None)
    backbone.fc = torch.nn.Linear(ARCHS[arch], EMBEDDING_DIM)
    return torch.nn.Sequential(backbone, torch.nn.Tanh())


def state_digest(state: dict[str, torch.Tensor], meta_json: str) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and values, and the metadata: what a
    checkpoint records about itself, so that a changed value is noticed when it is loaded."""
    import torch

    digest = hashlib.sha256(meta_json.encode())
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """What a weights file holds: the network's state, its backbone, and how it was made."""

    state: dict[str, Any]
    arch: str
    meta: dict[str, Any]  # empty for imgsim's model.pth
    training: dict[str, Any] | None  # optimizer and progress, in a resumable checkpoint


def read_checkpoint(path: Path) -> Checkpoint:
    """Load imgsim's model.pth or an imgindex checkpoint, safely (``weights_only=True``: a file
    cannot run code), checking an imgindex checkpoint's recorded digest."""
    import json

    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # (PyTorch's own message suggests loading it unsafely: not a suggestion to pass on.)
        if "global" not in str(exc).lower():  # not a pickle of known things at all
            raise WeightsError(
                f"{path}: not a PyTorch checkpoint (its contents are not a saved state dict; "
                "a damaged or unrelated file?)"
            ) from None
        raise WeightsError(
            f"{path}: not a loadable PyTorch state dict: it holds objects other than tensors "
            "and settings, which could run code when loaded; refused"
        ) from None
    except Exception as exc:
        raise WeightsError(
            f"{path}: not a loadable PyTorch state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT:
        meta_json = raw.get("meta")
        state = raw.get("state_dict")
        if not isinstance(meta_json, str) or not isinstance(state, dict):
            raise WeightsError(f"{path}: an imgindex checkpoint without state or metadata")
        if state_digest(state, meta_json) != raw.get("digest"):
            raise WeightsError(
                f"{path}: the weights do not match the checkpoint's recorded digest; the file "
                "was damaged or modified after it was written"
            )
        meta = json.loads(meta_json)
        return Checkpoint(state, str(meta.get("arch", "resnet50")), meta, raw.get("training"))
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(raw).__name__}")
    # imgsim's checkpoint was saved from nn.DataParallel ("module." prefixes) around a module whose
    # ResNet is called "pre"; our Sequential names it "0".
    renamed = {}
    for key, value in raw.items():
        key = key.removeprefix("module.")
        if key.startswith("pre."):
            key = "0." + key[len("pre.") :]
        renamed[key] = value
    return Checkpoint(renamed, "resnet50", {}, None)


def write_checkpoint(
    path: Path,
    network: torch.nn.Module,
    meta: dict[str, Any],
    training: dict[str, Any] | None = None,
) -> None:
    """Save ``network`` (with ``meta``, and ``training`` state for resuming) atomically: to a
    temporary file, flushed to disk, then renamed over ``path`` (:mod:`imgindex.atomic`)."""
    import json

    import torch

    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
             for k, v in network.state_dict().items()}  # fmt: skip
    meta_json = json.dumps(meta, sort_keys=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "meta": meta_json,
        "state_dict": state,
        "digest": state_digest(state, meta_json),
    }
    if training is not None:
        payload["training"] = training
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda fh: torch.save(payload, fh))


def load_network(weights: Weights) -> torch.nn.Module:
    """AugNet with ``weights`` loaded, in eval mode, on the CPU."""
    checkpoint = read_checkpoint(weights.path)
    network = build_network(checkpoint.arch)
    try:
        network.load_state_dict(checkpoint.state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise WeightsError(
            f"{weights.path}: not an AugNet {checkpoint.arch}-768 checkpoint ({detail[:300]})"
        ) from None
    refuse_non_finite(network, weights.path)
    return network.eval()


def refuse_non_finite(network: torch.nn.Module, path: Path) -> None:
    """Refuse a network whose weights hold NaN or infinite numbers (a training run that
    diverged): every vector it gave would be NaN, and NaN distances order nothing."""
    import torch

    for name, tensor in network.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightsError(
                f"{path}: the weights hold NaN or infinite numbers ({name}); a training run "
                "that diverged? Refused: use an earlier checkpoint"
            )


def network_arch(network: torch.nn.Module) -> str:
    """The backbone of an AugNet network, read off its structure."""
    backbone = network[0]
    if backbone.fc.in_features == ARCHS["resnet50"]:
        return "resnet50"
    return "resnet34" if len(backbone.layer1) == 3 else "resnet18"
