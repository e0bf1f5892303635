"""Atomic writes: write to a temporary file (or folder) beside the target, then rename over it; a folder is
replaced only if relict wrote it, and only what relict wrote in it is deleted."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

MARKER = ".relict-output"  # in every folder atomic_dir writes: what it wrote


@contextmanager
def atomic_write(path, mode: str = "w", **kwargs):
    """Open a temporary file for writing that replaces ``path`` only if the block finishes without error.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_write(target) as file:
    ...     _ = file.write("done")
    >>> target.read_text()
    'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_csv(path, rows) -> None:
    """Write ``rows`` (lists of cells, e.g. from a generator) as the CSV file ``path``, atomically.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.csv"
    >>> atomic_csv(target, (["id", "score"], ["a", 0.5]))
    >>> target.read_text().splitlines()
    ['id,score', 'a,0.5']
    """
    with atomic_write(path, newline="") as file:
        csv.writer(file).writerows(rows)


class OutputError(ValueError):
    """An output folder that relict may not replace (it holds files relict did not write)."""


def _written(folder: Path) -> list[str] | None:
    """The file names the marker of ``folder`` lists, or None if relict did not write it."""
    try:
        return list(json.loads((folder / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_replaceable(path) -> None:
    """Raise :class:`OutputError` unless ``path`` is missing, an empty folder, or a folder written by
    :func:`atomic_dir` that holds only the files it wrote (so replacing it deletes nothing else)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder")
    present = sorted(p.name for p in path.iterdir())
    if not present:
        return
    written = _written(path)
    if written is None:
        raise OutputError(f"{path}: a non-empty folder that relict did not write (no {MARKER} file); "
                          "choose a new or empty folder")
    others = sorted(set(present) - set(written) - {MARKER})
    if others:
        raise OutputError(f"{path}: holds files relict did not write ({', '.join(others[:5])}); "
                          "move them out or choose another folder")


@contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside ``path`` that replaces the folder ``path`` only if the block finishes
    without error; otherwise it is removed and ``path`` is left as it was.

    The folder gets a marker file (``.relict-output``) listing what was written. An existing ``path`` is replaced
    only if it is empty or such a folder holding nothing else (:func:`check_replaceable`, checked first), and
    only the files its marker lists are deleted.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out"
    >>> with atomic_dir(target) as folder:
    ...     _ = (folder / "a.txt").write_text("done")
    >>> sorted(p.name for p in target.iterdir())
    ['.relict-output', 'a.txt']
    """
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"written_by": "relict-callbacks", "files": files}))
        if path.exists():  # swap: the old folder moves aside, the new one in, then what relict wrote there goes
            old = tmp.with_suffix(".old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove_written(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_written(old: Path) -> None:
    """Delete the files the marker of ``old`` lists, then ``old`` if that emptied it (else keep it, warning)."""
    for name in (_written(old) or []) + [MARKER]:
        if (old / name).is_file():
            (old / name).unlink()
    try:
        old.rmdir()
    except OSError:
        warnings.warn(f"kept {old}: it holds files relict did not write")
