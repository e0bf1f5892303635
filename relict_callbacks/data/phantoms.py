"""Synthetic patients for tests, demos and benchmarks: head CTs with a hemorrhage and TOF-MRA-like vessel trees.

Every phantom is a head drawn from the same anatomy with per-patient variation (head size and outline, position,
small in-plane rotation, skull thickness, ventricles, sulci and texture, lesion or vessel layout), so two
patients are similar but never near-duplicates, and no patient is left-right symmetric. ``make_replica`` turns
one of them into the near-copy a memorizing generator would emit.

Layout is channel-first: ``[1, H, W]`` in 2D, an axial view as displayed (anterior at the top, left-right along
the columns; a slice for CT, a projection of the vessel tree for MRA), and ``[1, X, Y, Z]`` in 3D with RAS axes
(left-right, posterior-anterior, inferior-superior). Intensities lie in [0, 1]; only numpy and scipy are used.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
from scipy import ndimage

from ..levels.voxel import LR_AXIS

PERTURBATIONS = ("noise", "shift", "intensity", "blur", "flip")
HARD_PERTURBATIONS = ("elastic", "remap")  # copies that voxel similarity is not built for
# grainy, turned and bent copies, alone and combined, as undertrained or augmentation-trained diffusion models emit
DISTORTIONS = ("grain", "rotate", "bend", "grain+flip", "grain+rotate", "bend+shift")
_KINDS = {"head_ct": 1, "mra": 2}


def _soft(x):
    """Partial-volume occupancy of a voxel whose centre lies ``x`` voxels inside a surface."""
    return np.clip(x + 0.5, 0.0, 1.0).astype(np.float32)


def _field(rng, shape, sigma):
    """Smooth zero-mean, unit-variance random field with correlation length ``sigma`` voxels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, truncate=3)
    return (field - field.mean()) / field.std()


class _Frame:
    """One patient's head frame: voxel coordinates (lr, ap, si) relative to the head centre, slightly rotated."""

    def __init__(self, rng, ndim, size):
        self.ndim, self.centre = ndim, (size - 1) / 2
        # a few voxels off-centre (>= 0.9 left-right) and a little rotated, so that mirror images differ
        self.offset = np.float32(rng.choice([-1, 1], 3) * rng.uniform([0.35, 0, 0], 1) * max(2.5, size / 25))
        self.angle = np.float32(rng.choice([-1, 1]) * rng.uniform(0.05, 0.15))
        ax = np.arange(size, dtype=np.float32) - self.centre
        if ndim == 2:  # rows run anterior -> posterior, columns left-right; the slice is si = 0
            row, col = np.meshgrid(ax, ax, indexing="ij", sparse=True)
            lr, ap, self.si = col - self.offset[0], -row - self.offset[1], np.float32(0)
        else:
            lr, ap, si = np.meshgrid(ax, ax, ax, indexing="ij", sparse=True)
            lr, ap, self.si = lr - self.offset[0], ap - self.offset[1], si - self.offset[2]
        c, s = np.cos(self.angle), np.sin(self.angle)
        self.lr, self.ap = c * lr + s * ap, c * ap - s * lr

    def ellipsoid(self, centre, semi, angle=0.0):
        """Normalized radius (1 on the surface) of an ellipsoid, turned by ``angle`` in the axial plane."""
        centre, semi, angle = np.float32(centre), np.float32(semi), np.float32(angle)
        lr, ap = self.lr - centre[0], self.ap - centre[1]
        c, s = np.cos(angle), np.sin(angle)
        u, v = c * lr + s * ap, c * ap - s * lr
        return np.sqrt((u / semi[0]) ** 2 + (v / semi[1]) ** 2 + ((self.si - centre[2]) / semi[2]) ** 2)

    def to_index(self, points):
        """Array indices of frame points ``[N, 3]`` (in 2D the si coordinate is projected away)."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        lr = c * points[:, 0] - s * points[:, 1] + self.offset[0] + self.centre
        ap = s * points[:, 0] + c * points[:, 1] + self.offset[1]
        if self.ndim == 2:
            return np.stack([self.centre - ap, lr], axis=1)
        return np.stack([lr, ap + self.centre, points[:, 2] + self.offset[2] + self.centre], axis=1)


def _head(rng, frame, size):
    """A head: its radius normalized to 1 at the inner skull, the partial-volume occupancies of head (scalp
    included), skull-and-inside and brain, and the brain's semi-axes (lr, ap, si) in voxels."""
    semi = size * rng.uniform([0.29, 0.36, 0.34], [0.35, 0.42, 0.40])  # lr, ap, si
    axes = range(frame.ndim)  # irregular outline: a sum of smooth 1D profiles along the axes (cheap)
    bumps = sum(_field(rng, (size,), size / 8).reshape([-1 if a == i else 1 for a in axes]) for i in axes)
    r = frame.ellipsoid((0, 0, 0), semi) + 0.03 * bumps
    skull = size * rng.uniform(0.025, 0.045)
    depth = (1 - r) * semi[:2].mean()  # approximately voxels below the outer skull surface
    brain_semi = semi - skull
    rb = r * semi[:2].mean() / brain_semi[:2].mean()
    return rb, _soft(depth + size / 40), _soft(depth), _soft(depth - skull), brain_semi


