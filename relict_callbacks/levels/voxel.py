"""Voxel level: normalized cross-correlation (NCC) to the nearest training image, tolerant to the mirrored and
slightly shifted copies that generators trained with flip/shift augmentation emit.

Images are resampled to a common grid and z-scored per channel, so NCC is a dot product divided by the voxel
count. Search runs in three steps:

1. exact NCC top-k against the whole bank (one chunked matmul: the cost of plain NCC);
2. a thumbnail search of the query and its mirror images, whose top-k adds candidates that plain NCC ranks low
   because they are mirrored or shifted: thumbnails (grid / 4 per axis) are centred on the image's intensity
   centroid, so a translated copy has the same thumbnail as its source;
3. the best few (thumbnail candidate, flip) pairs are re-scored at full resolution at the shift their centroids
   predict (within ``max_shift``), and the best of them also one voxel around it along each axis.

The similarity reported is the full-resolution NCC of the best (candidate, flip, shift), and the record says
which transform matched (``"flip0+shift(1,0,-2)"``: the sample is the training image mirrored along spatial
axis 0 and displaced by that many grid voxels).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import torch
import torch.nn.functional as F

from ..items import Item, ItemError
from ..search import inner_product_topk
from ..validation import check_grid, check_number
from .base import Level, Nearest, plain_grid, resample, resolve_grid

LR_AXIS = {2: 1, 3: 0}  # left-right: columns of a [C, H, W] slice; first axis of a RAS [C, X, Y, Z] volume
THUMBNAIL_FACTOR = 4
REFINE_CANDIDATES = 3


def _pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool ``[B, C, *spatial]`` by ``factor`` per axis."""
    return F.avg_pool3d(x, factor) if x.ndim == 5 else F.avg_pool2d(x, factor)


