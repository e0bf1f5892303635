"""User checkpoints as feature extractors: safe weight loading, and a network's output at a named layer, pooled.

``load_weights`` reads a PyTorch weights file with ``torch.load(weights_only=True)``: tensors and plain
containers only, never code. A file that needs more (a whole pickled model, custom classes) is refused with an
error naming the file. ``CheckpointEncoder`` wraps any ``nn.Module`` (e.g. a MedicalNet-style
``monai.networks.nets.resnet50`` with the user's weights) and returns the global average of the activations
of one layer, chosen by its name in ``network.named_modules()``.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

_WRAPPERS = ("state_dict", "model", "network", "net", "model_state_dict")


class CheckpointError(ValueError):
    """A weights file that cannot be loaded safely, or does not fit the network; the message names the file."""


def load_weights(path, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, loaded without unpickling code.

    A checkpoint dict holding the weights under ``state_dict`` (or ``model``, ``network``, ``net``,
    ``model_state_dict``) is unwrapped. With ``prefix``, only keys starting with it are kept, the prefix removed
    (``"encoder."``); without, a ``module.`` prefix on every key (``DataParallel``) is removed.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "w.pt"
    >>> torch.save({"state_dict": {"module.fc.weight": torch.ones(2, 3)}, "epoch": 7}, path)
    >>> list(load_weights(path))
    ['fc.weight']
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        if not unsafe:
            raise CheckpointError(f"{path}: not a readable PyTorch weights file ({' '.join(str(err).split())[-200:]})"
                                  ) from None
        raise CheckpointError(
            f"{path}: refused: it holds pickled Python objects, not only tensors ({unsafe[0]}). Loading it would "
            "run code from the file; re-save the weights alone with torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({type(err).__name__}: {err})") from None
    for key in _WRAPPERS:
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
            break
    if not isinstance(content, dict) or not content:
        raise CheckpointError(f"{path}: holds a {type(content).__name__}, not a dict of tensors (a state_dict)")
    weights = {k: v for k, v in content.items() if isinstance(v, torch.Tensor)}
    if len(weights) != len(content):
        other = sorted(str(k) for k, v in content.items() if not isinstance(v, torch.Tensor))[:5]
        raise CheckpointError(f"{path}: entries {other} are not tensors; expected a state_dict")
    if prefix is None:
        prefix = "module." if all(k.startswith("module.") for k in weights) else ""
    kept = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not kept:
        raise CheckpointError(f"{path}: no key starts with prefix {prefix!r} (keys: {sorted(weights)[:5]}...)")
    return kept


def load_into(network: nn.Module, path, prefix: str | None = None, strict: bool = True) -> nn.Module:
    """Load the weights file ``path`` into ``network`` (see :func:`load_weights`); errors name the file and the
    missing or unexpected keys."""
    try:
        network.load_state_dict(load_weights(path, prefix), strict=strict)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(f"{path}: does not fit {type(network).__name__}: {detail[:600]}") from None
    return network


class _Stop(Exception):
    """Raised by the layer hook: the layers after the feature layer need not run."""


class CheckpointEncoder(nn.Module):
    """A network's activations at one layer, global-average-pooled to ``[B, channels]``.

    Args:
        network: any ``nn.Module`` taking ``[B, C, *spatial]``, e.g.
            ``monai.networks.nets.resnet50(spatial_dims=3, n_input_channels=1, feed_forward=False)``.
        weights: a PyTorch weights file to load into ``network`` (safely, see :func:`load_weights`), or None to
            use the network as it is.
        layer: name of the feature layer in ``network.named_modules()`` (``"layer4"``); ``""`` takes the
            network's own output. The layers after it are not run.
        prefix, strict: how the weights are matched to the network (see :func:`load_weights`).

    Images go in as they come: normalize them as the network was trained (``FeatureLevel(grid=...)`` resizes).

    >>> from monai.networks.nets import resnet10
    >>> encoder = CheckpointEncoder(resnet10(spatial_dims=3, n_input_channels=1), layer="layer3")
    >>> encoder(torch.rand(2, 1, 16, 16, 16)).shape
    torch.Size([2, 256])
    """

    casts_inputs = True  # gets float32 images (call_model) and casts them for its network itself

    def __init__(self, network: nn.Module, weights=None, layer: str = "", prefix: str | None = None,
                 strict: bool = True) -> None:
        super().__init__()
        modules = dict(network.named_modules())
        if layer not in modules:
            names = [name for name in modules if name and "." not in name]
            raise ValueError(f"{type(network).__name__} has no layer {layer!r}; top-level layers: {names}")
        if weights is not None:
            load_into(network, weights, prefix, strict)
        self.network, self.layer = network, layer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        captured = []

        def keep(module, inputs, output):
            captured.append(output)
            raise _Stop

        handle = self.network.get_submodule(self.layer).register_forward_hook(keep)
        parameter = next((p for p in self.network.parameters() if p.is_floating_point()), None)
        if parameter is not None:
            images = images.to(parameter.device, parameter.dtype)
        try:
            self.network(images)
        except _Stop:
            pass
        finally:
            handle.remove()
        features = captured[0]
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"layer {self.layer!r} of {type(self.network).__name__} returned a "
                            f"{type(features).__name__}, not a tensor")
        return features.flatten(2).mean(2) if features.ndim > 2 else features
