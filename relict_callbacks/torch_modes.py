"""torch's process-wide modes that a training run may have switched on, and the engine inside them.

**Autocast.** Mixed-precision training (Lightning's ``16-mixed``/``bf16-mixed``, MONAI's ``amp=True``) runs
matrix products in float16/bfloat16 inside an autocast region. Scores computed there would be rounded (bfloat16
NCC off by 1e-3) or overflow (float16 sums of 262,144 products past 65,504: ``inf``, clamped to an NCC of 1, a
replica). The engine turns autocast off for what it computes (:func:`full_precision`).

**Reduced-precision float32 products.** ``torch.set_float32_matmul_precision("high")`` (TF32 on CUDA, which
Lightning suggests for tensor cores) or ``"medium"`` (bfloat16, on CUDA and on CPUs with AMX), the per-backend
switches of torch 2.9 and later (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, ...), and cuDNN's TF32
convolutions (on by default) round float32 products to 10 or 8 bits: NCC off by about 1e-4, and the search's proof
that its neighbours are the float32 ones void. The engine computes in full float32 (:func:`full_precision`),
through the per-backend switches where torch has them (its older getter raises once a run has used them).

**Reduced-precision half products.** The engine multiplies float16 bank rows on CUDA with float32 accumulation and
output. ``torch.backends.cuda.matmul.allow_fp16_accumulation = True`` (a run's opt-in to faster float16 products)
makes cuBLAS refuse every such product ("gemm input type at::Half and output type float is not supported"), and the
``allow_fp16/bf16_reduced_precision_reduction`` switches (on by default) let it reduce split sums in half precision.
The engine turns all three off (:func:`full_precision`).

**Default dtype and device.** ``torch.set_default_dtype(torch.float64)`` (and Lightning's ``64-true`` inside a
step) or ``torch.set_default_device("cuda")`` make the tensors the engine creates without a dtype or device float64
or CUDA ones, which its float32 CPU tensors then meet: every check failed. The engine keeps float32 and the CPU as
defaults (:func:`full_precision`).

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


HALF_PRODUCT_SWITCHES = ("allow_fp16_accumulation", "allow_fp16_reduced_precision_reduction",
                         "allow_bf16_reduced_precision_reduction")  # of torch.backends.cuda.matmul, where torch has them


def _precision_switches() -> list:
    """torch's per-backend float32 precision switches (``fp32_precision``: ``"ieee"``, ``"tf32"``, ``"bf16"``, or
    ``"none"`` to follow the general one) for matrix products, convolutions and RNNs on CUDA and the CPU (torch 2.9 and
    later, which refuses its older ``get_float32_matmul_precision`` once a run has set one of these)."""
    backends = torch.backends
    switches = [getattr(getattr(backends, name, None), kind, None) for name in ("cuda", "mkldnn", "cudnn")
                for kind in ("matmul", "conv", "rnn")]
    return [switch for switch in switches if hasattr(switch, "fp32_precision")]


@contextlib.contextmanager
def full_precision():
    """Inside, autocast is off on the CPU and CUDA, float32 products keep float32's precision (each backend's
    ``fp32_precision`` ``"ieee"``; before torch 2.9, ``set_float32_matmul_precision("highest")`` and cuDNN's TF32
    off), and tensors are created as float32 on the CPU unless the engine says otherwise: what the engine computes
    is float32 even when it is called from a mixed-precision region, a run that allowed TF32 or bfloat16 products
    or half-precision sums in half products (``HALF_PRODUCT_SWITCHES`` off), or one that changed torch's default
    dtype or device; the user's settings are restored after (a decorator too).

    >>> torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # bfloat16 products on CPUs with AMX
    >>> torch.set_default_dtype(torch.float64)
    >>> with torch.autocast("cpu", dtype=torch.bfloat16), full_precision():
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype, torch.backends.mkldnn.matmul.fp32_precision
    (torch.float32, 'ieee')
    >>> torch.backends.mkldnn.matmul.fp32_precision, torch.get_default_dtype()
    ('bf16', torch.float64)
    >>> torch.backends.mkldnn.matmul.fp32_precision = "none"; torch.set_default_dtype(torch.float32)
    """
    switches = _precision_switches()
    saved = [switch.fp32_precision for switch in switches]
    legacy = None if switches else (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    dtype = torch.get_default_dtype()
    matmul = torch.backends.cuda.matmul
    half = {name: _half_switch(matmul, name) for name in HALF_PRODUCT_SWITCHES if hasattr(matmul, name)}
    for switch in switches:
        switch.fp32_precision = "ieee"
    for name, setting in half.items():  # the reductions' split-K switch (torch 2.9 on) kept as the run set it
        setattr(matmul, name, (False, setting[1]) if isinstance(setting, tuple) else False)
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
    torch.set_default_dtype(torch.float32)
    try:
        with contextlib.ExitStack() as stack:
            if _default_device().type != "cpu":  # a device context intercepts every call: only where needed
                stack.enter_context(torch.device("cpu"))
            stack.enter_context(torch.autocast("cpu", enabled=False))
            stack.enter_context(torch.autocast("cuda", enabled=False))
            yield
    finally:
        for switch, precision in zip(switches, saved):
            switch.fp32_precision = precision
        for name, setting in half.items():
            setattr(matmul, name, setting)
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy[0])
            torch.backends.cudnn.allow_tf32 = legacy[1]
        torch.set_default_dtype(dtype)


def _half_switch(matmul, name: str):
    """A switch of ``HALF_PRODUCT_SWITCHES`` as set: ``(allowed, split_k)`` where torch pairs it with a split-K
    switch (setting the bool alone turns split-K on), else the bool."""
    split_k = name + "_split_k"
    return (getattr(matmul, name), getattr(matmul, split_k)) if hasattr(matmul, split_k) else getattr(matmul, name)


def _default_device() -> torch.device:
    """Where torch creates a tensor given no device (``torch.get_default_device``, from torch 2.3)."""
    getter = getattr(torch, "get_default_device", None)
    return torch.device("cpu") if getter is None else getter()
