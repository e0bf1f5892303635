"""Segmentation level: Dice overlap of the segmented structures with those of the nearest training image, under
the mirror/shift that matched.

With a voxel level in the bank, the masks are compared with those of the voxel level's nearest training image,
moved by the transform the voxel level found (``undo_match``), so a mirrored copy scores its true overlap and
an unseen patient is compared with the one training image it resembles most, not with every lesion in the bank.
Without one, the level runs its own small search against the whole bank, as the masks are and mirrored along
each spatial axis (all mirrors in one pass over the bank): the best exact Dice, and the best few candidates by
Dice within ``max_shift`` voxels again by exact Dice at the shift their mask centroids predict and one voxel
around it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..items import Item, ItemError
from ..search import DEFAULT_CHUNK, DEVICE_CHUNK_BYTES, as_tensor, chunked_topk
from ..validation import check_grid, check_number
from .base import Level, Nearest, call_model, model_digest, plain_grid, resample, resolve_grid, same_shape_runs
from .voxel import REFINE_CANDIDATES, _describe, mirror_orientations, rigid_part, shift_reach, undo_match


def select_labels(label: torch.Tensor, labels) -> torch.Tensor:
    """Binary ``[L, *spatial]`` masks from a label map ``[1, *spatial]`` or channels ``[K, *spatial]``.

    A one-channel map gives one mask per value in ``labels`` (``None``: one foreground mask, value > 0.5);
    several channels (one-hot or probabilities) give one mask per channel (``labels`` picks channel indices),
    inside where the channel is > 0.5.
    """
    if label.shape[0] == 1:
        if labels is None:
            return label > 0.5
        return torch.cat([label.round() == value for value in labels])
    channels = label if labels is None else label[list(labels)]
    return channels > 0.5


def mean_dice(overlap: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Dice averaged over the last (label) axis from overlaps and summed sizes; a label empty on both sides
    is left out, and a pair with every label empty scores 0.

    >>> mean_dice(torch.tensor([[2.0, 0.0]]), torch.tensor([[4.0, 0.0]])).tolist()
    [1.0]
    """
    dice = torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.nan)
    return dice.nanmean(dim=-1).nan_to_num(0.0)


def _centroid(masks: torch.Tensor) -> torch.Tensor:
    """Centroid (voxels, per spatial axis) of the union of ``[L, *spatial]`` masks; mid-grid when empty."""
    points = torch.nonzero(masks.any(0)).float()
    if len(points) == 0:
        return torch.tensor([(n - 1) / 2 for n in masks.shape[1:]], device=masks.device)
    return points.mean(0)


