"""The distributed protocol of one check, the same for one process or many (:mod:`.communicator`).

Each process draws its share of the samples. The processes agree on failures first, so no process waits in a
gather the others skip; then rank 0 gathers the samples, scores them and decides, and every process takes rank 0's
outcome (its check, stop policy state and extra metrics), so histories and stop decisions are the same everywhere.
A failure on any process becomes the same failed check on every process, raised when ``strict``.

>>> import torch
>>> from relict_callbacks.monitor.communicator import SINGLE_PROCESS
>>> from relict_callbacks.monitor.stop import StopPolicy
>>> def judge(images, labels):  # rank 0: score and decide
...     return Check(3, 30, {"relict/replica_rate": 0.0}, num_samples=len(images))
>>> check, extra = run_check(lambda: (torch.zeros(2, 1, 8, 8), None), judge, StopPolicy(), SINGLE_PROCESS,
...                          epoch=3, step=30, extra={"train_loss": 0.5})
>>> check.num_samples, extra
(2, {'train_loss': 0.5})
>>> def out_of_memory():
...     raise RuntimeError("out of memory")
>>> check, extra = run_check(out_of_memory, judge, StopPolicy(), SINGLE_PROCESS, epoch=3, step=30)
>>> check.ok, check.error, extra
(False, 'RuntimeError: out of memory', None)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .communicator import Communicator
from .ledger import Check
from .sampling import SamplerError
from .stop import StopPolicy, StopReason

log = logging.getLogger("relict_callbacks")


def run_check(draw: Callable[[], tuple], judge: Callable[..., Check], stop: StopPolicy, comm: Communicator, *,
              epoch: int, step: int, extra: dict | None = None, strict: bool = False) -> tuple[Check, dict | None]:
    """Run the protocol; every process of ``comm`` calls it together.

    ``draw()`` returns this process's ``(images, labels)``; ``judge(images, labels)`` (rank 0 only) scores the
    gathered samples and decides, updating ``stop``. Returns the check and rank 0's ``extra`` (``None`` for a failed
    check), for the caller to record."""
    error, images, labels = None, None, None
    try:
        images, labels = draw()
    except Exception as exc:
        error = exc
    message = _agree_on_failure(error, comm)  # first, so no process waits in a gather the others skip
    if message is None:
        try:
            images = comm.gather(images)
            labels = None if labels is None else comm.gather(labels)
        except ValueError as exc:  # shapes differ between processes: every process raised the same
            error, message = exc, _describe(exc)
    if message is not None:
        try:
            return _failed(error, message, epoch, step, comm, strict), None
        finally:
            error = None  # let go of the error's traceback (see _failed)
    check = None

    def judged() -> dict:  # rank 0
        nonlocal check, error
        try:
            check = judge(images, labels)
        except Exception as exc:
            error = exc
            return {"error": _describe(exc)}
        return {"error": None, "metrics": check.metrics, "samples": check.num_samples, "extra": extra,
                "stop_reason": check.stop_reason.name, "stop_message": check.stop_message,
                "stop_state": stop.state_dict()}

    outcome = comm.from_rank_zero(judged)
    if outcome["error"] is not None:
        try:
            return _failed(error, outcome["error"], epoch, step, comm, strict), None
        finally:
            error = None  # let go of the error's traceback (see _failed)
    if check is None:  # another process: take over rank 0's check and stop policy
        stop.load_state_dict(outcome["stop_state"])
        check = Check(epoch, step, outcome["metrics"], num_samples=outcome["samples"],
                      stop_reason=StopReason[outcome["stop_reason"]], stop_message=outcome["stop_message"])
    return check, outcome["extra"]


def _agree_on_failure(error: BaseException | None, comm: Communicator) -> str | None:
    """What every process records when the sampler failed on any of them (rank 0's error, or which processes
    failed; those log their own error); ``None`` when it failed nowhere."""
    failed = comm.ranks_where(error is not None)
    if not failed:
        return None
    if error is not None and comm.rank != 0:
        log.warning("relict: sampling failed on process %d: %s", comm.rank, _describe(error))
    elsewhere = f"the sampler failed on process(es) {failed}, whose log has the error"
    return comm.broadcast(elsewhere if error is None else _describe(error))  # rank 0's message


def _failed(error: BaseException | None, message: str, epoch: int, step: int, comm: Communicator,
            strict: bool) -> Check:
    """The failed check every process records; raised instead when ``strict``. The caller then lets go of
    ``error``: its traceback holds the frames of the sampler that raised, with their tensors (a UNet's activations,
    when CUDA ran out of memory mid-sampling), and the caller's frame, which held ``error``, made a cycle with it that
    kept them until Python's cyclic collector ran, maybe after the next training step had run out of memory too."""
    if strict:
        raise error if error is not None else RuntimeError(message)
    if comm.rank == 0:
        log.warning("relict: check at epoch %d skipped, training goes on: %s", epoch, message)
    return Check(epoch, step, error=message)


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, SamplerError) else f"{type(error).__name__}: {error}"
