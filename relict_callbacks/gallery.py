"""Pictures of samples and their nearest training images: views of 2D/3D images, galleries, histograms.

Arrays in (numpy or torch, ``[C, *spatial]``, 2D or 3D), matplotlib figures out, rendered to PNG with the Agg
backend; figures are made without pyplot, so no display is needed and no global backend is changed.
:func:`gallery_rows` picks and captions the pairs of a report; the audit report, the monitor, the W&B sink and the
demos share it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.image import imread

if TYPE_CHECKING:
    from .levels import Level
    from .scoring import ReplicaReport

VIEWS_3D = ("axial", "coronal", "sagittal", "axial MIP")
REPLICA_COLOUR = "#c62828"
MEASURE = {"voxel": "NCC", "feature": "cosine", "segmentation": "Dice"}  # what each level's similarity is
_GAP = 2  # pixels of background between the views of a 3D montage


def _array(image) -> np.ndarray:
    array = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, dtype=np.float32)
    if array.ndim not in (3, 4):
        raise ValueError(f"expected an image [C, *spatial] with 2 or 3 spatial dims, got shape {array.shape}")
    return array


def _views(volume: np.ndarray) -> list[np.ndarray]:
    """The four radiological views of a RAS volume [X, Y, Z] (see :func:`display_view`)."""
    x, y, z = (n // 2 for n in volume.shape)
    return [volume[::-1, ::-1, z].T,        # axial: anterior up, patient's right on the left
            volume[::-1, y, ::-1].T,        # coronal: superior up, patient's right on the left
            volume[x, ::-1, ::-1].T,        # sagittal: superior up, anterior on the left
            volume.max(axis=2)[::-1, ::-1].T]  # axial maximum-intensity projection


def display_view(image) -> np.ndarray:
    """The 2D float array to show for an image ``[C, *spatial]`` (channel 0).

    A 2D ``[C, H, W]`` image is shown as it is (row 0 at the top). A 3D ``[C, X, Y, Z]`` RAS volume (first
    spatial axis left-right) becomes a montage, side by side and separated by NaN gaps, of its middle axial,
    coronal and sagittal slices and its axial maximum-intensity projection, oriented the radiological way:
    axial views with anterior at the top and the patient's right on the viewer's left (seen from the feet),
    coronal with superior at the top and the patient's right on the left, sagittal with superior at the top
    and anterior on the left.

    >>> display_view(np.zeros((1, 8, 6))).shape
    (8, 6)
    >>> display_view(np.zeros((1, 4, 5, 6))).shape  # heights 5, 6, 6, 5; widths 4 + 4 + 5 + 4 and 3 gaps
    (6, 23)
    """
    array = _array(image)[0]
    if array.ndim == 2:
        return array.astype(np.float32)
    views = _views(array)
    height = max(v.shape[0] for v in views)
    padded = [np.pad(v.astype(np.float32), ((0, height - v.shape[0]), (0, _GAP)), constant_values=np.nan)
              for v in views]
    return np.concatenate(padded, axis=1)[:, :-_GAP]


def _view_centres(image) -> list[float]:
    """Horizontal centre of each view in :func:`display_view` of a 3D image (for labelling them)."""
    x, y, z = _array(image).shape[1:]
    centres, left = [], 0
    for width in (x, x, y, x):
        centres.append(left + (width - 1) / 2)
        left += width + _GAP
    return centres


@dataclass
class GalleryRow:
    """One sample and its nearest training image (None when training images must not be shown), and the report
    record it shows (when it comes from :func:`gallery_rows`)."""

    sample: np.ndarray
    nearest: np.ndarray | None
    caption: str
    is_replica: bool = False
    record: object = None


def caption(record, main: str) -> str:
    """A gallery caption for a report record: the sample, its nearest training image at level ``main`` and the
    transform it matched under, each level's similarity (with its own match where that differs), the combined
    p-value and the verdict.

    >>> from relict_callbacks.scoring import LevelMatch, SampleRecord
    >>> record = SampleRecord(0, "gen-7", True, {"voxel": LevelMatch(0.994, "case-2", 2, True, "flip1", 0.01),
    ...                                          "segmentation": LevelMatch(0.95, "case-2", 2, True, "flip1", 0.01)},
    ...                       p_value=0.02)
    >>> caption(record, "voxel")
    'gen-7 -> train case-2 [flip1]  NCC 0.994  Dice 0.950  p=0.02  REPLICA'
    """
    match = record.levels[main]
    parts = [f"{record.id} -> train {match.nearest_id}" + ("" if match.transform == "identity" else
                                                          f" [{match.transform}]")]
    for name, level in record.levels.items():
        own = [level.nearest_id] if level.nearest_id != match.nearest_id else []
        own += [level.transform] if level.transform != match.transform else []
        parts.append(f"{MEASURE.get(name, name)} {level.similarity:.3f}" + (f" [{', '.join(own)}]" if own else ""))
    parts.append(f"p={record.p_value:.2g}" + ("  REPLICA" if record.is_replica else ""))
    return "  ".join(parts)


def _window(view: np.ndarray) -> tuple[float, float]:
    finite = view[np.isfinite(view)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [0.5, 99.5])
    return float(low), float(high if high > low else low + 1)


def _zscore(array: np.ndarray) -> np.ndarray:
    return (array - array.mean()) / max(float(array.std()), 1e-12)


def difference_map(sample: np.ndarray, nearest: np.ndarray) -> np.ndarray | None:
    """|z(sample) - z(nearest)| per voxel, or None when the shapes differ."""
    if sample.shape != nearest.shape:
        return None
    return np.abs(_zscore(sample) - _zscore(nearest))


def _show(ax, image, view: np.ndarray, cmap: str, limits: tuple[float, float]):
    colours = matplotlib.colormaps[cmap].with_extremes(bad="white")
    shown = ax.imshow(view, cmap=colours, vmin=limits[0], vmax=limits[1], interpolation="nearest")
    ax.set_yticks([])
    if _array(image).ndim == 4:
        ax.set_xticks(_view_centres(image), VIEWS_3D, fontsize=7)
        ax.tick_params(length=0)
    else:
        ax.set_xticks([])
    return shown


def _placeholder(ax, text: str) -> None:
    ax.set_facecolor("#eeeeee")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="#555555", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def gallery_figure(rows: list[GalleryRow], title: str = "") -> Figure:
    """One row per pair: sample | nearest training image | |difference| with its colour bar (for 3D montages,
    which are wide, the three stand one under the other).

    Both images are shown in their own intensity window (0.5-99.5 percentile); the difference is that of the
    z-scored images (what the voxel level's NCC compares), on a colour scale shared by all rows. Replica rows
    get a red frame and a red caption. Where ``nearest`` is None, its columns say "training image hidden".

    >>> fig = gallery_figure([GalleryRow(np.random.rand(1, 16, 16), np.random.rand(1, 16, 16), "s0 -> t3", True),
    ...                       GalleryRow(np.random.rand(1, 16, 16), None, "s1")], title="demo")
    >>> [len(sub.axes) for sub in fig.subfigs]  # 3 per row, and a colour bar where there is a difference
    [4, 3]
    """
    if not rows:
        raise ValueError("gallery_figure needs at least one row")
    views = [display_view(row.sample) for row in rows]
    aspect = max(v.shape[1] / v.shape[0] for v in views)
    stacked = aspect > 2  # 3D montages are wide: their three panels go one under the other
    height = 1.5 if stacked else 2.4  # inches of image per panel
    width, per_row = (height * aspect + 1.4, 3 * (height + 0.35) + 0.3) if stacked else \
        (3 * height * aspect + 1.4, height + 0.6)
    fig = Figure(figsize=(width, per_row * len(rows) + (0.4 if title else 0)), layout="constrained")
    diffs = [None if row.nearest is None else difference_map(_array(row.sample), _array(row.nearest)) for row in rows]
    scale = max([float(np.percentile(d, 99.5)) for d in diffs if d is not None] + [1.0])
    for sub, row, view, diff in zip(fig.subfigures(len(rows), 1, squeeze=False)[:, 0], rows, views, diffs):
        colour = REPLICA_COLOUR if row.is_replica else "black"
        fits = 72 * width / (0.65 * max(len(row.caption), 1))  # points per character that fit across the figure
        sub.suptitle(row.caption, x=0.005, ha="left", fontsize=min(10, fits), color=colour,
                     fontweight="bold" if row.is_replica else "normal")
        ax_sample, ax_nearest, ax_diff = sub.subplots(3, 1) if stacked else sub.subplots(1, 3)
        _show(ax_sample, row.sample, view, "gray", _window(view))
        ax_sample.set_title("synthetic sample", fontsize=8)
        if row.nearest is None:
            _placeholder(ax_nearest, "training image hidden")
            _placeholder(ax_diff, "training image hidden")
        else:
            nearest_view = display_view(row.nearest)
            _show(ax_nearest, row.nearest, nearest_view, "gray", _window(nearest_view))
            ax_nearest.set_title("nearest training image", fontsize=8)
            if diff is None:
                _placeholder(ax_diff, "shapes differ")
            else:
                shown = _show(ax_diff, row.sample, display_view(diff[None, 0]), "magma", (0, scale))
                ax_diff.set_title("|z(sample) - z(nearest)|", fontsize=8)
                sub.colorbar(shown, ax=ax_diff, shrink=0.9, label="z units")
        if row.is_replica:
            for ax in (ax_sample, ax_nearest, ax_diff):
                for spine in ax.spines.values():
                    spine.set_edgecolor(REPLICA_COLOUR)
                    spine.set_linewidth(3)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def histogram_figure(similarities: dict[str, np.ndarray], nulls: dict[str, np.ndarray],
                     thresholds: dict[str, float]) -> Figure:
    """One panel per level: histograms of the samples' and the null's nearest-training similarity, and the
    threshold as a red line.

    >>> fig = histogram_figure({"voxel": np.random.rand(20)}, {"voxel": np.random.rand(30)}, {"voxel": 0.9})
    >>> len(fig.axes)
    1
    """
    names = list(similarities)
    fig = Figure(figsize=(4.2 * len(names), 3.2), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        samples, null = np.asarray(similarities[name]), np.asarray(nulls[name])
        threshold = thresholds[name]
        values = np.concatenate([samples, null, [threshold]])
        bins = np.linspace(values.min(), values.max(), 31) if np.ptp(values) > 0 else 10
        ax.hist(null, bins=bins, density=True, alpha=0.55, color="#1f77b4", label=f"null: unseen -> train (n={len(null)})")
        ax.hist(samples, bins=bins, density=True, alpha=0.55, color="#ff7f0e", label=f"synthetic -> train (n={len(samples)})")
        ax.axvline(threshold, color=REPLICA_COLOUR, linewidth=2, label=f"threshold {threshold:.3f}")
        flagged = int((samples > threshold).sum())
        ax.set_title(f"{name}: {flagged}/{len(samples)} above threshold", fontsize=10)
        ax.set_xlabel(f"{name} similarity to nearest training image")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
    return fig


def figure_to_png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes.

    >>> figure_to_png_bytes(Figure(figsize=(1, 1)))[:4]
    b'\\x89PNG'
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def png_to_array(png: bytes) -> np.ndarray:
    """PNG bytes as an RGB ``uint8`` array ``[H, W, 3]``.

    >>> png_to_array(figure_to_png_bytes(Figure(figsize=(1, 2)))).shape
    (200, 100, 3)
    """
    return (imread(io.BytesIO(png), format="png")[..., :3] * 255).round().astype(np.uint8)


def ranked_records(report: ReplicaReport, count: int) -> list:
    """The ``count`` records a gallery shows: flagged first, then by similarity at the primary (first) level."""
    primary = next(iter(report.thresholds))
    return sorted(report.records, key=lambda r: (not r.is_replica, -r.levels[primary].similarity))[:count]


def gallery_rows(report: ReplicaReport, sample_image, training_image, primary: Level, count: int) -> list[GalleryRow]:
    """Gallery rows for the ``count`` records of :func:`ranked_records`, in that order.

    ``sample_image(record)`` gives a sample ``[C, *spatial]`` tensor; ``training_image(match)`` the nearest
    training image for a :class:`LevelMatch`, or ``None`` to hide it. The ``primary`` level (the report's first)
    picks the nearest image and shows the pair (:meth:`Level.display_pair`).
    """
    rows = []
    for record in ranked_records(report, count):
        match = record.levels[primary.name]
        sample, nearest = sample_image(record), training_image(match)
        if nearest is not None:
            sample, nearest = primary.display_pair(sample, nearest, match.transform)
        rows.append(GalleryRow(sample.numpy(), None if nearest is None else nearest.numpy(),
                               caption(record, primary.name), record.is_replica, record))
    return rows
