import subprocess
import sys

import numpy as np
import pytest
import torch

# device parametrization: the CPU always, CUDA under the `cuda` marker (skipped without a CUDA device)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def run_relict(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``relict ARGS...`` in a subprocess of this interpreter (so it runs the code under test), its output
    captured as text; arguments may be paths."""
    return subprocess.run([sys.executable, "-m", "relict_callbacks.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def smooth_field(n: int, shape: tuple[int, ...], seed: int, channels: int = 1, passes: int = 2) -> torch.Tensor:
    """``n`` smooth random images ``[n, C, *shape]`` (distinct, but correlated like real anatomy is not): white
    noise blurred by ``passes`` 5-voxel box filters (0: white noise)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, *shape, generator=gen)
    pool = torch.nn.functional.avg_pool2d if len(shape) == 2 else torch.nn.functional.avg_pool3d
    for _ in range(passes):
        x = pool(x, 5, 1, 2)
    return x


def on_threads(compute, counts=(1, 2)) -> list:
    """``compute()`` run with each of ``counts`` intra-op threads, in turn (the thread count restored after)."""
    threads = torch.get_num_threads()
    try:
        results = []
        for count in counts:
            torch.set_num_threads(count)
            results.append(compute())
        return results
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One intra-op thread for a test of tiny networks: a second thread only adds synchronisation, which costs
    seconds per step when the machine's cores are shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