def _head_ct(rng, anatomy, ndim, size):
    frame = _Frame(rng, ndim, size)
    shape = (size,) * ndim
    rb, head, outer, brain, b = _head(anatomy, frame, size)
    gyri = _field(rng, shape, max(1.0, size / 28))
    hemorrhage, edema, midline = np.zeros(shape, np.float32), np.zeros(shape, bool), 0.0
    for _ in range(1 + (rng.random() < 0.25)):
        direction = rng.standard_normal(3) * [1, 1, ndim == 3] + [rng.choice([-1, 1]), 0, 0]  # off the midline
        centre = direction / np.linalg.norm(direction) * rng.uniform(0.2, 0.6) * b
        radius = rng.uniform(*((0.06, 0.12) if ndim == 2 else (0.1, 0.15)))  # >= 0.2% of the image in 3D too
        semi = size * radius * rng.uniform(0.75, 1.25, 3)
        q = frame.ellipsoid(centre, semi, rng.uniform(0, np.pi)) + 0.25 * gyri
        hemorrhage = np.maximum(hemorrhage, _soft((1 - q) * semi.min()))
        edema |= (q > 1) & (q < 1.35)
        midline -= np.sign(centre[0]) * 0.25 * semi.mean()  # mass effect pushes the midline away
    texture = _field(rng, shape, 1.0)
    tissue = np.where(rb > 0.8 + 0.05 * gyri, 0.48, 0.41).astype(np.float32)  # cortical ribbon over white matter
    sulci = np.clip(1 - np.abs(gyri) / 0.3, 0, 1) * (rb > 0.75)  # zero-crossings of the gyri field
    fissure = (np.abs(frame.lr - midline) < 0.5) & (np.abs(frame.ap) > 0.3 * b[1])  # interhemispheric fissure
    tissue += (0.22 - tissue) * np.maximum(sulci, fissure | (rb > 0.96))
    scale = rng.uniform(0.7, 1.4)  # ventricle size grows with age / atrophy
    for side in (-1, 1):  # lateral ventricles, frontal horns diverging, never quite symmetric
        centre = (midline + side * rng.uniform(0.06, 0.1) * b[0], *(rng.uniform([-0.05, -0.05], [0.1, 0.05]) * b[1:]))
        semi = scale * rng.uniform(0.75, 1.25) * b * np.array([0.1, 0.36, 0.3]) * rng.uniform(0.85, 1.15, 3)
        q = frame.ellipsoid(centre, semi, -side * rng.uniform(0.1, 0.3))
        tissue += (0.17 - tissue) * _soft((1 - q) * semi[0])
    tissue -= 0.06 * edema  # perihematomal edema
    tissue += (rng.uniform(0.64, 0.72) - tissue) * hemorrhage
    bone = 0.93 + 0.03 * texture
    image = 0.45 * (head - outer) + bone * (outer - brain) + (tissue + 0.01 * texture) * brain
    image += 0.012 * rng.standard_normal(shape, dtype=np.float32) * head
    return np.clip(image, 0, 1), (hemorrhage >= 0.5) & (brain >= 0.5)


