"""The level protocol: turn images into bank rows, and find each query's most similar bank row.

A level has a ``name`` (its key in reports and metric names), a JSON ``config()`` (part of the bank
fingerprint, and enough to rebuild it with ``from_config`` where no user object is involved), an ``embed``
that turns a batch of validated items into named row arrays (first axis = item), and a ``nearest`` that
scores query rows against bank rows, **larger = more similar**, as matrix products over bank chunks.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..items import Item
from ..search import FaissIndex

log = logging.getLogger("relict_callbacks")

DEFAULT_GRID = {2: (128, 128), 3: (64, 64, 64)}


@dataclass
class Nearest:
    """Per query: best similarity, index of the bank item, and the transform under which it matched."""

    similarity: np.ndarray
    index: np.ndarray
    transform: list[str]


class Level(ABC):
    """Base class of the RELICT levels (voxel, feature, segmentation)."""

    name: str
    dot_product = False
    align_to: str | None = None  # a level whose matches this one re-scores when the bank has it (nearest(match=))

    @abstractmethod
    def config(self) -> dict:
        """JSON-serialisable configuration; ``type`` names the class."""

    @abstractmethod
    def embed(self, items: list[Item], device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
        """Row arrays for a batch of items, each with the batch as first axis."""

    @abstractmethod
    def nearest(self, query: dict[str, torch.Tensor], bank: dict[str, np.ndarray], *,
                exclude: torch.Tensor | None = None, index=None) -> Nearest:
        """Most similar bank item per query; ``exclude[q]`` is a bank index query ``q`` may not match."""

    def build_index(self, bank: dict[str, np.ndarray], kind: str):
        """A faiss index of ``kind`` over the bank's ``rows``, for levels whose similarity is their dot product
        (``dot_product = True``); None for the others, which always search exactly."""
        if not self.dot_product:
            return None
        index = FaissIndex(kind)
        rows = bank["rows"]
        index.add(rows.reshape(len(rows), -1))
        return index

    def stored_image(self, bank: dict[str, np.ndarray], index: int) -> torch.Tensor | None:
        """Bank item ``index`` as an image ``[C, *spatial]``, for galleries; ``None`` for levels that keep no
        images (embeddings, masks)."""
        return None

    def display_pair(self, sample: torch.Tensor, nearest: torch.Tensor, transform: str):
        """``(sample, nearest)`` as a gallery shows them side by side: ``nearest`` on the sample's grid."""
        return sample, resample(nearest, tuple(sample.shape[1:]))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({params})"


def plain_grid(grid):
    """A grid option as JSON holds it (a tuple becomes a list), for ``config()`` dicts and fingerprints."""
    return list(grid) if isinstance(grid, (tuple, list)) else grid


def resolve_grid(grid, ndim: int) -> tuple[int, ...]:
    """The target grid for images with ``ndim`` spatial dims (``None`` -> 128² / 64³, an int -> isotropic)."""
    if grid is None:
        return DEFAULT_GRID[ndim]
    if isinstance(grid, int):
        return (grid,) * ndim
    grid = tuple(int(g) for g in grid)
    if len(grid) != ndim:
        raise ValueError(f"grid {grid} has {len(grid)} dims but the images have {ndim} spatial dims")
    return grid


def resample(image: torch.Tensor, grid: tuple[int, ...], *, nearest: bool = False) -> torch.Tensor:
    """Resample ``[C, *spatial]`` to ``[C, *grid]``: area averaging when shrinking, linear when growing,
    nearest-neighbour for label maps."""
    if tuple(image.shape[1:]) == grid:
        return image
    return resample_batch(image[None].float(), grid, nearest)[0]


