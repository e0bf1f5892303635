"""W&B sink: replica metrics, per-level histograms, a nearest-neighbour gallery table and alerts, per check.

``ReplicaMonitor`` adds a :class:`WandbSink` by itself when a ``WandbLogger`` is attached to the trainer; the MONAI
handler takes one in ``sinks=[WandbSink(run)]`` with a plain ``wandb.init`` run.
"""

from __future__ import annotations

import logging

import numpy as np

from relict_callbacks.gallery import difference_map, display_view, png_to_array
from relict_callbacks.monitor import Check, Monitor, StopReason

log = logging.getLogger("relict_callbacks")


def view_uint8(array: np.ndarray) -> np.ndarray:
    """An image's display view (3D: orthogonal slices + MIP) scaled to 0-255 between its 1st and 99th percentile."""
    view = display_view(array)
    finite = view[np.isfinite(view)]
    low, high = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    scaled = np.clip((np.nan_to_num(view, nan=low) - low) / max(high - low, 1e-6), 0, 1)
    return (scaled * 255).astype(np.uint8)


def _image(array: np.ndarray, caption: str):
    import wandb

    return wandb.Image(view_uint8(array), caption=caption)


class WandbSink:
    """Send each check to a W&B run: metrics (x-axis ``epoch``, run summary = the worst replica rate), histograms
    of sample vs null similarity with the threshold, a gallery ``wandb.Table`` and alerts.

    Args:
        run: a ``wandb`` run (``wandb.init(...)`` or ``WandbLogger.experiment``); ``None``: the active run.
        alerts: send ``wandb.alert`` when the replica rate first exceeds the monitor's ``max_replica_rate`` and
            when the monitor stops training.

    Whether training images appear is the monitor's ``log_training_images``; the gallery size its
    ``gallery_size``. A failing W&B call is logged once and the sink goes quiet; training never stops for it.

    Example::

        run = wandb.init(project="ddpm", mode="offline")
        handler = ReplicaMonitorHandler(levels=[VoxelLevel()], sinks=[WandbSink(run)])
    """

    def __init__(self, run=None, alerts: bool = True) -> None:
        self.run, self.alerts = run, alerts
        self._defined = False
        self._above_limit = False
        self.failed = False

    def log_check(self, check: Check, monitor: Monitor, trainer=None) -> None:
        if self.failed:
            return
        try:
            self._log(check, monitor)
        except Exception as error:
            self.failed = True
            log.warning("relict: W&B logging failed and is off for the rest of this run (metrics stay in "
                        "monitor.history): %s: %s", type(error).__name__, error)

    def _log(self, check: Check, monitor: Monitor) -> None:
        import wandb

        run = self.run or wandb.run
        if run is None:
            raise RuntimeError("no W&B run: pass WandbSink(run) or call wandb.init() first")
        if not self._defined:
            run.define_metric("epoch")
            run.define_metric("relict/*", step_metric="epoch")
            run.define_metric("relict/replica_rate", step_metric="epoch", summary="max")
            self._defined = True
        pictures = monitor.pictures(check)  # the figures the PNG file and TensorBoard get too
        payload = {"epoch": check.epoch, **check.metrics}
        for name, values in pictures.similarities.items():
            payload[f"relict/{name}/similarity"] = wandb.Histogram(values)
        payload["relict/histograms"] = wandb.Image(png_to_array(pictures.histograms_png),
                                                   caption="nearest-training similarity: samples vs unseen "
                                                           "patients (null), threshold in red")
        payload["relict/gallery"] = self._table(check, monitor)
        run.log(payload)
        if self.alerts:
            self._alert(run, check, monitor)

    def _table(self, check: Check, monitor: Monitor):
        import wandb

        names = list(check.report.thresholds)
        show = monitor.log_training_images
        columns = ["epoch", "sample", "replica"] + [f"{n}_{c}" for n in names
                                                   for c in ("similarity", "nearest_id", "transform")]
        columns += ["synthetic"] + (["nearest_training", "abs_difference"] if show else [])
        table = wandb.Table(columns=columns)
        for row in monitor.gallery(check):
            record = row.record
            values = [check.epoch, record.index, record.is_replica]
            for n in names:
                values += [round(record.levels[n].similarity, 4), record.levels[n].nearest_id,
                           record.levels[n].transform]
            values.append(_image(row.sample, f"sample {record.index}"))
            if show:
                nearest = row.nearest if row.nearest is not None else np.zeros_like(row.sample)
                values += [_image(nearest, record.levels[names[0]].nearest_id),
                           _image(difference_map(row.sample, nearest), "|z(sample) - z(nearest)|")]
            table.add_data(*values)
        return table

    def _alert(self, run, check: Check, monitor: Monitor) -> None:
        import wandb

        rate, low, limit = check.metrics["relict/replica_rate"], check.metrics["relict/replica_rate_low"], \
            monitor.max_replica_rate
        above = limit is not None and low > limit  # memorization detected, not a noisy estimate
        if above and not self._above_limit:
            run.alert(title="Replica rate above limit",
                      text=f"replica rate {rate:.2f} (lower bound {low:.2f}) > {limit:.2f} at epoch {check.epoch}: "
                           "samples copy training patients", level=wandb.AlertLevel.WARN)
        self._above_limit = above
        if check.stop_reason is not StopReason.NOT_STOPPED:
            run.alert(title="Training stopped: memorization", text=check.stop_message, level=wandb.AlertLevel.ERROR)

