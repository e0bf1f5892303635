"""Folders of scans in, engine items out: NIfTI, NumPy, PNG/JPEG and DICOM series.

An :class:`ImageFolder` lists the images of a folder (recursively; a folder of DICOM files is one volume) and
reads them lazily as ``{"image", "label", "id"}`` items, ``id`` being the path relative to the folder; labels
come from a second folder, matched by file name (the relative path without its image suffix, so
``case_01.nii.gz`` may have the label ``case_01.nii.gz`` or ``case_01.png``). An :class:`ImageReader` turns
one file into a float32 ``[C, *spatial]`` tensor, with these rules:

- 3D volumes (NIfTI, DICOM series, 3D ``.npy``/``.npz``) are reoriented to RAS and resampled, with their voxel
  spacing, to one isotropic physical grid of ``grid`` voxels (64³ by default) centred on the volume, padded
  with its minimum where the field of view is smaller: two scans of one head at different spacings land on
  the same grid. The grid's spacing is ``spacing`` mm, or, by default, set by the first volume read (the first
  training image): its largest extent fills the grid. Arrays carry no geometry; they are taken as RAS with
  1 mm voxels. Files are read with MONAI's ``LoadImage`` (nibabel, pydicom; slope and intercept applied).
- 2D images (PNG/JPEG, 2D arrays, NIfTI/DICOM with one slice) are pixel arrays shown as displayed (rows top
  to bottom, anterior at the top); the levels resize them to their grid. PNG/JPEG are read with Pillow: grey
  images give one channel, colour images three.
- ``.npy`` is read without unpickling; ``.npz`` must hold one array (or an ``image`` array). Array layout:
  ``[H, W]``, ``[C, H, W]`` with C <= 4, ``[X, Y, Z]`` or ``[C, X, Y, Z]``.

Every problem (unreadable or corrupt file, unsupported type, 2D among 3D, empty folder, label without image)
raises a :class:`ReadError` naming the file.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .items import ItemError
from .levels.base import plain_grid, resolve_grid
from .validation import check_grid, check_number

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".npy", ".npz", ".png", ".jpg", ".jpeg", ".dcm")
SKIPPED_SUFFIXES = (".json", ".txt", ".md", ".csv", ".tsv")  # sidecar files next to scans


class ReadError(ItemError):
    """A file or folder that cannot be read as images; the message names it and the problem."""


def image_suffix(path: Path) -> str | None:
    """The image suffix of ``path`` (``".nii.gz"``, ``".png"``, ...), or None if it is not an image file."""
    name = path.name.lower()
    return next((suffix for suffix in IMAGE_SUFFIXES if name.endswith(suffix)), None)


def _is_dicom(path: Path) -> bool:
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as file:
            return file.read(132)[128:] == b"DICM"
    except OSError:
        return False


def list_images(folder) -> list[Path]:
    """Image files and DICOM series folders under ``folder``, sorted; hidden files and sidecars are skipped.

    >>> import tempfile, pathlib, numpy as np
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> np.save(root / "b.npy", np.zeros((4, 4))); np.save(root / "a.npy", np.zeros((4, 4)))
    >>> [p.name for p in list_images(root)]
    ['a.npy', 'b.npy']
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReadError(f"{folder}: no such folder")
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        paths = [Path(directory) / name for name in sorted(files) if not name.startswith(".")]
        dicom = [p for p in paths if _is_dicom(p)]
        if dicom:
            if len(dicom) != len(paths):
                other = next(p for p in paths if p not in dicom)
                raise ReadError(f"{other}: not a DICOM file, but its folder {directory} holds a DICOM series "
                                "(one folder = one volume; move other files out)")
            found.append(Path(directory))
            continue
        for path in paths:
            if image_suffix(path) is not None:
                found.append(path)
            elif not path.name.lower().endswith(SKIPPED_SUFFIXES):
                raise ReadError(f"{path}: unsupported file type (expected one of {', '.join(IMAGE_SUFFIXES)}, "
                                "or a folder of DICOM files)")
    if not found:
        raise ReadError(f"{folder}: no images found (expected {', '.join(IMAGE_SUFFIXES)} files or DICOM folders)")
    return sorted(found)


def match_key(path: Path, root: Path) -> str:
    """What an image and its label share: the path relative to ``root`` without the image suffix."""
    relative = path.relative_to(root).as_posix()
    suffix = image_suffix(path)
    return relative[: -len(suffix)] if suffix and not path.is_dir() else relative


def _array(path: Path) -> np.ndarray:
    """The array in a ``.npy`` or ``.npz`` file (never unpickled)."""
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    with np.load(path, allow_pickle=False) as archive:
        keys = archive.files
        if len(keys) != 1 and "image" not in keys:
            raise ReadError(f"{path}: .npz holds arrays {keys}; expected one array, or one named 'image'")
        return archive["image" if "image" in keys else keys[0]]


