"""Tiny real MONAI engines for the handler tests: a DDPM ``SupervisedTrainer``, a ``GanTrainer``, and a trainer
whose network turns into a copier at a known epoch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import GanTrainer, SupervisedTrainer
from monai.engines.utils import DiffusionPrepareBatch
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

import relict_callbacks as rc

SIZE = 16
LATENT = 16
STEPS = 50  # diffusion training timesteps


def phantoms(n: int = 8, seed: int = 0, prefix: str = "train") -> list[dict]:
    return rc.data.make_phantoms(n, ndim=2, size=SIZE, seed=seed, id_prefix=prefix)


def loader(items, batch_size: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(items, batch_size=batch_size)


def ddpm_trainer(items, max_epochs: int, handlers, device: str = "cpu") -> SupervisedTrainer:
    """A real MONAI DDPM (``DiffusionModelUNet``, ``DiffusionInferer``, ``DiffusionPrepareBatch``) on 16x16 images."""
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8),
                              attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8).to(device)
    return SupervisedTrainer(device=torch.device(device), max_epochs=max_epochs, train_data_loader=loader(items, len(items)),
                             network=unet,
                             optimizer=torch.optim.Adam(unet.parameters(), lr=1e-3), loss_function=F.mse_loss,
                             inferer=DiffusionInferer(DDPMScheduler(num_train_timesteps=STEPS)),
                             prepare_batch=DiffusionPrepareBatch(num_train_timesteps=STEPS), train_handlers=handlers)


def gan_trainer(items, max_epochs: int, handlers) -> GanTrainer:
    """MONAI's ``GanTrainer`` with a small MLP generator (``LATENT`` -> 1x16x16) and discriminator."""
    generator = torch.nn.Sequential(torch.nn.Linear(LATENT, 64), torch.nn.ReLU(), torch.nn.Linear(64, SIZE * SIZE),
                                    torch.nn.Sigmoid(), torch.nn.Unflatten(1, (1, SIZE, SIZE)))
    discriminator = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, 64), torch.nn.LeakyReLU(0.2),
                                        torch.nn.Linear(64, 1))

    def d_loss(fakes, reals):
        real, fake = discriminator(reals), discriminator(fakes.detach())
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))

    def g_loss(fakes):
        score = discriminator(fakes)
        return F.binary_cross_entropy_with_logits(score, torch.ones_like(score))

    return GanTrainer(device="cpu", max_epochs=max_epochs, train_data_loader=loader(items), g_network=generator,
                      g_optimizer=torch.optim.Adam(generator.parameters(), lr=1e-3), g_loss_function=g_loss,
                      d_network=discriminator, d_optimizer=torch.optim.Adam(discriminator.parameters(), lr=1e-3),
                      d_loss_function=d_loss, latent_shape=LATENT, train_handlers=handlers,
                      d_prepare_batch=lambda batch, device=None, non_blocking=False, **kw: batch["image"].to(device))


class TurnsCopier(torch.nn.Module):
    """A trained 1x1 convolution whose ``sample(n)`` emits noise before epoch ``copy_from`` (0-based), then
    training images: a generator that starts memorizing at a known epoch, so the bookkeeping can be checked."""

    def __init__(self, items, copy_from: int) -> None:
        super().__init__()
        self.images = torch.stack([torch.as_tensor(item["image"]) for item in items])
        self.copy_from, self.epoch = copy_from, 0
        self.layer = torch.nn.Conv2d(1, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layer(images)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.epoch >= self.copy_from:
            return self.images[torch.arange(n) % len(self.images)].clone()
        return torch.rand(n, 1, SIZE, SIZE, generator=generator)


def copier_trainer(items, max_epochs: int, handlers, copy_from: int = 1000) -> SupervisedTrainer:
    """A ``SupervisedTrainer`` of a :class:`TurnsCopier` that learns to predict the label from the image."""
    network = TurnsCopier(items, copy_from)
    trainer = SupervisedTrainer(device="cpu", max_epochs=max_epochs, train_data_loader=loader(items),
                                network=network, optimizer=torch.optim.SGD(network.parameters(), lr=0.01),
                                loss_function=lambda pred, label: F.mse_loss(pred, label.float()),
                                train_handlers=handlers)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: setattr(network, "epoch", engine.state.epoch - 1))
    return trainer
