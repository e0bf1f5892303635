"""The W&B sink in a real Lightning fit with an offline WandbLogger, read back from the run file."""

import json

import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning_models import TinyGAN, TurnsCopier, loader, phantoms, trainer
from PIL import Image
from wandb_records import history, of_type, read_records

import relict_callbacks as rc
from relict_callbacks.integrations.lightning import ReplicaMonitor
from relict_callbacks.integrations.wandb import WandbSink, view_uint8

wandb = pytest.importorskip("wandb")


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path
    wandb.finish()


def fit_with_wandb(tmp_path):
    train = phantoms(8)
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=4, alpha=0.1, max_replica_rate=0.4, patience=2,
                             gallery_size=3, progress=False)
    logger = WandbLogger(offline=True, save_dir=tmp_path, project="relict-test")
    trainer(tmp_path, 6, [monitor], logger=logger).fit(TurnsCopier(train, copy_from=1), loader(train))
    wandb.finish()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    return monitor, run_dir, read_records(next(run_dir.glob("run-*.wandb")))


def gallery_logs(records):
    return [h for h in history(records) if "relict/gallery/_type" in h or "relict/gallery" in h]


def test_metrics_histograms_gallery_and_alerts_reach_wandb(wandb_dir):
    monitor, run_dir, records = fit_with_wandb(wandb_dir)
    logs = gallery_logs(records)
    assert [h["epoch"] for h in logs] == [0, 1, 2]  # one per check; the third check stops training
    for key in ("relict/replica_rate", "relict/voxel/replica_rate", "relict/voxel/nn_similarity_mean",
                "relict/voxel/nn_similarity_max", "relict/voxel/copy_z"):
        assert [h[key] for h in logs] == pytest.approx([e[key] for e in monitor.history])
    assert logs[1]["relict/voxel/similarity/_type"] == "histogram"
    assert sum(logs[1]["relict/voxel/similarity/values"]) == 4
    assert logs[0]["relict/histograms/_type"] == "image-file"
    assert (run_dir / "files" / logs[0]["relict/histograms/path"]).exists()

    metrics = {m.name: m for m in of_type(records, "metric") if m.name}
    assert metrics["relict/replica_rate"].step_metric == "epoch" and metrics["relict/replica_rate"].summary.max
    assert any(m.glob_name == "relict/*" and m.step_metric == "epoch" for m in of_type(records, "metric"))

    table = json.loads((run_dir / "files" / logs[1]["relict/gallery/path"]).read_text())
    assert table["columns"] == ["epoch", "sample", "replica", "voxel_similarity", "voxel_nearest_id",
                                "voxel_transform", "synthetic", "nearest_training", "abs_difference"]
    assert len(table["data"]) == 3 and all(row[2] is True and row[4].startswith("train-") for row in table["data"])
    assert all(row[5] == "identity" or "flip" in row[5] or "shift" in row[5] for row in table["data"])
    images = [c for a in of_type(records, "artifact") if a.type == "run_table" for c in a.manifest.contents
              if c.path.endswith(".png")]
    assert len(images) >= 3 * 3  # sample, nearest and difference for each row (identical PNGs are stored once)

    alerts = [(a.title, a.text, a.level) for a in of_type(records, "alert")]
    assert alerts == [("Replica rate above limit", "replica rate 1.00 (lower bound 0.47) > 0.40 at epoch 1: samples "
                       "copy training patients", "WARN"),
                      ("Training stopped: memorization", "replica rate 1.00 (lower bound 0.47) > 0.40 for 2 checks at "
                       "epoch 2", "ERROR")]
    assert [h["relict/replica_rate_high"] for h in logs] == pytest.approx([e["relict/replica_rate_high"]
                                                                           for e in monitor.history])


class Capture:
    """A sink that keeps the checks, to rebuild exactly the training images a gallery would show."""

    def __init__(self) -> None:
        self.checks = []

    def log_check(self, check, monitor, trainer=None) -> None:
        self.checks.append(check)