def resample_batch(batch: torch.Tensor, grid: tuple[int, ...], nearest: bool) -> torch.Tensor:
    """:func:`resample` of each image of ``[B, C, *spatial]`` (float), in one call."""
    if tuple(batch.shape[2:]) == grid:
        return batch
    if nearest:
        return F.interpolate(batch, size=grid, mode="nearest-exact")
    if all(g <= s for g, s in zip(grid, batch.shape[2:])):
        return F.adaptive_avg_pool3d(batch, grid) if len(grid) == 3 else F.adaptive_avg_pool2d(batch, grid)
    mode = "trilinear" if len(grid) == 3 else "bilinear"
    return F.interpolate(batch, size=grid, mode=mode, align_corners=False)


def same_shape_runs(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Positions of ``tensors`` in runs of consecutive equal shapes (each run can be stacked into one batch).

    >>> same_shape_runs([torch.zeros(2), torch.zeros(2), torch.zeros(3), torch.zeros(2)])
    [[0, 1], [2], [3]]
    """
    runs: list[list[int]] = []
    for position, tensor in enumerate(tensors):
        if runs and tensor.shape == tensors[runs[-1][0]].shape:
            runs[-1].append(position)
        else:
            runs.append([position])
    return runs


def resample_all(images: list[torch.Tensor], grid: tuple[int, ...], device, *, nearest: bool = False) -> torch.Tensor:
    """Images ``[C, *spatial]`` of any sizes as one float32 batch ``[B, C, *grid]`` on ``device``, resampled as
    :func:`resample` does, one batched call per run of equal-sized images.

    >>> resample_all([torch.ones(1, 8, 8), torch.ones(1, 8, 8), torch.ones(1, 4, 4)], (4, 4), "cpu").shape
    torch.Size([3, 1, 4, 4])
    """
    runs = [resample_batch(torch.stack([images[i] for i in run]).to(device, torch.float32), grid, nearest)
            for run in same_shape_runs(images)]
    return runs[0] if len(runs) == 1 else torch.cat(runs)  # one run (the usual batch): no second copy


@torch.no_grad()
def call_model(model, images: torch.Tensor, device) -> torch.Tensor:
    """Run a user model (``nn.Module`` in eval mode, restored afterwards; or any callable) without gradients, on
    the device and in the floating dtype of its parameters (``device`` and float32 without any). A module with
    ``casts_inputs = True`` (the extractors here) gets float32 images on that device: it windows or z-scores them
    in float32 and casts them for its network itself (float16 would turn intensities past 65,504 into inf)."""
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module is not None and module.training
    parameter = next((p for p in module.parameters() if p.is_floating_point()), None) if module else None
    dtype = torch.float32
    if parameter is not None:
        _say_where_it_runs(module, parameter.device, device)
        device = parameter.device
        dtype = torch.float32 if getattr(model, "casts_inputs", False) else parameter.dtype
    if module is not None:
        module.eval()
    try:
        out = model(images.to(device=device, dtype=dtype))
    finally:
        if was_training:
            module.train()
    if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != images.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{type(model).__name__} returned {shape} for a batch of {images.shape[0]} images")
    return out


_told: weakref.WeakSet = weakref.WeakSet()  # modules whose device was said


def _say_where_it_runs(module: torch.nn.Module, where: torch.device, asked) -> None:
    """Warn once per module that runs elsewhere than the device asked for (a feature extractor left on the CPU by
    a scorer on CUDA embeds every image on the CPU, about 100x slower for a 3D backbone)."""
    asked = torch.device(asked)
    if module in _told or (asked.type == where.type and asked.index in (None, where.index)):
        return
    _told.add(module)
    log.warning("relict: %s runs on %s, where its weights are, not on %s: move it there (.to(%r)) to embed there",
                type(module).__name__, where, asked, str(asked))


def model_digest(model) -> dict:
    """Identify a user model for the bank fingerprint: its class and, for modules, a hash of its weights."""
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    if not isinstance(model, torch.nn.Module):
        return {"model": getattr(model, "__qualname__", kind), "weights": None}
    digest = hashlib.blake2b(digest_size=8)
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"model": kind, "weights": digest.hexdigest()}
