"""The built-in samplers with MONAI core and the older monai-generative nets and inferers (duck-typed)."""

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from relict_callbacks.integrations.samplers import DiffusionSampler, GANSampler, LatentDiffusionSampler
from relict_callbacks.monitor import SamplerError
from relict_callbacks.monitor.sampling import draw_samples

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


def draw(sampler, model):
    """Two samples the way a check draws them, expected to be 2D single-channel images."""
    return draw_samples(sampler, model, 2, seed=0, expected_shape=(1, 2))


@pytest.mark.parametrize("package", ["monai", "generative"])
@pytest.mark.parametrize("scheduler", [DDPMScheduler, DDIMScheduler])
def test_diffusion_sampler_draws_the_same_samples_every_check(package, scheduler):
    options, unet_class, _, inferer_class, _ = nets(package)
    unet = unet_class(in_channels=1, out_channels=1, **options)
    training = scheduler(num_train_timesteps=20)
    sampler = DiffusionSampler(training, (1, 16, 16), num_inference_steps=4, inferer=inferer_class(training))
    unet.train()
    first, _ = draw(sampler, unet)
    second, _ = draw(sampler, unet)
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
    images, labels = draw(sampler, model)
    assert images.shape == (2, 1, 16, 16) and labels is None and model.vae.training


def test_generated_masks_come_back_as_labels():
    generator = torch.nn.Sequential(torch.nn.Linear(4, 2 * 16 * 16), torch.nn.Unflatten(1, (2, 16, 16)))
    images, labels = draw(GANSampler(4, label_channels=1), generator)
    assert images.shape == (2, 1, 16, 16) and labels.shape == (2, 1, 16, 16) and labels.dtype == torch.uint8


def test_missing_network_attribute_is_named():
    sampler = DiffusionSampler(DDIMScheduler(num_train_timesteps=20), (1, 16, 16), network="unet")
    with pytest.raises(SamplerError, match="has no attribute 'unet'"):
        draw(sampler, torch.nn.Linear(2, 2))
