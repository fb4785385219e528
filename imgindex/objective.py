"""What AugNet learns: its objective, and one training step.

Views of one picture (:mod:`imgindex.augment`) should embed close to the centre of that
picture's views and far from the other pictures' centres (Chen et al., arXiv:2106.06250).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from imgindex.augment import photometric
from imgindex.devices import memory_format
from imgindex.preprocessing import PRESETS

if TYPE_CHECKING:
    import torch


class LossOptions(Protocol):
    """What the objective takes from the training options (``train.TrainOptions``)."""

    loss: str  # "contrastive" or "softmax"
    temperature: float
    margin: float


def augnet_loss(
    embeddings: torch.Tensor,
    images: int,
    kind: str = "contrastive",
    temperature: float = 0.1,
    margin: float = 1.0,
) -> torch.Tensor:
    """AugNet's objective for ``images x views`` embeddings (rows grouped by image).

    Each image's centre is the mean of its views' embeddings. ``contrastive``: the squared
    distance of every view to its own centre, plus a squared hinge on its distance to every
    other image's centre, which should be at least ``margin`` (distances are divided by
    sqrt(768), the root-mean-square difference per dimension, in which the stock weights put
    nearest neighbours of Caltech-101 photos 0.63 apart and a typical pair 1.12). ``softmax``:
    cross-entropy of each view's cosine similarities to all centres, divided by ``temperature``,
    with its own image as the class (an instance-discrimination form).
    """
    import torch
    import torch.nn.functional as F

    e = embeddings.float()
    views = e.shape[0] // images
    centres = e.view(images, views, -1).mean(1)
    own = torch.arange(images, device=e.device).repeat_interleave(views)
    if kind == "softmax":
        logits = F.normalize(e, dim=1) @ F.normalize(centres, dim=1).T / temperature
        return F.cross_entropy(logits, own)
    squared = torch.cdist(e, centres).pow(2) / e.shape[1]
    pull = squared.gather(1, own.view(-1, 1)).mean()
    # Every (view, other image's centre) pair, by a mask rather than by selecting them
    # (squared[others] would make the CPU wait for the GPU to count them).
    others = torch.ones_like(squared)
    others[torch.arange(len(own), device=e.device), own] = 0
    distance = squared.clamp_min(1e-12).sqrt()
    push = (F.relu(margin - distance).pow(2) * others).sum() / (len(own) * (images - 1))
    return pull + push


def train_step(
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    views: torch.Tensor,
    images: int,
    options: LossOptions,
    generator: torch.Generator,
    bf16: bool,
) -> torch.Tensor:
    """One step on ``views`` (``images x K`` uint8 crops on the training device, grouped by
    image): photometric augmentation, forward pass, AugNet's loss, update. Returns the loss,
    not yet read (reading it waits for the device)."""
    import torch

    device = views.device
    inputs = (
        PRESETS["exact"]
        .standardize(photometric(views, generator))
        .contiguous(memory_format=memory_format(str(device)))
    )
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        embeddings = network(inputs)
    loss = augnet_loss(embeddings, images, options.loss, options.temperature, options.margin)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss
