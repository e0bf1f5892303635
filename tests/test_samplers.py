"""The built-in samplers with MONAI core and the older monai-generative nets and inferers (duck-typed), on any
device and in any precision: networks on the ``meta`` device (shape-only; a CPU tensor mixed in raises as CUDA
would) in float32, bfloat16 and float16, and real CPU runs in bfloat16 under a Lightning Trainer."""

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

import relict_callbacks as rc
from relict_callbacks.integrations.samplers import DiffusionSampler, GANSampler, LatentDiffusionSampler
from relict_callbacks.monitor import SamplerError
from relict_callbacks.monitor.sampling import default_sampler, draw_samples

from conftest import DEVICES
from lightning_models import SIZE, TinyDDPM, loader, phantoms, trainer

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


PRECISIONS = [torch.float32, torch.bfloat16, torch.float16]  # fp32, bf16-true, 16-true


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


@pytest.mark.parametrize("unet_dtype, autoencoder_dtype", [(torch.bfloat16, torch.float32),
                                                             (torch.float32, torch.bfloat16)])
def test_latent_diffusion_decodes_with_an_autoencoder_in_another_precision(unet_dtype, autoencoder_dtype):
    """An autoencoder kept outside the LightningModule keeps its own precision (and device) when the diffusion
    network is cast: the latents are moved to it to be decoded (a dtype mismatch raised before)."""
    options, unet_class, autoencoder_class, _, _ = nets("monai")
    autoencoder = autoencoder_class(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8), latent_channels=2,
                                    attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)
    unet = unet_class(in_channels=2, out_channels=2, **options).to(unet_dtype)
    sampler = LatentDiffusionSampler(autoencoder.to(autoencoder_dtype), DDIMScheduler(num_train_timesteps=20),
                                     (2, 8, 8), num_inference_steps=2)
    images, _ = draw(sampler, unet)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    assert "decode_stage_2_outputs" not in vars(autoencoder)  # its own method again


def test_generated_masks_come_back_as_labels():
    generator = torch.nn.Sequential(torch.nn.Linear(4, 2 * 16 * 16), torch.nn.Unflatten(1, (2, 16, 16)))
    images, labels = draw(GANSampler(4, label_channels=1), generator)
    assert images.shape == (2, 1, 16, 16) and labels.shape == (2, 1, 16, 16) and labels.dtype == torch.uint8


def test_missing_network_attribute_is_named():
    sampler = DiffusionSampler(DDIMScheduler(num_train_timesteps=20), (1, 16, 16), network="unet")
    with pytest.raises(SamplerError, match="has no attribute 'unet'"):
        draw(sampler, torch.nn.Linear(2, 2))


# -- any device, any precision: the meta device stands in for CUDA ------------------------------------------------
@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("package", ["monai", "generative"])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_diffusion_sampler_follows_the_networks_device_and_dtype(package, kind, dtype):
    options, unet_class, _, inferer_class, _ = nets(package)
    unet = unet_class(in_channels=2, out_channels=2, **options).to("meta", dtype)
    scheduler = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[kind](num_train_timesteps=20)
    sampler = DiffusionSampler(scheduler, (2, 16, 16), num_inference_steps=3, inferer=inferer_class(scheduler),
                               label_channels=1)
    images, labels = sampler(unet, 2, torch.Generator().manual_seed(0))
    assert images.device.type == "meta" and images.dtype == dtype and images.shape == (2, 1, 16, 16)
    assert labels.device.type == "meta" and labels.shape == (2, 1, 16, 16)
    assert sampler.scheduler.timesteps.device.type == "cpu"  # MONAI's inferer concatenates them with a CPU tensor


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("package", ["monai", "generative"])
def test_latent_diffusion_sampler_follows_the_networks_device_and_dtype(package, dtype):
    options, unet_class, vae_class, _, latent_inferer_class = nets(package)
    model = torch.nn.Module()
    model.unet = unet_class(in_channels=2, out_channels=2, **options)
    model.vae = vae_class(in_channels=2, out_channels=2, latent_channels=2, **options)
    model.to("meta", dtype)
    scheduler = DDIMScheduler(num_train_timesteps=20)
    sampler = LatentDiffusionSampler("vae", scheduler, (2, 8, 8), num_inference_steps=2, network="unet",
                                     inferer=latent_inferer_class(scheduler, scale_factor=1.0), label_channels=1)
    images, labels = sampler(model, 2, torch.Generator().manual_seed(0))
    assert images.device.type == "meta" and images.dtype == dtype and images.shape == (2, 1, 16, 16)
    assert labels.shape == (2, 1, 16, 16)


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_gan_sampler_follows_the_networks_device_and_dtype(dtype):
    generator = torch.nn.Sequential(torch.nn.Linear(4, 2 * 8 * 8), torch.nn.Unflatten(1, (2, 8, 8))).to("meta", dtype)
    images, labels = GANSampler(4, label_channels=1)(generator, 3, torch.Generator().manual_seed(0))
    assert images.device.type == "meta" and images.dtype == dtype and images.shape == (3, 1, 8, 8)
    assert labels.device.type == "meta" and labels.shape == (3, 1, 8, 8)


def test_noise_is_the_same_in_every_precision():
    """Drawn in float32, then cast: a bf16 model sees the float32 model's noise, rounded."""
    generator = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(4, 4))
    generator[1].weight.data, generator[1].bias.data = torch.eye(4), torch.zeros(4)
    full = GANSampler(4)(generator, 3, torch.Generator().manual_seed(0))
    half = GANSampler(4)(generator.to(torch.bfloat16), 3, torch.Generator().manual_seed(0))
    assert half.dtype == torch.bfloat16 and torch.equal(half, full.to(torch.bfloat16))


