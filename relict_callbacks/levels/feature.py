"""Feature level: cosine similarity of encoder embeddings to the nearest training image."""

from __future__ import annotations

import numpy as np
import torch

from ..items import Item, ItemError
from ..search import inner_product_topk
from ..validation import check_grid
from .base import Level, Nearest, call_model, model_digest, plain_grid, resample_all, resolve_grid, same_shape_runs


class FeatureLevel(Level):
    """Cosine similarity between encoder embeddings of a sample and of its nearest training image.

    Args:
        extractor: an ``nn.Module`` or callable mapping ``[B, C, *spatial]`` to ``[B, D]`` (extra trailing
            dims are flattened). Modules are run in eval mode under ``torch.no_grad``.
        grid: resample every image to this grid before the extractor (default: keep the input size; items of
            different sizes are then embedded in runs of equal sizes).
        name: the level's key in reports and metrics (change it to use two extractors side by side).

    >>> import torch
    >>> from relict_callbacks.items import Item
    >>> level = FeatureLevel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8)))
    >>> rows = level.embed([Item(torch.rand(1, 8, 8), None, "a"), Item(torch.rand(1, 8, 8), None, "b")])
    >>> rows["rows"].shape
    (2, 8)
    """

    dot_product = True

    def __init__(self, extractor, grid=None, name: str = "feature") -> None:
        if not callable(extractor):
            raise TypeError(f"FeatureLevel extractor must be an nn.Module or callable, got {type(extractor).__name__}")
        self.extractor, self.grid, self.name = extractor, check_grid("grid", grid), name

    def config(self) -> dict:
        grid = plain_grid(self.grid)
        return {"type": "FeatureLevel", "name": self.name, **model_digest(self.extractor), "grid": grid}

    def embed(self, items: list[Item], device="cpu") -> dict[str, np.ndarray]:
        images = [item.image for item in items]
        if self.grid is not None:
            batches = [resample_all(images, resolve_grid(self.grid, images[0].ndim - 1), device)]
        else:
            batches = [torch.stack([images[i] for i in run]).to(device) for run in same_shape_runs(images)]
        features = torch.cat([call_model(self.extractor, batch, device).flatten(1).float().cpu() for batch in batches])
        norms = features.norm(dim=1)
        for item, norm, finite in zip(items, norms.tolist(), torch.isfinite(features).all(dim=1).tolist()):
            if not finite or norm == 0:
                problem = "NaN/Inf" if not finite else "an all-zero"
                raise ItemError(f"item {item.id!r}: the feature extractor returned {problem} embedding")
        return {"rows": (features / norms[:, None]).numpy()}

    def nearest(self, query, bank, *, exclude=None, index=None) -> Nearest:
        q = query["rows"].float()
        values, indices = index.search(q, 1) if index is not None else inner_product_topk(
            q, bank["rows"], 1, exclude=exclude)
        return Nearest(values[:, 0].cpu().numpy(), indices[:, 0].cpu().numpy(), ["identity"] * len(q))

