"""Which training step a checkpoint file holds, read from its content: a file is matched to a check by the weights
it holds now, never by its name, so a rewritten ``last.ckpt`` or ``best.pt`` is judged afresh (a file is read again
as soon as its modification time, size or inode changes).

A Lightning checkpoint carries ``global_step``; a MONAI ``CheckpointSaver`` file carries the ignite trainer's
``iteration`` (``save_dict={"trainer": trainer, ...}``) or the replica handler's ``saved_at`` step
(``save_dict={"relict": handler, ...}``). Files are memory-mapped, so the weights are not read.

>>> import tempfile, os, torch
>>> folder = tempfile.mkdtemp()
>>> torch.save({"epoch": 2, "global_step": 24, "state_dict": {}}, os.path.join(folder, "last.ckpt"))
>>> torch.save({"net": {}}, os.path.join(folder, "other.pt"))
>>> sorted((os.path.basename(path), step) for path, step in scan([folder]).items())
[('last.ckpt', 24), ('other.pt', None)]
"""

from __future__ import annotations

import os
import pickle
import time

import torch

SUFFIXES = (".ckpt", ".pt", ".pth")
RACY_NS = 2 * 10**9  # coarser than any file system's timestamps (FAT: 2 s)
_known: dict[str, tuple[tuple[int, int, int], int | None]] = {}  # path -> (mtime_ns, size, inode), step read


def saved_step(path) -> int | None:
    """The training step whose weights the checkpoint at ``path`` holds, or ``None`` when the file does not say
    (or cannot be read, see :func:`read_checkpoint`).

    A file is read once per version: while its modification time, size and inode are unchanged, the step read
    before is used; a rewritten file is read again. A file written in the last ``RACY_NS`` is read every time (a
    rewrite within its timestamp's granularity could keep all three).
    """
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except OSError:
        return None
    version = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    known = _known.get(path)
    if known is not None and known[0] == version:
        return known[1]
    try:
        step = step_of(read_checkpoint(path))
    except Exception:
        step = None
    if time.time_ns() - stat.st_mtime_ns > RACY_NS:
        _known[path] = (version, step)
    return step


def read_checkpoint(path, *, mmap: bool = True):
    """A checkpoint's content on the CPU as ``torch.load(weights_only=True)`` reads it (memory-mapped with ``mmap``,
    where the file allows: weights are then read only where used), except that objects of classes it does not
    allow, which a file may hold beside its weights (hyper-parameters saved as an ``argparse.Namespace`` or a
    ``Path``, a scheduler module), come back as inert placeholders instead of failing the whole file (subclasses of
    dict or list still fail it: torch fills only those types). No code a file names is run.

    >>> import argparse, tempfile, os, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "epoch=0.ckpt")
    >>> torch.save({"global_step": 8, "hyper_parameters": {"args": argparse.Namespace(lr=0.1)}}, path)
    >>> content = read_checkpoint(path)
    >>> content["global_step"], type(content["hyper_parameters"]["args"]).__name__
    (8, 'Inert')
    """
    try:
        return _load(path, mmap)
    except pickle.UnpicklingError:  # a class torch does not allow: stand in for each
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        with torch.serialization.safe_globals([(Inert, name) for name in unknown]):
            return _load(path, mmap)


def _load(path, mmap: bool):
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # an old, non-zip file cannot be memory-mapped
            pass
    return torch.load(path, map_location="cpu", weights_only=True)


class Inert:
    """What :func:`read_checkpoint` makes of an object of a class torch does not allow: it takes whatever the file
    gives it and keeps nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def step_of(content) -> int | None:
    """The training step a loaded checkpoint holds (see the module), or ``None`` when it does not say."""
    if not isinstance(content, dict):
        return None
    if "global_step" in content:  # Lightning
        return int(content["global_step"])
    for value in content.values():  # MONAI CheckpointSaver: one state dict per saved object
        if isinstance(value, dict) and "saved_at" in value:  # ReplicaMonitorHandler.state_dict()
            return int(value["saved_at"]["step"])
        if isinstance(value, dict) and {"iteration", "epoch_length"} <= value.keys():  # an ignite engine
            return int(value["iteration"])
    return None


def scan(folders) -> dict[str, int | None]:
    """Every checkpoint file (``.ckpt``, ``.pt``, ``.pth``) directly in ``folders``, with the step it holds."""
    found = {}
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file() and entry.name.endswith(SUFFIXES) and not entry.name.startswith("."):
                    found[entry.path] = saved_step(entry.path)
    return found
