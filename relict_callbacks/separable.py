"""Separable linear maps of images: one matrix per spatial axis (Gaussian blur, interpolation, cosine transforms,
shifted pooling).

>>> import torch
>>> along_axes(torch.ones(1, 1, 2, 3), [torch.eye(2), torch.ones(1, 3)]).tolist()
[[[[3.0], [3.0]]]]
"""

from __future__ import annotations

import numpy as np
import torch


def along_axes(x: torch.Tensor, matrices: list[torch.Tensor]) -> torch.Tensor:
    """``x`` ``[B, C, *spatial]`` with each spatial axis multiplied by its matrix (``[m, n]``: length n to m; or
    ``[B, m, n]``: one for each image), one (batched) matrix product per axis.

    >>> along_axes(torch.ones(2, 1, 3), [torch.stack([torch.ones(1, 3), 2 * torch.ones(1, 3)])]).flatten().tolist()
    [3.0, 6.0]
    """
    shape = list(x.shape)
    for axis, matrix in enumerate(matrices):
        n, after = shape[2 + axis], int(np.prod(shape[3 + axis :]))
        if matrix.ndim == 3:  # one per image
            x = (x.reshape(shape[0], -1, n) @ matrix.mT if after == 1
                 else matrix[:, None] @ x.reshape(shape[0], -1, n, after))
        else:
            x = x.reshape(-1, n) @ matrix.T if after == 1 else matrix @ x.reshape(-1, n, after)
        shape[2 + axis] = matrix.shape[-2]
    return x.reshape(shape)
