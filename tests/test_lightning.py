"""ReplicaMonitor in real Lightning fits: metrics, stopping, checkpoint choice, resume and faults."""

import csv
import json

import pytest
import torch
from faults import bad_sampler
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning_models import SIZE, TinyDDPM, TinyGAN, TurnsCopier, loader, phantoms, trainer
from monai.networks.schedulers import DDIMScheduler

import relict_callbacks as rc
from relict_callbacks.integrations.lightning import ReplicaMonitor
from relict_callbacks.integrations.samplers import DiffusionSampler
from relict_callbacks.monitor import SamplerError, StopReason

KEYS = {"relict/replica_rate", "relict/voxel/replica_rate", "relict/voxel/nn_similarity_mean",
        "relict/voxel/nn_similarity_max", "relict/voxel/copy_z"}


def logged_rows(tmp_path) -> list[dict]:
    with open(next(tmp_path.glob("logs/version_*/metrics.csv"))) as file:
        return list(csv.DictReader(file))


def test_ddpm_fit_logs_metrics_on_check_epochs(tmp_path):
    train = phantoms(12)
    sampler = DiffusionSampler(DDIMScheduler(num_train_timesteps=50), (1, SIZE, SIZE), num_inference_steps=4,
                               network="unet")
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], holdout=phantoms(12, seed=1, prefix="holdout"),
                             sampler=sampler, num_samples=4, every_n_epochs=2, alpha=0.1, save_dir=tmp_path / "relict",
                             progress=False)
    fit = trainer(tmp_path, 4, [monitor])
    fit.fit(TinyDDPM(), loader(train))

    assert [entry["epoch"] for entry in monitor.history] == [0, 1, 3]
    assert all(entry["error"] is None and KEYS <= entry.keys() for entry in monitor.history)
    assert all("train_loss" in entry for entry in monitor.history)  # the epoch's other metrics are kept too
    assert KEYS <= set(fit.callback_metrics)
    rows = [row for row in logged_rows(tmp_path) if row["relict/replica_rate"]]
    assert [int(row["epoch"]) for row in rows] == [0, 1, 3]  # loggers get each check once, not stale copies
    assert float(rows[-1]["relict/voxel/nn_similarity_max"]) == pytest.approx(
        monitor.history[-1]["relict/voxel/nn_similarity_max"])
    saved = json.loads((tmp_path / "relict" / "history.json").read_text())
    assert [entry["epoch"] for entry in saved] == [0, 1, 3]
    assert sorted(p.name for p in (tmp_path / "relict").glob("report-*.json")) == [
        "report-epoch=0.json", "report-epoch=1.json", "report-epoch=3.json"]


def test_same_noise_every_check_and_training_rng_untouched(tmp_path):
    train = phantoms(8)
    sampler = DiffusionSampler(DDIMScheduler(num_train_timesteps=50), (1, SIZE, SIZE), num_inference_steps=3,
                               network="unet")
    model = TinyDDPM()
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], sampler=sampler, num_samples=3, alpha=0.2, seed=7,
                             progress=False)
    monitor.monitor.prepare(train)
    model.train()
    torch.manual_seed(123)
    first = monitor.monitor.check(model, 0, 0).samples
    after_draw = torch.rand(1)
    torch.manual_seed(123)
    expected = torch.rand(1)
    second = monitor.monitor.check(model, 1, 0).samples
    assert torch.equal(first, second)
    assert torch.equal(after_draw, expected)
    assert model.training and model.unet.training


def test_gan_stops_when_samples_count_as_replicas(tmp_path):
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], thresholds={"voxel": -1.0}, num_samples=4,
                             every_n_epochs=2, max_replica_rate=0.4, patience=2, progress=False)
    fit = trainer(tmp_path, 10, [monitor])
    fit.fit(TinyGAN(), loader(phantoms(8)))
    assert [entry["epoch"] for entry in monitor.history] == [0, 1]
    assert fit.current_epoch == 2 and monitor.stopped_epoch == 1
    assert monitor.stopping_reason is StopReason.RATE_ABOVE_LIMIT
    assert monitor.stopping_reason_message == "replica rate 1.00 (lower bound 0.47) > 0.40 for 2 checks at epoch 1"


