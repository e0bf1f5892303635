"""Items in, validated tensors out.

An item is an array/tensor ``[C, *spatial]`` (2D or 3D), an ``(image, label)`` pair, or a dict
``{"image": ..., "label": ..., "id": ...}`` (MONAI style). A ``Dataset`` yields items one at a time; a
``DataLoader`` yields collated batches, which are split back into items. A Tensor ``[N, C, *spatial]`` is a
batch of N images. Everything is checked here, so every level receives finite ``float32`` images with a
channel axis, and every error names the item and the problem.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from .heartbeat import beat


class ItemError(ValueError):
    """An input item that cannot be scored; the message names the item and the problem."""


@dataclass
class Item:
    """One validated image: ``image`` float32 ``[C, *spatial]``, optional ``label``, and its ``id``."""

    image: torch.Tensor
    label: torch.Tensor | None
    id: str


def _as_tensor(value, what: str, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise ItemError(f"{name}: {what} is a {type(value).__name__}, not an array or tensor ({err})") from None


def _split(raw) -> tuple[object, object, object]:
    """(image, label, id) of one raw item."""
    if isinstance(raw, Mapping):
        if "image" not in raw:
            raise ItemError(f"dict item has no 'image' key (keys: {sorted(map(str, raw))})")
        return raw["image"], raw.get("label"), raw.get("id")
    if isinstance(raw, (tuple, list)):
        if len(raw) != 2:
            raise ItemError(f"a tuple item must be (image, label), got {len(raw)} elements")
        return raw[0], raw[1], None
    return raw, None, None


def _unbatch(batch) -> Iterator[tuple[object, object, object]]:
    """Split one collated DataLoader batch back into (image, label, id) triples."""
    image, label, ids = _split(batch)
    image = _as_tensor(image, "batched image", "DataLoader batch")
    for i in range(image.shape[0]):
        item_id = None if ids is None else ids[i]
        yield image[i], None if label is None else label[i], item_id


def iter_raw(items) -> Iterator[tuple[object, object, object]]:
    """Yield (image, label, id) triples from any supported container of items."""
    if isinstance(items, torch.Tensor) or (isinstance(items, np.ndarray) and items.dtype != object):
        batch = _as_tensor(items, "batch", "samples")
        if batch.ndim not in (4, 5):
            raise ItemError(
                f"samples: a batch tensor must be [N, C, *spatial] with 2 or 3 spatial dims, got shape {tuple(batch.shape)}"
            )
        for image in batch:
            yield image, None, None
    elif isinstance(items, DataLoader):
        for batch in items:
            yield from _unbatch(batch)
    elif isinstance(items, Mapping):
        raise ItemError("got a single dict item; pass a list of items (or a Dataset/DataLoader)")
    elif isinstance(items, Iterable) or hasattr(items, "__getitem__"):
        for raw in items if isinstance(items, Iterable) else (items[i] for i in range(len(items))):
            yield _split(raw)
    else:
        raise ItemError(f"cannot iterate items of type {type(items).__name__}")


def check_image(image: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``image`` as float32 ``[C, *spatial]`` or raise an ItemError naming ``name`` and the problem."""
    if image.ndim not in (3, 4):
        raise ItemError(
            f"{name}: image has shape {tuple(image.shape)}; expected [C, *spatial] with 2 or 3 spatial dims "
            "(add a channel axis for a single-channel image)"
        )
    if image.numel() == 0:
        raise ItemError(f"{name}: image is empty (shape {tuple(image.shape)})")
    if image.dtype == torch.bool or image.is_complex():
        raise ItemError(f"{name}: image has dtype {image.dtype}; expected real intensities")
    image = image.to(torch.float32)
    if not torch.isfinite(image.sum()):  # one pass; NaN/Inf anywhere makes the sum so (finite values may too)
        bad = int((~torch.isfinite(image)).sum())
        if bad:
            raise ItemError(f"{name}: image contains {bad} NaN/Inf values")
    return image


def check_label(label, image: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``label`` as ``[L, *spatial]`` on the image's spatial grid, or raise naming the problem."""
    label = _as_tensor(label, "label", name)
    spatial = tuple(image.shape[1:])
    if tuple(label.shape) == spatial:
        label = label[None]
    if label.ndim != image.ndim or tuple(label.shape[1:]) != spatial:
        raise ItemError(
            f"{name}: label has shape {tuple(label.shape)}, image has shape {tuple(image.shape)}; "
            "the label must cover the same spatial grid"
        )
    if label.is_floating_point() and not torch.isfinite(label).all():
        raise ItemError(f"{name}: label contains NaN/Inf values")
    return label


def iter_items(items, *, name: str = "item", check=None, on_error=None) -> Iterator[Item]:
    """Yield validated :class:`Item` s; ids default to the running index as a string.

    ``check(image, item_name)`` is a further check of each image that raises an :class:`ItemError`. An item
    failing a check raises; with ``on_error``, it is passed as ``on_error(item_id, error)`` and skipped (a
    container that fails to yield an item, such as an unreadable file, still raises).

    >>> skipped = []
    >>> items = [np.ones((1, 4, 4)), np.full((1, 4, 4), np.nan), np.ones((1, 4, 4))]
    >>> [item.id for item in iter_items(items, on_error=lambda item_id, error: skipped.append(item_id))], skipped
    (['0', '2'], ['1'])
    """
    for index, (image, label, item_id) in enumerate(iter_raw(items)):
        item_name = f"{name} {index}" if item_id is None else f"{name} {index} (id {item_id!r})"
        item_id = str(index) if item_id is None else str(item_id)
        try:
            tensor = check_image(_as_tensor(image, "image", item_name), item_name)
            label_tensor = None if label is None else check_label(label, tensor, item_name)
            if check is not None:
                check(tensor, item_name)
        except ItemError as error:
            if on_error is None:
                raise
            on_error(item_id, error)
            continue
        beat()  # an item read (from disk, often the slow part of a bank build)
        yield Item(tensor, label_tensor, item_id)


def iter_batches(items, batch_size: int, *, name: str = "item", check=None, on_error=None) -> Iterator[list[Item]]:
    """Validated items (see :func:`iter_items`) in lists of ``batch_size``, checking that all share rank and
    channel count with the first."""
    first: list[torch.Size] = []

    def like_first(image: torch.Tensor, item_name: str) -> None:
        if check is not None:
            check(image, item_name)
        if not first:
            first.append(image.shape)
        elif image.ndim != len(first[0]) or image.shape[0] != first[0][0]:
            raise ItemError(
                f"{item_name}: image has shape {tuple(image.shape)} but the first item has {tuple(first[0])}; "
                "all items need the same number of channels and spatial dims"
            )

    batch: list[Item] = []
    for item in iter_items(items, name=name, check=like_first, on_error=on_error):
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class ContentHash:
    """Hash of item ids, image and label bytes (the content part of a bank fingerprint), independent of the
    order items arrive in: the same items with the same ids in another order give the same hash (items
    without ids get their position as id, so reordering those changes it)."""

    def __init__(self) -> None:
        self._digests: list[bytes] = []

    def update(self, item: Item) -> None:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(item.id.encode() + b"\0" + str(tuple(item.image.shape)).encode())
        digest.update(item.image.contiguous().numpy().tobytes())
        if item.label is not None:
            digest.update(item.label.to(torch.float32).contiguous().numpy().tobytes())
        self._digests.append(digest.digest())

    def hexdigest(self) -> str:
        return hashlib.blake2b(b"".join(sorted(self._digests)), digest_size=16).hexdigest()