def _pixels(path: Path) -> np.ndarray:
    """A PNG/JPEG as ``[C, H, W]``: one channel for grey images, three for colour (alpha dropped)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode in ("1", "L", "P", "LA", "I", "I;16", "I;16B", "F"):
            grey = image.convert("L") if image.mode in ("1", "P", "LA") else image
            return np.asarray(grey, dtype=np.float32)[None]
        return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)


def axial_view(volume: torch.Tensor) -> torch.Tensor:
    """A RAS slice ``[C, X, Y]`` as displayed, ``[C, H, W]``: anterior at the top, the patient's right on the
    left (radiological convention).

    >>> axial_view(torch.arange(6.).reshape(1, 2, 3)).tolist()
    [[[5.0, 2.0], [4.0, 1.0], [3.0, 0.0]]]
    """
    return volume.flip(1, 2).transpose(1, 2)


@dataclass
class ImageReader:
    """Reads one image file into a float32 ``[C, *spatial]`` tensor on the common grid (see the module doc).

    Args:
        grid: voxels of the common 3D grid (int or 3 ints; default 64³); 2D images are left to the levels.
        spacing: isotropic voxel size of the 3D grid in mm; None: set by the first volume read.
        ndim: spatial dims every image must have; None: set by the first image read.

    >>> import tempfile, pathlib, numpy as np
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "scan.npy"
    >>> np.save(path, np.random.rand(20, 20, 10))
    >>> reader = ImageReader(grid=16)
    >>> tuple(reader.read(path).shape), reader.spacing
    ((1, 16, 16, 16), 1.25)
    """

    grid: int | tuple[int, ...] | None = None
    spacing: float | None = None
    ndim: int | None = None

    def __post_init__(self) -> None:
        self.grid = check_grid("grid", self.grid)
        if self.spacing is not None:
            self.spacing = check_number("spacing", self.spacing, low=0, low_open=True)
        if self.ndim not in (None, 2, 3):
            raise ValueError(f"ndim must be 2, 3 or None, got {self.ndim!r}")

    def config(self) -> dict:
        """The reader settings as JSON (saved with a bank, so samples are read the same way later)."""
        grid = plain_grid(self.grid)
        return {"grid": grid, "spacing": self.spacing, "ndim": self.ndim}

    @classmethod
    def from_config(cls, config: dict) -> ImageReader:
        grid = config["grid"]
        return cls(tuple(grid) if isinstance(grid, list) else grid, config["spacing"], config["ndim"])

    def read(self, path, label: bool = False) -> torch.Tensor:
        """Read ``path`` (an image file or a DICOM series folder); ``label=True`` resamples nearest-neighbour."""
        path = Path(path)
        try:
            image = self._load(path, label)
        except (ReadError, MemoryError):
            raise
        except Exception as err:  # readers raise anything from OSError to struct.error on corrupt files
            problem = f"{type(err).__name__}: {err}".strip()
            raise ReadError(f"{path}: cannot read {'label' if label else 'image'} ({problem})") from None
        ndim = image.ndim - 1
        if self.ndim is None:
            self.ndim = ndim
        elif ndim != self.ndim:
            raise ReadError(f"{path}: a {ndim}D image, but the images read before it are {self.ndim}D "
                            f"(shape {tuple(image.shape)}); do not mix 2D and 3D images")
        return image

    def _load(self, path: Path, label: bool) -> torch.Tensor:
        suffix = ".dcm" if path.is_dir() else image_suffix(path)
        if suffix in (".npy", ".npz"):
            array = np.asarray(_array(path))
            if array.dtype.kind not in "biuf" or array.ndim not in (2, 3, 4):
                raise ReadError(f"{path}: array of dtype {array.dtype} and shape {array.shape}; expected numbers "
                                "shaped [H, W], [C, H, W], [X, Y, Z] or [C, X, Y, Z]")
            if array.ndim == 2 or (array.ndim == 3 and array.shape[0] <= 4):
                return torch.from_numpy(np.array(array, dtype=np.float32, ndmin=3))
            volume = torch.from_numpy(np.array(array, dtype=np.float32, ndmin=4))
            return self._to_grid(self._meta(volume, np.eye(4)), label)
        if suffix in (".png", ".jpg", ".jpeg"):
            return torch.from_numpy(_pixels(path))
        if suffix in (".nii", ".nii.gz", ".dcm"):
            return self._load_scan(path, suffix, label)
        raise ReadError(f"{path}: unsupported file type")

    @staticmethod
    def _meta(array: torch.Tensor, affine: np.ndarray):
        from monai.data import MetaTensor

        return MetaTensor(array, affine=torch.as_tensor(affine, dtype=torch.float64))

    def _load_scan(self, path: Path, suffix: str, label: bool) -> torch.Tensor:
        from monai.data import NibabelReader, PydicomReader
        from monai.transforms import LoadImage

        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # GPU decoder notice
        reader = PydicomReader() if suffix == ".dcm" else NibabelReader()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's notes on metadata it does not use
            image = LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=np.float32)(str(path))
        spatial = image.shape[1:]
        if len(spatial) == 3 and spatial[2] == 1:  # one slice: a 2D image
            return axial_view(self._orient(image)[..., 0].as_tensor())
        if len(spatial) != 3:
            raise ReadError(f"{path}: {len(spatial)} spatial dims (shape {tuple(image.shape)}); expected a 3D volume "
                            "or one slice")
        return self._to_grid(image, label)

    @staticmethod
    def _orient(image):
        from monai.transforms import Orientation

        return Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)

    def _to_grid(self, image, label: bool) -> torch.Tensor:
        """Reorient a 3D MetaTensor to RAS and resample it to the isotropic grid, centred on the volume."""
        from monai.transforms import GaussianSmooth, ResizeWithPadOrCrop, Spacing

        grid = resolve_grid(self.grid, 3)
        image = self._orient(image)
        pixdim = np.asarray(image.pixdim, dtype=float)
        if self.spacing is None:
            self.spacing = float(max(np.asarray(image.shape[1:]) * pixdim / np.asarray(grid)))
        if not label:  # anti-alias before shrinking: a Gaussian of sigma (factor - 1) / 2 voxels per axis
            sigma = np.maximum(self.spacing / pixdim - 1, 0) / 2
            if sigma.max() > 0.25:
                image = GaussianSmooth(sigma=sigma.tolist())(image)
        image = Spacing(pixdim=(self.spacing,) * 3, mode="nearest" if label else "bilinear",
                        padding_mode="border", dtype=np.float32)(image)
        fill = 0.0 if label else float(image.min())
        image = ResizeWithPadOrCrop(grid, mode="constant", value=fill)(image)
        return image.as_tensor().float().contiguous()


class ImageFolder:
    """The images of a folder (and, optionally, their labels from another), read lazily as engine items.

    Items are ``{"image": [C, *spatial], "label": ... or None, "id": path relative to folder}``. Listing happens
    here, reading on access, so an empty folder, an unsupported file, a label without its image or an image
    without its label fails before any work is done.

    >>> import tempfile, pathlib, numpy as np
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "img").mkdir(); (root / "lab").mkdir()
    >>> np.save(root / "img" / "p1.npy", np.random.rand(8, 8)); np.save(root / "lab" / "p1.npy", np.ones((8, 8)))
    >>> folder = ImageFolder(root / "img", labels=root / "lab")
    >>> len(folder), folder[0]["id"], tuple(folder[0]["label"].shape)
    (1, 'p1.npy', (1, 8, 8))
    """

    def __init__(self, folder, reader: ImageReader | None = None, labels=None) -> None:
        self.root, self.reader = Path(folder), reader or ImageReader()
        self.paths = list_images(self.root)
        self.ids = [p.relative_to(self.root).as_posix() for p in self.paths]
        self.labels: list[Path | None] = [None] * len(self.paths)
        if labels is not None:
            label_root = Path(labels)
            by_key = {}
            for path in list_images(label_root):
                by_key.setdefault(match_key(path, label_root), []).append(path)
            keys = [match_key(p, self.root) for p in self.paths]
            orphans = sorted(str(p) for key, group in by_key.items() if key not in keys for p in group)
            if orphans:
                raise ReadError(f"{orphans[0]}: a label without an image of the same name in {self.root}"
                                + (f" ({len(orphans) - 1} more)" if len(orphans) > 1 else ""))
            for i, key in enumerate(keys):
                group = by_key.get(key, [])
                if len(group) != 1:
                    problem = "has no label" if not group else f"has {len(group)} labels ({group[0]}, {group[1]})"
                    raise ReadError(f"{self.paths[i]}: {problem} in {label_root} (labels are matched by file name)")
                self.labels[i] = group[0]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        image = self.reader.read(self.paths[index])
        label = None
        if self.labels[index] is not None:
            label = self.reader.read(self.labels[index], label=True)
            if tuple(label.shape[1:]) != tuple(image.shape[1:]):
                raise ReadError(f"{self.labels[index]}: label of shape {tuple(label.shape)} does not cover its image "
                                f"{self.paths[index]} of shape {tuple(image.shape)}")
        return {"image": image, "label": label, "id": self.ids[index]}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def path(self, item_id: str) -> Path:
        """The file (or DICOM folder) of an item id."""
        return self.root / item_id
