"""Whether the processes of a distributed run were handed the same training set: the bank, built on rank 0 alone,
must hold every training patient, and a run whose processes each load their own part (MONAI's ``partition_dataset``
per rank) would build it from rank 0's part only."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from .communicator import Communicator


def check_one_training_set(train_items, comm: Communicator) -> None:
    """Raise on every process when the processes were handed different training sets: each loads its own part
    (MONAI's ``partition_dataset`` per rank), and a bank built from rank 0's would miss the others' patients.
    Every process calls it; those handed none (``None``) take part without a say."""
    digest = 0 if train_items is None else _training_set_digest(train_items)
    digests = {d for d in comm.all_gather(torch.tensor([digest])).flatten().tolist() if d != 0}
    if len(digests) > 1:
        raise ValueError(f"the {comm.world_size} processes load different training sets (each its own part of it?): "
                         "a bank built from rank 0's would miss the other processes' patients, and their copies would "
                         "go unflagged; pass train_items=<the whole training set> (the same on every process)")


def _training_set_digest(items) -> int:
    """A digest (never 0) of a training set's size and, where it lists plain data (a MONAI ``Dataset``'s ``.data``
    of file names, nested lists and dicts of paths and numbers; a ``Subset``'s indices into such a dataset), of that
    list: the same on every process handed the same set.

    >>> from monai.data import Dataset
    >>> _training_set_digest(Dataset([{"image": ["a.nii", "b.nii"]}])) == _training_set_digest(
    ...     Dataset([{"image": ["a.nii", "c.nii"]}]))
    False
    """
    digest = hashlib.blake2b(str(len(items) if hasattr(items, "__len__") else -1).encode(), digest_size=7)
    while isinstance(items, torch.utils.data.Subset):
        digest.update(repr([int(i) for i in items.indices]).encode())
        items = items.dataset
    data = getattr(items, "data", None)
    if isinstance(data, (list, tuple)):
        try:
            digest.update(repr(_plain(data)).encode())
        except TypeError:  # arrays, tensors, objects: the size alone
            pass
    return int.from_bytes(digest.digest(), "big") or 1


def _plain(value):
    """``value`` as plain, comparable Python data (paths as strings, numpy numbers as Python's, dicts as sorted
    pairs); a ``TypeError`` where it holds anything else (arrays, tensors, objects)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic) and np.ndim(value) == 0:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return sorted((str(k), _plain(v)) for k, v in value.items())
    raise TypeError(f"not plain data: {type(value).__name__}")
