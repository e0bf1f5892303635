"""Samplers for the monitor: ``sampler(model, num_samples, generator) -> images`` or ``-> (images, labels)``.

``model`` is what the framework hands over: the LightningModule (Lightning) or the engine's network (MONAI). Each
sampler finds its networks on it by attribute name (``network="unet"``), takes them as modules, or uses the model
itself. They are duck-typed: MONAI core's ``DiffusionModelUNet``/``DiffusionInferer`` and the older
``monai-generative`` nets and inferers both work, with either package's schedulers. The monitor calls samplers in
eval mode, without gradients and with a seeded, forked RNG, so every check draws the same noise.

Devices and precision: noise is drawn with the check's generator on its device (the monitor's is a CPU generator:
the same noise whatever the model's device) in float32 (the same noise whatever the model's precision), then moved
to the network's device and cast to its dtype, so ``bf16-true``/``16-true`` networks get bf16/fp16 noise;
``*-mixed`` networks keep float32 weights and sample in reduced precision inside the autocast region the monitor
opens, as their training step does (Lightning's ``16-mixed``/``bf16-mixed``, MONAI's ``amp=True``). Scheduler
timesteps stay on the CPU, as MONAI's inferers expect (``DiffusionInferer.sample`` concatenates them with a CPU
tensor); the network gets each one on its device.
"""

from __future__ import annotations

import contextlib
import copy

import torch


def _part(model, part, what: str):
    """``part`` as a module: ``None`` -> the model, a string -> that attribute of the model, else ``part`` itself."""
    if part is None:
        return model
    if isinstance(part, str):
        if not hasattr(model, part):
            raise AttributeError(f"{type(model).__name__} has no attribute {part!r} (the {what})")
        return getattr(model, part)
    return part


