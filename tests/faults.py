"""Samplers that fail in the ways a real one can, for the fault tests of the adapters."""

import torch


def bad_sampler(kind: str, size: int = 16):
    """A sampler that raises (``"raises"``), returns a NaN (``"nan"``) or 1D images of the wrong shape."""

    def sampler(model, n, generator):
        if kind == "raises":
            raise RuntimeError("CUDA out of memory (pretend)")
        if kind == "nan":
            images = torch.rand(n, 1, size, size)
            images[1, 0, 3, 3] = float("nan")
            return images
        return torch.rand(n, 1, size)  # 1D: wrong shape

    return sampler


def failing(at_call: int | None = 0, here: bool = True, sampler=None):
    """A sampler that raises an out-of-memory error at its call ``at_call`` (0-based; ``None``: at every call) when
    ``here`` (e.g. ``rank == 1``: the process of a distributed run where it fails), and otherwise calls ``sampler`` or
    else the model's ``sample(n, generator=...)``."""
    calls = []

    def flaky(model, n, generator):
        calls.append(n)
        if here and at_call in (None, len(calls) - 1):
            raise RuntimeError("CUDA out of memory (pretend)")
        return sampler(model, n, generator) if sampler is not None else model.sample(n, generator=generator)

    return flaky


def fails_first(sampler=None):
    """A sampler that raises at its first call (an out-of-memory at the first check, say), then works."""
    return failing(0, sampler=sampler)