def test_diffusion_sampler_runs_under_autocast():
    """A mixed-precision network (float32 weights) sampled inside an autocast region, as in a training step."""
    options, unet_class, _, _, _ = nets("monai")
    unet = unet_class(in_channels=1, out_channels=1, **options)
    sampler = DiffusionSampler(DDPMScheduler(num_train_timesteps=20), (1, 16, 16), num_inference_steps=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        images = sampler(unet, 2, torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images.float()).all()


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_diffusion_sampler_checks_succeed_in_a_bf16_lightning_fit(tmp_path, device, precision):
    from relict_callbacks.integrations.lightning import ReplicaMonitor

    diffusion = DiffusionSampler(DDIMScheduler(num_train_timesteps=50), (1, SIZE, SIZE), num_inference_steps=3,
                                 network="unet")
    autocast = []

    def sampler(model, n, generator):  # records whether it samples as mixed precision trains: under autocast
        autocast.append(torch.is_autocast_enabled(torch.device(device).type))
        return diffusion(model, n, generator)

    monitor = ReplicaMonitor(levels=[rc.VoxelLevel()], sampler=sampler, num_samples=2, alpha=0.2, progress=False)
    model = TinyDDPM()
    accelerator = "gpu" if device == "cuda" else "cpu"
    trainer(tmp_path, 1, [monitor], precision=precision, accelerator=accelerator).fit(model, loader(phantoms(6)))
    assert next(model.unet.parameters()).dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    assert autocast == [precision == "bf16-mixed"]
    assert [entry["error"] for entry in monitor.history] == [None]
    assert monitor.history[0]["samples"] == 2  # both bf16 samples were scored
    assert 0 <= monitor.history[0]["relict/replica_rate"] <= 1
    certified = monitor.monitor.certify(model, 3)  # after the fit: its samples drawn as the checks drew them
    assert autocast == [precision == "bf16-mixed"] * 3 and certified.num_samples == 3  # in 2 calls of at most 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", [DDPMScheduler, DDIMScheduler])
def test_diffusion_sampler_returns_samples_on_the_networks_device(device, kind):
    options, unet_class, _, _, _ = nets("monai")
    unet = unet_class(in_channels=1, out_channels=1, **options).to(device)
    sampler = DiffusionSampler(kind(num_train_timesteps=20), (1, 16, 16), num_inference_steps=3)
    images = sampler(unet, 2, torch.Generator(device=device).manual_seed(0))
    assert images.device.type == torch.device(device).type and torch.isfinite(images).all()


@pytest.mark.parametrize("device", [*DEVICES, "meta"])
def test_checks_draw_with_a_cpu_generator_whatever_the_models_device(device):
    """A sampler written as the docs show (``torch.rand(..., generator=generator)``, on the CPU) works for a model
    on any device, and draws there what it draws for a model on the CPU."""
    def sampler(model, n, generator):
        return torch.rand(n, 1, 8, 8, generator=generator)

    on_device, _ = draw(sampler, torch.nn.Linear(2, 2).to(device))
    on_cpu, _ = draw(sampler, torch.nn.Linear(2, 2))
    assert torch.equal(on_device, on_cpu)


@pytest.mark.parametrize("device", DEVICES)
def test_a_check_leaves_the_rng_of_the_models_device_as_it_was(device):
    """A scheduler's per-step noise comes from the global RNG of the network's device: seeded for the check (the
    same samples every time), and training's stream there goes on after the check as if there had been none."""
    model = torch.nn.Linear(2, 2).to(device)
    state = (lambda: torch.cuda.get_rng_state(model.weight.device)) if device == "cuda" else torch.get_rng_state

    def sampler(model, n, generator):
        return torch.randn(n, 1, 8, 8, device=model.weight.device)

    before = state()
    first, _ = draw(sampler, model)
    second, _ = draw(sampler, model)
    assert torch.equal(state(), before) and torch.equal(first, second)


class DrawsOnItsDevice(torch.nn.Module):
    """A model whose ``sample`` draws its noise where it lives with the generator it is given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def sample(self, n, generator):
        return torch.randn(n, 1, 8, 8, device=self.weight.device, generator=generator)


@pytest.mark.parametrize("device", DEVICES)
def test_a_sampler_drawing_on_the_gpu_with_the_cpu_generator_is_told_how_to_draw(device):
    """``torch.randn(..., device="cuda", generator=generator)`` fails on CUDA (the generator is a CPU one, the same
    noise on every device): the check's error says to draw on the CPU and move the noise. On the CPU, where that
    draw works, a sampler raising CUDA's message stands in for it."""
    if device == "cuda":
        model, sampler = DrawsOnItsDevice().to(device), default_sampler
    else:
        def sampler(model, n, generator):
            raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu'")
        model = DrawsOnItsDevice()
    with pytest.raises(SamplerError, match=r"generator passed to samplers is a CPU one.*\.to\(device\)"):
        draw(sampler, model)

    def own_cuda_generator(model, n, generator):  # the reverse mistake: no hint about the check's generator
        raise RuntimeError("Expected a 'cpu' device type for generator but found 'cuda'")

    with pytest.raises(SamplerError) as raised:
        draw(own_cuda_generator, model)
    assert "generator passed to samplers" not in str(raised.value)
