"""A self-supervised copy encoder, trained on the bank's own training images to recognise a patient under the
changes a memorizing generator makes.

Following Dar et al. (memorization in 3D latent diffusion models for medical images), a small CNN is trained
contrastively (NT-Xent / InfoNCE, as SimCLR): two augmented views of one training patient are positives, the
other patients of the batch negatives. The augmentations model what a copying generator does: shifts, small
rotations and scalings, a small elastic deformation, intensity re-mapping (random gamma, a random monotone curve,
a smooth bias field), blur and noise. They are batched torch operations drawn from one seeded generator, so
training needs nothing beyond torch and the same seed gives the same weights on CPU. Images are resampled to a
small grid, translated so that their intensity centroid is the grid centre (a shifted copy comes out as its
source does) and z-scored (the embedding ignores gain and offset); the features keep a coarse spatial layout
(4x4 in 2D, 2x2x2 in 3D). Left-right mirrored copies are not its job: the voxel level finds those exactly.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_write
from ..items import ItemError, iter_batches
from ..levels.base import plain_grid, resample
from ..torch_modes import tolerating_nondeterministic_backward

DEFAULT_GRID = {2: (64, 64), 3: (32, 32, 32)}
POOL = {2: (4, 4), 3: (2, 2, 2)}  # the features keep this coarse layout
FORMAT = "relict-copy-encoder/1"


def _zscore(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    return ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)).view_as(x)


def _centre(x: torch.Tensor) -> torch.Tensor:
    """Each image translated (subvoxel) so that its intensity centroid (above its minimum) is the grid centre:
    a shifted copy then comes out as its source does, and the network only has to learn the rest."""
    b, c, *grid = x.shape
    weight = (x - x.flatten(1).amin(1).view(b, *[1] * (len(grid) + 1))).sum(1)  # [B, *grid]
    weight = weight / weight.flatten(1).sum(1).clamp_min(1e-6).view(b, *[1] * len(grid))
    identity = torch.eye(len(grid), len(grid) + 1, device=x.device, dtype=x.dtype).expand(b, -1, -1)
    coords = F.affine_grid(identity, [b, c, *grid], align_corners=False)
    centroid = (coords * weight[..., None]).flatten(1, -2).sum(1)  # [B, nd] in grid_sample's coordinate order
    return F.grid_sample(x, coords + centroid.view(b, *[1] * len(grid), len(grid)), mode="bilinear",
                         padding_mode="border", align_corners=False)


def _smooth_field(gen, batch: int, channels: int, grid, coarse: int) -> torch.Tensor:
    """A smooth random field in [-1, 1]-ish: ``coarse``-point noise per axis, upsampled to ``grid``."""
    noise = torch.rand(batch, channels, *[coarse] * len(grid), generator=gen) * 2 - 1
    return F.interpolate(noise, size=tuple(grid), mode="bilinear" if len(grid) == 2 else "trilinear",
                         align_corners=True)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each image by its own ``sigma`` (voxels), separable, as a grouped convolution."""
    b, c, *grid = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, k]
    out = x.reshape(1, b * c, *grid)
    conv = F.conv2d if len(grid) == 2 else F.conv3d
    for axis in range(len(grid)):
        shape = [b * c, 1] + [1] * len(grid)
        shape[2 + axis] = kernel.shape[1]
        pads = [0] * (2 * len(grid))  # F.pad lists the last axis first
        pads[2 * (len(grid) - 1 - axis)] = pads[2 * (len(grid) - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pads, mode="replicate"), kernel.view(shape), groups=b * c)
    return out.reshape(x.shape)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view of each z-scored image in ``x`` ``[B, C, *grid]`` (CPU), as a copying generator might
    emit it: intensity re-mapping, a shifted/rotated/scaled/elastically deformed resampling, blur and noise;
    z-scored again."""
    b, c, *grid = x.shape
    nd = len(grid)

    def view(per_image):
        return per_image.view(b, *[1] * (nd + 1))

    # intensity: min-max to [0, 1], gamma, a random monotone 5-segment curve, a smooth +-20% bias field
    flat = x.flatten(1)
    low, high = view(flat.amin(1)), view(flat.amax(1))
    unit = ((x - low) / (high - low).clamp_min(1e-6)) ** view(torch.exp(torch.empty(b).uniform_(-0.4, 0.4, generator=gen)))
    knots = torch.cat([torch.zeros(b, 1), torch.exp(0.5 * torch.randn(b, 5, generator=gen)).cumsum(1)], 1)
    knots = knots / knots[:, -1:]
    position = (unit * 5).clamp(0, 5 - 1e-6)
    index = position.floor().long()
    lo_knot = torch.gather(knots, 1, index.flatten(1)).view_as(x)
    hi_knot = torch.gather(knots, 1, (index + 1).flatten(1)).view_as(x)
    x = lo_knot + (position - index) * (hi_knot - lo_knot)
    x = x * (1 + 0.2 * _smooth_field(gen, b, 1, grid, 3).clamp(-1, 1))
    # geometry: affine (rotation in the axial plane, scale, shift up to 6% of the grid) + elastic
    angle = torch.empty(b).uniform_(-0.1, 0.1, generator=gen)
    scale = torch.exp(torch.empty(b).uniform_(-0.05, 0.05, generator=gen))
    theta = torch.zeros(b, nd, nd + 1)
    theta[:, range(nd), range(nd)] = scale[:, None]
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, :, nd] = torch.empty(b, nd).uniform_(-0.12, 0.12, generator=gen)
    coords = F.affine_grid(theta, [b, c, *grid], align_corners=False)
    elastic = 0.06 * _smooth_field(gen, b, nd, grid, 5)
    coords = coords + elastic.movedim(1, -1)
    x = F.grid_sample(x, coords, mode="bilinear", padding_mode="border", align_corners=False)
    # blur for half of them, then noise
    sigma = torch.empty(b).uniform_(0.3, 1.2, generator=gen) * (torch.rand(b, generator=gen) < 0.5)
    x = _blur(x, sigma)
    x = x + view(torch.empty(b).uniform_(0, 0.05, generator=gen)) * torch.randn(x.shape, generator=gen)
    return _zscore(x)


def _nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over ``2B`` L2-normalized embeddings where rows ``i`` and ``i + B`` are two views of one image."""
    n = len(z) // 2
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


