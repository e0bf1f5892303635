"""The three RELICT levels: voxel (NCC), feature (cosine of embeddings), segmentation (Dice)."""

from .base import Level, Nearest
from .feature import FeatureLevel
from .segmentation import SegmentationLevel
from .voxel import SAVED_BEFORE, VoxelLevel

__all__ = ["Level", "Nearest", "VoxelLevel", "FeatureLevel", "SegmentationLevel", "level_from_config",
           "current_config"]


def current_config(config: dict) -> dict:
    """A level config as a bank saved it, with the keys added since then set to what that version did (a voxel
    level saved before ``bend_fit`` existed fitted its bends by Adam), so that it compares equal to the config of
    the level that scores as it did.

    >>> current_config({"type": "VoxelLevel", "name": "voxel", "grid": 16})["bend_fit"]
    'adam'
    """
    return {**SAVED_BEFORE, **config} if config.get("type") == "VoxelLevel" else config


def level_from_config(config: dict) -> Level:
    """Rebuild a level from its saved config, where that needs no user object (extractor, segmenter, mask)."""
    kind = config.get("type")
    if kind == "VoxelLevel":
        return VoxelLevel.from_config(config)
    if kind == "SegmentationLevel":
        return SegmentationLevel.from_config(config)
    if kind == "FeatureLevel":
        raise ValueError(f"this bank has a feature level {config['name']!r} ({config['model']}): pass "
                         "levels=[..., FeatureLevel(extractor=...)] to load it")
    raise ValueError(f"unknown level type {kind!r} in bank manifest")
