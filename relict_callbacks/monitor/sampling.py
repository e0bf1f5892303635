"""Drawing samples from the model being trained: the same seeded noise every check, the training state left as
it was, and what comes back validated before it is scored.

>>> import torch
>>> class Noise(torch.nn.Module):
...     def sample(self, n, generator):
...         return torch.randn(n, 1, 8, 8, generator=generator)
>>> first, _ = draw_samples(default_sampler, Noise(), 2, seed=0, expected_shape=(1, 2))
>>> second, _ = draw_samples(default_sampler, Noise(), 2, seed=0, expected_shape=(1, 2))
>>> first.shape, torch.equal(first, second)
(torch.Size([2, 1, 8, 8]), True)
"""

from __future__ import annotations

import contextlib
import inspect

import torch


class SamplerError(RuntimeError):
    """A sampler failed or returned something that cannot be scored (wrong type or shape, NaN)."""


@contextlib.contextmanager
def sampling_mode(model, seed: int):
    """Eval mode, no gradients and a forked, seeded global RNG around a sampler call; all restored after.

    The global RNG is seeded too, so samplers that draw from it (e.g. a scheduler's per-step noise) give the same
    samples every check, and the training RNG stream is left exactly where it was.
    """
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    training = [m.training for m in modules]
    devices = _cuda_devices(model)
    for module in modules:
        module.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.default_generator.manual_seed(seed)
            for index in devices:  # the devices forked, not every CUDA device (which stays as it was)
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)
            yield
    finally:
        for module, was_training in zip(modules, training):
            module.train(was_training)


def _cuda_devices(model) -> list[int]:
    """The CUDA devices whose RNG a sampler of ``model`` may draw from: the current one and those holding its
    parameters (a MONAI engine on ``cuda:1`` need not make it current); none before CUDA is initialized."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []
    held = {p.device.index for p in model.parameters() if p.is_cuda} if isinstance(model, torch.nn.Module) else set()
    return sorted(held | {torch.cuda.current_device()})


def default_sampler(model, num_samples: int, generator: torch.Generator):
    """Call the model's own ``sample(n)`` or ``generate(n)`` (passing ``generator=`` when it takes one)."""
    for name in ("sample", "generate"):
        method = getattr(model, name, None)
        if callable(method):
            if "generator" in inspect.signature(method).parameters:
                return method(num_samples, generator=generator)
            return method(num_samples)
    raise SamplerError(f"{type(model).__name__} has no sample(n) or generate(n) method; pass sampler=... "
                       "(see relict_callbacks.integrations.samplers)")


def draw_samples(sampler, model, num_samples: int, seed: int, expected_shape: tuple[int, int], context=None):
    """``sampler(model, num_samples, generator)`` with noise seeded by ``seed``, checked against
    ``expected_shape`` = ``(channels, spatial_dims)``; ``(images, labels)`` on the CPU. Raises :class:`SamplerError`.

    ``generator`` is a CPU generator whatever the model's device: samplers draw with it on the CPU and move the
    noise to the model (``torch.randn(shape, generator=generator).to(device)``), so a check draws the same noise on
    every device. ``context()`` is entered around the sampler call (a framework's autocast for mixed-precision
    training, so that the networks sample in the precision they train in)."""
    generator = torch.Generator().manual_seed(seed)
    name = getattr(sampler, "__qualname__", type(sampler).__name__)
    try:
        with sampling_mode(model, seed), (context or contextlib.nullcontext)():
            out = sampler(model, num_samples, generator)
    except SamplerError:
        raise
    except Exception as error:
        hint = ("; the generator passed to samplers is a CPU one, so that a check draws the same noise on every "
                "device: draw with it on the CPU and move the noise, torch.randn(shape, generator=generator).to(device)"
                if "'cuda' device type for generator but found 'cpu'" in str(error) else "")
        raise SamplerError(f"sampler {name} raised {type(error).__name__}: {error}{hint}") from error
    images, labels = out if isinstance(out, (tuple, list)) else (out, None)
    channels, spatial_dims = expected_shape
    if not isinstance(images, torch.Tensor):
        raise SamplerError(f"sampler {name} returned {type(images).__name__}, expected a Tensor [N, C, *spatial]")
    if images.ndim != spatial_dims + 2 or images.shape[1] != channels or images.shape[0] != num_samples:
        raise SamplerError(f"sampler {name} returned shape {tuple(images.shape)}; expected "
                           f"[{num_samples}, {channels}, {', '.join('*' * spatial_dims)}] ({spatial_dims}D, "
                           f"{channels} channel(s), {num_samples} samples)")
    bad = ~torch.isfinite(images.flatten(1)).all(1)
    if bad.any():
        raise SamplerError(f"sampler {name} returned non-finite values (NaN/inf) in sample(s) "
                           f"{bad.nonzero().flatten().tolist()}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape[0] != num_samples
                               or labels.shape[2:] != images.shape[2:]):
        raise SamplerError(f"sampler {name} returned labels that do not match its images")
    return images.detach().float().cpu(), None if labels is None else labels.detach().cpu()


def draw_in_batches(sampler, model, num_samples: int, seed: int, expected_shape: tuple[int, int],
                    batch_size: int | None = None, context=None, processes: int = 1):
    """:func:`draw_samples` in calls of at most ``batch_size`` samples (all at once without one), each on the CPU
    before the next is drawn; ``(images, labels)``. The batch starting at sample ``first`` is seeded with ``seed +
    first * processes``: the ``processes`` of a distributed check, seeded ``base + rank``, never share a seed.

    >>> import torch
    >>> def noise(model, n, generator):
    ...     return torch.randn(n, 1, 8, 8, generator=generator)
    >>> images, _ = draw_in_batches(noise, None, 5, seed=0, expected_shape=(1, 2), batch_size=2)
    >>> images.shape, torch.equal(images[2:4], draw_samples(noise, None, 2, seed=2, expected_shape=(1, 2))[0])
    (torch.Size([5, 1, 8, 8]), True)
    """
    step = batch_size or num_samples
    drawn = [draw_samples(sampler, model, min(step, num_samples - first), seed + first * processes, expected_shape,
                          context) for first in range(0, num_samples, step)]
    images, labels = zip(*drawn)
    return torch.cat(images), None if labels[0] is None else torch.cat(labels)
