"""Trust: the monitor never kills a fit it only observes, calls a checkpoint safe only if the file holds weights
certified (upper bound <= limit) before memorization was detected (lower bound > limit), and certifies on demand."""

import gc
import logging
import os
import time
import weakref
from pathlib import Path

import pytest
import torch
from faults import fails_first
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning_models import TurnsCopier, loader, phantoms, trainer

import relict_callbacks as rc
from relict_callbacks.integrations.lightning import ReplicaMonitor
from relict_callbacks.monitor import Monitor
from relict_callbacks.monitor.checkpoints import saved_step

# 16 samples: 0 of 16 bounds the rate at 0.17 <= 0.3 (certified); 16 of 16 at >= 0.83 > 0.3 (detected)
LIMIT, SAMPLES = 0.3, 16


def test_monitor_is_public():
    from relict_callbacks.monitor import SamplerError, StopReason

    assert (rc.Monitor, rc.StopReason, rc.SamplerError) == (Monitor, StopReason, SamplerError)


def test_lightning_fit_survives_a_failed_first_check_and_last_ckpt_is_judged_by_content(tmp_path):
    train = phantoms(8)
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], sampler=fails_first(), num_samples=SAMPLES, alpha=0.1,
                             max_replica_rate=LIMIT, progress=False)
    seen = []

    class Spy(EarlyStopping):  # EarlyStopping at its defaults (strict=True, check_finite=True), recording values
        def _run_early_stopping_check(self, trainer):
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("relict/")})
            super()._run_early_stopping_check(trainer)

    readme = EarlyStopping(monitor="relict/replica_rate_low", mode="min", divergence_threshold=LIMIT, patience=10**6)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="relict/replica_rate", save_top_k=-1, save_last=True,
                            filename="{epoch}")
    fit = trainer(tmp_path, 8, [Spy(monitor="relict/replica_rate"), readme, monitor, every])
    fit.fit(TurnsCopier(train, copy_from=3), loader(train))

    assert "CUDA out of memory" in monitor.history[0]["error"]
    assert [e["relict/replica_rate"] for e in monitor.history[1:]] == [0.0, 0.0, 1.0]
    assert seen[0]["relict/replica_rate"] == 1.0 and seen[0]["relict/checked"] == 0  # not certified, never NaN
    assert seen[0]["relict/check_failed"] == 1 and seen[1]["relict/check_failed"] == 0
    assert fit.current_epoch == 4 and monitor.stopping_reason.name == "RATE_ABOVE_LIMIT"  # detected at epoch 3
    assert readme.stopped_epoch == 3  # the README recipe (lower bound above the limit) agrees

    last = tmp_path / "ckpt" / "last.ckpt"
    assert saved_step(last) == monitor.history[-1]["step"]  # last.ckpt holds the epoch that copied
    assert monitor.safe_checkpoint() == str(tmp_path / "ckpt" / "epoch=2.ckpt")
    torch.save(torch.load(tmp_path / "ckpt" / "epoch=2.ckpt", weights_only=True), last)  # rewritten with epoch 2
    (tmp_path / "ckpt" / "epoch=2.ckpt").unlink()
    (tmp_path / "ckpt" / "epoch=1.ckpt").unlink()
    assert monitor.safe_checkpoint() == str(last)  # the same name, now certified content
    (tmp_path / "ckpt" / "epoch=0.ckpt").unlink()
    last.unlink()
    assert monitor.safe_checkpoint() is None
    assert "no checkpoint file holds the weights of a check before memorization was detected at epoch 3" in \
        monitor.monitor.safe_checkpoint_reason


class ValidatedCopier(TurnsCopier):
    def validation_step(self, batch, batch_index):
        self.log("val_loss", self.layer(batch["image"].flatten(1)[:, :4]).pow(2).mean(), batch_size=4)


