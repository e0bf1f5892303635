"""ReplicaMonitorHandler on real MONAI engines: metrics, termination, checkpoint choice, resume and faults."""

import json
import logging
import runpy
from pathlib import Path

import pytest
import torch
from faults import bad_sampler
from ignite.engine import Events
from monai.handlers import CheckpointLoader, CheckpointSaver, EarlyStopHandler
from monai.networks.schedulers import DDIMScheduler
from monai_engines import LATENT, SIZE, STEPS, copier_trainer, ddpm_trainer, gan_trainer, phantoms

import relict_callbacks as rc
from relict_callbacks.integrations.monai import ReplicaMonitorHandler
from relict_callbacks.integrations.samplers import DiffusionSampler, GANSampler
from relict_callbacks.monitor import SamplerError, StopReason

KEYS = {"relict/replica_rate", "relict/voxel/replica_rate", "relict/voxel/nn_similarity_mean",
        "relict/voxel/nn_similarity_max", "relict/voxel/copy_z"}
pytestmark = pytest.mark.usefixtures("one_thread")


def metrics_per_epoch(trainer) -> list[dict]:
    """What handlers attached after the ReplicaMonitorHandler see in ``engine.state.metrics`` at each epoch end."""
    seen = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: seen.append(dict(engine.state.metrics)))
    return seen


def test_public_name_resolves():
    assert rc.ReplicaMonitorHandler is ReplicaMonitorHandler


def test_the_handler_samples_the_network_inside_its_wrappers():
    """``SupervisedTrainer(compile=True)`` compiles the (DDP- or DataParallel-wrapped) network: the sampler gets the
    network itself, so sampling runs no collective and no graph compiled for training is compiled again."""
    from relict_callbacks.integrations.monai import _unwrapped

    network = torch.nn.Linear(2, 2)
    assert _unwrapped(torch.compile(torch.nn.DataParallel(torch.compile(network)))) is network
    assert _unwrapped(network) is network


def test_ddpm_supervised_trainer_publishes_metrics_every_epoch(tmp_path):
    relict = ReplicaMonitorHandler(
        levels=[rc.VoxelLevel()], holdout=phantoms(8, seed=1, prefix="holdout"), num_samples=4, interval=2,
        alpha=0.1, save_dir=tmp_path / "relict", progress=False,
        sampler=DiffusionSampler(DDIMScheduler(num_train_timesteps=STEPS), (1, SIZE, SIZE), num_inference_steps=2))
    trainer = ddpm_trainer(phantoms(8), 3, [relict])
    seen = metrics_per_epoch(trainer)
    trainer.run()

    assert len(relict.monitor.bank) == 8  # built from the engine's data_loader.dataset
    assert [entry["epoch"] for entry in relict.history] == [0, 1]
    assert all(entry["error"] is None and KEYS <= entry.keys() for entry in relict.history)
    assert all(KEYS <= epoch.keys() for epoch in seen)
    rates = [epoch["relict/voxel/nn_similarity_max"] for epoch in seen]
    checked = [entry["relict/voxel/nn_similarity_max"] for entry in relict.history]
    assert rates == [checked[0], checked[1], checked[1]]  # epoch 2 carries epoch 1's check
    saved = json.loads((tmp_path / "relict" / "history.json").read_text())
    assert [entry["epoch"] for entry in saved] == [0, 1]


def test_gan_trainer_terminates_when_samples_count_as_replicas(caplog):
    relict = ReplicaMonitorHandler(levels=[rc.VoxelLevel()], sampler=GANSampler(LATENT), thresholds={"voxel": -1.0},
                                   num_samples=4, interval=2, max_replica_rate=0.4, patience=2, progress=False)
    trainer = gan_trainer(phantoms(8), 10, [relict])
    with caplog.at_level(logging.INFO):
        trainer.run()
    assert [entry["epoch"] for entry in relict.history] == [0, 1]
    assert trainer.state.epoch == 2 and relict.stopped_epoch == 1
    assert relict.stopping_reason is StopReason.RATE_ABOVE_LIMIT
    assert relict.stopping_reason_message == "replica rate 1.00 (lower bound 0.47) > 0.40 for 2 checks at epoch 1"
    assert ("terminating training after engine epoch 2: replica rate 1.00 (lower bound 0.47) > 0.40 for 2 checks at "
            "epoch 1" in caplog.text)