@pytest.mark.parametrize("log_training_images", [True, False])
def test_training_images_reach_wandb_only_when_allowed(wandb_dir, log_training_images):
    train, capture = phantoms(8), Capture()
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=4, alpha=0.1, gallery_size=3,
                             log_training_images=log_training_images, sinks=[capture], progress=False)
    logger = WandbLogger(offline=True, save_dir=wandb_dir, project="relict-test")
    trainer(wandb_dir, 2, [monitor], logger=logger).fit(TinyGAN(), loader(train))
    wandb.finish()
    run_dir = next((wandb_dir / "wandb").glob("offline-run-*"))
    records = read_records(next(run_dir.glob("run-*.wandb")))
    table = json.loads((run_dir / "files" / gallery_logs(records)[0]["relict/gallery/path"]).read_text())
    assert ("nearest_training" in table["columns"]) is log_training_images
    assert all(row[4].startswith("train-") for row in table["data"])  # ids and scores are always there
    logged = [np.asarray(Image.open(c.local_path)) for a in of_type(records, "artifact")
              for c in a.manifest.contents if c.path.endswith(".png")]
    monitor.monitor.log_training_images = True  # the training images these galleries would have shown
    training_views = [view_uint8(row.nearest) for check in capture.checks for row in monitor.monitor.gallery(check)]
    assert len(training_views) == 2 * 3
    shown = [any(np.array_equal(image, view) for image in logged) for view in training_views]
    assert all(shown) if log_training_images else not any(shown)


def test_wandb_failure_never_stops_training(tmp_path, caplog):
    train = phantoms(8)
    broken = WandbSink(run=object())  # not a run: every call fails
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=4, alpha=0.1, sinks=[broken], progress=False)
    fit = trainer(tmp_path, 3, [monitor])
    fit.fit(TurnsCopier(train, copy_from=1), loader(train))
    assert fit.current_epoch == 3 and len(monitor.history) == 3 and broken.failed
    assert caplog.text.count("W&B logging failed") == 1


def test_tensorboard_gets_gallery_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train = phantoms(8)
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=4, alpha=0.1, progress=False)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, 2, [monitor], logger=logger).fit(TurnsCopier(train, copy_from=1), loader(train))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0}).Reload()
    assert {"relict/gallery", "relict/histograms"} <= set(events.Tags()["images"])
    assert "relict/voxel/similarity" in events.Tags()["histograms"]
    assert [e.value for e in events.Scalars("relict/replica_rate")] == [0.0, 1.0]


def test_each_check_makes_its_pictures_once_for_the_png_tensorboard_and_wandb(wandb_dir, monkeypatch):
    """One gallery and one of each figure per check, whatever shows them: the PNG file, TensorBoard and W&B get the
    same pictures (each sink used to make its own: three galleries and four figures per check)."""
    from matplotlib.figure import Figure
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from relict_callbacks.gallery import png_to_array
    from relict_callbacks.monitor import presentation

    made = {"galleries": 0, "figures": 0}

    def counted(function, key):
        def call(*args, **kwargs):
            made[key] += 1
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(presentation, "gallery_rows", counted(presentation.gallery_rows, "galleries"))
    monkeypatch.setattr(Figure, "__init__", counted(Figure.__init__, "figures"))
    train = phantoms(8)
    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=3, alpha=0.1, gallery_size=2,
                             save_dir=wandb_dir / "relict", progress=False)
    loggers = [TensorBoardLogger(wandb_dir, name="tb"), WandbLogger(offline=True, save_dir=wandb_dir,
                                                                    project="relict-test")]
    trainer(wandb_dir, 2, [monitor], logger=loggers).fit(TurnsCopier(train, copy_from=1), loader(train))
    wandb.finish()
    assert len(monitor.history) == 2 and made == {"galleries": 2, "figures": 2 * 2}  # a gallery and a histogram

    events = EventAccumulator(loggers[0].log_dir, size_guidance={"images": 0}).Reload()
    shown = {tag: [png_to_array(image.encoded_image_string) for image in events.Images(tag)]
             for tag in ("relict/gallery", "relict/histograms")}
    for epoch, gallery in enumerate(shown["relict/gallery"]):
        saved = Image.open(wandb_dir / "relict" / f"gallery-epoch={epoch}.png")
        assert np.array_equal(gallery, np.asarray(saved)[..., :3])
    run_dir = next((wandb_dir / "wandb").glob("offline-run-*"))
    logs = gallery_logs(read_records(next(run_dir.glob("run-*.wandb"))))
    sent = [np.asarray(Image.open(run_dir / "files" / log["relict/histograms/path"]))[..., :3] for log in logs]
    assert len(sent) == len(shown["relict/histograms"]) == 2
    assert all(np.array_equal(a, b) for a, b in zip(sent, shown["relict/histograms"]))
