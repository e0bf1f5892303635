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


def fails_first(sampler=None):
    """A sampler that raises at its first call (an out-of-memory at the first check, say), then works: it calls
    ``sampler`` or else the model's ``sample(n, generator=...)``."""
    calls = []

    def flaky(model, n, generator):
        calls.append(n)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (pretend, first check only)")
        return sampler(model, n, generator) if sampler is not None else model.sample(n, generator=generator)

    return flaky