def test_checkpoint_saver_keeps_the_lowest_replica_rate(tmp_path):
    train = phantoms(8)
    relict = ReplicaMonitorHandler(levels=[rc.VoxelLevel()], holdout=phantoms(8, seed=1, prefix="holdout"),
                                   num_samples=4, alpha=0.1, max_replica_rate=0.6, stop_on="rising", min_delta=0.1,
                                   checkpoint_dirs=[tmp_path / "ckpt"], progress=False)
    trainer = copier_trainer(train, 10, [], copy_from=3)
    best = CheckpointSaver(tmp_path / "ckpt", {"net": trainer.network, "relict": relict}, save_key_metric=True,
                           key_metric_name="relict/replica_rate", key_metric_negative_sign=True)
    stop = EarlyStopHandler(patience=4, score_function=lambda engine: -engine.state.metrics["relict/replica_rate"],
                            trainer=trainer)
    for handler in (relict, best, stop):  # the relict handler first: the others read its metrics
        handler.attach(trainer)
    trainer.run()

    assert [(e["epoch"], e["relict/replica_rate"]) for e in relict.history] == [(0, 0.0), (1, 0.0), (2, 0.0),
                                                                                 (3, 1.0)]
    assert relict.stopping_reason is StopReason.RATE_RISING and trainer.state.epoch == 4
    files = list((tmp_path / "ckpt").iterdir())
    assert len(files) == 1  # the first checkpoint with the lowest rate; later ties do not replace it
    assert relict.safe_checkpoint() == str(files[0])
    assert [e["checkpoint"] is not None for e in relict.history] == [True, False, False, False]
    kept = torch.load(files[0], weights_only=True)  # plain values only: MONAI's CheckpointLoader can read it
    assert [e["epoch"] for e in kept["relict"]["history"]] == [0]


def test_a_rewritten_checkpoint_belongs_to_the_latest_check(tmp_path):
    train = phantoms(8)
    relict = ReplicaMonitorHandler(levels=[rc.VoxelLevel()], num_samples=4, alpha=0.1, max_replica_rate=0.6,
                                   checkpoint_dirs=[tmp_path / "ckpt"], progress=False)
    trainer = copier_trainer(train, 4, [relict], copy_from=3)
    # the trainer's state in the file says which step it holds (the handler's own state would too)
    CheckpointSaver(tmp_path / "ckpt", {"net": trainer.network, "trainer": trainer}, save_key_metric=True,
                    key_metric_name="relict/replica_rate", key_metric_negative_sign=True,
                    key_metric_filename="best.pt", key_metric_greater_or_equal=True).attach(trainer)
    trainer.run()
    assert [e["relict/replica_rate"] for e in relict.history] == [0.0, 0.0, 0.0, 1.0]
    # best.pt was written at epochs 0, 1 and 2 (ties replace it): it holds epoch 2's weights now
    assert [e["checkpoint"] for e in relict.history] == [None, None, str(tmp_path / "ckpt" / "best.pt"), None]
    assert relict.safe_checkpoint() == str(tmp_path / "ckpt" / "best.pt")


def test_resume_through_checkpoint_saver_and_loader(tmp_path):
    train = phantoms(8)

    def run(max_epochs: int, load_path=None):
        relict = ReplicaMonitorHandler(levels=[rc.VoxelLevel()], num_samples=4, alpha=0.1, max_replica_rate=0.4,
                                       patience=3, cache_dir=tmp_path / "cache", seed=3, progress=False)
        trainer = copier_trainer(train, max_epochs, [relict], copy_from=1)
        objects = {"trainer": trainer, "net": trainer.network, "opt": trainer.optimizer, "relict": relict}
        CheckpointSaver(tmp_path / "ckpt", objects, save_interval=1).attach(trainer)
        if load_path is not None:
            CheckpointLoader(str(load_path), objects).attach(trainer)
        trainer.run()
        return relict

    first = run(3)
    assert [e["relict/replica_rate"] for e in first.history] == [0.0, 1.0, 1.0]
    assert first.monitor.stop.wait["limit"] == 2 and first.stopping_reason is StopReason.NOT_STOPPED

    resumed = run(10, tmp_path / "ckpt" / "checkpoint_epoch=3.pt")
    assert "reused cached bank" in resumed.monitor.bank.cache_message
    assert [e["epoch"] for e in resumed.history] == [0, 1, 2, 3]  # one more check was enough: patience carried over
    assert resumed.stopping_reason is StopReason.RATE_ABOVE_LIMIT and resumed.monitor.seed == 3
    assert resumed.stopping_reason_message == "replica rate 1.00 (lower bound 0.47) > 0.40 for 3 checks at epoch 3"


