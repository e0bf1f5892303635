"""What ReplicaMonitor adds to a Lightning fit, as ratios against the same fit without it.

The same MONAI DDPM (the demo's) is fitted twice on phantoms; the monitored fit checks every 5 epochs. The added
time is split into bank build, sampling (the model's own DDIM sampling: the cost of the samples themselves) and
scoring + bookkeeping (search, history, logging). Target: scoring + bookkeeping under 5% of the fit.

    python benchmarks/callback_overhead.py [--epochs 20] [--samples 16]
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from monai.networks.schedulers import DDIMScheduler

from relict_callbacks import VoxelLevel
from relict_callbacks.data import make_phantoms
from relict_callbacks.demos.training import PhantomDDPM
from relict_callbacks.integrations.lightning import ReplicaMonitor
from relict_callbacks.integrations.samplers import DiffusionSampler
from relict_callbacks.monitor import Monitor, core


class Timed:
    """Accumulate wall time spent in some functions, given as ``{label: (owner, attribute)}``."""

    def __init__(self, targets: dict[str, tuple[object, str]]) -> None:
        self.targets = targets
        self.seconds = dict.fromkeys(targets, 0.0)
        self.originals = {label: getattr(owner, name) for label, (owner, name) in targets.items()}

    def __enter__(self):
        for label, original in self.originals.items():
            def timed(*args, _label=label, _original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds[_label] += time.perf_counter() - start
            setattr(*self.targets[label], timed)
        return self

    def __exit__(self, *exc) -> None:
        for label, original in self.originals.items():
            setattr(*self.targets[label], original)


def fit(epochs: int, callbacks, train) -> float:
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    start = time.perf_counter()
    trainer.fit(PhantomDDPM(), torch.utils.data.DataLoader(train * 16, batch_size=8, shuffle=True))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    train = make_phantoms(8, "head_ct", ndim=2, size=32, seed=0)
    holdout = make_phantoms(48, "head_ct", ndim=2, size=32, seed=1, id_prefix="holdout")

    bare = fit(args.epochs, [], train)
    monitor = ReplicaMonitor(levels=[VoxelLevel()], train_items=train, holdout=holdout, alpha=0.05,
                             sampler=DiffusionSampler(DDIMScheduler(1000, prediction_type="sample"), (1, 32, 32),
                                                      num_inference_steps=25, network="unet"),
                             num_samples=args.samples, every_n_epochs=5, progress=False)
    timings = {"prepare": (Monitor, "prepare"), "draw": (core, "draw_in_batches"), "evaluate": (Monitor, "_judge")}
    with Timed(timings) as timed:
        monitored = fit(args.epochs, [monitor], train)
    added = monitored - bare
    bookkeeping = added - sum(timed.seconds.values())
    checks = len(monitor.history)
    print(f"fit of {args.epochs} epochs ({args.epochs * len(train) * 2} steps), {checks} checks of {args.samples} "
          f"samples (every 5 epochs + the first)")
    print(f"  without monitor {bare:7.2f} s")
    print(f"  with monitor    {monitored:7.2f} s  ({monitored / bare:.3f}x)")
    print(f"    bank build             {timed.seconds['prepare']:6.2f} s  {timed.seconds['prepare'] / bare:6.1%}")
    print(f"    sampling (DDIM 25)     {timed.seconds['draw']:6.2f} s  {timed.seconds['draw'] / bare:6.1%}")
    print(f"    scoring                {timed.seconds['evaluate']:6.2f} s  {timed.seconds['evaluate'] / bare:6.1%}")
    print(f"    other (hooks, logging) {bookkeeping:6.2f} s  {bookkeeping / bare:6.1%}  (noise of two fits included)")
    print(f"  scoring + bookkeeping: {(timed.seconds['evaluate'] + max(bookkeeping, 0)) / bare:.1%} of the bare fit "
          "(target < 5%)")


if __name__ == "__main__":
    main()