class SegmentationLevel(Level):
    """Dice between the structures in a sample and those of its nearest training image, under the mirror and
    shift that matched.

    Masks come from the items' labels; items without one are segmented with ``segmenter`` (a callable or
    ``nn.Module`` mapping ``[B, C, *spatial]`` to a label map ``[B, 1, *spatial]`` or channels
    ``[B, K, *spatial]``). Several labels give the mean Dice over labels.

    Which training image: with a voxel level in the bank, the voxel level's nearest one, its masks moved by the
    transform the voxel level matched (mirror, shift; nearest-neighbour), and the match carries that
    transform; without one, the best Dice over the bank under the level's own small mirror/shift search.

    Empty masks: a label empty in both images is left out of the mean (it is no evidence either way); a label
    empty in one image only scores 0; a pair with every label empty on both sides scores 0, so a sample with
    nothing segmented is never flagged at this level.

    Args:
        segmenter: model used for items (and samples) that come without a label.
        labels: label values (one-channel maps) or channel indices (multi-channel) to compare; default: all
            foreground as one structure (one-channel) or every channel.
        grid: common grid masks are resampled to, nearest-neighbour (default 128² for 2D, 64³ for 3D).
        flips: spatial axes the own search mirrors along: ``"all"`` (default: each axis in turn), a tuple of
            axes, or ``()``.
        max_shift: largest translation, in grid voxels per axis, the own search tries (default: 5% of the
            grid's smallest side; 0 disables it).

    >>> import torch
    >>> from relict_callbacks.items import Item
    >>> level = SegmentationLevel(grid=8)
    >>> mask = torch.zeros(1, 8, 8); mask[0, 2:5, 1:3] = 1
    >>> rows = level.embed([Item(torch.rand(1, 8, 8), mask, "a")])
    >>> copy = level.embed([Item(torch.rand(1, 8, 8), mask.flip(2), "mirrored")])
    >>> found = level.nearest({k: torch.from_numpy(v) for k, v in copy.items()}, rows)
    >>> float(found.similarity[0]), found.transform
    (1.0, ['flip1'])
    """

    name = "segmentation"
    align_to = "voxel"

    def __init__(self, segmenter=None, labels=None, grid=None, flips="all", max_shift: int | None = None) -> None:
        if segmenter is not None and not callable(segmenter):
            raise TypeError(f"segmenter must be an nn.Module or callable, got {type(segmenter).__name__}")
        if isinstance(flips, str) and flips != "all":
            raise ValueError(f"flips must be 'all' or a tuple of spatial axes, got {flips!r}")
        self.segmenter = segmenter
        self.labels = None if labels is None else [check_number("labels", v, low=0, integer=True) for v in labels]
        self.grid = check_grid("grid", grid)
        self.flips = flips if isinstance(flips, str) else tuple(check_number("flips axis", a, low=0, integer=True)
                                                                for a in flips)
        self.max_shift = None if max_shift is None else check_number("max_shift", max_shift, low=0, integer=True)

    def config(self) -> dict:
        grid = plain_grid(self.grid)
        segmenter = None if self.segmenter is None else model_digest(self.segmenter)
        return {"type": "SegmentationLevel", "name": self.name, "segmenter": segmenter, "labels": self.labels,
                "grid": grid, "flips": self.flips if isinstance(self.flips, str) else list(self.flips),
                "max_shift": self.max_shift}

    @classmethod
    def from_config(cls, config: dict) -> SegmentationLevel:
        if config.get("segmenter"):
            raise ValueError("this bank's segmentation level uses a segmenter: pass "
                             "levels=[SegmentationLevel(segmenter=...), ...] to load it")
        if "flips" not in config:
            raise ValueError("this bank was built by an older relict-callbacks whose segmentation level did not align "
                             "masks (its null does not fit this version): build it again")
        return cls(labels=config["labels"], grid=config["grid"], flips=config["flips"], max_shift=config["max_shift"])

    def _labels(self, items: list[Item], device) -> list[torch.Tensor]:
        """Each item's label map on ``device``; items without one are segmented, one ``segmenter`` call per run of
        equal sizes."""
        labels = [None if item.label is None else item.label.to(device, torch.float32) for item in items]
        missing = [i for i, label in enumerate(labels) if label is None]
        if missing and self.segmenter is None:
            raise ItemError(f"item {items[missing[0]].id!r}: no label, and the segmentation level has no segmenter "
                            "to make one")
        for run in same_shape_runs([items[i].image for i in missing]):
            chosen = [missing[i] for i in run]
            made = call_model(self.segmenter, torch.stack([items[i].image for i in chosen]).to(device), device)
            for i, mask in zip(chosen, made.to(device, torch.float32)):
                labels[i] = mask if mask.ndim == items[i].image.ndim else mask[None]
        return labels

    def embed(self, items: list[Item], device="cpu") -> dict[str, np.ndarray]:
        grid = resolve_grid(self.grid, items[0].image.ndim - 1)
        masks = []
        for item, label in zip(items, self._labels(items, device)):
            if tuple(label.shape[1:]) != tuple(item.image.shape[1:]):
                raise ItemError(f"item {item.id!r}: segmenter output {tuple(label.shape)} does not match the image "
                                f"{tuple(item.image.shape)}")
            mask = resample(select_labels(label, self.labels).float(), grid, nearest=True)
            if masks and mask.shape != masks[0].shape:
                raise ItemError(f"item {item.id!r}: {mask.shape[0]} label channel(s), the first item has "
                                f"{masks[0].shape[0]}")
            masks.append(mask)
        masks = torch.stack(masks).cpu()
        return {"masks": masks.to(torch.uint8).numpy(), "sizes": masks.flatten(2).sum(dim=2).numpy()}

    # -- search -------------------------------------------------------------------------------------------
    def nearest(self, query, bank, *, exclude=None, index=None, match: Nearest | None = None,
                match_grid=None) -> Nearest:
        """Best Dice per query; with ``match`` (the voxel level's matches, whose transforms are expressed on
        ``match_grid``), the Dice with each matched training image under its transform."""
        q = query["masks"].float()
        if q.shape[1:] != bank["masks"].shape[1:]:
            raise ValueError(f"samples have masks {tuple(q.shape[1:])} (labels x grid), the bank has "
                             f"{tuple(bank['masks'].shape[1:])}")
        if match is not None:
            pairs = [[(int(j), transform)] for j, transform in zip(match.index, match.transform)]
            return self._best(q, bank, pairs, tuple(match_grid))
        reach = shift_reach(tuple(q.shape[2:]), self.max_shift)
        mirrors = mirror_orientations(range(q.ndim - 2) if self.flips == "all" else self.flips)
        oriented = torch.cat([q.flip([2 + a for a in axes]) for axes in mirrors])  # every mirror in one bank pass
        exclude = None if exclude is None else exclude.repeat(len(mirrors))

        def candidates(tolerance):  # per query: [(Dice, bank index, mirror)], mirror by mirror, best first
            values, indices = self._dice_topk(oriented, bank, exclude, tolerance)
            values, indices = (t.view(len(mirrors), len(q), -1).tolist() for t in (values, indices))  # one copy
            return [[(v, m, axes) for axes, vs, ms in zip(mirrors, values, indices) for v, m in zip(vs[i], ms[i])]
                    for i in range(len(q))]

        exact, near = candidates(0), candidates(reach) if reach else [[] for _ in range(len(q))]
        pairs = []
        for i, (as_is, within) in enumerate(zip(exact, near)):
            _, best, best_flip = max(as_is, key=lambda p: p[0])  # the best unshifted pair, then shifted candidates
            shifted = sorted(within, key=lambda p: -p[0])[:REFINE_CANDIDATES]
            pairs.append([(best, _describe(best_flip, ()))]
                         + [(m, _describe(flip, shift)) for _, m, flip in shifted
                            for shift in self._shifts(q[i], bank["masks"][m], flip, reach)])
        return self._best(q, bank, pairs, tuple(q.shape[2:]))

    def _dice_topk(self, q: torch.Tensor, bank, exclude, reach: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top candidates of masks ``q`` ``[Q, L, *grid]`` against the whole bank: by Dice (``reach`` 0), or by
        overlap within ``reach`` voxels (bank voxels that near the query's mask count), scaled by the size
        ratio of the two masks, so that a shifted copy of the same size ranks first."""
        q_sizes = q.flatten(2).sum(dim=2)
        for axis in range(2, q.ndim) if reach > 0 else ():  # dilate by reach: a separable max filter
            window = [1] * (q.ndim - 2)
            window[axis - 2] = 2 * reach + 1
            pool = F.max_pool3d if q.ndim == 5 else F.max_pool2d
            q = pool(q, window, stride=1, padding=[w // 2 for w in window])
        q = q.flatten(2)
        refs = bank["masks"]
        ref_sizes = torch.as_tensor(bank["sizes"]).to(q.device, torch.float32)

        def score_chunk(start: int, stop: int) -> torch.Tensor:
            r = as_tensor(refs[start:stop], q.device).flatten(2)
            overlap = torch.einsum("qld,rld->qrl", q, r)
            sizes = q_sizes[:, None, :], ref_sizes[None, start:stop, :]
            if reach == 0:
                return mean_dice(overlap, sizes[0] + sizes[1])
            small, large = torch.minimum(*sizes), torch.maximum(*sizes)
            return mean_dice(overlap * small / large.clamp_min(1), 2 * large)  # fraction within reach x size ratio

        row_bytes = 4 * int(np.prod(refs.shape[1:]))  # a mask as float32
        rows = max(1, min(DEFAULT_CHUNK, DEVICE_CHUNK_BYTES // row_bytes))  # 256 MiB of them at most at 128³
        return chunked_topk(score_chunk, len(refs), REFINE_CANDIDATES, chunk_size=rows, exclude=exclude)

    @staticmethod
    def _shifts(query: torch.Tensor, ref, flip: tuple, reach: int) -> list[tuple[int, ...]]:
        """The shift the mask centroids predict for ``query`` ``[L, *grid]`` against bank masks ``ref`` under
        ``flip`` (within ``reach``), and its neighbours one voxel along each axis."""
        if reach == 0:
            return []
        oriented = query.flip([1 + a for a in flip]).cpu()  # a few centroids: on the CPU, where the bank's mask is
        ref = torch.as_tensor(ref).bool().cpu()
        centre = (_centroid(oriented.bool()) - _centroid(ref)).round().clamp(-reach, reach).int().tolist()
        steps = [tuple(max(-reach, min(reach, s + step * (a == axis))) for a, s in enumerate(centre))
                 for axis in range(len(centre)) for step in (-1, 1)]
        return sorted({tuple(centre), *steps} - {(0,) * len(centre)})

    @staticmethod
    def _best(q: torch.Tensor, bank, pairs: list[list[tuple[int, str]]], transform_grid: tuple) -> Nearest:
        """Per query ``q[i]``, the best Dice over its (bank index, transform) ``pairs``, each bank mask moved
        into the query's frame by ``undo_match`` on ``transform_grid`` (nearest-neighbour)."""
        refs, grid = bank["masks"], tuple(q.shape[2:])
        similarity, index, transforms = [], [], []
        for query, candidates in zip(q, pairs):
            scores = []
            for j, transform in candidates:
                ref = as_tensor(refs[j], query.device)
                if rigid_part(transform) != "identity":  # a bend alone is not undone: no round trip of grids
                    moved = undo_match(resample(ref, transform_grid, nearest=True), transform) > 0.5
                    ref = resample(moved.float(), grid, nearest=True)
                overlap = (query * ref).flatten(1).sum(1)
                total = query.flatten(1).sum(1) + ref.flatten(1).sum(1)
                scores.append(float(mean_dice(overlap, total)))
            best = int(np.argmax(scores))
            similarity.append(scores[best])
            index.append(candidates[best][0])
            transforms.append(candidates[best][1])
        return Nearest(np.array(similarity, dtype=np.float32), np.array(index, dtype=np.int64), transforms)