class RecordingSink:
    def __init__(self) -> None:
        self.epochs = []

    def log_check(self, check, monitor, engine):
        self.epochs.append((check.epoch, engine.state.epoch, monitor.num_samples))


class BrokenSink:
    def log_check(self, check, monitor, engine):
        raise ConnectionError("no network")


def test_check_on_completed_tensorboard_and_sinks(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer, sink = SummaryWriter(tmp_path / "tb"), RecordingSink()
    relict = ReplicaMonitorHandler(levels=[rc.VoxelLevel()], num_samples=4, interval=3, alpha=0.1,
                                   check_on_completed=True, summary_writer=writer, sinks=[BrokenSink(), sink],
                                   progress=False)
    trainer = copier_trainer(phantoms(8), 4, [relict])
    trainer.run()
    writer.close()
    assert [e["epoch"] for e in relict.history] == [0, 2, 3]  # the last epoch is checked on completion
    assert sink.epochs == [(0, 1, 4), (2, 3, 4), (3, 4, 4)]  # a failing sink does not keep the others from logging
    assert "BrokenSink failed to log the check at engine epoch 1: no network" in caplog.text
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert KEYS <= set(events.Tags()["scalars"])
    assert "relict/gallery" in events.Tags()["images"]  # the TensorBoardSink added for the writer
    assert [event.step for event in events.Scalars("relict/replica_rate")] == [1, 3, 4]  # engine epochs of the checks


@pytest.mark.parametrize("kind, message", [("raises", "raised RuntimeError: CUDA out of memory"),
                                           ("nan", "non-finite values (NaN/inf) in sample(s) [1]"),
                                           ("shape", "returned shape (4, 1, 16)")])
def test_failing_sampler_is_logged_and_training_goes_on(kind, message, caplog):
    relict = ReplicaMonitorHandler(levels=[rc.VoxelLevel()], sampler=bad_sampler(kind), num_samples=4, alpha=0.1,
                                   progress=False)
    trainer = copier_trainer(phantoms(8), 2, [relict])
    trainer.run()
    assert trainer.state.epoch == 2  # trained to the end
    assert [e["epoch"] for e in relict.history] == [0, 1]
    assert all(message in e["error"] for e in relict.history)
    published = trainer.state.metrics  # no check succeeded: "not certified" (1.0), flagged, never missing or NaN
    assert published["relict/replica_rate"] == 1.0 and published["relict/checked"] == 0
    assert published["relict/check_failed"] == 1 and "relict/voxel/replica_rate" not in published
    assert "check at epoch 0 skipped, training goes on" in caplog.text


def test_strict_mode_raises():
    relict = ReplicaMonitorHandler(levels=[rc.VoxelLevel()], sampler=bad_sampler("nan"), num_samples=4, alpha=0.1,
                                   strict=True, progress=False)
    with pytest.raises(SamplerError, match="non-finite"):
        copier_trainer(phantoms(8), 2, [relict]).run()


def test_example_runs(tmp_path, capsys):
    main = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "monai_engine_ddpm.py"))["main"]

    relict = main(tmp_path, max_epochs=2, interval=1, steps_per_epoch=2, progress=False)
    printed = capsys.readouterr().out
    assert [e["epoch"] for e in relict.history] == [0, 1]
    assert "replica rate" in printed and "checkpoint" in printed
    assert (tmp_path / "history.json").exists()
