"""The adapters configured the way their users configure: a LightningCLI YAML (jsonargparse) and a MONAI bundle
(``monai.bundle.ConfigParser``); every Monitor option reaches both, declared once."""

import inspect

import pytest
from lightning.pytorch.cli import LightningCLI
from lightning_models import TinyDDPM, loader, phantoms
from monai.bundle import ConfigParser

import relict_callbacks as rc
from relict_callbacks.integrations.lightning import ReplicaMonitor
from relict_callbacks.integrations.monai import ReplicaMonitorHandler
from relict_callbacks.monitor import Monitor

LIGHTNING_YAML = """
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: relict_callbacks.ReplicaMonitor
      init_args:
        levels:
          - class_path: relict_callbacks.VoxelLevel
            init_args: {grid: 16, max_shift: 0}
        sampler:
          class_path: relict_callbacks.integrations.samplers.DiffusionSampler
          init_args:
            scheduler: {class_path: monai.networks.schedulers.DDIMScheduler, init_args: {num_train_timesteps: 50}}
            image_shape: [1, 16, 16]
            num_inference_steps: 3
            network: unet
        %s: 4
        alpha: 0.1
        confidence: 0.9
        max_replica_rate: 0.5
        device: cpu
        progress: false
"""


def lightning_cli(tmp_path, option: str = "num_samples") -> LightningCLI:
    config = tmp_path / "config.yaml"
    config.write_text(LIGHTNING_YAML % option)
    return LightningCLI(TinyDDPM, run=False, args=["--config", str(config)], save_config_callback=None)


def test_lightning_cli_yaml_builds_and_runs_the_callback(tmp_path):
    cli = lightning_cli(tmp_path)
    monitor = next(callback for callback in cli.trainer.callbacks if isinstance(callback, ReplicaMonitor))
    assert monitor.monitor.levels[0].max_shift == 0 and monitor.monitor.sampler.num_inference_steps == 3
    assert monitor.monitor.num_samples == 4 and monitor.monitor.scorer_options["confidence"] == 0.9
    cli.trainer.fit(cli.model, loader(phantoms(8)))
    assert [entry["epoch"] for entry in monitor.history] == [0, 1]
    assert all(entry["error"] is None and entry["samples"] == 4 for entry in monitor.history)
    assert "relict/replica_rate" in cli.trainer.callback_metrics


def test_lightning_cli_names_a_misspelled_option(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lightning_cli(tmp_path, option="num_sample")
    assert "num_sample" in capsys.readouterr().err


def bundle(**relict_options) -> dict:
    ddim = {"_target_": "monai.networks.schedulers.DDIMScheduler", "num_train_timesteps": 50}
    return {
        "imports": ["$import torch", "$import relict_callbacks"],
        "network": {"_target_": "DiffusionModelUNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 1,
                    "channels": [8, 8], "attention_levels": [False, False], "num_res_blocks": 1,
                    "norm_num_groups": 8},
        "relict": {"_target_": "relict_callbacks.ReplicaMonitorHandler", "interval": 2, "alpha": 0.1,
                   "confidence": 0.9, "max_replica_rate": 0.5, "device": "cpu", "progress": False,
                   "levels": [{"_target_": "relict_callbacks.VoxelLevel", "grid": 16, "max_shift": 0}],
                   "sampler": {"_target_": "relict_callbacks.integrations.samplers.DiffusionSampler",
                               "scheduler": ddim, "image_shape": [1, 16, 16], "num_inference_steps": 3},
                   **relict_options},
        "trainer": {"_target_": "SupervisedTrainer", "device": "cpu", "max_epochs": 3, "network": "@network",
                    "train_data_loader": "$torch.utils.data.DataLoader("
                                         "relict_callbacks.data.make_phantoms(8, ndim=2, size=16), batch_size=4)",
                    "optimizer": "$torch.optim.Adam(@network.parameters(), lr=1e-3)",
                    "loss_function": "$torch.nn.functional.mse_loss",
                    "inferer": {"_target_": "DiffusionInferer",
                                "scheduler": {"_target_": "DDPMScheduler", "num_train_timesteps": 50}},
                    "prepare_batch": {"_target_": "DiffusionPrepareBatch", "num_train_timesteps": 50},
                    "train_handlers": ["@relict"]},
    }


def test_monai_bundle_config_builds_and_runs_the_handler():
    parser = ConfigParser(bundle(num_samples=4))
    trainer = parser.get_parsed_content("trainer")
    relict = parser.get_parsed_content("relict")
    assert isinstance(relict, ReplicaMonitorHandler) and relict.monitor.every_n_epochs == 2
    assert relict.monitor.num_samples == 4 and relict.monitor.scorer_options["confidence"] == 0.9
    trainer.run()
    assert [entry["epoch"] for entry in relict.history] == [0, 1]
    assert all(entry["error"] is None and entry["samples"] == 4 for entry in relict.history)
    assert "relict/replica_rate" in trainer.state.metrics


def test_monai_bundle_names_a_misspelled_option():
    with pytest.raises(Exception) as raised:
        ConfigParser(bundle(num_sample=4)).get_parsed_content("relict")
    chain = [raised.value, raised.value.__cause__, raised.value.__context__]
    assert any("unexpected keyword argument 'num_sample'" in str(error) for error in chain)


def test_the_handlers_old_checkpoint_dir_option_points_to_checkpoint_dirs():
    with pytest.raises(TypeError, match=r"checkpoint_dir is now checkpoint_dirs.*pass checkpoint_dirs=\[folder\]"):
        ReplicaMonitorHandler(levels=[rc.VoxelLevel()], checkpoint_dir="ckpt")
    with pytest.raises(Exception) as raised:
        ConfigParser(bundle(checkpoint_dir="ckpt")).get_parsed_content("relict")
    chain = [raised.value, raised.value.__cause__, raised.value.__context__]
    assert any("pass checkpoint_dirs=[folder]" in str(error) for error in chain)
    handler = ReplicaMonitorHandler(levels=[rc.VoxelLevel()], checkpoint_dirs=["ckpt"])
    assert handler.monitor.checkpoint_dirs == ["ckpt"]


@pytest.mark.parametrize("adapter, renamed", [(ReplicaMonitor, set()), (ReplicaMonitorHandler, {"every_n_epochs"})])
def test_adapters_take_every_monitor_option_as_declared(adapter, renamed):
    options = inspect.signature(Monitor, eval_str=True).parameters
    taken = inspect.signature(adapter).parameters
    assert set(options) - set(taken) == renamed
    assert all(taken[name] == options[name] for name in set(options) - renamed)


def test_bad_option_values_are_refused_when_constructed():
    with pytest.raises(ValueError, match=r"num_samples must be in \[1, inf\], got 0"):
        ReplicaMonitor(levels=[rc.VoxelLevel()], num_samples=0)
    with pytest.raises(ValueError, match="alpha must be in"):
        ReplicaMonitorHandler(levels=[rc.VoxelLevel()], alpha=1.5)
    with pytest.raises(ValueError, match="rule must be one of"):
        ReplicaMonitor(levels=[rc.VoxelLevel()], rule="most")
    with pytest.raises(ValueError, match="every_n_epochs must be in"):
        ReplicaMonitorHandler(levels=[rc.VoxelLevel()], interval=0)
    with pytest.raises(ValueError, match=r"sinks\[0\] \(str\) has no log_check"):
        ReplicaMonitor(levels=[rc.VoxelLevel()], sinks=["wandb"])
