"""Certify a chosen model or checkpoint with many more samples than the routine checks, so those can stay cheap:
0 of 8 flagged still allows a replica rate of 31%, 0 of 59 bounds it at 5% (95%, exact one-sided).

>>> import torch, relict_callbacks as rc
>>> from relict_callbacks.monitor import Monitor
>>> train = rc.data.make_phantoms(12, ndim=2, size=32)
>>> class Noise(torch.nn.Module):
...     def sample(self, n, generator):
...         return torch.rand(n, 1, 32, 32, generator=generator)
>>> monitor = Monitor(levels=[rc.VoxelLevel(grid=32)], num_samples=4, alpha=0.1, max_replica_rate=0.1,
...                   progress=False)
>>> monitor.prepare(train)
>>> check = certify(monitor, Noise(), num_samples=30)
>>> check.kind, check.num_samples, check.metrics["relict/replica_rate_high"] < 0.1
('certify', 30, True)
"""

from __future__ import annotations

import logging


from ..intervals import rate_bounds, samples_to_certify
from ..validation import check_number
from . import checkpoints
from .ledger import HIGH, RATE, Check
from .sampling import draw_in_batches

log = logging.getLogger("relict_callbacks")
SEED_OFFSET = 100_003  # certification noise differs from the routine checks'


def certify(monitor, model, num_samples: int, checkpoint=None, key: str | None = None,
            sampling_context=None) -> Check:
    """Score ``num_samples`` fresh samples of ``model`` (drawn the monitor's ``sample_batch_size``, or else its
    ``num_samples``, at a time), or of ``checkpoint``'s weights loaded into ``model`` (``key``: where the weights
    are in the file; default ``"state_dict"`` (Lightning) or the entry matching ``model``'s keys (MONAI
    ``CheckpointSaver``)). ``sampling_context()`` is entered around each sampler call; default: the last check's
    (the training's autocast under mixed precision), so that the certified samples are drawn as the checks drew;
    ``contextlib.nullcontext`` samples without one.

    A checkpoint's certification is recorded in the monitor's history (``kind="certify"``) for the step the file
    holds, and outweighs that step's routine check in ``safe_checkpoint``. Single process: call it on rank 0."""
    check_number("num_samples", num_samples, low=1, integer=True)
    step = None
    if checkpoint is not None:
        content = checkpoints.read_checkpoint(checkpoint, mmap=False)  # read once: its step and weights
        step = checkpoints.step_of(content)
        model.load_state_dict(_weights(content, model, key))
    images, labels = draw_in_batches(monitor.sampler, model, num_samples, monitor.seed + SEED_OFFSET,
                                     monitor.image_shape, monitor.sample_batch_size or monitor.num_samples,
                                     sampling_context or monitor.sampling_context)
    report = monitor.scorer.score(images, labels)
    epoch = max((e["epoch"] for e in monitor.history if step is not None and e["step"] <= step), default=-1)
    check = Check(epoch, -1 if step is None else step, report.metrics(), report, num_samples=num_samples,
                  kind="certify")
    log.info("relict: certified %s: %d of %d samples flagged, replica rate <= %.3f (%g%% upper bound)",
             checkpoint or "the model", round(check.metrics[RATE] * num_samples), num_samples, check.metrics[HIGH],
             100 * monitor.confidence)
    if step is not None:
        monitor._record(check)
    return check


def warn_if_uncertifiable(limit: float | None, num_samples: int, confidence: float) -> None:
    """Say if no routine check of ``num_samples`` can ever certify ``limit``: even 0 flagged leaves the upper bound
    above it."""
    highest = rate_bounds(0, num_samples, confidence)[1]
    if limit is None or highest <= limit:
        return
    needed = (f"that needs num_samples >= {samples_to_certify(limit, confidence)}" if limit > 0
              else "no number of samples can")
    log.warning("relict: %d samples per check can never certify a replica rate <= %g at %g%% confidence (0 of %d "
                "flagged still allows %.2f); %s. Checks still detect memorization; certify the checkpoint to ship "
                "with monitor.certify(model, num_samples=..., checkpoint=...)", num_samples, limit, 100 * confidence,
                num_samples, highest, needed)


def _weights(content, model, key: str | None) -> dict:
    """The model weights inside a loaded checkpoint (Lightning: ``state_dict``; MONAI: the entry with the model's
    keys)."""
    if key is not None:
        return content[key]
    if "state_dict" in content:
        return content["state_dict"]
    wanted = set(model.state_dict())
    found = [value for value in content.values() if isinstance(value, dict) and set(value) == wanted]
    if not found:
        raise ValueError(f"no entry of the checkpoint ({sorted(content)}) holds {type(model).__name__}'s weights; "
                         "pass key=...")
    return found[0]