def _placement(module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a module's first floating-point parameter (CPU and float32 when it has none)."""
    parameters = module.parameters() if isinstance(module, torch.nn.Module) else ()
    parameter = next((p for p in parameters if p.is_floating_point()), None)
    return (parameter.device, parameter.dtype) if parameter is not None else (torch.device("cpu"), torch.float32)


def _noise(shape, generator: torch.Generator, placement: tuple[torch.device, torch.dtype]) -> torch.Tensor:
    """Standard normal noise drawn in float32 with ``generator``, then moved to the network's device and dtype."""
    device, dtype = placement
    return torch.randn(shape, generator=generator, device=generator.device).to(device=device, dtype=dtype)


def _split_labels(images: torch.Tensor, label_channels: int):
    """Images whose last ``label_channels`` channels are generated masks -> ``(images, binary labels)``."""
    if not label_channels:
        return images
    return images[:, :-label_channels], (images[:, -label_channels:] > 0.5).to(torch.uint8)


class _SchedulerSampler:
    """Shared set-up of the diffusion samplers: a private copy of the scheduler with its inference steps."""

    def __init__(self, scheduler, num_inference_steps: int | None, label_channels: int) -> None:
        self.scheduler = copy.deepcopy(scheduler)  # set_timesteps must not change the training scheduler
        self.num_inference_steps, self.label_channels = num_inference_steps, label_channels

    def _set_timesteps(self) -> None:
        """Set the inference steps, leaving the timesteps on the CPU (MONAI's inferers concatenate them with a
        CPU tensor; the network gets each timestep moved to its own device)."""
        if self.num_inference_steps is not None:
            self.scheduler.set_timesteps(self.num_inference_steps)
        if isinstance(getattr(self.scheduler, "timesteps", None), torch.Tensor):
            self.scheduler.timesteps = self.scheduler.timesteps.cpu()


class DiffusionSampler(_SchedulerSampler):
    """Sample a diffusion model with a MONAI ``DiffusionInferer`` and a DDPM/DDIM scheduler.

    Args:
        scheduler: ``DDPMScheduler``/``DDIMScheduler`` (MONAI core or compatible); copied, so the training
            scheduler is left untouched.
        image_shape: ``(C, *spatial)`` of one sample (the noise shape).
        num_inference_steps: denoising steps per sample (``None``: the scheduler's own setting).
        network: where the denoiser is: attribute name on the model, a module, or ``None`` for the model itself.
        inferer: a ``DiffusionInferer``; default MONAI's, built on the scheduler.
        label_channels: the last channels of each sample are generated masks, returned as labels.

    >>> import torch
    >>> from monai.networks.nets import DiffusionModelUNet
    >>> from monai.networks.schedulers import DDIMScheduler
    >>> unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8),
    ...                           attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)
    >>> sampler = DiffusionSampler(DDIMScheduler(num_train_timesteps=100), (1, 16, 16), num_inference_steps=5)
    >>> sampler(unet, 2, torch.Generator().manual_seed(0)).shape
    torch.Size([2, 1, 16, 16])
    """

    def __init__(self, scheduler, image_shape, num_inference_steps: int | None = None, network=None, inferer=None,
                 label_channels: int = 0) -> None:
        super().__init__(scheduler, num_inference_steps, label_channels)
        self.image_shape, self.network = tuple(image_shape), network
        if inferer is None:
            from monai.inferers import DiffusionInferer

            inferer = DiffusionInferer(self.scheduler)
        self.inferer = inferer

    def __call__(self, model, num_samples: int, generator: torch.Generator):
        unet = _part(model, self.network, "diffusion network")
        self._set_timesteps()
        noise = _noise((num_samples, *self.image_shape), generator, _placement(unet))
        images = self.inferer.sample(input_noise=noise, diffusion_model=unet, scheduler=self.scheduler, verbose=False)
        return _split_labels(images, self.label_channels)


class LatentDiffusionSampler(_SchedulerSampler):
    """Sample a latent diffusion model: denoise in the autoencoder's latent space, then decode.

    Args:
        autoencoder: the ``AutoencoderKL``/``VQVAE`` (attribute name on the model, or a module).
        scheduler, num_inference_steps, network, label_channels: as for :class:`DiffusionSampler`.
        latent_shape: ``(C, *spatial)`` of one latent.
        scale_factor: the latent scaling used in training (``LatentDiffusionInferer(scale_factor=...)``).
        inferer: a ``LatentDiffusionInferer``; default MONAI's.

    >>> import torch
    >>> from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    >>> from monai.networks.schedulers import DDIMScheduler
    >>> vae = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8), latent_channels=2,
    ...                     attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)
    >>> unet = DiffusionModelUNet(spatial_dims=2, in_channels=2, out_channels=2, channels=(8, 8),
    ...                           attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)
    >>> sampler = LatentDiffusionSampler(vae, DDIMScheduler(num_train_timesteps=100), (2, 8, 8),
    ...                                  num_inference_steps=3)
    >>> sampler(unet, 2, torch.Generator().manual_seed(0)).shape
    torch.Size([2, 1, 16, 16])
    """

    def __init__(self, autoencoder, scheduler, latent_shape, num_inference_steps: int | None = None,
                 scale_factor: float = 1.0, network=None, inferer=None, label_channels: int = 0) -> None:
        super().__init__(scheduler, num_inference_steps, label_channels)
        self.autoencoder, self.latent_shape, self.network = autoencoder, tuple(latent_shape), network
        if inferer is None:
            from monai.inferers import LatentDiffusionInferer

            inferer = LatentDiffusionInferer(self.scheduler, scale_factor=scale_factor)
        self.inferer = inferer

    def __call__(self, model, num_samples: int, generator: torch.Generator):
        unet = _part(model, self.network, "diffusion network")
        autoencoder = _part(model, self.autoencoder, "autoencoder")
        self._set_timesteps()
        was_training = autoencoder.training  # the autoencoder may not be part of `model`, so restore it here
        autoencoder.eval()
        try:
            noise = _noise((num_samples, *self.latent_shape), generator, _placement(unet))
            with _decoding_where_it_is(autoencoder):
                images = self.inferer.sample(input_noise=noise, autoencoder_model=autoencoder, diffusion_model=unet,
                                             scheduler=self.scheduler, verbose=False)
        finally:
            autoencoder.train(was_training)
        return _split_labels(images, self.label_channels)


@contextlib.contextmanager
def _decoding_where_it_is(autoencoder):
    """Inside, ``autoencoder.decode_stage_2_outputs`` takes latents from anywhere: they are moved to its own device
    and dtype first. The diffusion network's may differ: an autoencoder kept outside the LightningModule (training on
    precomputed latents) stays on the CPU in float32 under ``bf16-true``. The inferer still gets the autoencoder
    itself (it checks its class, e.g. for SPADE)."""
    decode, placement = autoencoder.decode_stage_2_outputs, _placement(autoencoder)
    own = vars(autoencoder).get("decode_stage_2_outputs")  # one the user set on the instance, kept

    def moved(latents, *args, **kwargs):
        return decode(latents.to(*placement), *args, **kwargs)

    autoencoder.decode_stage_2_outputs = moved
    try:
        yield
    finally:
        if own is None:
            del autoencoder.decode_stage_2_outputs  # the class's method again
        else:
            autoencoder.decode_stage_2_outputs = own


class GANSampler:
    """Sample a GAN generator from Gaussian latents: ``generator(z)`` with ``z ~ N(0, 1)`` of ``latent_shape``.

    Args:
        latent_shape: shape of one latent, e.g. ``64`` or ``(64,)`` for vectors, ``(8, 4, 4)`` for maps.
        network: the generator (attribute name on the model, a module, or ``None`` for the model itself).
        label_channels: the last channels of each output are generated masks, returned as labels.

    >>> import torch
    >>> generator = torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.Unflatten(1, (1, 16, 16)))
    >>> GANSampler(8)(generator, 3, torch.Generator().manual_seed(0)).shape
    torch.Size([3, 1, 16, 16])
    """

    def __init__(self, latent_shape, network=None, label_channels: int = 0) -> None:
        self.latent_shape = (latent_shape,) if isinstance(latent_shape, int) else tuple(latent_shape)
        self.network, self.label_channels = network, label_channels

    def __call__(self, model, num_samples: int, generator: torch.Generator):
        network = _part(model, self.network, "generator network")
        images = network(_noise((num_samples, *self.latent_shape), generator, _placement(network)))
        return _split_labels(images, self.label_channels)
