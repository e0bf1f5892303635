"""Voxel level: normalized cross-correlation (NCC) to the nearest training image, tolerant to the grainy, mirrored
and slightly shifted copies that generators trained with flip/shift augmentation emit.

Images are resampled to a common grid, blurred by a Gaussian of ``smoothing`` voxels (sampling noise averages
out) and z-scored per channel, so NCC is a dot product divided by the voxel count. Search runs in three steps,
each batched over all samples:

1. exact NCC top-1 against the whole bank (one chunked matmul: the cost of plain NCC);
2. a thumbnail search of the query and its mirror images (one matmul), whose top-k adds candidates that plain
   NCC ranks low because they are mirrored or shifted: thumbnails (grid / 4 per axis) are centred on the
   centroid of the image's above-average intensity, so a translated copy has the same thumbnail as its source;
3. the best few (candidate, flip) pairs are re-scored at full resolution at the shift their centroids predict
   (within ``max_shift``), the best of them also one voxel around it along each axis and at the combination of
   the better steps;
4. the best match is bent onto the sample (:func:`register`: a smooth displacement field of at most
   ``max_bend`` voxels, a few Gauss-Newton steps on a coarse grid), so turned and bent copies score as straight
   ones do.

The similarity reported is the full-resolution NCC of the best (candidate, flip, shift, bend), and the record says
which transform matched (``"flip0+shift(1,0,-2)+bend(1.8)"``: the sample is the training image displaced by that
many grid voxels, bent by at most 1.8 voxels, then mirrored along spatial axis 0; :func:`undo_match` applies its
mirror and shift to a training image or mask).
"""

from __future__ import annotations

import functools
import hashlib
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..items import Item, ItemError
from ..search import blocked_dots_, inner_product_topk, row_pieces, sum_block, take_rows
from ..separable import along_axes
from ..torch_modes import tolerating_nondeterministic_backward
from ..validation import check_grid, check_number
from ..window_sums import bent_window_sums, window_sums
from .base import Level, Nearest, plain_grid, resample, resample_all, resolve_grid

LR_AXIS = {2: 1, 3: 0}  # left-right: columns of a [C, H, W] slice; first axis of a RAS [C, X, Y, Z] volume
THUMBNAIL_FACTOR = 4
REFINE_CANDIDATES = 3  # best (candidate, mirror) pairs re-scored at shifts (the segmentation level's own search too)
# the largest block of shifted copies (2 ndim per query) refined at once on the CPU: under glibc's largest threshold for
# mapping a block afresh (32 MiB), so that the allocator reuses it (a 3D refinement of 64 queries took 360 ms in blocks
# of 24 MiB, 800 in blocks of 48 MiB and 410 in blocks of 12 MiB); on an accelerator, a larger batch
REFINE_BYTES = 24 * 2**20
DEVICE_REFINE_BYTES = 256 * 2**20
SMOOTHING = 1.0  # Gaussian sigma, in grid voxels, applied before NCC: sampling noise averages out
BEND = 0.03  # largest bend searched, as a share of the grid's smallest side (about 2 voxels of a 64 grid)
BEND_CONTROL = 4  # control points of the bend's displacement field per axis
BEND_FITS = ("gauss-newton", "adam")  # how a bend is fitted (register); "adam": banks built before Gauss-Newton
BEND_ITERATIONS = 3  # Gauss-Newton steps of the bend search
BEND_DAMPING = 1e-3  # of each Gauss-Newton step, relative to the mean of its normal matrix's diagonal
BEND_STEPS = 20  # Adam steps of the bend search of banks built before the Gauss-Newton fit
# what banks saved before each of these config keys existed did: the keys a saved config lacks take these values
SAVED_BEFORE = {"smoothing": 0.0, "max_bend": 0.0, "bend_fit": "adam"}
BEND_SIDE = 16  # the bend is searched on a grid pooled to at most about this many voxels per side
BEND_MIN = 0.5  # a bend kept must move some voxel at least this far (smaller ones only fit interpolation noise)
# float32 images a bend's full-resolution score holds at once per pair where it scores the bent copies (CUDA, masks:
# its field, sampling grid, two-channel sample, standardized copies): bends are scored a few at a time so that these
# stay within REFINE_BYTES, which the allocator reuses (the bend phase of 64 3D queries on the CPU took 312 ms 2 pairs
# at a time, 340-358 ms 3 or 4 at a time, 474 ms 6)
BEND_SCORE_COPIES = 12
FIT_PAIRS = 16  # bends fitted at once on the CPU: their float64 normal matrices (295 KB a 3D pair) stay reusable
DEVICE_FIT_PAIRS = 1024  # off the CPU


def shift_reach(grid: tuple[int, ...], max_shift: int | None) -> int:
    """The largest shift, in voxels per axis, a search on ``grid`` tries: ``max_shift``, by default 5% of the
    grid's smallest side (at least 1)."""
    return max(1, round(0.05 * min(grid))) if max_shift is None else max_shift


def mirror_orientations(axes) -> list[tuple[int, ...]]:
    """The orientations a search tries: as is, then mirrored along each of the spatial ``axes`` in turn."""
    return [()] + [(axis,) for axis in axes]


def _pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool ``[B, C, *spatial]`` by ``factor`` per axis."""
    return F.avg_pool3d(x, factor) if x.ndim == 5 else F.avg_pool2d(x, factor)


def _centred(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, C, *spatial]`` less its mean per image and channel over the voxels in ``mask``, and their standard
    deviation there (from the centred copy: two passes, much faster than Tensor.std on the CPU)."""
    dims = tuple(range(2, x.ndim))
    if mask is None:
        centred = x - x.mean(dim=dims, keepdim=True)
        return centred, torch.linalg.vector_norm(centred, dim=dims, keepdim=True) / float(np.prod(x.shape[2:])) ** 0.5
    count = mask.sum(dim=dims, keepdim=True)  # per image where each has its own mask
    centred = x - (x * mask).sum(dim=dims, keepdim=True) / count
    return centred, ((centred * mask) ** 2).sum(dim=dims, keepdim=True).div(count).sqrt()


def _centroids(x: torch.Tensor) -> torch.Tensor:
    """Centroid ``[B, ndim]`` (voxels) of the above-average intensity of z-scored ``[B, C, *spatial]`` images.

    Only voxels brighter than the image mean weigh in (by how much brighter), so zero-mean sampling noise, which
    lifts the dark background once intensities are clipped, barely moves it. Summed by reductions, whose result
    does not depend on the batch or the thread count (matrix products with ones, as fast, rounded the last digit
    differently for a batch of one image or on another number of threads).
    """
    weight = (x[:, 0] if x.shape[1] == 1 else x.sum(1)).clamp_min(0)  # [B, *grid]; a sum over one channel is slow
    profile = weight.sum(-1)  # summed over the last axis
    dims = range(1, profile.ndim)
    moments = [profile.sum([d for d in dims if d != axis]) if profile.ndim > 2 else profile for axis in dims]
    moments.append(weight.sum(list(dims)))  # along the last axis
    return torch.stack([(m * torch.arange(m.shape[1], dtype=x.dtype, device=x.device)).sum(1) for m in moments],
                       1) / moments[0].sum(1, keepdim=True).clamp_min(1e-12)


