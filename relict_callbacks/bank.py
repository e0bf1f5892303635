"""ReferenceBank: the training set, embedded once per level, with the calibration null of each level.

Built by streaming items in batches (raw images are never all in memory), saved as one uncompressed ``.npz``
(``allow_pickle=False``; the JSON manifest is a member of it) whose arrays are loaded memory-mapped, and
cached in a ``cache_dir`` while its fingerprint (level configs, item ids, a content hash of images and labels,
the holdout) matches. The manifest holds an xxh3-128 checksum of every array; loading verifies them all,
hashing each mapped array in blocks: one pass over the file, no longer than a plain sequential read of it
(``benchmarks/bank_integrity.py``: 0.82-0.94x for a 1 GB bank of 2,000 x 64³ in the page cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
import xxhash
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .atomic import atomic_write
from .heartbeat import beat
from .items import ContentHash, ItemError, iter_batches
from .levels import Level, Nearest, current_config, level_from_config
from .levels.base import resolve_grid
from .validation import check_number
from .search import describe_placement, device_budget, place_rows
from .torch_modes import full_precision

log = logging.getLogger("relict_callbacks")

FORMAT = "relict-bank/2"  # /2: the manifest holds a checksum of every array
CACHE_NAME = "bank.npz"
HASH_BLOCK = 1 << 24  # bytes hashed at a time


class BankError(ValueError):
    """A bank file that is corrupt, foreign, or does not match the levels it is loaded with."""


def _count(items) -> int | None:
    if isinstance(items, DataLoader):
        return len(items.dataset) if hasattr(items.dataset, "__len__") else None
    return len(items) if hasattr(items, "__len__") else None


def _hash_items(items, name: str, batch_size: int) -> tuple[str, list[str]]:
    content, ids = ContentHash(), []
    for batch in iter_batches(items, batch_size, name=name):
        for item in batch:
            content.update(item)
            ids.append(item.id)
    return content.hexdigest(), ids


def _checksum(data: np.ndarray) -> str:
    """xxh3-128 of the bytes of a flat uint8 array (in memory or memory-mapped), read in blocks."""
    digest = xxhash.xxh3_128()
    for start in range(0, len(data), HASH_BLOCK):
        digest.update(data[start : start + HASH_BLOCK])
    return f"xxh3_128:{digest.hexdigest()}"


def _ids_digest(ids: list[str]) -> str:
    return hashlib.blake2b("\0".join(sorted(ids)).encode(), digest_size=16).hexdigest()


def _differences(old: dict, new: dict) -> list[str]:
    """Why a cached bank (manifest ``old``) does not fit the inputs described by ``new``."""
    reasons = []
    if old.get("format") != new["format"]:
        reasons.append(f"bank format {old.get('format')!r} -> {new['format']!r}")
    old_levels = {c.get("name"): current_config(c) for c in old.get("levels", [])}
    new_levels = {c["name"]: c for c in new["levels"]}
    for name in old_levels.keys() | new_levels.keys():
        before, after = old_levels.get(name), new_levels.get(name)
        if before is None or after is None:
            reasons.append(f"level {name!r} {'added' if before is None else 'removed'}")
        elif before != after:
            changed = ", ".join(f"{key} {before.get(key)!r} -> {after.get(key)!r}"
                                for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key))
            reasons.append(f"level {name!r} changed: {changed}")
    old_ids, new_ids = set(old.get("ids", [])), set(new["ids"])
    if old_ids != new_ids:
        reasons.append(f"item ids changed: {len(new_ids - old_ids)} added, {len(old_ids - new_ids)} removed")
    if old.get("content") != new["content"]:
        reasons.append("training image or label content changed")
    if old.get("holdout") != new["holdout"]:
        reasons.append("holdout set changed")
    if old.get("null_size") != new["null_size"]:
        reasons.append(f"null_size {old.get('null_size')} -> {new['null_size']}")
    return reasons


class ReferenceBank:
    """The training set embedded per level, plus each level's calibration null.

    Build with :meth:`build`; persist with :meth:`save` / :meth:`load`. ``nulls[level]`` holds the similarity
    of unseen patients (holdout) to their nearest training image, or, without a holdout, of training images
    to their nearest *other* training image (leave-one-out, on at most ``null_size`` of them).

    >>> import relict_callbacks as rc
    >>> train = rc.data.make_phantoms(8, ndim=2, size=32)
    >>> bank = rc.ReferenceBank.build(train, levels=[rc.VoxelLevel(grid=32)], progress=False)
    >>> len(bank), bank.null_source, bank.nulls["voxel"].shape
    (8, 'leave-one-out', (8,))
    """

    def __init__(self, levels: list[Level], ids: list[str], arrays: dict[str, dict[str, np.ndarray]],
                 nulls: dict[str, np.ndarray], manifest: dict) -> None:
        self.levels, self.ids, self.arrays, self.nulls, self.manifest = levels, ids, arrays, nulls, manifest
        self.cache_message = ""
        self._placed: dict = {}  # (device, budget) -> the arrays placed for search there (one placement kept)

    # -- facts ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def null_source(self) -> str:
        return self.manifest["null_source"]

    @property
    def fingerprint(self) -> str:
        """Hex digest of what the bank was built from (levels, ids, content, holdout, null size)."""
        keys = ("format", "levels", "ids_digest", "content", "holdout", "null_size")
        blob = json.dumps({k: self.manifest[k] for k in keys}, sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=16).hexdigest()

    @property
    def image_shape(self) -> tuple[int, int]:
        """(channels, spatial dims) every scored image must have."""
        return self.manifest["channels"], self.manifest["spatial_dims"]

    def level(self, name: str) -> Level:
        for level in self.levels:
            if level.name == name:
                return level
        raise KeyError(f"bank has no level {name!r} (levels: {[lv.name for lv in self.levels]})")

    def rows(self, level: Level, device="cpu", budget: int | None = None) -> dict:
        """The bank arrays of ``level`` ready for search on ``device`` (see :func:`~relict_callbacks.search.place_rows`):
        resident within ``budget`` bytes (default: a quarter of a CUDA device's memory and at most half of what is
        free on it, or a quarter of the RAM for the CPU, where float16 rows are ranked in bfloat16 or float32), beyond
        it streamed from host memory through pinned staging buffers (CUDA) or read memory-mapped (CPU). Placed once
        per device and budget, and kept until another is asked for."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if (device, budget) not in self._placed:
            bytes_allowed = device_budget(device, budget)  # taken once: on CUDA it depends on the memory free now
            self._placed = {(device, budget): place_rows(self.arrays, device, bytes_allowed)}
            log.info(describe_placement(self._placed[(device, budget)], device, bytes_allowed))
        return self._placed[(device, budget)][level.name]

    def release_rows(self) -> None:
        """Forget where :meth:`rows` placed the arrays, freeing what they held on a device; the next search places
        them again (on a GPU, within the memory free then).

        >>> import relict_callbacks as rc
        >>> bank = rc.ReferenceBank.build(rc.data.make_phantoms(3, ndim=2, size=16), [rc.VoxelLevel(grid=16)],
        ...                               progress=False)
        >>> placed = bank.rows(bank.levels[0])["rows"]
        >>> bank.rows(bank.levels[0])["rows"] is placed  # kept
        True
        >>> bank.release_rows()
        >>> bank.rows(bank.levels[0])["rows"] is placed  # placed again
        False
        """
        self._placed = {}

    @full_precision()
    def nearest(self, level: Level, query: dict[str, np.ndarray], device="cpu", *, exclude=None,
                index=None, budget: int | None = None, **options) -> Nearest:
        """``level.nearest`` of embedded query rows against this bank, searched on ``device`` (query rows and
        ``exclude`` are moved there; ``budget``: see :meth:`rows`; ``options`` go to ``level.nearest``)."""
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in query.items()}
        exclude = None if exclude is None else exclude.to(device)
        return level.nearest(tensors, self.rows(level, device, budget), exclude=exclude, index=index, **options)

    def nearest_levels(self, queries: dict[str, dict[str, np.ndarray]], device="cpu", *, exclude=None,
                       indexes=None, budget: int | None = None) -> dict[str, Nearest]:
        """:meth:`nearest` at every level for the same queries (``queries[level name]`` are their rows). A level
        aligned to another one (``level.align_to``, e.g. segmentation to voxel) re-scores that level's matches
        under their transforms instead of searching by itself. Searched on ``device`` (``budget``: see :meth:`rows`)."""
        found = {}
        names = [level.name for level in self.levels]
        for level in sorted(self.levels, key=lambda lv: lv.align_to in names):  # anchors first
            options = {}
            if level.align_to in names:
                anchor = self.level(level.align_to)
                options = {"match": found[anchor.name], "match_grid": resolve_grid(anchor.grid, self.image_shape[1])}
            found[level.name] = self.nearest(level, queries[level.name], device, exclude=exclude, budget=budget,
                                             index=(indexes or {}).get(level.name), **options)
        return {name: found[name] for name in names}

    # -- building ------------------------------------------------------------------------------------------
    @classmethod
    @full_precision()  # scores and nulls in float32, even when called inside autocast
    def build(cls, items, levels: list[Level], holdout=None, cache_dir=None, *, batch_size: int = 16,
              device="cpu", progress: bool = True, null_size: int = 512, seed: int = 0) -> ReferenceBank:
        """Embed ``items`` for every level, compute calibration nulls, and cache the result in ``cache_dir``.

        Args:
            items: training items (arrays ``[C, *spatial]``, ``(image, label)`` pairs, dicts with
                ``image``/``label``/``id``, or a Dataset/DataLoader of them).
            levels: the RELICT levels to embed (e.g. ``[VoxelLevel(), SegmentationLevel()]``).
            holdout: real images not used in training, for calibration (else leave-one-out on the training set).
            cache_dir: folder holding ``bank.npz``, reused while the fingerprint matches, rebuilt (saying why)
                when it does not.
            batch_size, device: how items are streamed and where embeddings are computed.
            null_size: at most this many leave-one-out queries for the null (a seeded subset).
        """
        check_number("batch_size", batch_size, low=1, integer=True)
        check_number("null_size", null_size, low=1, integer=True)
        check_number("seed", seed, low=0, integer=True)
        names = [level.name for level in levels]
        if not levels or len(set(names)) != len(names):
            raise ValueError(f"need at least one level, with unique names (got {names})")
        cache = None if cache_dir is None else Path(cache_dir) / CACHE_NAME
        reasons = ["no cached bank"]
        if cache is not None and cache.exists():
            content, ids = _hash_items(items, "item", batch_size)
            holdout_content = None if holdout is None else _hash_items(holdout, "holdout item", batch_size)[0]
            wanted = {"format": FORMAT, "levels": [lv.config() for lv in levels], "ids": ids, "content": content,
                      "holdout": holdout_content, "null_size": null_size}
            try:
                reasons = _differences(cls.read_manifest(cache), wanted)
                bank = None if reasons else cls.load(cache, levels=levels)
            except BankError as err:  # unreadable, or an array fails its checksum
                reasons = [str(err)]
            if not reasons:
                bank.cache_message = f"reused cached bank {cache} ({len(bank)} items)"
                log.info(bank.cache_message)
                return bank
            log.warning("rebuilding reference bank %s: %s", cache, "; ".join(reasons))
        bank = cls._build(items, levels, holdout, batch_size, device, progress, null_size, seed)
        if cache is not None:
            bank.save(cache)
            bank.cache_message = f"built bank {cache} ({'; '.join(reasons)})"
        return bank

    @classmethod
    def _build(cls, items, levels, holdout, batch_size, device, progress, null_size, seed) -> ReferenceBank:
        content, ids = ContentHash(), []
        chunks: dict[str, dict[str, list[np.ndarray]]] = {level.name: {} for level in levels}
        bar = tqdm(total=_count(items), desc="relict bank", unit="img", disable=not progress)
        first = None
        for batch in iter_batches(items, batch_size):
            first = first or batch[0]
            for item in batch:
                content.update(item)
                ids.append(item.id)
            for level in levels:
                for key, rows in level.embed(batch, device).items():
                    chunks[level.name].setdefault(key, []).append(rows)
            bar.update(len(batch))
        bar.close()
        if first is None:
            raise ItemError("the training set is empty: a reference bank needs at least one item")
        if len(set(ids)) != len(ids):
            duplicated = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ItemError(f"training item ids must be unique; repeated: {duplicated}")
        arrays = {name: {key: np.concatenate(parts) for key, parts in level_chunks.items()}
                  for name, level_chunks in chunks.items()}
        manifest = {
            "format": FORMAT, "levels": [level.config() for level in levels], "ids_digest": _ids_digest(ids),
            "content": content.hexdigest(), "holdout": None, "null_size": null_size,
            "channels": int(first.image.shape[0]), "spatial_dims": int(first.image.ndim - 1),
            "null_source": "leave-one-out" if holdout is None else "holdout",
        }
        bank = cls(list(levels), ids, arrays, {}, manifest)
        if holdout is None:
            bank.nulls = bank._leave_one_out_nulls(null_size, batch_size, device, seed, progress)
        else:
            bank.nulls, manifest["holdout"] = bank._holdout_nulls(holdout, batch_size, device, progress)
        return bank

    def check_compatible(self, image: torch.Tensor, name: str) -> None:
        """Raise an ItemError naming ``name`` if ``image`` has another channel count or rank than the bank."""
        channels, spatial_dims = self.image_shape
        if image.shape[0] != channels or image.ndim - 1 != spatial_dims:
            raise ItemError(f"{name}: image has shape {tuple(image.shape)}, but the bank holds {spatial_dims}D images "
                            f"with {channels} channel(s)")

    def _holdout_nulls(self, holdout, batch_size, device, progress) -> tuple[dict[str, np.ndarray], str]:
        content, nulls = ContentHash(), {level.name: [] for level in self.levels}
        bar = tqdm(total=_count(holdout), desc="relict null (holdout)", unit="img", disable=not progress)
        for batch in iter_batches(holdout, batch_size, name="holdout item"):
            for item in batch:
                self.check_compatible(item.image, f"holdout item {item.id!r}")
                content.update(item)
            found = self.nearest_levels({level.name: level.embed(batch, device) for level in self.levels}, device)
            for name, nearest in found.items():
                nulls[name].append(nearest.similarity)
            bar.update(len(batch))
        bar.close()
        if not nulls[self.levels[0].name]:
            raise ItemError("the holdout set is empty")
        return {name: np.concatenate(parts) for name, parts in nulls.items()}, content.hexdigest()

    def _leave_one_out_nulls(self, null_size, batch_size, device, seed, progress) -> dict[str, np.ndarray]:
        if len(self) < 2:
            raise ItemError("leave-one-out calibration needs at least 2 training items (or pass a holdout)")
        chosen = np.arange(len(self))
        if len(self) > null_size:
            chosen = np.sort(np.random.default_rng(seed).choice(len(self), null_size, replace=False))
        nulls = {level.name: [] for level in self.levels}
        step = 4 * batch_size
        for start in tqdm(range(0, len(chosen), step), desc="relict null (leave-one-out)", disable=not progress):
            indices = chosen[start : start + step]
            exclude = torch.from_numpy(indices).to(device)
            queries = {name: {key: rows[indices] for key, rows in arrays.items()} for name, arrays in self.arrays.items()}
            for name, nearest in self.nearest_levels(queries, device, exclude=exclude).items():
                nulls[name].append(nearest.similarity)
            beat()
        return {name: np.concatenate(parts) for name, parts in nulls.items()}

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the bank atomically to one ``.npz`` (arrays + JSON manifest with their checksums); returns the
        path."""
        members = {"ids": np.array(self.ids, dtype=np.str_)}
        for name, rows in self.arrays.items():
            members.update({f"rows.{name}.{key}": array for key, array in rows.items()})
        members.update({f"null.{name}": null for name, null in self.nulls.items()})
        members = {key: np.ascontiguousarray(array) for key, array in members.items()}  # stored as hashed
        checksums = {key: _checksum(array.reshape(-1).view(np.uint8)) for key, array in members.items()}
        manifest = {**self.manifest, "checksums": checksums}
        members["manifest"] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
        with atomic_write(path, "wb") as file:
            np.savez(file, **members)
        return Path(path)

    @staticmethod
    def read_manifest(path, any_version: bool = False) -> dict:
        """The JSON manifest of the bank file ``path`` (with its ``ids``); BankError if it is not a relict bank of
        this format version (of any version with ``any_version``)."""
        try:
            with np.load(path, allow_pickle=False) as archive:
                if "manifest" not in archive.files:
                    raise BankError(f"{path}: not a relict bank (no manifest in the archive)")
                manifest = json.loads(archive["manifest"].tobytes())
                manifest["ids"] = [str(i) for i in archive["ids"]] if "ids" in archive.files else []
        except (OSError, ValueError, zipfile.BadZipFile, json.JSONDecodeError) as err:
            if isinstance(err, BankError):
                raise
            raise BankError(f"{path}: not a readable relict bank ({type(err).__name__}: {err})") from None
        family = str(manifest.get("format")).partition("/")[0]
        if manifest.get("format") != FORMAT and not (any_version and family == FORMAT.partition("/")[0]):
            raise BankError(f"{path}: bank format {manifest.get('format')!r}, this version reads {FORMAT!r}")
        return manifest

    @classmethod
    def load(cls, path, levels: list[Level] | None = None) -> ReferenceBank:
        """Load a saved bank, arrays memory-mapped, each verified against its checksum (BankError naming the file
        and the array on a mismatch). ``levels`` are required for feature levels (the extractor cannot be saved
        as data); when given, their configs must match the saved ones."""
        path = Path(path)
        if not path.is_file():
            raise BankError(f"{path}: no such bank file")
        manifest = cls.read_manifest(path)
        saved = [current_config(config) for config in manifest["levels"]]
        if levels is None:
            levels = [level_from_config(config) for config in saved]
        elif [lv.config() for lv in levels] != saved:
            raise BankError(f"{path}: levels {[lv.config() for lv in levels]} do not match the saved {saved}")
        members = _memmap_npz(path, manifest.get("checksums", {}))
        ids = manifest.pop("ids")
        arrays, nulls = {level.name: {} for level in levels}, {}
        for key, array in members.items():
            kind, _, rest = key.partition(".")
            if kind == "rows":
                name, _, array_key = rest.partition(".")
                if name in arrays:
                    arrays[name][array_key] = array
            elif kind == "null":
                nulls[rest] = np.array(array)
        for level in levels:
            rows = arrays[level.name]
            if not rows or level.name not in nulls or any(len(a) != len(ids) for a in rows.values()):
                raise BankError(f"{path}: arrays of level {level.name!r} are missing or do not match {len(ids)} ids")
        return cls(levels, ids, arrays, nulls, manifest)


def _memmap_npz(path: Path, checksums: dict[str, str]) -> dict[str, np.ndarray]:
    """Memory-map every array member of an uncompressed ``.npz`` (as written by ``np.savez``), copy-on-write:
    writable in memory (as torch wants), never written back to the file; every member but the manifest must
    match its entry in ``checksums``."""
    out = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as file:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise BankError(f"{path}: member {info.filename} is compressed; banks are stored uncompressed")
                file.seek(info.header_offset)
                header = file.read(30)
                name_length, extra_length = struct.unpack("<HH", header[26:30])
                file.seek(info.header_offset + 30 + name_length + extra_length)
                version = np.lib.format.read_magic(file)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(file)
                if dtype.hasobject:
                    raise BankError(f"{path}: member {info.filename} holds Python objects; refusing to load it")
                key = info.filename.removesuffix(".npy")
                size = int(np.prod(shape)) * dtype.itemsize
                data = np.memmap(path, dtype=np.uint8, mode="r", offset=file.tell(), shape=(size,)) if size else \
                    np.empty(0, np.uint8)
                if key != "manifest":
                    _verify(path, key, data, checksums)
                out[key] = np.empty(shape, dtype) if not size else np.memmap(
                    path, dtype=dtype, mode="c", offset=file.tell(), shape=shape, order="F" if fortran else "C")
            missing = sorted(set(checksums) - set(out))
            if missing:
                raise BankError(f"{path}: array {missing[0]!r} listed in the manifest is missing from the file")
    except (OSError, ValueError, zipfile.BadZipFile, struct.error) as err:
        if isinstance(err, BankError):
            raise
        raise BankError(f"{path}: corrupt bank file ({type(err).__name__}: {err})") from None
    return out


def _verify(path: Path, key: str, data: np.ndarray, checksums: dict[str, str]) -> None:
    """Raise a BankError naming ``path`` and the array ``key`` unless ``data`` (its bytes) matches its checksum."""
    if key not in checksums:
        raise BankError(f"{path}: array {key!r} has no checksum in the manifest; the file was changed after it "
                        "was written (rebuild the bank)")
    if _checksum(data) != checksums[key]:
        raise BankError(f"{path}: array {key!r} does not match its checksum; the file is corrupt or was changed "
                        "after it was written (rebuild the bank: `relict bank build`, or delete it from the cache)")
