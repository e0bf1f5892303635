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
from ..search import DEFAULT_CHUNK, DEVICE_CHUNK_BYTES, as_tensor, chunked_topk, take_rows
from ..validation import check_grid, check_number
from .base import (Level, Nearest, call_model, model_digest, plain_grid, resample, resample_batch, resolve_grid,
                   same_shape_runs)
from .voxel import (REFINE_CANDIDATES, _describe, _padded, _windows, mirror_orientations, rigid_transform,
                    shift_reach)

PAIR_BYTES = 64 * 2**20  # float32 masks of the pairs scored at once on the CPU (twice that where grids differ)
DEVICE_PAIR_BYTES = 512 * 2**20  # and on an accelerator


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
        ``match_grid``), the Dice with each matched training image under its transform. Batched over the queries
        and their candidates, on the queries' device."""
        q = query["masks"].float()
        if q.shape[1:] != bank["masks"].shape[1:]:
            raise ValueError(f"samples have masks {tuple(q.shape[1:])} (labels x grid), the bank has "
                             f"{tuple(bank['masks'].shape[1:])}")
        ndim, device = q.ndim - 2, q.device
        if match is not None:
            rigid = [rigid_transform(t, ndim) for t in match.transform]
            mirror = torch.tensor([[[a in flip for a in range(ndim)]] for flip, _ in rigid], device=device)
            shift = torch.tensor([[[shift]] for _, shift in rigid], device=device)
            index = torch.as_tensor(match.index, device=device)[:, None]
            scores = self._dice(q, bank, index, mirror, shift, tuple(match_grid))[:, 0, 0]
            return Nearest(scores.cpu().numpy(), np.asarray(match.index, dtype=np.int64), list(match.transform))
        reach = shift_reach(tuple(q.shape[2:]), self.max_shift)
        mirrors = mirror_orientations(range(ndim) if self.flips == "all" else self.flips)
        mirrored = torch.tensor([[a in axes for a in range(ndim)] for axes in mirrors], device=device)
        oriented = torch.cat([q.flip([2 + a for a in axes]) for axes in mirrors])  # every mirror in one bank pass
        exclude = None if exclude is None else exclude.repeat(len(mirrors))

        def candidates(tolerance):  # [Q, mirrors x k]: Dice, bank index, mirror; mirror by mirror, best first
            values, indices = self._dice_topk(oriented, bank, exclude, tolerance)
            values, indices = (t.view(len(mirrors), len(q), -1).transpose(0, 1).flatten(1) for t in (values, indices))
            which = torch.arange(len(mirrors), device=device).repeat_interleave(values.shape[1] // len(mirrors))
            return values, indices, which.expand_as(indices)

        values, indices, which = candidates(0)
        best = values.argmax(1, keepdim=True)  # the best unshifted pair (the first of equals)
        index, mirror = indices.gather(1, best), mirrored[which.gather(1, best)]  # [Q, 1], [Q, 1, ndim]
        shift = torch.zeros(len(q), 1, ndim, dtype=torch.long, device=device)
        scores = self._dice(q, bank, index, mirror, shift[:, :, None], tuple(q.shape[2:])).flatten(1)
        if reach:  # then the best few candidates by Dice within reach, each at the shifts their centroids predict
            values, indices, which = candidates(reach)
            top = values.sort(dim=1, descending=True, stable=True).indices[:, :REFINE_CANDIDATES]
            indices, flips = indices.gather(1, top), mirrored[which.gather(1, top)]  # [Q, P], [Q, P, ndim]
            shifts, usable = self._shifts(q, bank, indices, flips, reach)  # [Q, P, S, ndim], [Q, P, S]
            shifted = self._dice(q, bank, indices, flips, shifts, tuple(q.shape[2:])).masked_fill(~usable, -torch.inf)
            count = shifts.shape[2]
            scores = torch.cat([scores, shifted.flatten(1)], 1)
            index = torch.cat([index, indices.repeat_interleave(count, 1)], 1)
            mirror = torch.cat([mirror, flips.repeat_interleave(count, 1)], 1)
            shift = torch.cat([shift, shifts.flatten(1, 2)], 1)
        chosen = scores.argmax(1)  # the first of equals, in the order listed: unshifted, then candidate by candidate
        rows = torch.arange(len(q), device=device)
        transforms = [_describe(tuple(a for a in range(ndim) if m[a]), tuple(s))
                      for m, s in zip(mirror[rows, chosen].tolist(), shift[rows, chosen].tolist())]
        return Nearest(scores[rows, chosen].cpu().numpy(), index[rows, chosen].cpu().numpy(), transforms)

    def _dice_topk(self, q: torch.Tensor, bank, exclude, reach: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top candidates of masks ``q`` ``[Q, L, *grid]`` against the whole bank: by Dice (``reach`` 0), or by
        overlap within ``reach`` voxels (bank voxels that near the query's mask count), scaled by the size
        ratio of the two masks, so that a shifted copy of the same size ranks first."""
        q_sizes = q.flatten(2).sum(dim=2)
        q = (_dilate(q.to(torch.uint8), reach).float() if reach > 0 else q).flatten(2)
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
    def _shifts(q: torch.Tensor, bank, indices: torch.Tensor, flips: torch.Tensor,
                reach: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each query ``q`` [Q, L, *grid] and each of its candidates (bank ``indices`` [Q, P], mirrored along
        ``flips`` [Q, P, ndim]): the shift their mask centroids predict (within ``reach``) and its neighbours one
        voxel along each axis, in ascending order, ``[Q, P, 1 + 2 ndim, ndim]``, and which of them to try
        ``[Q, P, 1 + 2 ndim]`` (not the zero shift, each shift once)."""
        ndim, grid = q.ndim - 2, torch.tensor(q.shape[2:], device=q.device)
        own = _centroids(q)[:, None]
        centre = torch.where(flips, grid - 1 - own, own)  # of the queries as mirrored
        refs = torch.cat([_centroids(take_rows(bank["masks"], part, q.device))  # a few masks at a time
                          for part in indices.flatten().split(max(1, PAIR_BYTES // (4 * q[0].numel())))])
        centre = centre - refs.view_as(centre)
        centre = centre.round().clamp(-reach, reach).long()  # [Q, P, ndim]
        unit = torch.eye(ndim, dtype=torch.long, device=q.device)
        steps = torch.cat([torch.zeros_like(unit[:1]), unit, -unit])  # [1 + 2 ndim, ndim], sorted below
        shifts = (centre[:, :, None] + steps).clamp(-reach, reach)
        key = (shifts + reach) @ (2 * reach + 1) ** torch.arange(ndim - 1, -1, -1, device=q.device)  # their order
        key, order = key.sort(dim=2)
        shifts = shifts.gather(2, order[..., None].expand_as(shifts))
        first = torch.cat([torch.ones_like(key[..., :1], dtype=torch.bool), key[..., 1:] != key[..., :-1]], 2)
        return shifts, first & shifts.ne(0).any(3)

    @staticmethod
    def _dice(q: torch.Tensor, bank, index: torch.Tensor, mirror: torch.Tensor, shift: torch.Tensor,
              transform_grid: tuple) -> torch.Tensor:
        """Dice ``[Q, C, S]`` of each query ``q[i]`` [L, *grid] with its candidates' bank masks (``index`` [Q, C],
        mirrored along ``mirror`` [Q, C, ndim]) at each of their ``shift`` [Q, C, S, ndim], moved into the query's
        frame as :func:`undo_match` moves them on ``transform_grid`` (shifted, then mirrored; nearest-neighbour):
        each candidate padded once for all its shifts, a few queries at a time."""
        grid, (nq, nc, ns) = tuple(q.shape[2:]), shift.shape[:3]
        regrid = transform_grid != grid
        per_query = nc * (ns + 1) * q.shape[1] * int(np.prod(transform_grid)) * 4 * (2 if regrid else 1)
        at_once = max(1, (PAIR_BYTES if q.device.type == "cpu" else DEVICE_PAIR_BYTES) // per_query)
        parts = []
        for chunk in torch.arange(nq, device=q.device).split(at_once):
            refs = take_rows(bank["masks"], index[chunk].flatten(), q.device)  # [n, L, *grid]
            moving = resample_batch(refs, transform_grid, nearest=True) if regrid else refs
            flips, moves = mirror[chunk].flatten(0, 1), shift[chunk].flatten(0, 1)  # [n, ndim], [n, S, ndim]
            pad = int(moves.abs().max()) if moves.numel() else 0
            moved = _windows(_padded(moving, pad, flips), pad, -moves, flips)  # [n, S, L, *transform_grid]
            if regrid:  # back to the masks' grid, where the transform moves a mask at all
                moved = resample_batch(moved.flatten(0, 1), grid, nearest=True).view(len(refs), ns, *q.shape[1:])
                still = (moves.eq(0).all(2) & ~flips.any(1, keepdim=True)).view(len(refs), ns, *[1] * (q.ndim - 1))
                moved = torch.where(still, refs[:, None], moved)
            moved = moved.reshape(len(chunk), nc * ns, q.shape[1], -1)  # [c, C x S, L, D]
            queries = q[chunk].flatten(2)  # [c, L, D]
            overlap = torch.einsum("cnld,cld->cnl", moved, queries)  # sums of 0/1 products: exact in any order
            parts.append(mean_dice(overlap, moved.sum(3) + queries.sum(2)[:, None]).view(len(chunk), nc, ns))
        return torch.cat(parts)


def _dilate(masks: torch.Tensor, reach: int) -> torch.Tensor:
    """Masks ``[B, L, *spatial]`` (0/1) dilated by ``reach`` voxels along each spatial axis in turn: a separable
    max filter, the maximum of shifted views (torch's max pooling, the same values, also computes its indices:
    10x slower)."""
    for axis in range(2, masks.ndim):
        n = masks.shape[axis]
        padded = F.pad(masks, [0, 0] * (masks.ndim - 1 - axis) + [reach, reach])
        out = padded.narrow(axis, 0, n).clone()
        for step in range(1, 2 * reach + 1):
            torch.maximum(out, padded.narrow(axis, step, n), out=out)
        masks = out
    return masks


def _centroids(masks: torch.Tensor) -> torch.Tensor:
    """Centroids ``[B, ndim]`` (voxels) of the union of each ``[L, *spatial]`` mask set of ``masks`` (mid-grid where
    empty), from exact integer sums of the voxel coordinates."""
    union = masks.flatten(2).gt(0.5).any(1).view(len(masks), *masks.shape[2:])  # bool, summed as int64
    count = union.flatten(1).sum(1)
    sums = []
    for axis in range(union.ndim - 1):
        profile = union.sum([d for d in range(1, union.ndim) if d != axis + 1], dtype=torch.long)  # [B, n]
        sums.append((profile * torch.arange(profile.shape[1], device=masks.device)).sum(1))  # no integer matmul on CUDA
    middle = torch.tensor([(n - 1) / 2 for n in masks.shape[2:]], device=masks.device)
    centre = torch.stack(sums, 1).float() / count.clamp_min(1)[:, None].float()
    return torch.where(count[:, None] > 0, centre, middle)