def test_rising_rate_stops_and_checkpoints_follow_the_replica_rate(tmp_path):
    train = phantoms(8)
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], holdout=phantoms(12, seed=1, prefix="holdout"),
                             num_samples=4, every_n_epochs=2, alpha=0.1, stop_on="rising", min_delta=0.1,
                             progress=False)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="relict/replica_rate", mode="min", save_top_k=1,
                           every_n_epochs=2, filename="{epoch}")
    fit = trainer(tmp_path, 12, [monitor, best])
    fit.fit(TurnsCopier(train, copy_from=4), loader(train))

    assert [(e["epoch"], e["relict/replica_rate"]) for e in monitor.history] == [(0, 0.0), (1, 0.0), (3, 0.0),
                                                                                   (5, 1.0)]
    assert monitor.stopping_reason is StopReason.RATE_RISING and fit.current_epoch == 6
    assert best.best_model_path.endswith("epoch=1.ckpt")  # the first with the lowest rate; later ties do not win
    assert monitor.safe_checkpoint(max_replica_rate=0.6) == best.best_model_path  # 0 of 4: rate <= 0.53
    assert [e["checkpoint"] is not None for e in monitor.history] == [False, True, False, False]  # top-1 only


def test_early_stopping_and_checkpoint_recipe_with_every_n_epochs(tmp_path):
    """The README recipe: metrics exist on every epoch, so strict EarlyStopping and ModelCheckpoint never fail."""
    train = phantoms(8)
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=4, every_n_epochs=3, alpha=0.1, progress=False)
    stop = EarlyStopping(monitor="relict/replica_rate", mode="min", divergence_threshold=0.5, patience=1000,
                         strict=True)
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="relict/replica_rate", mode="min", save_top_k=-1,
                           filename="{epoch}")
    fit = trainer(tmp_path, 12, [stop, monitor, last])
    fit.fit(TurnsCopier(train, copy_from=4), loader(train))
    assert stop.stopped_epoch == 5 and fit.current_epoch == 6
    assert [e["epoch"] for e in monitor.history] == [0, 2, 5]
    assert monitor.safe_checkpoint(max_replica_rate=0.6).endswith("epoch=2.ckpt")  # 0 of 4: rate <= 0.53
    assert monitor.safe_checkpoint(max_replica_rate=0.6, metric="train_loss") is not None


def test_resume_keeps_history_and_patience(tmp_path):
    train = phantoms(8)

    def monitor():
        return ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=4, alpha=0.1, max_replica_rate=0.4,
                              patience=3, cache_dir=tmp_path / "cache", seed=3, progress=False)

    first = monitor()
    fit = trainer(tmp_path, 3, [first, ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}")])
    fit.fit(TurnsCopier(train, copy_from=1), loader(train))
    assert [e["relict/replica_rate"] for e in first.history] == [0.0, 1.0, 1.0]
    assert first.monitor.stop.wait["limit"] == 2 and first.stopping_reason is StopReason.NOT_STOPPED

    resumed = monitor()
    fit = trainer(tmp_path, 10, [resumed])
    fit.fit(TurnsCopier(train, copy_from=1), loader(train), ckpt_path=tmp_path / "ckpt" / "epoch=2.ckpt")
    assert "reused cached bank" in resumed.monitor.bank.cache_message
    assert [e["epoch"] for e in resumed.history] == [0, 1, 2, 3]  # one more check was enough: patience carried over
    assert resumed.stopping_reason is StopReason.RATE_ABOVE_LIMIT and resumed.monitor.seed == 3
    assert resumed.stopping_reason_message == "replica rate 1.00 (lower bound 0.47) > 0.40 for 3 checks at epoch 3"


@pytest.mark.parametrize("kind, message", [("raises", "raised RuntimeError: CUDA out of memory"),
                                           ("nan", "non-finite values (NaN/inf) in sample(s) [1]"),
                                           ("shape", "returned shape (4, 1, 16)")])
def test_failing_sampler_is_logged_and_training_goes_on(tmp_path, kind, message, caplog):
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], sampler=bad_sampler(kind), num_samples=4, alpha=0.1,
                             progress=False)
    fit = trainer(tmp_path, 2, [monitor])
    fit.fit(TinyGAN(), loader(phantoms(8)))
    assert fit.current_epoch == 2  # trained to the end
    assert [e["epoch"] for e in monitor.history] == [0, 1]
    assert all(message in e["error"] for e in monitor.history)
    assert "check at epoch 0 skipped, training goes on" in caplog.text


