"""Tiny real models for the integration tests: a MONAI DDPM, a GAN, and a generator that turns into a copier."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

import relict_callbacks as rc

SIZE = 16


def phantoms(n: int = 12, seed: int = 0, prefix: str = "train") -> list[dict]:
    return rc.data.make_phantoms(n, ndim=2, size=SIZE, seed=seed, id_prefix=prefix)


def loader(items, batch_size: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(items, batch_size=batch_size)


def tiny_unet() -> DiffusionModelUNet:
    return DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8),
                              attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)


class TinyDDPM(L.LightningModule):
    """A real MONAI DDPM (``DiffusionModelUNet`` + ``DiffusionInferer``), trained on 16x16 phantoms."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = tiny_unet()
        self.scheduler = DDPMScheduler(num_train_timesteps=50)
        self.inferer = DiffusionInferer(self.scheduler)

    def training_step(self, batch, batch_index):
        images = batch["image"] * 2 - 1
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, 50, (len(images),), device=self.device)
        loss = F.mse_loss(self.inferer(inputs=images, diffusion_model=self.unet, noise=noise, timesteps=timesteps),
                          noise)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(images))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class TinyGAN(L.LightningModule):
    """A small real GAN (MLP generator and discriminator, manual optimization) with a ``sample(n)`` method."""

    latent = 16

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = torch.nn.Sequential(torch.nn.Linear(self.latent, 64), torch.nn.ReLU(),
                                             torch.nn.Linear(64, SIZE * SIZE), torch.nn.Sigmoid(),
                                             torch.nn.Unflatten(1, (1, SIZE, SIZE)))
        self.discriminator = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, 64),
                                                 torch.nn.LeakyReLU(0.2), torch.nn.Linear(64, 1))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.generator(torch.randn(n, self.latent, generator=generator).to(self.device))

    def training_step(self, batch, batch_index):
        opt_g, opt_d = self.optimizers()
        real = batch["image"]
        fake = self.generator(torch.randn(len(real), self.latent, device=self.device))
        ones, zeros = torch.ones(len(real), 1, device=self.device), torch.zeros(len(real), 1, device=self.device)
        d_loss = (F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
                  + F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), zeros))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log("g_loss", g_loss, on_step=False, on_epoch=True, batch_size=len(real))

    def configure_optimizers(self):
        return (torch.optim.Adam(self.generator.parameters(), lr=1e-3),
                torch.optim.Adam(self.discriminator.parameters(), lr=1e-3))


class TurnsCopier(L.LightningModule):
    """A trained linear model whose ``sample(n)`` emits noise until ``copy_from`` epoch, then training images.

    It stands for a generator that starts memorizing at a known epoch, so the bookkeeping (metrics per epoch,
    stopping, checkpoint choice) can be checked against a known truth.
    """

    def __init__(self, train: list[dict], copy_from: int) -> None:
        super().__init__()
        self.images = torch.stack([torch.as_tensor(item["image"]) for item in train])
        self.copy_from = copy_from
        self.layer = torch.nn.Linear(4, 1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.current_epoch >= self.copy_from:
            return self.images[torch.arange(n) % len(self.images)].clone()
        return torch.rand(n, 1, SIZE, SIZE, generator=generator)

    def training_step(self, batch, batch_index):
        loss = self.layer(batch["image"].flatten(1)[:, :4]).pow(2).mean()
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["image"]))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def trainer(tmp_path, max_epochs: int, callbacks, **kwargs) -> L.Trainer:
    options = dict(max_epochs=max_epochs, callbacks=callbacks, default_root_dir=tmp_path, accelerator="cpu",
                   devices=1, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                   logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"))
    options.update(kwargs)
    return L.Trainer(**options)