def _curve(rng, a, b, wiggle=0.1):
    """Points every half voxel along a smooth random curve from ``a`` to ``b`` (frame coordinates)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    length = np.linalg.norm(b - a)
    t = np.linspace(0, 1, max(2, int(2 * length) + 1))[:, None]
    harmonics = np.arange(1, 4)
    amplitude = rng.normal(0, wiggle * length, (3, 3)) / harmonics[:, None]
    return a + t * (b - a) + np.sin(np.pi * t * harmonics) @ amplitude


def _vessel_tree(rng, b, r0):
    """Centerline points and radii of a Circle-of-Willis-like arterial tree in a brain of semi-axes ``b``."""
    segments = []

    def at(lr, ap, si):
        return (np.array([lr, ap, si]) + rng.normal(0, 0.04, 3)) * b

    def vessel(a, z, radius, wiggle=0.1):
        points = _curve(rng, a, z, wiggle)
        taper = np.linspace(1, 0.8, len(points))
        segments.append((points, r0 * radius * rng.uniform(0.85, 1.15) * taper))
        return points

    cow = rng.uniform(-0.35, -0.2)  # height of the circle of Willis
    ring = rng.uniform([0.1, 0.12], [0.16, 0.2])
    tip = at(0, -0.8 * ring[1], cow)
    vessel(at(0, -0.25, -0.95), tip, 0.9)  # basilar artery
    for side in (-1, 1):
        ica = at(side * ring[0], 0.1, cow)
        siphon = at(side * 0.28, 0.3, cow - 0.3)
        vessel(at(side * 0.3, 0.05, -0.95), siphon, 1.0)
        vessel(siphon, ica, 1.0, 0.2)
        acom = at(side * 0.03, ring[1], cow)
        vessel(ica, acom, 0.6)  # A1
        genu = at(side * 0.04, rng.uniform(0.6, 0.8), cow + 0.3)
        vessel(acom, genu, 0.55)  # A2
        vessel(genu, at(side * 0.05, rng.uniform(0.0, 0.4), cow + rng.uniform(0.7, 0.9)), 0.45)  # pericallosal
        pcom = at(side * 0.9 * ring[0], -ring[1], cow)
        vessel(tip, pcom, 0.6)  # P1
        if rng.random() < 0.7:  # the posterior communicating artery is often hypoplastic
            vessel(ica, pcom, 0.35)
        p2 = vessel(pcom, at(side * rng.uniform(0.3, 0.45), rng.uniform(-0.75, -0.6), cow + 0.1), 0.6)
        vessel(p2[len(p2) // 2], at(side * 0.15, -0.9, cow + rng.uniform(0.2, 0.5)), 0.45)
        m1_end = at(side * rng.uniform(0.45, 0.6), rng.uniform(0.0, 0.15), cow + 0.05)
        vessel(ica, m1_end, 0.8)  # M1
        for ap in np.sort(rng.uniform(-0.5, 0.6, rng.integers(2, 4))):  # M2 trunks, then the odd M3 branch
            m2 = vessel(m1_end, at(side * rng.uniform(0.75, 0.88), ap, cow + rng.uniform(0.2, 0.7)), 0.55, 0.15)
            if rng.random() < 0.6:
                end = at(side * rng.uniform(0.6, 0.85), ap + rng.uniform(-0.3, 0.3), cow + 0.6)
                vessel(m2[len(m2) // 2], end, 0.4, 0.15)
    return segments


def _mra(rng, anatomy, ndim, size):
    frame = _Frame(rng, ndim, size)
    shape = (size,) * ndim
    _, head, outer, brain, b = _head(anatomy, frame, size)
    tissue = 0.22 + 0.03 * _field(rng, shape, 2.0)
    background = 0.02 + 0.33 * (head - outer) + 0.04 * (outer - brain) + tissue * brain  # scalp fat bright, bone dark
    segments = _vessel_tree(rng, b, max(0.6, size * 0.02 * rng.uniform(0.85, 1.15)))
    index = np.rint(frame.to_index(np.concatenate([p for p, _ in segments]))).astype(int).clip(0, size - 1)
    radius = np.concatenate([r for _, r in segments]).astype(np.float32)
    inside = brain[tuple(index.T)] > 0.5  # vessels stay inside the brain
    index, radius = tuple(index[inside].T), np.maximum(radius[inside], 0.5)
    not_centerline = np.ones(shape, bool)
    not_centerline[index] = False
    radius_map = np.zeros(shape, np.float32)
    np.maximum.at(radius_map, index, radius)
    dist, nearest = ndimage.distance_transform_edt(not_centerline, return_indices=True)
    radius_map = radius_map[tuple(nearest)]
    tube = _soft(radius_map - dist)
    brightness = 0.72 + 0.25 * np.clip(radius_map / radius.max(), 0, 1)
    image = background + (brightness - background) * tube
    image += 0.015 * rng.standard_normal(shape, dtype=np.float32) * head
    return np.clip(image, 0, 1), dist <= radius_map


def _warp(image, label, kind: str, strength: float, rng):
    """``image`` (and ``label``) rotated in plane by 3-5 degrees, or bent by a smooth field of at most ~2 voxels."""
    import torch
    from monai.networks.blocks import Warp
    from monai.transforms import Rotate

    spatial = image.ndim - 1
    if kind == "rotate":
        angle = float(np.deg2rad(rng.choice([-1, 1]) * rng.uniform(3, 5) * strength))
        angles = angle if spatial == 2 else (0.0, 0.0, angle)  # 3D: about the inferior-superior axis
        move = lambda x, mode: Rotate(angles, mode=mode, padding_mode="border")(x)
    else:
        size = np.array(image.shape[1:])
        field = np.stack([_field(rng, tuple(size), size.min() / 6) for _ in range(spatial)])
        field *= 2 * strength * rng.uniform(0.8, 1.2) / np.sqrt((field**2).sum(0)).max()
        ddf = torch.from_numpy(field)[None]
        move = lambda x, mode: Warp(mode=mode, padding_mode="border")(x[None], ddf)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's note that Warp uses torch's grid_sample
        image = move(torch.from_numpy(image), "bilinear").numpy()
        if label is not None:
            label = move(torch.from_numpy(label.astype(np.float32)), "nearest").numpy().round().astype(label.dtype)
    return image, label


def make_phantoms(
    n: int, kind: str = "head_ct", ndim: int = 2, size: int = 64, seed: int = 0, id_prefix: str | None = None,
    siblings_of: int | None = None,
) -> list[dict]:
    """``n`` distinct synthetic patients as ``{"image": float32 [1, *spatial], "label": uint8 [1, *spatial], "id"}``.

    ``kind`` is ``"head_ct"`` (brain-window axial head CT; label = hemorrhage) or ``"mra"`` (TOF-MRA-like arterial
    tree, a maximum-intensity-projection-like axial view in 2D; label = vessels). Spatial shape is ``(size,) * ndim``.
    Patient ``i`` depends only on ``(seed, i, kind, ndim, size)``, not on ``n``; ids are ``f"{prefix}-{i:04d}"``.
    With ``siblings_of=other_seed``, patient ``i`` is a sibling of patient ``i`` of ``other_seed``: the same head
    (outline, size, skull) in its own position and pose, with its own brain (tissue, ventricles, lesions or
    vessels, texture): the hard case of unseen patients who share anatomy with training patients.

    >>> items = make_phantoms(4, kind="mra", ndim=2, size=32)
    >>> items[0]["image"].shape, items[0]["label"].dtype, items[3]["id"]
    ((1, 32, 32), dtype('uint8'), 'mra-0003')
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; expected one of {sorted(_KINDS)}")
    if ndim not in LR_AXIS:
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    draw = _head_ct if kind == "head_ct" else _mra
    prefix = kind if id_prefix is None else id_prefix
    items = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, _KINDS[kind], ndim])
        anatomy = rng
        if siblings_of is not None:  # the other patient's random stream, past the draws of its pose
            anatomy = np.random.default_rng([siblings_of, i, _KINDS[kind], ndim])
            _Frame(anatomy, ndim, size)
        image, label = draw(rng, anatomy, ndim, size)
        items.append(
            {"image": image[None].astype(np.float32), "label": label[None].astype(np.uint8), "id": f"{prefix}-{i:04d}"}
        )
    return items


