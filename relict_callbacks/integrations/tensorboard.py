"""TensorBoard sink: each check's gallery and similarity histograms on a ``SummaryWriter``.

Scalars reach TensorBoard through Lightning's ``TensorBoardLogger`` (or the MONAI handler's ``summary_writer``); this
sink adds the pictures. ``ReplicaMonitor`` adds it by itself when a ``TensorBoardLogger`` is attached.
"""

from __future__ import annotations

from relict_callbacks.gallery import png_to_array
from relict_callbacks.monitor import Check, Monitor


class TensorBoardSink:
    """Write the gallery (``relict/gallery``), the histogram figure (``relict/histograms``) and raw per-level
    similarity histograms (``relict/<level>/similarity``) of each check, at the check's training step.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (``TensorBoardLogger.experiment``).

    >>> import tempfile, torch, relict_callbacks as rc
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> from relict_callbacks.monitor import Monitor
    >>> train = rc.data.make_phantoms(6, ndim=2, size=16)
    >>> monitor = Monitor(levels=[rc.VoxelLevel()], num_samples=2, alpha=0.2, progress=False,
    ...                   sampler=lambda model, n, generator: torch.rand(n, 1, 16, 16, generator=generator))
    >>> monitor.prepare(train)
    >>> TensorBoardSink(SummaryWriter(tempfile.mkdtemp())).log_check(monitor.check(None, 0, 5), monitor)
    """

    def __init__(self, writer) -> None:
        self.writer = writer

    def log_check(self, check: Check, monitor: Monitor, trainer=None) -> None:
        pictures, step = monitor.pictures(check), check.step  # the figures the PNG file and W&B get too
        for tag, png in (("relict/gallery", pictures.gallery_png), ("relict/histograms", pictures.histograms_png)):
            self.writer.add_image(tag, png_to_array(png), global_step=step, dataformats="HWC")
        for name, values in pictures.similarities.items():
            self.writer.add_histogram(f"relict/{name}/similarity", values, global_step=step)
        self.writer.flush()
