"""TensorBoard sink: each check's gallery and similarity histograms on a ``SummaryWriter``.

Scalars reach TensorBoard through Lightning's ``TensorBoardLogger`` (or the MONAI handler's ``summary_writer``); this
sink adds the pictures. ``ReplicaMonitor`` adds it by itself when a ``TensorBoardLogger`` is attached.
"""

from __future__ import annotations

from relict_callbacks.gallery import gallery_figure, histogram_figure
from relict_callbacks.monitor import Check, Monitor
from relict_callbacks.monitor.presentation import gallery_title


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
        report, step = check.report, check.step
        self.writer.add_figure("relict/gallery", gallery_figure(monitor.gallery(check), gallery_title(check)),
                               global_step=step)
        sims = {name: report.similarities(name) for name in report.thresholds}
        self.writer.add_figure("relict/histograms", histogram_figure(sims, report.nulls, report.thresholds),
                               global_step=step)
        for name, values in sims.items():
            self.writer.add_histogram(f"relict/{name}/similarity", values, global_step=step)
        self.writer.flush()