def test_monitoring_callbacks_run_at_validation_end_find_the_metrics_and_are_told_they_lag(tmp_path):
    """Validation twice an epoch runs EarlyStopping and ModelCheckpoint (at their defaults: strict, no missing key)
    at validation end, before the epoch's check: they find the metrics from the start and are warned they lag."""
    train = phantoms(8)
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=4, alpha=0.1, max_replica_rate=LIMIT,
                             progress=False)
    stop = EarlyStopping(monitor="relict/replica_rate_low", mode="min", divergence_threshold=LIMIT, patience=10**6)
    keep = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="relict/replica_rate", mode="min", save_top_k=2)
    fit = trainer(tmp_path, 2, [monitor, stop, keep], val_check_interval=0.5)
    with pytest.warns(UserWarning, match="one check late") as warned:
        fit.fit(ValidatedCopier(train, copy_from=10), loader(train), loader(phantoms(4, seed=1)))
    lagging = sorted(str(w.message).split(" runs at")[0] for w in warned if "one check late" in str(w.message))
    assert lagging == ["relict: EarlyStopping(monitor='relict/replica_rate_low') (pass check_on_train_epoch_end=True)",
                       "relict: ModelCheckpoint(monitor='relict/replica_rate') (pass save_on_train_epoch_end=True)"]
    assert fit.current_epoch == 2 and len(monitor.history) == 2 and keep.best_model_path


def test_samples_are_drawn_in_batches_of_sample_batch_size_each_seeded_alone():
    """A check and a certification draw at most ``sample_batch_size`` samples per sampler call; without it, a
    process's whole share (a check) or ``num_samples`` (a certification) at once."""
    calls = []

    def sampler(model, n, generator):
        calls.append(n)
        return torch.rand(n, 1, 16, 16, generator=generator)

    def monitor(**options):
        made = Monitor(levels=[rc.VoxelLevel(grid=16)], train_items=phantoms(4), num_samples=5, sampler=sampler,
                       alpha=0.2, progress=False, **options)
        made.prepare()
        return made

    batched, whole = monitor(sample_batch_size=2), monitor()
    calls.clear()
    assert batched.check(None, epoch=0, step=0).ok and calls == [2, 2, 1]
    calls.clear()
    assert whole.check(None, epoch=0, step=0).ok and calls == [5]
    calls.clear()
    assert batched.certify(None, num_samples=7).num_samples == 7 and calls == [2, 2, 2, 1]
    calls.clear()
    assert whole.certify(None, num_samples=7).num_samples == 7 and calls == [5, 2]


def test_checks_sample_the_averaged_weights_that_an_ema_callback_puts_in_checkpoints(tmp_path):
    """EMAWeightAveraging saves the averaged weights in every checkpoint: checks sample that averaged model, so that
    a checkpoint is judged by the weights it holds, not by the raw ones being trained."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    train, sampled = phantoms(8), []

    def sampler(model, n, generator):
        sampled.append(model)
        return torch.rand(n, 1, 16, 16, generator=generator)

    ema = EMAWeightAveraging()
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], sampler=sampler, num_samples=2, alpha=0.2, progress=False)
    module = TurnsCopier(train, copy_from=10)
    trainer(tmp_path, 2, [monitor, ema]).fit(module, loader(train))
    assert len(sampled) == 2 and all(model is ema._average_model.module for model in sampled)
    assert sampled[0] is not module


class CopierWithSettings(TurnsCopier):
    """Saves a hyper-parameter torch's safe loading does not allow (a Path), as ``save_hyperparameters()`` does."""

    def __init__(self, train, copy_from: int, out_dir: Path) -> None:
        super().__init__(train, copy_from)
        self.save_hyperparameters("out_dir")


