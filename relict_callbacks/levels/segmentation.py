"""Segmentation level: Dice overlap of the segmented structures with those of the nearest training image."""

from __future__ import annotations

import numpy as np
import torch

from ..items import Item, ItemError
from ..search import chunked_topk, rows_to_tensor
from .base import Level, Nearest, call_model, model_digest, resample, resolve_grid, same_shape_runs


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


class SegmentationLevel(Level):
    """Dice between the structures in a sample and those of its nearest training image.

    Masks come from the items' labels; items without one are segmented with ``segmenter`` (a callable or
    ``nn.Module`` mapping ``[B, C, *spatial]`` to a label map ``[B, 1, *spatial]`` or channels
    ``[B, K, *spatial]``). Several labels give the mean Dice over labels.

    Empty masks: a label empty in both images is left out of the mean (it is no evidence either way); a label
    empty in one image only scores 0; a pair with every label empty on both sides scores 0, so a sample with
    nothing segmented is never flagged at this level.

    Args:
        segmenter: model used for items (and samples) that come without a label.
        labels: label values (one-channel maps) or channel indices (multi-channel) to compare; default: all
            foreground as one structure (one-channel) or every channel.
        grid: common grid masks are resampled to, nearest-neighbour (default 128² for 2D, 64³ for 3D).

    >>> import torch
    >>> from relict_callbacks.items import Item
    >>> level = SegmentationLevel(grid=8)
    >>> mask = torch.zeros(1, 8, 8); mask[0, 2:5, 2:5] = 1
    >>> rows = level.embed([Item(torch.rand(1, 8, 8), mask, "a")])
    >>> query = {k: torch.from_numpy(v) for k, v in rows.items()}
    >>> float(level.nearest(query, rows).similarity[0])
    1.0
    """

    name = "segmentation"

    def __init__(self, segmenter=None, labels=None, grid=None) -> None:
        if segmenter is not None and not callable(segmenter):
            raise TypeError(f"segmenter must be an nn.Module or callable, got {type(segmenter).__name__}")
        self.segmenter = segmenter
        self.labels = None if labels is None else [int(v) for v in labels]
        self.grid = grid

    def config(self) -> dict:
        grid = list(self.grid) if isinstance(self.grid, (tuple, list)) else self.grid
        segmenter = None if self.segmenter is None else model_digest(self.segmenter)
        return {"type": "SegmentationLevel", "name": self.name, "segmenter": segmenter, "labels": self.labels, "grid": grid}

    @classmethod
    def from_config(cls, config: dict) -> SegmentationLevel:
        if config.get("segmenter"):
            raise ValueError("this bank's segmentation level uses a segmenter: pass "
                             "levels=[SegmentationLevel(segmenter=...), ...] to load it")
        return cls(labels=config["labels"], grid=config["grid"])

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
        masks = torch.stack(masks).flatten(2).cpu()
        return {"masks": masks.to(torch.uint8).numpy(), "sizes": masks.sum(dim=2).numpy()}

    def nearest(self, query, bank, *, exclude=None, index=None) -> Nearest:
        q, q_sizes = query["masks"].float(), query["sizes"].float()
        if q.shape[1:] != bank["masks"].shape[1:]:
            raise ValueError(f"samples have masks {tuple(q.shape[1:])} (labels x voxels), the bank has "
                             f"{tuple(bank['masks'].shape[1:])}")
        refs, ref_sizes = bank["masks"], torch.as_tensor(bank["sizes"]).to(q.device, torch.float32)

        def score_chunk(start: int, stop: int) -> torch.Tensor:
            r = rows_to_tensor(refs, start, stop, q.device)
            overlap = torch.einsum("qld,rld->qrl", q, r)
            total = q_sizes[:, None, :] + ref_sizes[None, start:stop, :]
            dice = torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.nan)
            return dice.nanmean(dim=2).nan_to_num(0.0)

        values, indices = chunked_topk(score_chunk, len(refs), 1, exclude=exclude)
        return Nearest(values[:, 0].cpu().numpy(), indices[:, 0].cpu().numpy(), ["identity"] * len(q))