class _Network(nn.Module):
    """A small CNN: a stride-2 stem and three stride-2 stages of two 3x3 convolutions (GroupNorm, ReLU), global
    average pool to ``8 * width`` features; a two-layer projection head used only in training."""

    def __init__(self, spatial_dims: int, channels: int, width: int, dim: int) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d

        def block(cin, cout, stride):
            return [conv(cin, cout, 3, stride, 1), nn.GroupNorm(min(8, cout // 4), cout), nn.ReLU()]

        layers = block(channels, width, 2)
        for i in range(3):
            layers += block(width << i, width << (i + 1), 2) + block(width << (i + 1), width << (i + 1), 1)
        pool = nn.AdaptiveAvgPool2d(POOL[2]) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(POOL[3])
        self.backbone = nn.Sequential(*layers, pool, nn.Flatten())
        features = 8 * width * math.prod(POOL[spatial_dims])
        self.head = nn.Sequential(nn.Linear(features, 256), nn.ReLU(), nn.Linear(256, dim))


class CopyEncoder(nn.Module):
    """A small CNN trained contrastively on the training images themselves to embed a patient so that copies
    of it (shifted, deformed, re-contrasted, blurred, noisy) land next to it and other patients do not.

    Args:
        grid: images are resampled to this grid (default 64² in 2D, 32³ in 3D).
        width: channels of the first stage (features: ``8 * width`` per layout cell, 512 for 4 in 2D).
        dim: size of the projection used by the training loss.
        steps, time_budget: training stops after ``steps`` steps or ``time_budget`` seconds, whichever comes
            first (the same seed gives the same weights when ``steps`` is what stops it, on the CPU: on CUDA,
            cuDNN's and adaptive pooling's backward passes add in any order, so the weights, and with them the
            fingerprint of a bank cached with this encoder, differ between fits; save the fitted encoder and
            load it to reuse the bank).
        batch_size: patients per step (two views each); the others in the batch are the negatives.
        temperature, lr: of the NT-Xent loss and the Adam optimizer.
        seed: seeds the initial weights, the batches and the augmentations.

    Unfitted, it has no weights: ``fit(items)`` trains it on the training items; ``save``/``load`` keep it in an
    ``.npz`` beside the bank (``ReferenceBank.load(path, levels=[FeatureLevel(CopyEncoder.load(...))])``).

    >>> import relict_callbacks as rc
    >>> train = rc.data.make_phantoms(8, ndim=2, size=32)
    >>> encoder = CopyEncoder(grid=32, width=4, steps=2, batch_size=4).fit(train, progress=False)
    >>> encoder(torch.rand(3, 1, 32, 32)).shape, encoder.fitted_steps
    (torch.Size([3, 512]), 2)
    """

    casts_inputs = True  # gets float32 images (call_model) and casts them for its network itself

    def __init__(self, grid=None, width: int = 16, dim: int = 128, steps: int = 400, batch_size: int = 32,
                 time_budget: float = 120.0, temperature: float = 0.1, lr: float = 3e-3, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 2 or steps < 1 or width < 4 or time_budget <= 0:
            raise ValueError(f"CopyEncoder needs batch_size >= 2, steps >= 1, width >= 4 and time_budget > 0; got "
                             f"batch_size={batch_size}, steps={steps}, width={width}, time_budget={time_budget}")
        self.grid = None if grid is None else (grid if isinstance(grid, int) else tuple(int(g) for g in grid))
        self.width, self.dim, self.steps, self.batch_size = width, dim, steps, batch_size
        self.time_budget, self.temperature, self.lr, self.seed = time_budget, temperature, lr, seed
        self.network: _Network | None = None
        self.spatial_dims = self.channels = None
        self.fitted_steps, self.fit_seconds = 0, 0.0

    def config(self) -> dict:
        """The constructor arguments (JSON)."""
        grid = plain_grid(self.grid)
        return {"grid": grid, "width": self.width, "dim": self.dim, "steps": self.steps,
                "batch_size": self.batch_size, "time_budget": self.time_budget, "temperature": self.temperature,
                "lr": self.lr, "seed": self.seed}

    def _grid(self, spatial_dims: int) -> tuple[int, ...]:
        if self.grid is None:
            return DEFAULT_GRID[spatial_dims]
        return (self.grid,) * spatial_dims if isinstance(self.grid, int) else self.grid

    def _build(self, spatial_dims: int, channels: int) -> None:
        with torch.random.fork_rng(devices=[]):  # built on the CPU: only its RNG is seeded (and restored)
            torch.default_generator.manual_seed(self.seed)
            self.network = _Network(spatial_dims, channels, self.width, self.dim)
        self.spatial_dims, self.channels = spatial_dims, channels

    def _prepare(self, images) -> torch.Tensor:
        """Resampled to the grid and z-scored: ``[B, C, *grid]`` float32."""
        grid = self._grid(images[0].ndim - 1)
        return _zscore(_centre(torch.stack([resample(image.float(), grid) for image in images])))

    def fit(self, items, device="cpu", progress: bool = True) -> CopyEncoder:
        """Train on ``items`` (any container the bank accepts) from the seeded initial weights; returns self."""
        images = [self._prepare([item.image for item in batch]) for batch in iter_batches(items, 64)]
        if sum(len(b) for b in images) < 2:
            raise ItemError("CopyEncoder.fit needs at least 2 training items (other patients are its negatives)")
        data = torch.cat(images)
        self._build(data.ndim - 2, data.shape[1])
        network = self.network.to(device).train()
        start = time.perf_counter()
        bar = tqdm(total=self.steps, desc="relict copy encoder", unit="step", disable=not progress)
        with tolerating_nondeterministic_backward("adaptive_avg_pool2d_backward_cuda",
                                                  "adaptive_avg_pool3d_backward_cuda"):
            self._train(network, data, device, start, bar)
        bar.close()
        network.eval()
        self.fit_seconds = time.perf_counter() - start
        return self

    def _train(self, network, data: torch.Tensor, device, start: float, bar) -> None:
        """Adam steps on pairs of augmented views of ``data`` until ``steps`` or the time budget."""
        optimizer = torch.optim.Adam(network.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        batch = min(self.batch_size, len(data))
        order, cursor = torch.randperm(len(data), generator=gen), 0
        for step in range(1, self.steps + 1):
            if cursor + batch > len(data):
                order, cursor = torch.randperm(len(data), generator=gen), 0
            chosen = data[order[cursor : cursor + batch]]
            cursor += batch
            views = _centre(torch.cat([augment(chosen, gen), augment(chosen, gen)])).to(device)
            z = F.normalize(network.head(network.backbone(views)), dim=1)
            loss = _nt_xent(z, self.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            self.fitted_steps = step
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if time.perf_counter() - start > self.time_budget:
                break

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.network is None:
            raise RuntimeError("CopyEncoder is not fitted: call fit(training items) first, or CopyEncoder.load(path)")
        if images.ndim - 2 != self.spatial_dims or images.shape[1] != self.channels:
            raise ValueError(f"CopyEncoder was fitted on {self.spatial_dims}D images with {self.channels} "
                             f"channel(s); got a batch of shape {tuple(images.shape)}")
        parameter = next(self.network.parameters())
        return self.network.backbone(self._prepare(list(images)).to(parameter.device, parameter.dtype))

    # -- persistence ---------------------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fitted encoder as named arrays: the weights, and its configuration as JSON bytes (``config``)."""
        if self.network is None:
            raise RuntimeError("CopyEncoder is not fitted: nothing to save")
        meta = {"format": FORMAT, **self.config(), "spatial_dims": self.spatial_dims, "channels": self.channels,
                "fitted_steps": self.fitted_steps, "fit_seconds": self.fit_seconds}
        arrays = {f"weight.{k}": v.detach().cpu().numpy() for k, v in self.network.state_dict().items()}
        return {"config": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays}

    @classmethod
    def from_arrays(cls, arrays, source: str = "arrays") -> CopyEncoder:
        """Rebuild a fitted encoder from :meth:`to_arrays` output (``source`` names it in errors)."""
        try:
            meta = json.loads(np.asarray(arrays["config"]).tobytes())
        except (KeyError, ValueError) as err:
            raise ValueError(f"{source}: not a saved CopyEncoder ({type(err).__name__}: {err})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{source}: format {meta.get('format')!r}, this version reads {FORMAT!r}")
        config = {k: meta[k] for k in cls().config()}
        encoder = cls(**config)
        encoder._build(meta["spatial_dims"], meta["channels"])
        weights = {k.removeprefix("weight."): torch.from_numpy(np.array(v)) for k, v in arrays.items()
                   if k.startswith("weight.")}
        try:
            encoder.network.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{source}: weights do not fit the saved configuration ({err})") from None
        encoder.network.eval()
        encoder.fitted_steps, encoder.fit_seconds = meta["fitted_steps"], meta["fit_seconds"]
        return encoder

    def save(self, path) -> None:
        """Write the fitted encoder to one ``.npz`` (weights + JSON config), atomically."""
        with atomic_write(path, "wb") as file:
            np.savez(file, **self.to_arrays())

    @classmethod
    def load(cls, path) -> CopyEncoder:
        """Read an encoder written by :meth:`save` (``allow_pickle=False``)."""
        with np.load(path, allow_pickle=False) as archive:
            return cls.from_arrays(dict(archive), source=str(path))