def _moments(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``[B, C, *spatial]`` per image and channel over the voxels in ``mask``."""
    dims = tuple(range(2, x.ndim))
    if mask is None:
        return x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True, unbiased=False)
    count = mask.sum()
    mean = (x * mask).sum(dim=dims, keepdim=True) / count
    return mean, (((x - mean) * mask) ** 2).sum(dim=dims, keepdim=True).div(count).sqrt()


def _centroid(image: torch.Tensor) -> torch.Tensor:
    """Intensity centroid (in voxels, per spatial axis) of ``[C, *spatial]``, weighting voxels by their
    intensity above the image minimum."""
    weight = image.sum(0)
    weight = weight - weight.min()
    total = weight.sum().clamp_min(1e-12)
    axes = range(weight.ndim)
    return torch.stack([
        (weight.sum(dim=[b for b in axes if b != a]) * torch.arange(weight.shape[a], device=image.device)).sum()
        for a in axes
    ]) / total


def _displace(image: torch.Tensor, shift) -> torch.Tensor:
    """``out[x] = image[x + shift]`` for ``[C, *spatial]``, edge-replicated where that falls outside."""
    pad = max(abs(s) for s in shift)
    if pad == 0:
        return image
    padded = F.pad(image[None], (pad,) * (2 * len(shift)), mode="replicate")[0]
    return padded[(slice(None),) + tuple(slice(pad + s, pad + s + n) for s, n in zip(shift, image.shape[1:]))]


def _centre(x: torch.Tensor) -> torch.Tensor:
    """Translate each ``[C, *spatial]`` image of a batch by whole voxels so that its centroid is mid-grid."""
    middle = torch.tensor([(n - 1) / 2 for n in x.shape[2:]], device=x.device)
    return torch.stack([_displace(image, (_centroid(image) - middle).round().int().tolist()) for image in x])


def _standardize(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Z-score ``[B, C, *spatial]`` per image and channel over the voxels in ``mask`` (all when None)."""
    mean, std = _moments(x, mask)
    return (x - mean) / std.clamp_min(1e-12)


class VoxelLevel(Level):
    """NCC between a sample and its nearest training image, robust to mirroring and small shifts.

    Args:
        grid: common grid every image is resampled to (default 128² for 2D, 64³ for 3D; an int means isotropic).
        mask: optional boolean array on ``grid``; only voxels inside it count (e.g. exclude a scanner table).
        max_shift: largest translation, in grid voxels per axis, under which candidates are re-scored
            (0 disables the shift search; default: 5% of the grid's smallest side, i.e. 6 voxels of the 128²
            grid and 3 of the 64³ grid).
        flips: spatial axes to mirror along: ``"lr"`` (default: left-right, i.e. axis 1 of a 2D ``[C, H, W]``
            slice and axis 0 of a 3D RAS ``[C, X, Y, Z]`` volume), ``"all"``, a tuple of axes, or ``()``.
        top_k: candidates taken from each thumbnail search (the best 3 of them, over all flips, are re-scored).

    >>> import torch
    >>> from relict_callbacks.items import Item
    >>> level = VoxelLevel(grid=32)
    >>> rows = level.embed([Item(torch.rand(1, 40, 40), None, "a"), Item(torch.rand(1, 40, 40), None, "b")])
    >>> query = {k: torch.from_numpy(v[:1]).float() for k, v in rows.items()}
    >>> level.nearest(query, rows).index.tolist()
    [0]
    """

    name = "voxel"
    dot_product = True

    def __init__(self, grid=None, mask=None, max_shift: int | None = None, flips="lr", top_k: int = 5) -> None:
        if isinstance(flips, str) and flips not in ("lr", "all"):
            raise ValueError(f"flips must be 'lr', 'all' or a tuple of spatial axes, got {flips!r}")
        self.grid = check_grid("grid", grid)
        self.mask = None if mask is None else torch.as_tensor(np.asarray(mask, dtype=bool))
        self.max_shift = None if max_shift is None else check_number("max_shift", max_shift, low=0, integer=True)
        self.flips = flips if isinstance(flips, str) else tuple(check_number("flips", a, low=0, high=2, integer=True)
                                                                for a in flips)
        self.top_k = check_number("top_k", top_k, low=1, integer=True)

    def config(self) -> dict:
        mask_digest = None
        if self.mask is not None:
            mask_digest = hashlib.blake2b(self.mask.numpy().tobytes(), digest_size=8).hexdigest()
        grid = plain_grid(self.grid)
        return {"type": "VoxelLevel", "name": self.name, "grid": grid, "mask": mask_digest, "max_shift": self.max_shift,
                "flips": self.flips if isinstance(self.flips, str) else list(self.flips), "top_k": self.top_k}

    @classmethod
    def from_config(cls, config: dict) -> VoxelLevel:
        if config.get("mask"):
            raise ValueError("this bank's voxel level uses a mask: pass levels=[VoxelLevel(mask=...), ...] to load it")
        return cls(grid=config["grid"], max_shift=config["max_shift"], flips=config["flips"], top_k=config["top_k"])

    # -- geometry -----------------------------------------------------------------------------------------
    def stored_image(self, bank: dict[str, np.ndarray], index: int) -> torch.Tensor:
        """The bank's z-scored image ``index`` on the level's grid."""
        return torch.from_numpy(np.asarray(bank["rows"][index], dtype=np.float32))

    def display_pair(self, sample: torch.Tensor, nearest: torch.Tensor, transform: str):
        """Both on the level's grid, ``nearest`` moved by the matched mirror/shift into the sample's frame."""
        grid = resolve_grid(self.grid, sample.ndim - 1)
        return resample(sample, grid), undo_match(resample(nearest, grid), transform)

    def _mask(self, grid: tuple[int, ...], factor: int = 1, device="cpu") -> torch.Tensor | None:
        if self.mask is None:
            return None
        if tuple(self.mask.shape) != grid:
            raise ValueError(f"VoxelLevel mask has shape {tuple(self.mask.shape)}, the grid is {grid}")
        mask = self.mask[None, None].float()
        return (mask if factor == 1 else _pool(mask, factor)).gt(0.5).float().to(device)

    def shift_reach(self, grid: tuple[int, ...]) -> int:
        """The largest shift searched on ``grid``."""
        return max(1, round(0.05 * min(grid))) if self.max_shift is None else self.max_shift

    def flip_axes(self, ndim: int) -> list[int]:
        """The spatial axes mirrored during the search, for images with ``ndim`` spatial dims."""
        if self.flips == "lr":
            return [LR_AXIS[ndim]]
        if self.flips == "all":
            return list(range(ndim))
        return list(self.flips)

    # -- embedding ----------------------------------------------------------------------------------------
    def embed(self, items: list[Item], device="cpu") -> dict[str, np.ndarray]:
        ndim = items[0].image.ndim - 1
        grid = resolve_grid(self.grid, ndim)
        mask = self._mask(grid, device=device)
        batch = torch.stack([resample(item.image.to(device), grid) for item in items])
        _, std = _moments(batch, mask)
        scale = batch.flatten(2).abs().amax(dim=2).clamp_min(1e-12)
        for item, constant in zip(items, (std.flatten(1) <= 1e-6 * scale).any(dim=1).tolist()):
            if constant:
                raise ItemError(f"item {item.id!r}: image is constant (in a channel or inside the mask); NCC is undefined")
        rows = _standardize(batch, mask)
        factor = min(THUMBNAIL_FACTOR, *(g // 4 for g in grid)) or 1
        thumbs = _standardize(_pool(_centre(rows), factor), self._mask(grid, factor, device))
        return {"rows": rows.half().cpu().numpy(), "thumbs": thumbs.half().cpu().numpy()}

    # -- search -------------------------------------------------------------------------------------------
    def _orientations(self, ndim: int) -> list[tuple[int, ...]]:
        return [()] + [(axis,) for axis in self.flip_axes(ndim)]

    def _query_form(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Standardized, masked, divided by the voxel count and flattened: ``query_form @ rows.T`` is NCC."""
        z = _standardize(x, mask)
        count = x[0].numel() if mask is None else mask.sum() * x.shape[1]
        return (z if mask is None else z * mask).flatten(1) / count

    def nearest(self, query, bank, *, exclude=None, index=None) -> Nearest:
        rows, thumbs = bank["rows"], bank["thumbs"]
        q = query["rows"].float()
        n, ndim = len(rows), q.ndim - 2
        grid, device = tuple(q.shape[2:]), q.device
        mask = self._mask(grid, device=device)
        flat_rows, flat_thumbs = rows.reshape(n, -1), thumbs.reshape(n, -1)
        k = min(self.top_k, n - (exclude is not None))
        plain = self._query_form(q, mask)
        if index is not None:
            values, indices = index.search(plain, 1)
        else:
            values, indices = inner_product_topk(plain, flat_rows, 1, exclude=exclude)
        best, best_index = values[:, 0].clone(), indices[:, 0].clone()
        transforms = ["identity"] * len(q)
        reach, orientations = self.shift_reach(grid), self._orientations(ndim)
        if reach == 0 and len(orientations) == 1:
            return Nearest(best.clamp(-1, 1).cpu().numpy(), best_index.cpu().numpy(), transforms)
        factor = grid[0] // thumbs.shape[2]
        thumb_mask = self._mask(grid, factor, device)
        proposals = [[] for _ in range(len(q))]  # (thumbnail similarity, bank index, flip) per query
        for flip in orientations:
            tq = self._query_form(query["thumbs"].float().flip([2 + a for a in flip]), thumb_mask)
            thumb_values, thumb_indices = inner_product_topk(tq, flat_thumbs, k, exclude=exclude)
            for found, v, j in zip(proposals, thumb_values.tolist(), thumb_indices.tolist()):
                found += [(score, m, flip) for score, m in zip(v, j)]
        for i, found in enumerate(proposals):
            found = sorted(found, key=lambda p: -p[0])[:REFINE_CANDIDATES]
            chosen = sorted({m for _, m, _ in found})
            refs = torch.from_numpy(np.ascontiguousarray(rows[chosen])).to(device).float()
            sim, m, flip, shift = self._refine(q[i], [(m, refs[chosen.index(m)], flip) for _, m, flip in found],
                                               reach, mask)
            if sim > best[i]:
                best[i], best_index[i], transforms[i] = sim, m, _describe(flip, shift)
        return Nearest(best.clamp(-1, 1).cpu().numpy(), best_index.cpu().numpy(), transforms)


    def _refine(self, query: torch.Tensor, pairs: list, reach: int, mask) -> tuple[float, int, tuple, tuple]:
        """Best full-resolution NCC of ``query`` [C, *grid] over (bank index, bank image, flip) ``pairs``: each
        pair is scored at the shift its centroids predict (within ``reach``), then the best pair also at that
        shift's neighbours along each axis. Returns (NCC, bank index, flip, shift)."""
        scored = []
        for m, ref, flip in pairs:
            oriented = query.flip([1 + a for a in flip])
            shift = tuple((_centroid(oriented) - _centroid(ref)).round().clamp(-reach, reach).int().tolist())
            scored.append((float(self._ncc_at(oriented, ref, [shift], mask)[0]), m, flip, shift, oriented, ref))
        sim, m, flip, shift, oriented, ref = max(scored, key=lambda entry: entry[0])
        neighbours = sorted({tuple(max(-reach, min(reach, s + step * (a == axis))) for a, s in enumerate(shift))
                             for axis in range(len(shift)) for step in (-1, 1)} - {shift})
        if neighbours:
            scores = self._ncc_at(oriented, ref, neighbours, mask)
            j = int(scores.argmax())
            if float(scores[j]) > sim:
                sim, shift = float(scores[j]), neighbours[j]
        return sim, m, flip, shift

    @staticmethod
    def _ncc_at(image: torch.Tensor, ref: torch.Tensor, shifts: list[tuple[int, ...]], mask) -> torch.Tensor:
        """NCC of ``image`` displaced by each shift against the standardized ``ref`` (both ``[C, *grid]``)."""
        crops = torch.stack([_displace(image, shift) for shift in shifts]).flatten(2)  # [S, C, D]
        if mask is not None:
            crops = crops * mask.flatten()
        count = crops.shape[2] if mask is None else mask.sum()
        dots = torch.einsum("scd,cd->sc", crops, ref.flatten(1))  # ref has zero mean inside the mask
        mean = crops.sum(dim=2) / count
        std = (torch.linalg.vector_norm(crops, dim=2).square() / count - mean.square()).clamp_min(1e-12).sqrt()
        return (dots / std).sum(dim=1) / (count * crops.shape[1])


def _describe(flip: tuple[int, ...], shift: tuple[int, ...]) -> str:
    parts = [f"flip{flip[0]}"] if flip else []
    if any(shift):
        parts.append("shift(" + ",".join(map(str, shift)) + ")")
    return "+".join(parts) or "identity"


def undo_match(reference: torch.Tensor, transform: str) -> torch.Tensor:
    """``reference`` [C, *grid] moved into its sample's frame, undoing the ``transform`` a match reports (the
    sample is the reference mirrored, then displaced), e.g. to show the two side by side.

    >>> ref = torch.arange(4.).reshape(1, 1, 4)
    >>> undo_match(ref, "flip1+shift(0,1)").tolist()
    [[[2.0, 1.0, 0.0, 0.0]]]
    """
    flip = re.search(r"flip(\d+)", transform)
    shift = re.search(r"shift\(([-\d,]+)\)", transform)
    moved = reference if shift is None else _displace(reference, [-int(s) for s in shift.group(1).split(",")])
    return moved if flip is None else moved.flip(1 + int(flip.group(1)))
