"""torch's process-wide modes that a training run may have switched on, and the engine inside them.

**Autocast.** Mixed-precision training (Lightning's ``16-mixed``/``bf16-mixed``, MONAI's ``amp=True``) runs
matrix products in float16/bfloat16 inside an autocast region. Scores computed there would be rounded (bfloat16
NCC off by 1e-3) or overflow (float16 sums of 262,144 products past 65,504: ``inf``, clamped to an NCC of 1, a
replica). The engine turns autocast off for what it computes (:func:`full_precision`).

**Reduced-precision float32 products.** ``torch.set_float32_matmul_precision("high")`` (TF32 on CUDA, which
Lightning suggests for tensor cores) or ``"medium"`` (bfloat16, on CUDA and on CPUs with AMX), and cuDNN's TF32
convolutions (on by default), round float32 products to 10 or 8 bits: NCC off by about 1e-4, and the search's proof
that its neighbours are the float32 ones void. The engine computes in full float32 (:func:`full_precision`).

**Deterministic algorithms.** Lightning's ``Trainer(deterministic=True)`` and MONAI's
``set_determinism(..., use_deterministic_algorithms=True)`` turn on ``torch.use_deterministic_algorithms(True)``,
under which torch refuses, on CUDA, the backward passes it has no deterministic kernel for. Two of ours are among
them: ``grid_sample``'s (the voxel level's Adam bend fit, which banks built before its Gauss-Newton fit use; it
differentiates only the sampling grid, a gradient torch computes point by point, so it stays reproducible) and
adaptive average pooling's (the copy encoder's training). Refused, every check would fail on the GPU
(:func:`tolerating_nondeterministic_backward`).
"""

from __future__ import annotations

import contextlib
import warnings

import torch


@contextlib.contextmanager
def tolerating_nondeterministic_backward(*ops: str):
    """Inside, torch's deterministic mode, where it is on, warns rather than raises (the warnings about ``ops``,
    torch's kernel names, silenced); the user's setting is restored after.

    >>> torch.use_deterministic_algorithms(True)
    >>> with tolerating_nondeterministic_backward("grid_sampler_3d_backward_cuda"):
    ...     torch.is_deterministic_algorithms_warn_only_enabled()
    True
    >>> torch.is_deterministic_algorithms_warn_only_enabled(), torch.are_deterministic_algorithms_enabled()
    (False, True)
    >>> torch.use_deterministic_algorithms(False)
    """
    strict = torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    with warnings.catch_warnings():
        for op in ops:
            warnings.filterwarnings("ignore", f".*{op}")
        if strict:
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            if strict:
                torch.use_deterministic_algorithms(True)


@contextlib.contextmanager
def full_precision():
    """Inside, autocast is off on the CPU and CUDA, and float32 products keep float32's precision
    (``torch.set_float32_matmul_precision("highest")``, cuDNN's TF32 off): what the engine computes is float32 even
    when it is called from a mixed-precision region or a run that allowed TF32; the user's settings are restored
    after (a decorator too).

    >>> torch.set_float32_matmul_precision("medium")
    >>> with torch.autocast("cpu", dtype=torch.bfloat16), full_precision():
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype, torch.get_float32_matmul_precision()
    (torch.float32, 'highest')
    >>> torch.get_float32_matmul_precision()
    'medium'
    >>> torch.set_float32_matmul_precision("highest")
    """
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
