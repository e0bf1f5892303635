"""The monitor's options, declared, documented and validated once: the keyword arguments of
:class:`~relict_callbacks.monitor.Monitor`, which the Lightning callback and the MONAI handler take as they are.

>>> import relict_callbacks as rc
>>> rc.Monitor(levels=[rc.VoxelLevel()], num_samples=0)
Traceback (most recent call last):
ValueError: num_samples must be in [1, inf], got 0
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ..bank import ReferenceBank
from ..levels import Level
from ..scoring import ReplicaScorer, check_scoring_options
from ..validation import check_number
from .ledger import Ledger
from .sampling import default_sampler
from .stop import StopPolicy


class MonitorOptions:
    """The options of a monitor, each kept as an attribute once validated, and the parts they configure: the stop
    policy (``stop``), an empty history (``ledger``) and, until the bank is prepared, no ``scorer``.

    Args:
        bank: a ready :class:`ReferenceBank`; or ``None`` and ``levels`` to build one in ``Monitor.prepare``.
        levels: the RELICT levels to build the bank with, e.g. ``[VoxelLevel()]``; the first is the primary level,
            which orders and shows galleries and fills the history table.
        train_items: the training images to build the bank from (items, Dataset or DataLoader); default: what the
            adapter finds (the train dataloader's or the engine's dataset).
        holdout: real images not used in training, for calibration.
        cache_dir: folder where the bank is saved and reused while the training data and levels are unchanged.
        sampler: ``sampler(model, num_samples, generator) -> images`` or ``-> (images, labels)``, e.g. a
            :class:`~relict_callbacks.integrations.samplers.DiffusionSampler`; default: the model's
            ``sample(n)``/``generate(n)``.
        num_samples: samples drawn per check (split over processes in distributed training, scored once).
        sample_batch_size: samples drawn per sampler call, each batch moved to the CPU before the next is drawn
            (default: a process's whole share at once); lower it where sampling them all at once would run the GPU
            out of memory (3D diffusion, latent decoding). Each batch has its own seed, so it changes the samples.
        every_n_epochs: check after the first epoch, then every ``every_n_epochs`` epochs (epochs ``N-1, 2N-1, ...``).
        alpha: false-positive rate that sets each level's threshold (see :class:`ReplicaScorer`).
        confidence: level of the one-sided bounds ``relict/replica_rate_low`` / ``_high``.
        rule: how many levels must flag a sample for it to count as a replica: ``"any"``, ``"all"``, ``"majority"``.
        thresholds: explicit per-level thresholds, e.g. ``{"voxel": 0.9}``, instead of calibrated ones.
        search: ``"exact"`` or a faiss index kind for large banks.
        max_replica_rate: the limit on the replica rate. Memorization is detected when a check's lower bound is
            above it; a checkpoint is safe only when certified under it (upper bound <= limit, see
            ``Monitor.safe_checkpoint``).
        patience: consecutive bad checks before stopping.
        min_delta: for ``"rising"``, how far above its lowest value the rate must be to count as rising.
        stop_on: criteria that stop training: ``"limit"`` (lower bound > ``max_replica_rate``: memorization
            detected) and/or ``"rising"`` (rate > lowest rate so far + ``min_delta``); default ``("limit",)`` when
            ``max_replica_rate`` is set (see :class:`~.stop.StopPolicy`).
        seed: seed of the sampling noise; the same every check, offset by the process rank.
        strict: raise on a failing check (sampler error, NaN, wrong shape) instead of logging it and going on.
        save_dir: folder for ``history.json`` and, per check, ``report-epoch=E.json`` and ``gallery-epoch=E.png``.
        gallery_size: sample/training pairs per gallery (PNG, W&B table, TensorBoard).
        log_training_images: ``False`` keeps training images (patient data) out of every gallery and logger,
            leaving synthetic images, ids and scores.
        device: where the bank is built and samples are scored; default: the model's device (``"cpu"`` alone).
        device_budget: bytes of bank rows kept on ``device`` from the first check on, for the whole fit (default: a
            quarter of a GPU's memory and at most half of what is free at the first check, or a quarter of the RAM
            on the CPU; see :class:`ReplicaScorer`); rows beyond it are streamed from pinned host memory at every
            check (CUDA) or read memory-mapped (CPU). Lower it (0: none kept) where training needs that memory
            later, e.g. for a larger validation batch.
        progress: show a progress bar while building the bank.
        checkpoint_dirs: folders whose checkpoint files ``Monitor.safe_checkpoint`` considers (the adapters add
            their framework's checkpoint folders by themselves).
    """

    def __init__(self, bank: ReferenceBank | None = None, *, levels: list[Level] | None = None,
                 train_items: Any = None, holdout: Any = None, cache_dir: str | os.PathLike | None = None,
                 sampler: Callable | None = None,
                 num_samples: int = 16, sample_batch_size: int | None = None, every_n_epochs: int = 1,
                 alpha: float = 0.01, confidence: float = 0.95,
                 rule: str = "any", thresholds: dict[str, float] | None = None, search: str = "exact",
                 max_replica_rate: float | None = None, patience: int = 1, min_delta: float = 0.0,
                 stop_on: str | list[str] | None = None, seed: int = 0, strict: bool = False,
                 save_dir: str | os.PathLike | None = None, gallery_size: int = 8, log_training_images: bool = True,
                 device: str | torch.device | None = None, device_budget: int | None = None, progress: bool = True,
                 checkpoint_dirs: list[str | os.PathLike] = ()) -> None:
        if bank is None and not levels:
            raise ValueError("pass bank=ReferenceBank(...) or levels=[...] to build one from the training data")
        check_scoring_options(alpha, rule, confidence, thresholds)
        self.stop = StopPolicy(max_replica_rate, patience, min_delta, stop_on)
        self.ledger = Ledger()
        self.bank, self.levels, self.train_items, self.holdout = bank, levels, train_items, holdout
        self.cache_dir = cache_dir
        self.sampler = sampler or default_sampler
        self.num_samples = check_number("num_samples", num_samples, low=1, integer=True)
        self.sample_batch_size = None if sample_batch_size is None else check_number(
            "sample_batch_size", sample_batch_size, low=1, integer=True)
        self.every_n_epochs = check_number("every_n_epochs", every_n_epochs, low=1, integer=True)
        self.scorer_options = dict(alpha=alpha, rule=rule, thresholds=thresholds, search=search, confidence=confidence,
                                   device_budget=None if device_budget is None else check_number(
                                       "device_budget", device_budget, low=0, integer=True))
        self.seed, self.strict = check_number("seed", seed, low=0, integer=True), strict
        self.save_dir, self.device, self.progress = save_dir, device, progress
        self.gallery_size = check_number("gallery_size", gallery_size, low=1, integer=True)
        self.log_training_images = log_training_images
        self.confidence = self.scorer_options["confidence"]
        self.checkpoint_dirs = [str(folder) for folder in checkpoint_dirs]
        self.scorer: ReplicaScorer | None = None
        self.sampling_context = None  # the last check's (see Monitor.check)
        self.image_shape = None if bank is None else bank.image_shape  # (channels, spatial dims) samples must have

    @property
    def max_replica_rate(self) -> float | None:
        return self.stop.max_replica_rate
