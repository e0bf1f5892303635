"""Choosing the checkpoint to ship: the :class:`~relict_callbacks.monitor.Monitor` methods that read its ledger
against the checkpoint files as they are now (:mod:`.checkpoints`), and certify the one to ship (:mod:`.certification`).

>>> import tempfile, os, torch, relict_callbacks as rc
>>> folder = tempfile.mkdtemp()
>>> torch.save({"global_step": 10, "state_dict": {}}, os.path.join(folder, "epoch=0.ckpt"))
>>> monitor = rc.Monitor(levels=[rc.VoxelLevel()], max_replica_rate=0.1, checkpoint_dirs=[folder])
>>> monitor.ledger.record(Check(0, 10, {"relict/replica_rate": 0.0, "relict/replica_rate_low": 0.0,
...                                     "relict/replica_rate_high": 0.05}, num_samples=60))
>>> os.path.basename(monitor.safe_checkpoint())
'epoch=0.ckpt'
"""

from __future__ import annotations

from . import certification, checkpoints
from .communicator import SINGLE_PROCESS, Communicator
from .ledger import RATE, Check, Ledger
from .stop import StopPolicy


class CheckpointSelection:
    """The checkpoint views of a monitor, which has a ``ledger``, a ``stop`` policy and ``checkpoint_dirs``."""

    ledger: Ledger
    stop: StopPolicy
    checkpoint_dirs: list[str]
    save_dir: str | None

    def published(self) -> dict[str, float]:
        """What the adapters publish on every epoch for ``EarlyStopping``/``ModelCheckpoint``/``CheckpointSaver``:
        the latest good check's metrics, never NaN; before the first, replica rate 1.0 (not certified) with bounds
        0-1; ``relict/checked`` (0/1) and ``relict/check_failed`` (1 when the latest check failed)."""
        return self.ledger.published()

    def checkpoints(self) -> dict[str, int | None]:
        """Every checkpoint file in :attr:`checkpoint_dirs`, with the step its content holds (read now, unless the
        file is unchanged since it was last read)."""
        return checkpoints.scan(self.checkpoint_dirs)

    def note_checkpoints(self, comm: Communicator = SINGLE_PROCESS) -> None:
        """At the end of a run: show, in the history, which file now holds each check's weights (as rank 0, which
        writes the checkpoints, sees them, so every process has the same history) and save it (rank 0)."""
        self.ledger.note_files(comm.from_rank_zero(self.checkpoints))
        if self.save_dir is not None and comm.rank == 0:
            self.save_history()

    def safe_checkpoint(self, max_replica_rate: float | None = None, metric: str | None = None,
                        mode: str = "min") -> str | None:
        """The checkpoint to ship, verified now from the files' content: among files holding the weights of a
        check (or certification) from before memorization was detected (a lower bound above the limit) whose upper
        bound is <= ``max_replica_rate`` (default: the monitor's), the latest, or the best by ``metric`` in
        ``mode`` (``"min"``/``"max"``). ``None`` when none qualifies; :attr:`safe_checkpoint_reason` says why."""
        files = self.checkpoints()
        self.ledger.note_files(files)
        return self.ledger.safe_checkpoint(files, self._limit(max_replica_rate), metric, mode)

    @property
    def safe_checkpoint_reason(self) -> str | None:
        """Why the last :meth:`safe_checkpoint` returned ``None`` (``None`` when it named a file)."""
        return self.ledger.reason

    def checkpoint_to_certify(self, max_replica_rate: float | None = None) -> str | None:
        """The latest checkpoint file, not yet certified, holding a check from before detection whose replica rate
        was <= the limit: the one to :meth:`certify` when the routine checks are too small to certify it (after a
        certification that fell short, the one before it)."""
        files, limit = self.checkpoints(), self._limit(max_replica_rate)
        fitting = [e for e in self.ledger.candidates(files, limit) if e[RATE] <= limit and e.get("kind") != "certify"]
        return self.ledger.holder(files, fitting[-1]["step"]) if fitting else None

    def certify(self, model, num_samples: int, checkpoint=None, key: str | None = None,
                sampling_context=None) -> Check:
        """Score ``num_samples`` fresh samples of ``model`` or of ``checkpoint``'s weights loaded into it, drawn as
        the checks drew them; see :func:`.certification.certify`."""
        return certification.certify(self, model, num_samples, checkpoint, key, sampling_context)

    def _limit(self, max_replica_rate: float | None) -> float:
        limit = self.stop.max_replica_rate if max_replica_rate is None else max_replica_rate
        if limit is None:
            raise ValueError("pass max_replica_rate=... (the monitor has none)")
        return limit