def test_strict_mode_raises(tmp_path):
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], sampler=bad_sampler("nan"), num_samples=4, alpha=0.1,
                             strict=True, progress=False)
    with pytest.raises(SamplerError, match="non-finite"):
        trainer(tmp_path, 2, [monitor]).fit(TinyGAN(), loader(phantoms(8)))


def test_device_budget_bounds_the_rows_the_checks_keep_and_is_checked(tmp_path, caplog):
    """``device_budget=0``: the checks of a fit keep no bank rows resident (read from the file or host memory at
    every check, as the placement log says) and score as with the default budget; a bad budget is refused."""
    caplog.set_level("INFO", logger="relict_callbacks")
    histories = {}
    for budget in (None, 0):
        monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=4, alpha=0.1, device_budget=budget,
                                 progress=False)
        trainer(tmp_path / str(budget), 2, [monitor]).fit(TurnsCopier(phantoms(8), copy_from=1), loader(phantoms(8)))
        histories[budget] = [entry["relict/voxel/nn_similarity_max"] for entry in monitor.history]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bank arrays for search")]
    assert any("0 B held in RAM (budget 0 B)" in line for line in said)
    assert len(histories[0]) == 2 and histories[0] == pytest.approx(histories[None], abs=1e-6)
    with pytest.raises(ValueError, match="device_budget must be in"):
        ReplicaMonitor(levels=[rc.VoxelLevel()], device_budget=-1)


def test_model_without_sample_method_is_a_clear_error(tmp_path):
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=4, alpha=0.1, strict=True, progress=False)
    with pytest.raises(SamplerError, match="TinyDDPM has no sample"):
        trainer(tmp_path, 1, [monitor]).fit(TinyDDPM(), loader(phantoms(8)))


def test_fast_dev_run_builds_nothing_and_checks_nothing(tmp_path):
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=4, alpha=0.1, save_dir=tmp_path / "relict",
                             progress=False)
    fit = trainer(tmp_path, 3, [monitor], fast_dev_run=True)
    fit.fit(TurnsCopier(phantoms(8), copy_from=0), loader(phantoms(8)))
    assert monitor.monitor.bank is None and monitor.history == []
    assert not (tmp_path / "relict").exists() and "relict/replica_rate" not in fit.callback_metrics


@pytest.mark.parametrize("strategy, spawned", [("ddp_spawn", True), ("ddp_fork", True), ("ddp", False)])
def test_fits_in_spawned_processes_are_told_the_monitor_records_stay_there(strategy, spawned):
    """Under ddp_spawn/ddp_fork (and notebooks with several devices), setup warns that what the monitor records
    stays in the worker processes."""
    import warnings

    import lightning as L

    fit = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False, enable_progress_bar=False)
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=2, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.setup(fit, torch.nn.Linear(1, 1), "fit")
    told = [str(w.message) for w in caught if "stays in" in str(w.message)]
    assert len(told) == spawned and all("set save_dir=" in message for message in told)