def make_replica(item: dict, perturbation: str, strength: float = 1.0, seed: int = 0) -> dict:
    """A near-copy of ``item`` as a memorizing generator would emit it, with id ``f"{item['id']}~{perturbation}"``.

    ``perturbation`` is one of ``PERTURBATIONS`` or ``"none"``: additive Gaussian noise (sigma 0.04), a shift by
    1-3 voxels (integer or subpixel, edge-replicate or background fill), a monotone gain/offset/gamma change, a
    Gaussian blur (sigma 0.7-1 voxel) or a left-right mirror along ``LR_AXIS``; or one of ``HARD_PERTURBATIONS``:
    a small elastic deformation (a smooth random displacement field, up to about 4% of the image size, plus a
    shift of up to 2 voxels) or an intensity re-mapping (a random monotone curve with 5 knots that re-contrasts
    the tissues, plus a smooth multiplicative bias field of +-20%, like an MR coil); or one of ``DISTORTIONS``
    (these need MONAI): heavy sampling noise ``"grain"`` (sigma 10% of the intensity range), an in-plane
    ``"rotate"`` by 3-5 degrees (the axial plane, spatial axes 0 and 1 of a RAS volume; MONAI ``Rotate``) or a
    smooth elastic ``"bend"`` of at most about 2 voxels (MONAI ``Warp``); several joined by ``"+"`` (e.g.
    ``"grain+flip"``) are applied in turn. ``strength`` scales the amount (1.0 = realistic, clearly still a copy;
    ignored by "flip" and "none"). The label moves with the image, and the image stays within the source's
    intensity range. Randomness depends on ``(seed, item id, perturbation)``.

    >>> item = make_phantoms(1, size=32)[0]
    >>> copy = make_replica(item, "flip")
    >>> copy["id"], bool((copy["label"] == item["label"][:, :, ::-1]).all())
    ('head_ct-0000~flip', True)
    """
    if "+" in perturbation:
        replica = item
        for part in perturbation.split("+"):
            replica = make_replica(replica, part, strength, seed)
        return {**replica, "id": f"{item['id']}~{perturbation}"}
    known = (*PERTURBATIONS, *HARD_PERTURBATIONS, *DISTORTIONS, "none")
    if perturbation not in known:
        raise ValueError(f"unknown perturbation {perturbation!r}; expected one of {known}, or several joined by '+'")
    rng = np.random.default_rng([seed, zlib.crc32(str(item["id"]).encode()), zlib.crc32(perturbation.encode())])
    image = np.array(item["image"], dtype=np.float32)
    label = None if item.get("label") is None else np.array(item["label"])
    lo, hi = float(image.min()), float(image.max())
    spatial = image.ndim - 1
    if perturbation == "noise":
        image += rng.normal(0, 0.04 * strength, image.shape).astype(np.float32)
    elif perturbation == "shift":
        direction = rng.standard_normal(spatial)
        vector = direction / np.linalg.norm(direction) * rng.uniform(1, 3) * strength
        if rng.random() < 0.5:
            vector = np.rint(vector)
        mode = "nearest" if rng.random() < 0.5 else "constant"
        image = ndimage.shift(image, (0, *vector), order=3, mode=mode, cval=lo)
        if label is not None:
            moved = ndimage.shift(label.astype(np.float32), (0, *vector), order=1, mode=mode, cval=0)
            label = (moved >= 0.5).astype(label.dtype)
    elif perturbation == "intensity":
        gamma = np.exp(rng.choice([-1, 1]) * rng.uniform(0.1, 0.25) * strength)
        gain, offset = np.exp(rng.uniform(-0.1, 0.1) * strength), rng.uniform(-0.05, 0.05) * strength
        unit = (image - lo) / max(hi - lo, 1e-12)
        image = lo + (hi - lo) * (gain * unit**gamma + offset)
    elif perturbation == "blur":
        image = ndimage.gaussian_filter(image, (0, *[rng.uniform(0.7, 1.0) * strength] * spatial))
    elif perturbation == "flip":
        image = np.flip(image, 1 + LR_AXIS[spatial])
        label = None if label is None else np.flip(label, 1 + LR_AXIS[spatial])
    elif perturbation == "elastic":
        size = np.array(image.shape[1:])
        amplitude = 0.04 * size.min() * strength
        grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in size], indexing="ij")
        shift = rng.uniform(-2, 2, spatial) * strength
        coords = [g + s + amplitude * _field(rng, tuple(size), size.min() / 6) / 2 for g, s in zip(grid, shift)]
        image = np.stack([ndimage.map_coordinates(c, coords, order=3, mode="nearest") for c in image])
        if label is not None:
            label = np.stack([ndimage.map_coordinates(c.astype(np.float32), coords, order=1, mode="constant") >= 0.5
                              for c in label]).astype(label.dtype)
    elif perturbation == "grain":
        image += rng.normal(0, 0.1 * strength * (hi - lo), image.shape).astype(np.float32)
    elif perturbation in ("rotate", "bend"):
        image, label = _warp(image, label, perturbation, strength, rng)
    elif perturbation == "remap":
        knots = np.linspace(0, 1, 6)
        curve = np.concatenate([[0], np.cumsum(np.exp(rng.normal(0, strength, 5)))])
        unit = np.interp((image - lo) / max(hi - lo, 1e-12), knots, curve / curve[-1])
        bias = 1 + 0.2 * strength * np.clip(_field(rng, image.shape[1:], image.shape[1] / 3), -1.5, 1.5) / 1.5
        image = lo + (hi - lo) * unit * bias.astype(np.float32)
    image = np.ascontiguousarray(np.clip(image, lo, hi), dtype=np.float32)
    replica = {**item, "image": image, "id": f"{item['id']}~{perturbation}"}
    if label is not None:
        replica["label"] = np.ascontiguousarray(label)
    return replica