def test_checkpoints_holding_hyperparameters_torch_will_not_load_safely_are_still_read(tmp_path):
    """A checkpoint whose hyper-parameters torch's weights-only loading refuses (a Path, a Namespace, a scheduler)
    is still matched to its step (it was ignored: no safe checkpoint) and certified (it raised)."""
    train = phantoms(8)
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=SAMPLES, alpha=0.1, max_replica_rate=LIMIT,
                             progress=False)
    keep = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    module = CopierWithSettings(train, copy_from=10, out_dir=tmp_path)
    trainer(tmp_path, 2, [monitor, keep]).fit(module, loader(train))
    first = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(first, weights_only=True)
    assert saved_step(first) == 2
    assert monitor.monitor.certify(module, num_samples=SAMPLES, checkpoint=first).num_samples == SAMPLES


def test_a_failed_check_lets_go_of_the_failed_samplers_tensors_at_once():
    """A sampler that ran out of memory mid-sampling leaves tensors in the frames of its traceback (a UNet's
    activations): freed when the check returns, not when Python's cyclic collector gets to them, after the next
    training step may have run out of memory too."""
    held = []

    def sampler(model, n, generator):
        activations = torch.ones(1000)
        held.append(weakref.ref(activations))
        raise RuntimeError("CUDA out of memory (pretend)")

    monitor = Monitor(levels=[rc.VoxelLevel(grid=16)], train_items=phantoms(4), num_samples=2, sampler=sampler,
                      alpha=0.2, progress=False)
    monitor.prepare()
    gc.disable()
    try:
        check = monitor.check(None, epoch=0, step=0)
        assert not check.ok and "CUDA out of memory" in check.error
        assert held[0]() is None
    finally:
        gc.enable()


