"""Sums over shifted, mirrored windows of training images, for the voxel level's refinement on the CPU: each window's
voxels read once from the unpadded image, without copying the window (a numba kernel, compiled once per machine and
cached).

A window is a training image displaced by whole voxels (edges replicated), then mirrored: ``w[y] = r[clamp(m(y) +
s)]`` with ``m`` mirroring the chosen axes and ``s`` the shift. Its sums with a query's form ``q`` are the dot
``sum q w``, ``sum w`` and ``sum w²``, from which NCC follows. Mirroring along the last axis is read as the query
mirrored instead (a dot is unchanged when both sides are permuted alike), so every row of a window is a run of its
image's row, its ends the row's edge values. Each row's sums are float32 (vectorized), added up in float64: within
about 1e-7 of float64 sums, and the same whatever the thread count. It runs on one thread, releasing the GIL: as
fast as two on a 2-core machine (bound by its memory bandwidth), and, unlike numba's OpenMP layer, it lets a forked
process (a DataLoader worker, a multiprocessing pool) sum windows too.

>>> import torch
>>> image = torch.arange(4.0).view(1, 1, 1, 1, 4)  # read one voxel on: [1, 2, 3, 3]
>>> window_sums(torch.ones(1, 1, 1, 1, 4), image, torch.tensor([0]), torch.tensor([0]),
...             torch.tensor([[[0, 0, 1]]]), torch.zeros(1, 3, dtype=torch.bool))[0, 0, 0].tolist()
[9.0, 9.0, 23.0]
"""

from __future__ import annotations

import numba
import numpy as np
import torch


def _compiled(kernel):
    """``kernel`` compiled by numba (releasing the GIL, float sums reassociated so that they vectorize), cached on
    disk where numba finds a writable place (next to this module, or the user's cache), else compiled again in each
    process: a read-only install still imports."""
    options = {"nogil": True, "fastmath": {"reassoc", "contract"}}
    try:
        return numba.njit(cache=True, **options)(kernel)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(**options)(kernel)


@_compiled
def _sums(forms, flipped, form_of, images, image_of, shifts, mirror, out):  # pragma: no cover (compiled)
    pairs, shift_count = shifts.shape[0], shifts.shape[1]
    channels, depth, height, width = images.shape[1], images.shape[2], images.shape[3], images.shape[4]
    plane, volume = height * width, depth * height * width
    query, query_flipped, image = forms.reshape(-1), flipped.reshape(-1), images.reshape(-1)
    for item in range(pairs * shift_count):  # windows, numbered pair by pair
        b, s = item // shift_count, item % shift_count
        sz, sy, sx = shifts[b, s, 0], shifts[b, s, 1], shifts[b, s, 2]
        start = min(max(0, -sx), width)  # the voxels of a row read inside the image's row: [start, stop)
        stop = max(min(width, width - sx), start)
        reads = query_flipped if mirror[b, 2] else query
        for c in range(channels):
            form_base, image_base = (form_of[b] * channels + c) * volume, (image_of[b] * channels + c) * volume
            dot, total, square = 0.0, 0.0, 0.0
            for z in range(depth):
                source_z = min(max((depth - 1 - z if mirror[b, 0] else z) + sz, 0), depth - 1)
                for y in range(height):
                    source_y = min(max((height - 1 - y if mirror[b, 1] else y) + sy, 0), height - 1)
                    q_at = form_base + z * plane + y * width
                    r_at = image_base + source_z * plane + source_y * width
                    q_row, r_row = reads[q_at + start : q_at + stop], image[r_at + start + sx : r_at + stop + sx]
                    d, t, sq = np.float32(0.0), np.float32(0.0), np.float32(0.0)
                    for k in range(stop - start):
                        v = r_row[k]
                        d += q_row[k] * v
                        t += v
                        sq += v * v
                    first, last = image[r_at], image[r_at + width - 1]  # read past the row's ends
                    before, after = np.float32(0.0), np.float32(0.0)
                    for x in range(start):
                        before += reads[q_at + x]
                    for x in range(stop, width):
                        after += reads[q_at + x]
                    outside = width - stop
                    dot += d + before * first + after * last
                    total += t + start * first + outside * last
                    square += sq + start * first * first + outside * last * last
            out[b, s, c, 0], out[b, s, c, 1], out[b, s, c, 2] = dot, total, square


def window_sums(forms: torch.Tensor, images: torch.Tensor, form_of: torch.Tensor, image_of: torch.Tensor,
                shifts: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """``[B, S, C, 3]`` float64: for each pair ``b`` (query form ``forms[form_of[b]]``, training image
    ``images[image_of[b]]``, both float32 ``[*, C, *grid]`` on the CPU, 2D or 3D) and each of its ``shifts``
    ``[B, S, ndim]``, the window ``w[y] = image[clamp(m(y) + shift)]`` mirrored along the spatial axes ``mirror``
    ``[B, ndim]`` sets, its sums per channel of ``form * w``, ``w`` and ``w²``."""
    if forms.ndim == 4:  # 2D: one slice deep
        zero = torch.zeros_like(shifts[..., :1])
        return window_sums(forms[:, :, None], images[:, :, None], form_of, image_of, torch.cat([zero, shifts], -1),
                           torch.cat([torch.zeros_like(mirror[:, :1]), mirror], 1))
    forms, images = forms.float().contiguous(), images.float().contiguous()
    out = np.empty((*shifts.shape[:2], images.shape[1], 3))
    flipped = forms.flip(-1).contiguous() if mirror[:, -1].any() else forms  # read only by pairs mirrored there
    _sums(forms.numpy(), flipped.numpy(), form_of.long().numpy(), images.numpy(), image_of.long().numpy(),
          shifts.long().contiguous().numpy(), mirror.bool().numpy(), out)
    return torch.from_numpy(out)
