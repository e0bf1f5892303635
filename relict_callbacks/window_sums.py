"""Sums over shifted, mirrored (and bent) windows of training images, for the voxel level's refinement and bend search
on the CPU: each window's voxels read once from the unpadded image, without copying the window (numba kernels,
compiled once per machine and cached).

A window is a training image displaced by whole voxels (edges replicated), then mirrored: ``w[y] = r[clamp(m(y) +
s)]`` with ``m`` mirroring the chosen axes and ``s`` the shift. Its sums with a query's form ``q`` are the dot
``sum q w``, ``sum w`` and ``sum w²``, from which NCC follows. Mirroring along the last axis is read as the query
mirrored instead (a dot is unchanged when both sides are permuted alike), so every row of a window is a run of its
image's row, its ends the row's edge values. Each row's sums are float32 (vectorized), added up in float64: within
about 1e-7 of float64 sums, and the same whatever the thread count. It runs on one thread, releasing the GIL: as
fast as two on a 2-core machine (bound by its memory bandwidth), and, unlike numba's OpenMP layer, it lets a forked
process (a DataLoader worker, a multiprocessing pool) sum windows too.

A bent window (:func:`bent_window_sums`) is read trilinearly where a smooth displacement field sends each voxel:
its sums with the query are those of the voxel level's bend score, without the sampled copy of the training image.

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


@_compiled
def _bent_sums(forms, form_of, images, controls, tents_z, tents_y, tents_x, shifts, mirror,
               out):  # pragma: no cover (compiled)
    pairs, channels = images.shape[0], images.shape[1]
    depth, height, width = images.shape[2], images.shape[3], images.shape[4]
    cz, cy, cx = controls.shape[2], controls.shape[3], controls.shape[4]
    plane, f32, i32 = height * width, np.float32, np.int32
    top_z, top_y, top_x = f32(depth - 1), f32(height - 1), f32(width - 1)
    columns = np.arange(width).astype(np.float32)
    at_z, at_y, at_x = np.empty(width, np.float32), np.empty(width, np.float32), np.empty(width, np.float32)
    # per column of a row (in the bend's frame): the voxel read first, the weights of the next voxel along each axis
    # and the steps to it (0 at the far edge)
    first, wz, wy, wx = np.empty(width, np.int32), np.empty(width, np.float32), np.empty(width, np.float32), np.empty(
        width, np.float32)
    step_z, step_y, step_x = np.empty(width, np.int32), np.empty(width, np.int32), np.empty(width, np.int32)
    plane_controls = np.empty((3, cy, cx), np.float32)  # the controls interpolated onto a slice
    row_controls = np.empty((3, cx), np.float32)  # and onto a row
    images, forms = images.reshape(pairs, channels, -1), forms.reshape(forms.shape[0], channels, -1)
    out[:] = 0.0
    for b in range(pairs):
        sz, sy, sx = f32(shifts[b, 0]), f32(shifts[b, 1]), f32(shifts[b, 2])
        for z in range(depth):
            bz = depth - 1 - z if mirror[b, 0] else z  # the slice in the bend's frame
            for k in range(3):
                for j in range(cy):
                    for i in range(cx):
                        value = f32(0.0)
                        for a in range(cz):
                            value += tents_z[bz, a] * controls[b, k, a, j, i]
                        plane_controls[k, j, i] = value
            for y in range(height):
                by = height - 1 - y if mirror[b, 1] else y
                for k in range(3):
                    for i in range(cx):
                        value = f32(0.0)
                        for j in range(cy):
                            value += tents_y[by, j] * plane_controls[k, j, i]
                        row_controls[k, i] = value
                for x in range(width):
                    at_z[x], at_y[x], at_x[x] = f32(bz), f32(by), columns[x]
                for i in range(cx):  # the displacement along the row: its controls interpolated
                    dz, dy, dx = row_controls[0, i], row_controls[1, i], row_controls[2, i]
                    for x in range(width):
                        t = tents_x[i, x]
                        at_z[x] += t * dz
                        at_y[x] += t * dy
                        at_x[x] += t * dx
                for x in range(width):  # read at the bent point (edges replicated), then shifted (edges again)
                    pz = min(max(min(max(at_z[x], f32(0.0)), top_z) + sz, f32(0.0)), top_z)
                    py = min(max(min(max(at_y[x], f32(0.0)), top_y) + sy, f32(0.0)), top_y)
                    px = min(max(min(max(at_x[x], f32(0.0)), top_x) + sx, f32(0.0)), top_x)
                    iz, iy, ix = i32(pz), i32(py), i32(px)
                    wz[x], wy[x], wx[x] = pz - f32(iz), py - f32(iy), px - f32(ix)
                    first[x] = iz * i32(plane) + iy * i32(width) + ix
                    step_z[x] = i32(plane) if iz < i32(depth - 1) else i32(0)
                    step_y[x] = i32(width) if iy < i32(height - 1) else i32(0)
                    step_x[x] = i32(1) if ix < i32(width - 1) else i32(0)
                row = (z * height + y) * width
                for c in range(channels):  # every channel read at the row's points, found once
                    image, form = images[b, c], forms[form_of[b], c]
                    d, t_, sq, ft, fs = f32(0.0), f32(0.0), f32(0.0), f32(0.0), f32(0.0)
                    for x in range(width):
                        q = form[np.uint64(row + (width - 1 - x if mirror[b, 2] else x))]
                        p, oz, oy, ox = (np.uint64(first[x]), np.uint64(step_z[x]), np.uint64(step_y[x]),
                                         np.uint64(step_x[x]))
                        v00 = image[p] + wx[x] * (image[p + ox] - image[p])
                        v01 = image[p + oy] + wx[x] * (image[p + oy + ox] - image[p + oy])
                        v10 = image[p + oz] + wx[x] * (image[p + oz + ox] - image[p + oz])
                        v11 = image[p + oz + oy] + wx[x] * (image[p + oz + oy + ox] - image[p + oz + oy])
                        v0 = v00 + wy[x] * (v01 - v00)
                        v = v0 + wz[x] * (v10 + wy[x] * (v11 - v10) - v0)
                        d += q * v
                        t_ += v
                        sq += v * v
                        ft += q
                        fs += q * q
                    out[b, c, 0] += d
                    out[b, c, 1] += t_
                    out[b, c, 2] += sq
                    out[b, c, 3] += ft
                    out[b, c, 4] += fs


def bent_window_sums(forms: torch.Tensor, images: torch.Tensor, form_of: torch.Tensor, controls: torch.Tensor,
                     tents: list[torch.Tensor], shifts: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """``[B, C, 5]`` float64: for each pair ``b`` (query form ``forms[form_of[b]]``, training image ``images[b]``,
    float32 ``[*, C, *grid]`` on the CPU, 2D or 3D), the bent window ``w[y] = image~[clamp(clamp(m(y) + u(m(y))) +
    s)]``: ``image~`` read bi/trilinearly, ``u`` the displacement field interpolated from the pair's ``controls``
    ``[B, ndim, *control]`` by the ``tents`` (``[n, control]`` per axis), ``m`` mirroring the spatial axes ``mirror``
    ``[B, ndim]`` sets, ``s`` the pair's ``shifts`` ``[B, ndim]``, each clamp to the grid; its sums per channel of
    ``form * w``, ``w``, ``w²``, ``form`` and ``form²``."""
    if forms.ndim == 4:  # 2D: one slice deep, not displaced across it
        flat = torch.cat([torch.zeros_like(controls[:, :1]), controls], 1)[:, :, None]
        return bent_window_sums(forms[:, :, None], images[:, :, None], form_of, flat, [tents[0].new_ones(1, 1), *tents],
                                torch.cat([torch.zeros_like(shifts[:, :1]), shifts], 1),
                                torch.cat([torch.zeros_like(mirror[:, :1]), mirror], 1))
    out = np.empty((len(images), images.shape[1], 5))
    arrays = [t.float().contiguous().numpy() for t in (forms, images, controls, tents[0], tents[1], tents[2].T)]
    _bent_sums(arrays[0], form_of.long().numpy(), *arrays[1:], shifts.long().contiguous().numpy(),
               mirror.bool().numpy(), out)
    return torch.from_numpy(out)
