"""The built-in samplers with MONAI core and the older monai-generative nets and inferers (duck-typed)."""

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

import relict_callbacks as rc
from relict_callbacks.integrations.samplers import DiffusionSampler, GANSampler, LatentDiffusionSampler
from relict_callbacks.monitor import Monitor, SamplerError

COMMON = dict(spatial_dims=2, attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)


def nets(package: str):
    if package == "monai":
        from monai.inferers import DiffusionInferer, LatentDiffusionInferer
        from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    else:
        pytest.importorskip("generative")
        from generative.inferers import DiffusionInferer, LatentDiffusionInferer
        from generative.networks.nets import AutoencoderKL, DiffusionModelUNet
    widths = {"channels" if package == "monai" else "num_channels": (8, 8)}  # the older package's name
    return ({**COMMON, **widths}, DiffusionModelUNet, AutoencoderKL, DiffusionInferer, LatentDiffusionInferer)


def monitor_for(sampler, size: int) -> Monitor:
    monitor = Monitor(levels=[rc.VoxelLevel()], sampler=sampler, num_samples=2, alpha=0.2)
    monitor.prepare(rc.data.make_phantoms(6, ndim=2, size=size), progress=False)
    return monitor


@pytest.mark.parametrize("package", ["monai", "generative"])
@pytest.mark.parametrize("scheduler", [DDPMScheduler, DDIMScheduler])
def test_diffusion_sampler_draws_the_same_samples_every_check(package, scheduler):
    options, unet_class, _, inferer_class, _ = nets(package)
    unet = unet_class(in_channels=1, out_channels=1, **options)
    training = scheduler(num_train_timesteps=20)
    sampler = DiffusionSampler(training, (1, 16, 16), num_inference_steps=4, inferer=inferer_class(training))
    monitor = monitor_for(sampler, 16)
    unet.train()
    first, _ = monitor.draw(unet)
    second, _ = monitor.draw(unet)
    assert first.shape == (2, 1, 16, 16) and torch.equal(first, second)
    assert unet.training and all(m.training for m in unet.modules())
    assert len(training.timesteps) == 20  # the training scheduler was not re-stepped


@pytest.mark.parametrize("package", ["monai", "generative"])
def test_latent_diffusion_sampler_decodes_latents(package):
    options, unet_class, vae_class, _, latent_inferer_class = nets(package)
    model = torch.nn.Module()
    model.unet = unet_class(in_channels=2, out_channels=2, **options)
    model.vae = vae_class(in_channels=1, out_channels=1, latent_channels=2, **options)
    scheduler = DDIMScheduler(num_train_timesteps=20)
    sampler = LatentDiffusionSampler("vae", scheduler, (2, 8, 8), num_inference_steps=3, network="unet",
                                     inferer=latent_inferer_class(scheduler, scale_factor=1.0))
    images, labels = monitor_for(sampler, 16).draw(model)
    assert images.shape == (2, 1, 16, 16) and labels is None and model.vae.training


def test_generated_masks_come_back_as_labels():
    generator = torch.nn.Sequential(torch.nn.Linear(4, 2 * 16 * 16), torch.nn.Unflatten(1, (2, 16, 16)))
    images, labels = monitor_for(GANSampler(4, label_channels=1), 16).draw(generator)
    assert images.shape == (2, 1, 16, 16) and labels.shape == (2, 1, 16, 16) and labels.dtype == torch.uint8


def test_missing_network_attribute_is_named():
    sampler = DiffusionSampler(DDIMScheduler(num_train_timesteps=20), (1, 16, 16), network="unet")
    with pytest.raises(SamplerError, match="has no attribute 'unet'"):
        monitor_for(sampler, 16).draw(torch.nn.Linear(2, 2))