def _displace(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``out[b, s][y] = x[b][y + shifts[b, s]]``: each ``[C, *spatial]`` image of ``x`` displaced by each of its
    integer ``shifts`` ``[B, S, ndim]``, edge-replicated where that falls outside; ``[B, S, C, *spatial]``."""
    pad = int(shifts.abs().max()) if shifts.numel() else 0
    if pad == 0:
        return x[:, None].expand(-1, shifts.shape[1], *x.shape[1:])
    still = torch.zeros(len(x), x.ndim - 2, dtype=torch.bool, device=x.device)
    return _windows(_padded(x, pad, still), pad, shifts, still)


def _padded(x: torch.Tensor, pad: int, mirror: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, C, *spatial]`` edge-replicated ``pad`` voxels beyond each side, the images ``mirror`` ``[B, ndim]``
    mirrors along the last axis mirrored along it (:func:`_windows` copies that axis's rows forward), to read
    windows of it shifted by up to ``pad`` voxels from (once for all the windows of an image)."""
    padded = F.pad(x, (pad,) * (2 * (x.ndim - 2)), mode="replicate")
    last = torch.nonzero(mirror[:, -1]).flatten()
    if len(last):
        padded[last] = padded[last].flip(-1)
    return padded


def _windows(padded: torch.Tensor, pad: int, shifts: torch.Tensor, mirror: torch.Tensor,
             images: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`_displace` of the images :func:`_padded` made (``pad``, ``mirror`` as given to it), then mirrored along
    the spatial axes ``mirror`` sets (read mirrored rather than copied twice), read by their index ``images`` ``[B]``
    (default: each once) with the ``shifts`` ``[B, S, ndim]`` (at most ``pad``) and ``mirror`` ``[B, ndim]`` of each
    read; ``[B, S, C, *spatial]``, written into the start of ``out`` (a flat buffer of at least that many values)
    where given."""
    (c, *sizes), (b, s, ndim) = padded.shape[1:], shifts.shape
    grid, device = [n - 2 * pad for n in sizes], padded.device
    images = torch.arange(b, device=device) if images is None else images
    last = torch.arange(ndim, device=device) == ndim - 1
    shifts = torch.where(last, 1 - 2 * mirror.long(), 1)[:, None] * shifts.long()
    strides = [int(np.prod(sizes[axis + 1 :])) for axis in range(ndim)]  # of a padded image, in voxels
    far = mirror.clone()
    far[:, -1] = False  # other mirrored axes are read from their far end (the last axis is mirrored in the copy)
    first = shifts + pad + far[:, None] * torch.tensor([n - 1 for n in grid], device=device)
    # every row of grid[-1] output voxels is a contiguous run of the padded images, copied from where it starts
    starts = ((images.view(b, 1, 1) * c + torch.arange(c, device=device).view(1, 1, c)) * int(np.prod(sizes))
              + (first * torch.tensor(strides, device=device)).sum(2)[:, :, None])  # [B, S, C]
    for axis, n in enumerate(grid[:-1]):
        step = torch.arange(n, device=device) * strides[axis]
        step = torch.where(far[:, axis, None], -step, step).view(b, 1, 1, *([1] * axis), n)
        starts = starts[..., None] + step
    flat = padded.reshape(-1)
    runs = flat.as_strided((flat.numel() - grid[-1] + 1, grid[-1]), (1, 1))
    into = None if out is None else out[: starts.numel() * grid[-1]].view(-1, grid[-1])
    return torch.index_select(runs, 0, starts.flatten(), out=into).view(b, s, c, *grid)


def _centred_thumbnails(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Each ``[C, *spatial]`` image of a batch translated by whole voxels so that its centroid is mid-grid (edges
    replicated, as :func:`_displace` does), then average-pooled by ``factor`` per axis (as :func:`_pool`): both in
    one matrix product per axis and image (:func:`_shift_pool_matrices`), without a padded copy of each image."""
    middle = torch.tensor([(n - 1) / 2 for n in x.shape[2:]], device=x.device)
    return _moved_pooled(x, factor, (_centroids(x) - middle).round().long())


def _moved_pooled(x: torch.Tensor, factor: int, shifts: torch.Tensor, mirror: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[B, C, *spatial]`` displaced by whole voxels (``out[y] = x[y + shift]``, each image by its ``shifts``
    ``[B, ndim]``, edges replicated), mirrored along the axes ``mirror`` ``[B, ndim]`` sets, and average-pooled by
    ``factor``: one matrix product per axis and image (:func:`_shift_pool_matrices`), no full-resolution copy."""
    return along_axes(x, [_shift_pool_matrices(shifts[:, axis], n, factor, None if mirror is None else mirror[:, axis])
                          .to(x.dtype) for axis, n in enumerate(x.shape[2:])])


def _shift_pool_matrices(shifts: torch.Tensor, n: int, factor: int, mirror: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, n // factor, n]``: for each of the ``shifts`` ``[B]``, the matrix that reads an axis of length ``n``
    displaced by that many voxels (``out[y] = x[y + shift]``, edges replicated), mirrored where ``mirror`` ``[B]``
    is set (``out[y] = x[n - 1 - y + shift]``), and averages runs of ``factor``."""
    pooled = n // factor
    source = torch.arange(pooled * factor, device=shifts.device).expand(len(shifts), -1)
    if mirror is not None:
        source = torch.where(mirror[:, None], n - 1 - source, source)
    source = (source + shifts[:, None]).clamp(0, n - 1)
    reads = source.view(-1, pooled, factor, 1) == torch.arange(n, device=shifts.device)  # [B, pooled, factor, n]
    return reads.sum(2).float() / factor  # how often each voxel is read (edges replicated), over the run


def _mirrored_axes(orientations: list[tuple[int, ...]], flips: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[*flips.shape, ndim]`` (bool): the spatial axes ``orientations[flips]`` mirrors, for :func:`_windows`."""
    return torch.tensor([[a in axes for a in range(ndim)] for axes in orientations], device=flips.device)[flips]


def _mirrored(x: torch.Tensor, orientations: list[tuple[int, ...]], flips: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, C, *spatial]`` in float32, each image mirrored along the spatial axes of its orientation
    ``orientations[flips[b]]``: one copy, then the images of each mirroring orientation flipped together."""
    out = x.to(torch.float32, copy=True)
    for f in flips.unique().tolist():
        if orientations[f]:
            at = torch.nonzero(flips == f).flatten()
            out[at] = out[at].flip([2 + a for a in orientations[f]])
    return out


def _blur_matrix(n: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` matrix ``m`` with ``m @ v`` the Gaussian blur of a length-``n`` vector ``v`` by ``sigma`` voxels,
    edges replicated, truncated at 3 sigma (as ``scipy.ndimage.gaussian_filter(mode="nearest", truncate=3)``)."""
    radius = max(1, int(3 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1)
    kernel = torch.exp(-0.5 * (offsets.to(like.dtype) / sigma) ** 2)
    source = (torch.arange(n)[:, None] + offsets).clamp(0, n - 1)  # [n, taps], edges replicated
    matrix = torch.zeros(n, n, dtype=like.dtype)  # on the CPU: CUDA's scatter_add_ adds edge taps in any order
    return matrix.scatter_add_(1, source, (kernel / kernel.sum()).expand(n, -1)).to(like.device)


def _smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``[B, C, *spatial]`` by ``sigma`` voxels along every spatial axis (edges replicated), one
    matrix product per axis."""
    return x if sigma == 0 else along_axes(x, [_blur_matrix(n, sigma, x) for n in x.shape[2:]])


def _standardize(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Z-score ``[B, C, *spatial]`` per image and channel over the voxels in ``mask`` (all when None)."""
    centred, std = _centred(x, mask)
    std = std.clamp_min(1e-12)
    return centred / std if centred.requires_grad else centred.div_(std)  # autograd needs the centred copy


def _ncc_pairs(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """NCC ``[B]`` of each image of ``x`` with the same image of ``y`` (``[B, C, *spatial]``), over ``mask``."""
    product = _standardize(x, mask) * _standardize(y, mask)
    product = product if mask is None else product * mask
    count = x[0, 0].numel() if mask is None else mask.sum()
    return product.flatten(2).sum(2).mean(1) / count


def _linear_matrix(n: int, points: int, like: torch.Tensor) -> torch.Tensor:
    """``[n, points]`` matrix that interpolates ``points`` evenly spaced values linearly onto ``n`` (corners on
    corners, as ``F.interpolate(..., align_corners=True)``)."""
    where = torch.linspace(0, points - 1, n, device=like.device, dtype=like.dtype)[:, None]
    return (1 - (where - torch.arange(points, device=like.device, dtype=like.dtype)).abs()).clamp_min(0)


def bend_field(controls: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """A bend's displacement field ``[B, ndim, *grid]``: its control-point displacements ``[B, ndim, *control]``
    interpolated (bi/trilinearly, corners on corners) onto ``grid``, so no voxel moves further than its farthest
    control point; one small matrix product per axis."""
    return along_axes(controls, [_linear_matrix(n, c, controls) for n, c in zip(grid, controls.shape[2:])])


def _bend_points(controls: torch.Tensor, grid: tuple[int, ...], parts) -> torch.Tensor:
    """``[B, *grid, K]``: for each ``(axis, scale, offset)`` of the ``K`` ``parts``, ``scale * (y + u) + offset`` at
    each voxel of ``grid``, ``y`` its position along ``axis`` and ``u`` the bend's displacement along it
    (:func:`bend_field` of ``controls``), the parts interleaved last (``grid_sample``'s layout). Linear interpolation
    reproduces the positions, so they are interpolated with the displacements, from the control points: one small
    matrix product per axis, the last writing the interleaved parts."""
    b, ndim, *control = controls.shape
    values = []
    for axis, scale, offset in parts:
        at = torch.linspace(0, grid[axis] - 1, control[axis], device=controls.device, dtype=controls.dtype)
        values.append((controls[:, axis] + at.view([-1 if a == axis else 1 for a in range(ndim)])) * scale + offset)
    values = torch.stack(values, -1).reshape(b, 1, *control[:-1], control[-1] * len(parts))
    tents = [_linear_matrix(n, c, controls) for n, c in zip(grid, control)]
    tents[-1] = torch.kron(tents[-1], torch.eye(len(parts), device=controls.device, dtype=controls.dtype))
    return along_axes(values, tents).view(b, *grid, len(parts))


def _bent(x: torch.Tensor, controls: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, C, *grid]`` bent by the bend of ``controls`` ``[B, ndim, *control]`` (:func:`bend_field`):
    sampled at each voxel plus its displacement (voxels), bi/trilinearly, edges replicated, as MONAI ``Warp``
    samples with that field; the sampling points made from the control points (:func:`_bend_points`), without the
    field itself. Volumes: :func:`_sample_volume`."""
    if x.ndim == 5:
        return _sample_volume(x, controls)
    grid = tuple(x.shape[2:])
    scales = [2 / max(n - 1, 1) for n in grid]  # grid_sample's normalized units, corners on corners
    where = _bend_points(controls, grid, [(1, scales[1], -1), (0, scales[0], -1)])  # grid_sample's (x, y)
    return F.grid_sample(x, where, mode="bilinear", padding_mode="border", align_corners=True)


def _sample_volume(x: torch.Tensor, controls: torch.Tensor) -> torch.Tensor:
    """:func:`_bent` of volumes ``[B, C, D, H, W]`` by a 2D bilinear sample of their slices stacked into a tall image,
    at each point's row in the slice below it, of two channels: the tall image and the same image read a slice
    further on (the slice above), blended linearly along the first axis: trilinear sampling, 1.3-1.9x faster on the
    CPU (torch's 2D kernel is vectorized, its 3D one is not). Each slice is stacked with its first and last rows
    repeated, so a row read a rounding error beyond a slice's edge reads the edge again, not the next slice.
    Positions are within about ``D * H * 1e-7`` voxels of a 3D sample's (float32 rows of the tall image), 5e-4 on a
    64³ grid: below the float16 rounding of the bank's rows."""
    b, c, d, h, w = x.shape
    # the slices, each with its edge rows repeated, and the last slice repeated (read with weight 0 at the top);
    # the two channels are views of the same rows, a slice apart
    padded = F.pad(x.reshape(b * c, 1, d, h, w), (0, 0, 1, 1, 0, 1), mode="replicate")
    slices = padded.as_strided((b * c, 2, d * (h + 2), w), (padded.stride(0), (h + 2) * w, w, 1))
    rows, columns = 2 / (d * (h + 2) - 1), 2 / max(w - 1, 1)  # grid_sample's normalized units, corners on corners
    # each point's column and its row in its slice (beyond the slice's edges: clamped to them), then in the slice
    # below it, as grid_sample's (x, y)
    where = _bend_points(controls, (d, h, w), [(2, columns, -1), (1, rows, rows - 1)])
    depth = _bend_points(controls, (d, h, w), [(0, 1, 0)]).view(b, d, h, w).clamp_(0, d - 1)
    below = depth.floor()
    where[..., 1].clamp_(rows - 1, h * rows - 1).add_(below, alpha=(h + 2) * rows)
    where = where.view(b, d * h, w, 2)
    sampled = F.grid_sample(slices, where if c == 1 else where.repeat_interleave(c, 0), mode="bilinear",
                            padding_mode="border", align_corners=True).view(b, c, 2, d, h, w)
    return torch.lerp(sampled[:, :, 0], sampled[:, :, 1], depth.sub_(below)[:, None])


@functools.lru_cache(maxsize=8)
def _bending_form(grid: tuple[int, ...]) -> torch.Tensor:
    """MONAI's ``BendingEnergyLoss`` of a bend on ``grid`` as a quadratic form of its control points: the ``[P, P]``
    matrix ``K`` with ``c @ K @ c`` the loss (summed, not averaged) of the field :func:`bend_field` interpolates
    from one component's ``P = BEND_CONTROL ** ndim`` control displacements ``c``. The field is linear in ``c`` and
    the loss quadratic in the field, so ``K`` is half the loss's Hessian, taken once per grid."""
    from monai.losses import BendingEnergyLoss

    ndim, control = len(grid), (BEND_CONTROL,) * len(grid)
    bending = BendingEnergyLoss(reduction="sum")

    def energy(c):  # the loss of a field moved along its first component only (components add up independently)
        controls = torch.cat([c.view(1, 1, *control), c.new_zeros(1, ndim - 1, *control)], 1)
        return bending(bend_field(controls, grid))

    with torch.inference_mode(False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using a non-tuple sequence")  # inside MONAI's BendingEnergyLoss
        hessian = torch.autograd.functional.hessian(energy, torch.zeros(BEND_CONTROL**ndim, dtype=torch.float64))
    return (hessian / 2).float()


def register(sample: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None, reach: float,
             fit: str = "gauss-newton") -> torch.Tensor:
    """The bend that lays each ``reference`` onto its ``sample`` (``[B, C, *grid]``): the displacements
    ``[B, ndim, *control]``, in voxels of ``grid`` and each within ``reach``, of ``BEND_CONTROL`` control points per
    axis (:func:`bend_field` interpolates them onto the grid) that maximize NCC (as MONAI ``Warp`` samples) less a
    small MONAI ``BendingEnergyLoss`` (taken as a quadratic form of the control points, :func:`_bending_form`).
    ``reach`` bounds it so that another patient cannot be bent into the sample. Each pair is fitted on its own,
    ``FIT_PAIRS`` at a time (``DEVICE_FIT_PAIRS`` off the CPU).

    ``fit`` is ``"gauss-newton"`` (:func:`_fit_gauss_newton`: ``BEND_ITERATIONS`` steps, no autograd, so no
    nondeterministic backward pass on CUDA) or ``"adam"`` (:func:`_fit_adam`: ``BEND_STEPS`` steps, the fit of banks
    built before it).

    >>> image = torch.zeros(1, 1, 32, 32); image[..., 10:20, 12:22] = 1
    >>> moved = torch.roll(image, 1, dims=2)
    >>> controls = register(moved, image, None, reach=2.0)
    >>> field = bend_field(controls, (32, 32))
    >>> bool(controls.abs().max() <= 2.0), round(float(field[0, 0, 15, 16]))
    (True, -1)
    """
    fitter = _fit_gauss_newton if _checked_fit(fit) == "gauss-newton" else _fit_adam
    pairs = FIT_PAIRS if sample.device.type == "cpu" else DEVICE_FIT_PAIRS
    return torch.cat([fitter(s, r, mask, reach) for s, r in zip(sample.split(pairs), reference.split(pairs))])


def _checked_fit(fit: str) -> str:
    if fit not in BEND_FITS:
        raise ValueError(f"bend_fit must be one of {BEND_FITS}, got {fit!r}")
    return fit


def _energy_scale(grid: tuple[int, ...]) -> int:
    """What MONAI's ``BendingEnergyLoss`` averages over on ``grid``: components times inner voxels."""
    return len(grid) * int(np.prod([n - 2 for n in grid]))


def _fit_gauss_newton(sample, reference, mask, reach, iterations: int = BEND_ITERATIONS) -> torch.Tensor:
    """:func:`register` by Gauss-Newton steps on NCC's residual, the difference of the standardized images (NCC is
    1 less half its mean square), each damped by ``BEND_DAMPING`` of its normal matrix's mean diagonal and clamped
    to ``reach``. The residual's Jacobian is taken as the warped image's gradient (central differences) over its
    standard deviation, centred, times the tent weights :func:`bend_field` interpolates with (the derivative of the
    standard deviation left out), so its normal matrix is formed one axis at a time (:func:`along_axes` with
    products of tent weights) rather than voxel by voxel. Each pair keeps the best of its iterates by the objective,
    the zero bend among them, so a step that overshoots is never returned."""
    (b, channels, *grid), ndim = sample.shape, sample.ndim - 2
    grid, spatial, size = tuple(grid), tuple(range(2, sample.ndim)), ndim * BEND_CONTROL**ndim
    count = float(np.prod(grid)) if mask is None else mask.sum()
    stiffness = torch.block_diag(*[_bending_form(grid).to(sample.device)] * ndim) * (2 / _energy_scale(grid))
    tents = [_linear_matrix(n, BEND_CONTROL, sample) for n in grid]  # [n, control]
    adjoints = [t.T for t in tents]
    products = [(t[:, :, None] * t[:, None, :]).flatten(1).T for t in tents]  # [control², n]
    pairs_first = [0, 1, *range(3, 3 + 2 * ndim, 2), 2, *range(4, 4 + 2 * ndim, 2)]  # (d, i..., e, j...)
    target = _standardize(sample, mask)
    controls = sample.new_zeros(b, size)
    best, best_objective = controls, torch.full((b,), -torch.inf, device=sample.device)
    for step in range(iterations + 1):
        warped = _bent(reference, controls.view(b, ndim, *(BEND_CONTROL,) * ndim))
        centred, std = _centred(warped, mask)
        std = std.clamp_min(1e-12)
        moved = centred / std
        residual = target - moved if mask is None else (target - moved) * mask
        ncc = (target * moved if mask is None else target * moved * mask).flatten(2).sum(2).mean(1) / count
        objective = ncc - (controls @ stiffness * controls).sum(1) / 2
        better = objective > best_objective
        best = torch.where(better[:, None], controls, best)
        best_objective = torch.where(better, objective, best_objective)
        if step == iterations:
            break
        slopes = torch.stack(torch.gradient(warped, dim=spatial), 1).div_(std[:, None])  # [B, ndim, C, *grid]
        slopes = slopes if mask is None else slopes * mask
        outer = torch.einsum("bdc...,bec...->bde...", slopes, slopes).reshape(b * ndim * ndim, 1, *grid)
        normal = along_axes(outer, products).view(b, ndim, ndim, *(BEND_CONTROL,) * (2 * ndim))
        normal = normal.permute(pairs_first).reshape(b, size, size)
        # the residual is centred: less the outer product of each channel's Jacobian summed over the voxels
        sums = along_axes(slopes.flatten(0, 1), adjoints).view(b, ndim, channels, -1).transpose(1, 2)
        sums = sums.reshape(b, channels, size)
        normal = normal.sub_(torch.einsum("bcp,bcq->bpq", sums, sums) / count).div_(count * channels).add_(stiffness)
        ascent = along_axes((slopes * residual[:, None]).sum(2), adjoints).view(b, size) / (count * channels)
        ascent = ascent - controls @ stiffness
        diagonal = normal.diagonal(dim1=1, dim2=2)
        diagonal += BEND_DAMPING * diagonal.mean(1, keepdim=True)
        # in float64: float32 factors of these systems differ in their last digit with the CPU's thread count
        factor, failed = torch.linalg.cholesky_ex(normal.double())
        change = torch.cholesky_solve(ascent.double()[..., None], factor)[..., 0].float()
        usable = (failed == 0)[:, None] & change.isfinite().all(1, keepdim=True)
        controls = (controls + torch.where(usable, change, 0)).clamp(-reach, reach)
    return best.view(b, ndim, *(BEND_CONTROL,) * ndim)


def _fit_adam(sample, reference, mask, reach, steps: int = BEND_STEPS) -> torch.Tensor:
    """:func:`register` by ``steps`` Adam steps through autograd (the controls ``reach * tanh`` of its parameters),
    as the bend search fitted before :func:`_fit_gauss_newton`; kept for the banks built then."""
    grid, ndim = tuple(sample.shape[2:]), sample.ndim - 2
    with (torch.inference_mode(False), torch.enable_grad(),
          tolerating_nondeterministic_backward("grid_sampler_2d_backward_cuda", "grid_sampler_3d_backward_cuda")):
        form = _bending_form(grid).to(sample.device)
        target, moving = sample.clone(), reference.clone()
        params = torch.zeros(len(sample), ndim, *(BEND_CONTROL,) * ndim, device=sample.device, requires_grad=True)
        optimizer = torch.optim.Adam([params], lr=0.1)
        for _ in range(steps):
            controls = reach * torch.tanh(params)
            flat = controls.flatten(2)
            energy = torch.einsum("bcp,pq,bcq->", flat, form, flat) / _energy_scale(grid)  # summed over the pairs
            loss = energy - _ncc_pairs(_bent(moving, controls), target, mask).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return reach * torch.tanh(params.detach())


class VoxelLevel(Level):
    """NCC between a sample and its nearest training image, robust to mirroring and small shifts.

    Args:
        grid: common grid every image is resampled to (default 128² for 2D, 64³ for 3D; an int means isotropic).
        mask: optional boolean array on ``grid``; only voxels inside it count (e.g. exclude a scanner table).
        max_shift: largest translation, in grid voxels per axis, under which candidates are re-scored
            (0 disables the shift search; default: 5% of the grid's smallest side, i.e. 6 voxels of the 128²
            grid and 3 of the 64³ grid).
        flips: spatial axes to mirror along: ``"all"`` (default: each spatial axis on its own, whatever the
            array layout), ``"lr"`` (left-right: axis 1 of a 2D ``[C, H, W]`` slice and axis 0 of a 3D RAS
            ``[C, X, Y, Z]`` volume; a ``(z, y, x)`` NumPy/SimpleITK/pydicom array has it last), a tuple of
            axes, or ``()``.
        top_k: candidates taken from each thumbnail search (the best 3 of them, over all flips, are re-scored).
        smoothing: Gaussian sigma, in grid voxels, applied to every image before NCC (0: none), so that grainy
            copies of a patient score as clean ones do.
        max_bend: largest bend, in grid voxels per axis, under which each sample's best match is re-scored
            (:func:`register`: a smooth displacement field fitted on a pooled grid), so that turned and bent
            copies score as straight ones do (0 disables it; default: 3% of the grid's smallest side, i.e. 3.8
            voxels of the 128² grid and 1.9 of the 64³ grid). It costs a few small warps per sample and one at
            full resolution.
        bend_fit: how the bend is fitted: ``"gauss-newton"`` (default: ``BEND_ITERATIONS`` steps, without autograd)
            or ``"adam"`` (``BEND_STEPS`` steps through autograd, about 4x slower: the fit of banks built before the
            Gauss-Newton one, which load with it so that their nulls and new scores agree).

    >>> import torch
    >>> from relict_callbacks.items import Item
    >>> level = VoxelLevel(grid=32)
    >>> rows = level.embed([Item(torch.rand(1, 40, 40), None, "a"), Item(torch.rand(1, 40, 40), None, "b")])
    >>> query = {k: torch.from_numpy(v[:1]).float() for k, v in rows.items()}
    >>> level.nearest(query, rows).index.tolist()
    [0]
    """

    name = "voxel"
    dot_product = True

    def __init__(self, grid=None, mask=None, max_shift: int | None = None, flips="all", top_k: int = 5,
                 smoothing: float = SMOOTHING, max_bend: float | None = None, bend_fit: str = "gauss-newton") -> None:
        if isinstance(flips, str) and flips not in ("lr", "all"):
            raise ValueError(f"flips must be 'lr', 'all' or a tuple of spatial axes, got {flips!r}")
        self.grid = check_grid("grid", grid)
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu()  # kept on the CPU, moved with each search (a CUDA mask is welcome)
        self.mask = None if mask is None else torch.as_tensor(np.asarray(mask, dtype=bool))
        if self.mask is not None and not self.mask.any():
            raise ValueError("VoxelLevel mask has no voxel inside it: NCC over it is undefined")
        self.max_shift = None if max_shift is None else check_number("max_shift", max_shift, low=0, integer=True)
        self.flips = flips if isinstance(flips, str) else tuple(check_number("flips", a, low=0, high=2, integer=True)
                                                                for a in flips)
        self.top_k = check_number("top_k", top_k, low=1, integer=True)
        self.smoothing = float(check_number("smoothing", smoothing, low=0))
        self.max_bend = None if max_bend is None else float(check_number("max_bend", max_bend, low=0))
        self.bend_fit = _checked_fit(bend_fit)

    def config(self) -> dict:
        mask_digest = None
        if self.mask is not None:
            mask_digest = hashlib.blake2b(self.mask.numpy().tobytes(), digest_size=8).hexdigest()
        grid = plain_grid(self.grid)
        return {"type": "VoxelLevel", "name": self.name, "grid": grid, "mask": mask_digest, "max_shift": self.max_shift,
                "flips": self.flips if isinstance(self.flips, str) else list(self.flips), "top_k": self.top_k,
                "smoothing": self.smoothing, "max_bend": self.max_bend,
                "bend_fit": self.bend_fit}

    @classmethod
    def from_config(cls, config: dict) -> VoxelLevel:
        config = {**SAVED_BEFORE, **config}
        if config.get("mask"):
            raise ValueError("this bank's voxel level uses a mask: pass levels=[VoxelLevel(mask=...), ...] to load it")
        return cls(grid=config["grid"], max_shift=config["max_shift"], flips=config["flips"], top_k=config["top_k"],
                   smoothing=config["smoothing"], max_bend=config["max_bend"], bend_fit=config["bend_fit"])

    # -- geometry -----------------------------------------------------------------------------------------
    def stored_image(self, bank: dict[str, np.ndarray], index: int) -> torch.Tensor:
        """The bank's z-scored image ``index`` on the level's grid."""
        return torch.from_numpy(np.asarray(bank["rows"][index], dtype=np.float32))

    def display_pair(self, sample: torch.Tensor, nearest: torch.Tensor, transform: str):
        """Both on the level's grid, ``nearest`` moved by the matched mirror/shift into the sample's frame."""
        grid = resolve_grid(self.grid, sample.ndim - 1)
        return resample(sample, grid), undo_match(resample(nearest, grid), transform)

    def _mask(self, grid: tuple[int, ...], factor: int = 1, device="cpu") -> torch.Tensor | None:
        if self.mask is None:
            return None
        if tuple(self.mask.shape) != grid:
            raise ValueError(f"VoxelLevel mask has shape {tuple(self.mask.shape)}, the grid is {grid}")
        mask = self.mask[None, None].float()
        return (mask if factor == 1 else _pool(mask, factor)).gt(0.5).float().to(device)

    def shift_reach(self, grid: tuple[int, ...]) -> int:
        """The largest shift searched on ``grid``."""
        return shift_reach(grid, self.max_shift)

    def bend_reach(self, grid: tuple[int, ...]) -> float:
        """The largest bend searched on ``grid``, in voxels per axis."""
        return BEND * min(grid) if self.max_bend is None else self.max_bend

    def flip_axes(self, ndim: int) -> list[int]:
        """The spatial axes mirrored during the search, for images with ``ndim`` spatial dims."""
        if self.flips == "lr":
            return [LR_AXIS[ndim]]
        if self.flips == "all":
            return list(range(ndim))
        return list(self.flips)

    # -- embedding ----------------------------------------------------------------------------------------
    def embed(self, items: list[Item], device="cpu") -> dict[str, np.ndarray]:
        ndim = items[0].image.ndim - 1
        grid = resolve_grid(self.grid, ndim)
        if torch.device(device).type != "cpu":
            return self._embed_piece(items, grid, device)
        # on the CPU a few images at a time (PIECE_BYTES of float32 each): the allocator reuses their temporaries
        # (16 64³ volumes at once faulted 50,000-80,000 new pages, 180-400 ms for 64; 4 at a time about 100 ms)
        parts = [self._embed_piece(items[piece], grid, device)
                 for piece in row_pieces(len(items), 4 * items[0].image.shape[0] * int(np.prod(grid)))]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def _embed_piece(self, items: list[Item], grid: tuple[int, ...], device) -> dict[str, np.ndarray]:
        mask = self._mask(grid, device=device)
        batch = _smooth(resample_all([item.image for item in items], grid, device), self.smoothing)
        centred, std = _centred(batch, mask)
        flat = batch.flatten(2)  # the largest magnitude; amax and amin reduce 6x faster than aminmax on the CPU
        scale = torch.maximum(flat.amax(dim=2), -flat.amin(dim=2)).clamp_min(1e-12)
        for item, constant in zip(items, (std.flatten(1) <= 1e-6 * scale).any(dim=1).tolist()):
            if constant:
                raise ItemError(f"item {item.id!r}: image is constant (in a channel or inside the mask); NCC is undefined")
        rows = centred.div_(std.clamp_min(1e-12))
        factor = min(THUMBNAIL_FACTOR, *(g // 4 for g in grid)) or 1
        thumbs = _standardize(_centred_thumbnails(rows, factor), self._mask(grid, factor, device))
        rows = rows.half()
        # the refinement predicts shifts from the centroids of the stored rows: taken once here, not at every search
        centroids = _centroids(rows.float())
        return {"rows": rows.cpu().numpy(), "thumbs": thumbs.half().cpu().numpy(), "centroids": centroids.cpu().numpy()}

    # -- search -------------------------------------------------------------------------------------------
    def _query_form(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (any float dtype) standardized, masked, divided by the voxel count and flattened, in float32:
        ``query_form @ rows.T`` is NCC. Made a few queries at a time (:func:`row_pieces`), whose temporaries the
        allocator reuses (64 3D queries at once took two fresh 64 MiB copies), as the whole batch at once gives it."""
        count = x[0].numel() if mask is None else mask.sum() * x.shape[1]
        form = torch.empty(len(x), x[0].numel(), dtype=torch.float32, device=x.device)
        for piece in row_pieces(len(x), 4 * x[0].numel()):
            z = _standardize(x[piece].float(), mask)
            torch.div((z if mask is None else z * mask).flatten(1), count, out=form[piece])
        return form

    def nearest(self, query, bank, *, exclude=None, index=None) -> Nearest:
        rows, thumbs = bank["rows"], bank["thumbs"]
        q = query["rows"]  # as stored (float16): converted a chunk at a time
        n, ndim = len(rows), q.ndim - 2
        grid, device = tuple(q.shape[2:]), q.device
        mask = self._mask(grid, device=device)
        with record_function("relict.voxel.search"):  # each phase named in torch.profiler traces
            plain = self._query_form(q, mask)
            if index is not None:
                values, indices = index.search(plain, 1)
            else:
                values, indices = inner_product_topk(plain, rows.reshape(n, -1), 1, exclude=exclude)
        best, best_index = values[:, 0].clone(), indices[:, 0].clone()
        flip = torch.zeros(len(q), dtype=torch.long, device=device)
        shift = torch.zeros(len(q), ndim, dtype=torch.long, device=device)
        reach, orientations = self.shift_reach(grid), mirror_orientations(self.flip_axes(ndim))
        if reach > 0 or len(orientations) > 1:
            chunks = torch.arange(len(q), device=device).split(self._chunk(q, 2 * ndim))
            with record_function("relict.voxel.thumbnails"):
                candidates, flips = self._propose(query["thumbs"].float(), thumbs, orientations, grid, exclude)
            with record_function("relict.voxel.refine"):
                # stored centroids (None in banks saved before they were kept)
                query_centres, bank_centres = query.get("centroids"), bank.get("centroids")
                # the windows every chunk reads, in one buffer: allocated afresh for each read, they took longer
                # than reading them (new pages from the OS); none where they are summed in place
                windows = None if self._sums_in_place(q, mask) else torch.empty(
                    len(chunks[0]) * max(REFINE_CANDIDATES, 2 * ndim) * q[0].numel(), dtype=torch.float32, device=device)
                found = [self._refine(q[chunk].float(), rows, candidates[chunk], flips[chunk], orientations, reach,
                                      mask, (None if query_centres is None else query_centres[chunk], bank_centres),
                                      windows)
                         for chunk in chunks]
                del windows
            sim, m, found_flip, found_shift = (torch.cat(parts) for parts in zip(*found))
            better = sim > best
            best, best_index = torch.where(better, sim, best), torch.where(better, m, best_index)
            flip, shift = torch.where(better, found_flip, flip), torch.where(better[:, None], found_shift, shift)
        transforms = [_describe(orientations[int(f)], tuple(s)) for f, s in zip(flip.tolist(), shift.tolist())]
        if self.bend_reach(grid) > 0:
            with record_function("relict.voxel.bend"):
                sim, size = self._bend(q, rows, best_index, flip, shift, orientations, mask)
            better = sim > best
            best = torch.where(better, sim, best)
            for i in torch.nonzero(better).flatten().tolist():
                transforms[i] = _describe(orientations[int(flip[i])], tuple(shift[i].tolist()), float(size[i]))
        return Nearest(best.clamp(-1, 1).cpu().numpy(), best_index.cpu().numpy(), transforms)

    def _bend(self, q, rows, index, flip, shift, orientations, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """NCC of each query ``q`` [Q, C, *grid] with its match (bank ``index``, orientation ``flip``, ``shift``)
        bent onto it, and the largest displacement of that bend, in grid voxels. Each pair (the query as matched,
        mirrored, and its match moved into its frame) is pooled to about ``BEND_SIDE`` voxels per axis straight from
        the query and its match (:func:`_moved_pooled`); the bends are fitted
        there (:func:`register`), then scored at full resolution (:meth:`_bent_ncc`), a few queries at a time (on the
        CPU :func:`row_pieces`, whose temporaries the allocator reuses; else :meth:`_chunk` of 2). A bend that moves no
        voxel as far as ``BEND_MIN`` is not scored (its NCC is ``-inf``): it is not kept."""
        grid, ndim = tuple(q.shape[2:]), q.ndim - 2
        factor = max(1, min(grid) // BEND_SIDE)
        mirror, moved = _mirrored_axes(orientations, flip, ndim), -shift
        every = torch.arange(len(q), device=q.device)
        pieces = ([every[piece] for piece in row_pieces(len(q), 4 * q[0].numel())] if q.device.type == "cpu"
                  else every.split(self._chunk(q, 2)))

        def pair(piece):  # the queries and their matches at full resolution, in float32
            return q[piece].float(), take_rows(rows, index[piece], q.device)

        pooled = []
        for piece in pieces:
            queries, refs = pair(piece)
            pooled.append((_moved_pooled(queries, factor, torch.zeros_like(moved[piece]), mirror[piece]),
                           _moved_pooled(refs, factor, moved[piece])))
        pooled_queries, pooled_refs = (torch.cat(part) for part in zip(*pooled))
        mask_small = None if mask is None else self._mask(grid, factor, q.device)
        controls = factor * register(pooled_queries, pooled_refs, mask_small, self.bend_reach(grid) / factor,
                                     self.bend_fit)
        size = torch.linalg.vector_norm(controls, dim=1).flatten(1).amax(1)
        sim = torch.full_like(size, -torch.inf)
        for piece in pieces:
            kept = piece[size[piece] >= BEND_MIN]
            if len(kept):
                sim[kept] = self._bent_ncc(*pair(kept), controls[kept], moved[kept], orientations, flip[kept], mask)
        return sim, size

    @staticmethod
    def _bent_ncc(queries, refs, controls, moved, orientations, flips, mask) -> torch.Tensor:
        """NCC ``[B]`` of each query (``[B, C, *grid]``) in its orientation ``orientations[flips]`` with its
        training image ``refs`` displaced by ``moved`` [B, ndim] (``w[y] = ref[y + moved]``, edges replicated)
        and bent by ``controls`` (:func:`_bent`), over ``mask``. On the CPU without a mask, summed where the bent
        image lies (:func:`bent_window_sums`, in float64; no mirrored, displaced or bent copy); else from those
        copies, a few pairs at a time (:meth:`_chunk` of ``BEND_SCORE_COPIES``)."""
        grid = tuple(refs.shape[2:])
        if VoxelLevel._sums_in_place(refs, mask):
            tents = [_linear_matrix(n, c, controls) for n, c in zip(grid, controls.shape[2:])]
            mirror = _mirrored_axes(orientations, flips, len(grid))
            sums = bent_window_sums(queries, refs, torch.arange(len(refs)), controls, tents, moved, mirror)
            count = refs[0, 0].numel()
            means = sums[..., [1, 3]] / count  # of the window and of the query
            spreads = (sums[..., [2, 4]] / count - means.square()).clamp_min(1e-24).sqrt()
            covariance = sums[..., 0] / count - means.prod(-1)
            return (covariance / spreads.prod(-1)).mean(1).float()
        sims = []
        for part in torch.arange(len(refs), device=refs.device).split(VoxelLevel._chunk(refs, BEND_SCORE_COPIES)):
            displaced = _displace(refs[part], moved[part, None])[:, 0]
            sims.append(_ncc_pairs(_bent(displaced, controls[part]), _mirrored(queries[part], orientations, flips[part]),
                                   mask))
        return torch.cat(sims)

    def _propose(self, query_thumbs, thumbs, orientations, grid, exclude) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``REFINE_CANDIDATES`` best (bank index, orientation) pairs per query ``[Q, P]`` by thumbnail NCC of
        the query's mirror images, searched in one matmul over all orientations."""
        nq, device = len(query_thumbs), query_thumbs.device
        thumb_mask = self._mask(grid, grid[0] // thumbs.shape[2], device)
        oriented = torch.cat([query_thumbs.flip([2 + a for a in axes]) for axes in orientations])
        k = min(self.top_k, len(thumbs) - (exclude is not None))
        values, indices = inner_product_topk(self._query_form(oriented, thumb_mask), thumbs.reshape(len(thumbs), -1),
                                             k, exclude=None if exclude is None else exclude.repeat(len(orientations)))
        values = values.view(len(orientations), nq, -1).transpose(0, 1).flatten(1)  # [Q, orientations * k]
        indices = indices.view(len(orientations), nq, -1).transpose(0, 1).flatten(1)
        top = values.topk(min(REFINE_CANDIDATES, values.shape[1]), dim=1).indices
        return indices.gather(1, top), torch.div(top, values.shape[1] // len(orientations), rounding_mode="floor")

    @staticmethod
    def _chunk(q: torch.Tensor, copies: int) -> int:
        """Queries worked on at once, so that ``copies`` float32 images of each take about ``REFINE_BYTES``
        (``DEVICE_REFINE_BYTES`` off the CPU): the refinement's shifted copies of each query's best pair one voxel
        along each axis (``2 ndim``), or what a bend's full-resolution score holds (``BEND_SCORE_COPIES``)."""
        held = REFINE_BYTES if q.device.type == "cpu" else DEVICE_REFINE_BYTES
        return max(1, held // (q[0].numel() * 4 * copies))

    def _refine(self, q, rows, candidates, flips, orientations, reach, mask, centres=(None, None), windows=None):
        """Best full-resolution NCC of each query ``q`` [Q, C, *grid] over its (bank index, orientation)
        ``candidates``/``flips`` [Q, P]: every pair is scored at the shift its centroids predict (within
        ``reach``), then each query's best pair one voxel around it along each axis and at the combination of the
        better steps. ``centres``: the centroids of the queries and of the bank's rows, where stored (else
        taken here); ``windows``: a buffer for the windows read (see :meth:`_ncc`). Returns (NCC, bank index,
        orientation, shift) per query.

        NCC is unchanged when both images are mirrored, so the shifted training image is mirrored as it is read
        (on the CPU without a mask, summed where it lies: :meth:`_ncc_summed`; else :func:`_windows` of the pair's
        :func:`_padded` copy) and compared with the query as is, rather than each pair copying a mirrored query."""
        nq, npairs = candidates.shape
        ndim = q.ndim - 2
        pair_flips = flips.flatten()
        mirror = _mirrored_axes(orientations, pair_flips, ndim)
        refs = take_rows(rows, candidates.flatten(), q.device)
        size = torch.tensor(q.shape[2:], device=q.device)
        query_centres, bank_centres = centres
        centre = (_centroids(q) if query_centres is None else query_centres.float()).repeat_interleave(npairs, 0)
        centre = torch.where(mirror, size - 1 - centre, centre)  # of the mirror images
        ref_centres = (_centroids(refs) if bank_centres is None
                       else take_rows(bank_centres, candidates.flatten(), q.device))
        shift = (centre - ref_centres).round().clamp(-reach, reach).long()
        if mask is None:  # each query's pairs share it
            forms, masks = q, None
        else:  # the query standardized inside the mask mirrored as its pair's training image is
            masks = torch.cat([mask.flip([2 + a for a in axes]) for axes in orientations])[pair_flips]
            forms = _standardize(q.repeat_interleave(npairs, 0), masks) * masks
        # every window of a pair is read from its training image (summed where it lies) or one padded copy of it: its
        # predicted shift, then within a voxel of it
        pad = min(reach, int(shift.abs().max()) + 1) if shift.numel() else 0
        summed = self._sums_in_place(q, mask)
        source = refs if summed else _padded(refs, pad, mirror)
        del refs
        ncc = self._ncc_summed if summed else self._ncc
        scores = ncc(forms, source, pad, shift[:, None], mirror, masks, out=windows)[:, 0].view(nq, npairs)
        centre, pick = scores.max(1)
        chosen = torch.arange(nq, device=q.device) * npairs + pick
        shift, mirror = shift[chosen], mirror[chosen]
        forms, masks = (forms, None) if mask is None else (forms[chosen], masks[chosen])
        steps = torch.cat([torch.eye(ndim, dtype=torch.long), -torch.eye(ndim, dtype=torch.long)]).to(q.device)
        around = (shift[:, None] + steps).clamp(-reach, reach)  # [Q, 2 ndim, ndim]
        near = ncc(forms, source, pad, around, mirror, masks, chosen, windows)
        up, down = near[:, :ndim], near[:, ndim:]
        step = torch.where((up > centre[:, None]) & (up >= down), 1, torch.where(down > centre[:, None], -1, 0))
        around = torch.cat([shift[:, None], around, (shift + step).clamp(-reach, reach)[:, None]], 1)
        last = ncc(forms, source, pad, around[:, -1:], mirror, masks, chosen, windows)
        near = torch.cat([centre[:, None], near, last], 1)
        sim, j = near.max(1)
        arange = torch.arange(nq, device=q.device)
        return sim, candidates[arange, pick], flips[arange, pick], around[arange, j]

    @staticmethod
    def _ncc(forms, padded, pad, shifts, mirror, masks, images=None, out=None) -> torch.Tensor:
        """NCC ``[B, S]`` of the training images ``padded`` (:func:`_padded` by ``pad``; read by their index ``images``
        ``[B]``, default each once) displaced by minus each of their ``shifts`` [B, S, ndim] (the training image
        moved onto the sample) and mirrored along ``mirror`` [B, ndim], with their query's ``forms``
        [G, C, *grid] (standardized; the ``B / G`` pairs of a query share its form), inside ``masks``
        [B, 1, *grid] where given (the forms then standardized and masked there, one per pair). The windows are
        read into ``out`` where given (a flat buffer, see :func:`_windows`)."""
        windows = _windows(padded, pad, -shifts, mirror, images, out).flatten(3)  # [B, S, C, D]
        if masks is not None:
            windows = windows * masks.flatten(2)[:, None]
        count = windows.shape[3] if masks is None else masks[0].sum()
        totals = windows.sum(dim=3)
        squares = torch.linalg.vector_norm(windows.unflatten(3, (-1, sum_block(windows.shape[3]))), dim=4)
        squares = squares.square().sum(3)
        # each window times its query's form, in place: the windows are read no more
        grouped = windows.view(len(forms), -1, *windows.shape[2:])  # [G, pairs x S, C, D]
        dots = blocked_dots_(grouped, forms.flatten(2)[:, None]).view(windows.shape[:3])
        return _correlation(dots, totals, squares, count)

    @staticmethod
    def _sums_in_place(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether the refinement of queries ``q`` sums each window where it lies (:meth:`_ncc_summed`): on the CPU,
        without a mask (else it reads windows from padded copies, :meth:`_ncc`)."""
        return q.device.type == "cpu" and mask is None

    @staticmethod
    def _ncc_summed(forms, refs, pad, shifts, mirror, masks=None, images=None, out=None) -> torch.Tensor:
        """:meth:`_ncc` on the CPU without a mask, from the training images ``refs`` themselves (not padded: ``pad``
        and ``out`` go unused), each window summed where it lies (:func:`window_sums`, in float64): about 4x faster
        than reading the windows into a buffer, and no padded copy."""
        b, count = len(shifts), forms[0, 0].numel()
        images = torch.arange(b) if images is None else images
        sums = window_sums(forms, refs, torch.arange(b) // (b // len(forms)), images, -shifts, mirror)
        return _correlation(*sums.unbind(-1), count).float()


def _correlation(dots, totals, squares, count) -> torch.Tensor:
    """NCC ``[B, S]`` of windows with standardized query forms from their sums per channel ``[B, S, C]`` over
    ``count`` voxels: the dots with the forms, the windows' values and their squares; averaged over the channels."""
    mean = totals / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return (dots / std).mean(dim=2) / count


def _describe(flip: tuple[int, ...], shift: tuple[int, ...], bend: float = 0.0) -> str:
    parts = [f"flip{flip[0]}"] if flip else []
    if any(shift):
        parts.append("shift(" + ",".join(map(str, shift)) + ")")
    if bend:
        parts.append(f"bend({bend:.1f})")
    return "+".join(parts) or "identity"


_TRANSFORM_PART = r"flip\d|shift\(-?\d+(,-?\d+)*\)|bend\(\d+(\.\d+)?\)"


def rigid_part(transform: str) -> str:
    """The mirror and shift of a match's ``transform``, without its bend (which :func:`undo_match` cannot apply).

    >>> rigid_part("flip1+bend(1.8)"), rigid_part("bend(2.0)")
    ('flip1', 'identity')
    """
    return "+".join(p for p in transform.split("+") if not p.startswith("bend(")) or "identity"


def undo_match(reference: torch.Tensor, transform: str) -> torch.Tensor:
    """``reference`` [C, *grid] moved into its sample's frame, undoing the ``transform`` a match reports:
    ``"identity"``, ``"flipA"``, ``"shift(dx,dy[,dz])"``, ``"bend(m)"`` or several joined by ``+``, meaning the
    sample is the reference displaced by that many grid voxels (edges replicated), bent by at most ``m`` voxels,
    then mirrored along spatial axis ``A``. Use it to show the two side by side, or to align a training mask with
    its sample. A bend is applied as no bend: the string keeps only its size, not its field, so a bent match
    stays up to ``m`` voxels off its sample (the mirror and shift, the rigid part, are undone).

    >>> ref = torch.arange(4.).reshape(1, 1, 4)
    >>> undo_match(ref, "flip1+shift(0,1)").tolist()
    [[[2.0, 1.0, 0.0, 0.0]]]
    >>> undo_match(ref, "flip1+shift(0,1)+bend(1.8)").tolist()
    [[[2.0, 1.0, 0.0, 0.0]]]
    """
    flip, shift = rigid_transform(transform, reference.ndim - 1)
    if any(shift):
        offsets = torch.tensor([[[-s for s in shift]]], device=reference.device)
        reference = _displace(reference[None].float(), offsets)[0, 0].to(reference.dtype)  # masks too
    return reference.flip([1 + a for a in flip]) if flip else reference


def rigid_transform(transform: str, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The mirrored spatial axes and the shift (grid voxels per axis) of a match's ``transform`` (see
    :func:`undo_match`); a bend is left out.

    >>> rigid_transform("flip1+shift(0,-2)+bend(1.8)", 2), rigid_transform("identity", 3)
    (((1,), (0, -2)), ((), (0, 0, 0)))
    """
    if transform != "identity" and not all(re.fullmatch(_TRANSFORM_PART, p) for p in transform.split("+")):
        raise ValueError(f"transform {transform!r} is not one a voxel match reports (flipA, shift(...), bend(m))")
    flip = re.search(r"flip(\d+)", transform)
    shift = re.search(r"shift\(([-\d,]+)\)", transform)
    return (() if flip is None else (int(flip.group(1)),),
            (0,) * ndim if shift is None else tuple(int(s) for s in shift.group(1).split(",")))
