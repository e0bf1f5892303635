"""What people look at after a check: its pictures (the gallery of its most similar sample/training pairs, the
similarity histograms), made once and shared, and the history as a table. Nothing here takes part in a decision; the
stop policy, ledger and sampling never import it.

>>> print(history_table([{"epoch": 0, "train_loss": 0.5, "relict/replica_rate": 0.25, "error": None,
...                       "relict/replica_rate_low": 0.05, "relict/replica_rate_high": 0.61, "samples": 8,
...                       "relict/voxel/nn_similarity_mean": 0.4, "relict/voxel/nn_similarity_max": 0.9,
...                       "checkpoint": "/ckpt/epoch=0.ckpt"}], level="voxel"))
epoch  train_loss  samples  replica rate  bounds (low-high)  mean sim  max sim  checkpoint
    0      0.5000        8          0.25          0.05-0.61     0.400    0.900  epoch=0.ckpt
"""

from __future__ import annotations

import os
from functools import cached_property

import numpy as np
import torch

from ..atomic import atomic_write
from ..bank import ReferenceBank
from ..gallery import GalleryRow, figure_to_png_bytes, gallery_figure, gallery_rows, histogram_figure
from .ledger import Check


class Pictures:
    """What people look at for one check, each made once, when first asked for, and shared by the check's PNG file,
    TensorBoard and W&B: the ``size`` most similar sample/training pairs (training images left out unless
    ``log_training_images``, shown by the bank's primary level), the gallery and histogram figures as PNG bytes and
    each level's similarities. It keeps the check's report and samples, not the check that holds it.

    >>> import torch, relict_callbacks as rc
    >>> from relict_callbacks.monitor import Monitor
    >>> monitor = Monitor(levels=[rc.VoxelLevel()], num_samples=2, alpha=0.2, progress=False,
    ...                   sampler=lambda model, n, generator: torch.rand(n, 1, 16, 16, generator=generator))
    >>> monitor.prepare(rc.data.make_phantoms(6, ndim=2, size=16))
    >>> pictures = monitor.pictures(monitor.check(None, 0, 5))
    >>> len(pictures.gallery), pictures.gallery_png[:4], pictures.gallery is pictures.gallery  # made once
    (2, b'\\x89PNG', True)
    """

    def __init__(self, bank: ReferenceBank, check: Check, size: int, log_training_images: bool = True) -> None:
        self.bank, self.report, self.samples, self.title = bank, check.report, check.samples, gallery_title(check)
        self.options = (size, log_training_images)

    @cached_property
    def gallery(self) -> list[GalleryRow]:
        size, show = self.options
        return gallery_rows(self.report, lambda record: self.samples[record.index],
                            lambda match: training_image(self.bank, match.nearest_index) if show else None,
                            self.bank.levels[0], size)

    @cached_property
    def gallery_png(self) -> bytes:
        return figure_to_png_bytes(gallery_figure(self.gallery, self.title))

    @cached_property
    def similarities(self) -> dict[str, np.ndarray]:
        """Each level's nearest-training similarity of every sample."""
        return {name: self.report.similarities(name) for name in self.report.thresholds}

    @cached_property
    def histograms_png(self) -> bytes:
        return figure_to_png_bytes(histogram_figure(self.similarities, self.report.nulls, self.report.thresholds))


def save_check(save_dir, check: Check, pictures: Pictures) -> None:
    """Write the check's ``report-epoch=E.json`` and its gallery, ``gallery-epoch=E.png``, in ``save_dir``,
    atomically."""
    check.report.to_json(os.path.join(save_dir, f"report-epoch={check.epoch}.json"))
    with atomic_write(os.path.join(save_dir, f"gallery-epoch={check.epoch}.png"), "wb") as file:
        file.write(pictures.gallery_png)


def gallery_title(check: Check) -> str:
    metrics = check.metrics
    return (f"epoch {check.epoch}: replica rate {metrics['relict/replica_rate']:.2f}, bounds "
            f"{metrics['relict/replica_rate_low']:.2f}-{metrics['relict/replica_rate_high']:.2f} "
            f"({check.num_samples} samples)")


def training_image(bank: ReferenceBank, index: int) -> torch.Tensor | None:
    """Training image ``index`` as the first level that keeps images holds it (e.g. the voxel level's z-scored
    grid), or ``None``."""
    images = (level.stored_image(bank.arrays[level.name], index) for level in bank.levels)
    return next((image for image in images if image is not None), None)


def history_table(history: list[dict], level: str, loss: str = "train_loss", epoch_offset: int = 0,
                  epoch_label: str = "epoch") -> str:
    """The history as a readable table: epoch, ``loss``, samples, replica rate and its exact one-sided bounds,
    mean/max similarity at ``level``, checkpoint file name, and "certification" on the rows of
    ``Monitor.certify`` (``epoch_offset=1`` numbers epochs from 1, as MONAI engines do)."""
    width = max(len(epoch_label), 5)
    lines = [f"{epoch_label:>{width}}  {loss:>10}  samples  {'replica rate':>12}  bounds (low-high)  {'mean sim':>8}"
             "  max sim  checkpoint"]
    for entry in history:
        epoch = entry["epoch"] + epoch_offset
        if entry["error"] is not None:
            lines.append(f"{epoch:>{width}}  check failed: {entry['error']}")
            continue
        checkpoint = os.path.basename(entry["checkpoint"] or "-")
        bounds = f"{entry.get('relict/replica_rate_low', 0.0):.2f}-{entry.get('relict/replica_rate_high', 1.0):.2f}"
        certified = "  (certification)" if entry.get("kind") == "certify" else ""
        lines.append(f"{epoch:>{width}}  {entry.get(loss, float('nan')):>10.4f}  {entry.get('samples', 0):>7}  "
                     f"{entry['relict/replica_rate']:>12.2f}  {bounds:>17}  "
                     f"{entry[f'relict/{level}/nn_similarity_mean']:>8.3f}  "
                     f"{entry[f'relict/{level}/nn_similarity_max']:>7.3f}  {checkpoint}{certified}")
    return "\n".join(lines)