def test_every_checkpoint_is_known_and_small_checks_need_certification(tmp_path, caplog):
    """ModelCheckpoint without a monitor (every epoch) and Lightning's default one; 4 samples per check can never
    certify 0.3, which is said at the start; certify() with many samples makes the checkpoint safe."""
    train = phantoms(8)
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=4, alpha=0.1, max_replica_rate=LIMIT,
                             progress=False)
    keep = ModelCheckpoint(dirpath=tmp_path / "every", every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    fit = trainer(tmp_path, 3, [monitor, keep])
    with caplog.at_level(logging.WARNING):
        fit.fit(TurnsCopier(train, copy_from=100), loader(train))
    assert caplog.text.count("4 samples per check can never certify a replica rate <= 0.3") == 1
    assert "num_samples >= 9" in caplog.text

    files = monitor.monitor.checkpoints()
    assert {p.rsplit("/", 1)[-1] for p in files} == {"epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"}
    assert [e["checkpoint"] is not None for e in monitor.history] == [True, True, True]
    assert monitor.safe_checkpoint() is None  # 0 of 4 only bounds the rate at 0.53
    reason = monitor.monitor.safe_checkpoint_reason
    assert "epoch=2.ckpt" in reason and "0.53 > 0.30" in reason and "monitor.certify" in reason

    candidate = monitor.monitor.checkpoint_to_certify()
    assert candidate.endswith("epoch=2.ckpt")
    check = monitor.monitor.certify(TurnsCopier(train, copy_from=100), num_samples=SAMPLES, checkpoint=candidate)
    assert check.kind == "certify" and check.metrics["relict/replica_rate_high"] < LIMIT
    assert monitor.history[-1]["kind"] == "certify" and monitor.history[-1]["step"] == saved_step(candidate)
    assert monitor.safe_checkpoint() == candidate
    assert "(certification)" in monitor.monitor.history_table()

    default = trainer(tmp_path / "default", 2, [monitor := ReplicaMonitor(
        levels=[rc.VoxelLevel()], num_samples=SAMPLES, alpha=0.1, max_replica_rate=LIMIT, progress=False)])
    default.fit(TurnsCopier(train, copy_from=100), loader(train))  # Lightning's own ModelCheckpoint: last epoch only
    assert monitor.safe_checkpoint().endswith("epoch=1-step=4.ckpt")


def test_monai_trainer_survives_a_failed_first_check_and_best_pt_is_judged_by_content(tmp_path, one_thread):
    from monai.handlers import CheckpointSaver, EarlyStopHandler
    from monai_engines import copier_trainer

    from relict_callbacks.integrations.monai import ReplicaMonitorHandler

    relict = ReplicaMonitorHandler(levels=[rc.VoxelLevel()], sampler=fails_first(), num_samples=SAMPLES,
                                   alpha=0.1, max_replica_rate=LIMIT, patience=2, progress=False)
    trainer = copier_trainer(phantoms(8), 6, [], copy_from=3)
    saver = CheckpointSaver(tmp_path / "ckpt", {"net": trainer.network, "relict": relict}, save_key_metric=True,
                            key_metric_name="relict/replica_rate", key_metric_negative_sign=True,
                            key_metric_filename="best.pt", key_metric_greater_or_equal=True, save_final=True,
                            final_filename="final.pt")
    stop = EarlyStopHandler(patience=10, score_function=lambda engine: -engine.state.metrics["relict/replica_rate"],
                            trainer=trainer)
    for handler in (relict, saver, stop):
        handler.attach(trainer)
    trainer.run()

    assert "CUDA out of memory" in relict.history[0]["error"]
    assert [e["relict/replica_rate"] for e in relict.history[1:]] == [0.0, 0.0, 1.0, 1.0]
    assert trainer.state.epoch == 5 and relict.stopping_reason.name == "RATE_ABOVE_LIMIT"
    assert trainer.state.metrics["relict/checked"] == 1 and trainer.state.metrics["relict/check_failed"] == 0
    # best.pt was written at epochs 0 (rate 1.0 = not checked), 1 and 2 (ties replace it): it holds epoch 2 now
    assert saved_step(tmp_path / "ckpt" / "best.pt") == relict.history[2]["step"]
    assert saved_step(tmp_path / "ckpt" / "final.pt") == relict.history[-1]["step"]
    assert relict.safe_checkpoint() == str(tmp_path / "ckpt" / "best.pt")
    assert [e["checkpoint"] for e in relict.history] == [None, None, str(tmp_path / "ckpt" / "best.pt"), None,
                                                         str(tmp_path / "ckpt" / "final.pt")]


def measured(epoch, flagged, samples, kind="check"):
    from relict_callbacks.intervals import rate_bounds
    from relict_callbacks.monitor.ledger import Check

    low, high = rate_bounds(flagged, samples)
    return Check(epoch, 10 * (epoch + 1), {"relict/replica_rate": flagged / samples, "relict/replica_rate_low": low,
                                           "relict/replica_rate_high": high}, num_samples=samples, kind=kind)


@pytest.mark.parametrize("checks, files, expected, reason", [
    # 0 of 8 only bounds the rate at 0.31: never certified under 0.1, however clean
    ([(0, 0, 8), (1, 0, 8)], {"a": 10, "b": 20}, None, "bounds the replica rate only at 0.31 > 0.10"),
    # 0 of 40 certifies 0.1 (upper bound 0.072); the later, detected check (3 of 8: lower bound 0.11) is not safe
    ([(0, 0, 40), (1, 3, 8)], {"a": 10, "b": 20}, "a", None),
    # a check after detection is never safe, even when it certifies (memorization may hide in 0 of 40)
    ([(0, 4, 8), (1, 0, 40)], {"a": 10, "b": 20}, None, "before memorization was detected at epoch 0"),
    # the certification of a step (48 samples) outweighs its routine check (8 samples)
    ([(0, 0, 8), (0, 0, 48, "certify")], {"a": 10}, "a", None),
    # a file that now holds another step (last.ckpt rewritten) or no step at all does not stand for a check
    ([(0, 0, 40)], {"last.ckpt": 30, "x.pt": None}, None, "none of the 2 checkpoint file(s) holds the weights"),
    ([(0, 0, 40)], {}, None, "no checkpoint files found"),
    # between two files holding one step, the one whose name is not reused
    ([(0, 0, 40)], {"last.ckpt": 10, "epoch=0.ckpt": 10}, "epoch=0.ckpt", None),
])
def test_safe_checkpoint_verdicts(checks, files, expected, reason):
    from relict_callbacks.monitor.ledger import Ledger

    ledger = Ledger()
    for check in checks:
        ledger.record(measured(*check))
    assert ledger.safe_checkpoint(files, max_replica_rate=0.1) == expected
    assert (ledger.reason is None) if reason is None else (reason in ledger.reason)


@pytest.fixture
def reads(monkeypatch):
    """The names of the files ``torch.load`` reads from now on."""
    names, load = [], torch.load

    def counted(file, *args, **kwargs):
        names.append(os.path.basename(file))
        return load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    return names


def save_checkpoint(path, step: int, age_ns: int | None = None) -> None:
    """A Lightning checkpoint of ``step``, rewritten in place (same inode), last modified ``age_ns`` ago if given."""
    torch.save({"global_step": step, "state_dict": {"weight": torch.full((4,), float(step))}}, path)
    if age_ns is not None:
        mtime = time.time_ns() - age_ns
        os.utime(path, ns=(mtime, mtime))


def test_safe_checkpoint_reads_a_file_again_only_once_it_is_rewritten(tmp_path, reads):
    monitor = Monitor(levels=[rc.VoxelLevel()], max_replica_rate=0.1, checkpoint_dirs=[tmp_path])
    for check in [(0, 0, 40), (1, 0, 40)]:  # steps 10 and 20, both certified
        monitor.ledger.record(measured(*check))
    last, minute = tmp_path / "last.ckpt", 60 * 10**9
    save_checkpoint(tmp_path / "epoch=0.ckpt", 10, age_ns=minute)
    save_checkpoint(last, 20, age_ns=minute)
    (tmp_path / "notes.pt").write_bytes(b"not a checkpoint")
    os.utime(tmp_path / "notes.pt", ns=(time.time_ns() - minute,) * 2)
    reads.clear()
    assert monitor.safe_checkpoint() == str(last)
    assert set(reads) == {"epoch=0.ckpt", "last.ckpt", "notes.pt"}
    reads.clear()
    assert monitor.safe_checkpoint() == str(last) and reads == []  # unchanged files, readable or not: not read again

    reads.clear()
    size, inode = last.stat().st_size, last.stat().st_ino
    save_checkpoint(last, 30, age_ns=minute // 2)  # step 30 was never checked: same size and inode, later time
    assert (last.stat().st_size, last.stat().st_ino) == (size, inode)
    assert monitor.safe_checkpoint() == str(tmp_path / "epoch=0.ckpt") and reads == ["last.ckpt"]

    save_checkpoint(last, 40)  # just written: read on every call, as a rewrite within its timestamp could go unseen
    written = last.stat().st_mtime_ns
    assert monitor.safe_checkpoint() == str(tmp_path / "epoch=0.ckpt")
    save_checkpoint(last, 20)
    os.utime(last, ns=(written, written))  # size, inode and time all as before: only the content says step 20
    assert monitor.safe_checkpoint() == str(last) and reads == ["last.ckpt"] * 3


def test_certify_reads_the_checkpoint_once(tmp_path, reads):
    class Noise(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4))

        def sample(self, n, generator):
            return torch.rand(n, 1, 16, 16, generator=generator) + self.weight.sum()

    monitor = Monitor(levels=[rc.VoxelLevel()], num_samples=4, alpha=0.1, max_replica_rate=LIMIT, progress=False)
    monitor.prepare(phantoms(8))
    model = Noise()
    torch.save({"global_step": 10, "state_dict": {"weight": torch.ones(4)}}, tmp_path / "epoch=0.ckpt")
    reads.clear()
    check = monitor.certify(model, num_samples=8, checkpoint=tmp_path / "epoch=0.ckpt")
    assert reads == ["epoch=0.ckpt"] and check.step == 10 and monitor.history[-1]["kind"] == "certify"
    assert torch.equal(model.weight.detach(), torch.ones(4))  # the file's weights were loaded
