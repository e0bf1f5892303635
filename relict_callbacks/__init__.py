"""relict-callbacks: catch generative models for medical images memorizing their training patients.

The engine (this package) is framework-free; ``Monitor`` (the framework-free monitor), ``ReplicaMonitor``
(Lightning) and ``ReplicaMonitorHandler`` (MONAI) are imported lazily, so ``import relict_callbacks`` never
imports lightning, ignite, wandb or matplotlib.
"""

from importlib import import_module

from . import data
from .bank import BankError, ReferenceBank
from .items import ItemError
from .levels import FeatureLevel, Level, SegmentationLevel, VoxelLevel
from .scoring import LevelMatch, RankTest, ReplicaReport, ReplicaScorer, SampleRecord
from .search import FaissIndex

__version__ = "0.1.0"

__all__ = [
    "ReferenceBank", "BankError", "ItemError", "Level", "VoxelLevel", "FeatureLevel", "SegmentationLevel",
    "ReplicaScorer", "ReplicaReport", "SampleRecord", "LevelMatch", "RankTest", "FaissIndex", "data", "Monitor",
    "StopReason", "SamplerError", "ReplicaMonitor", "ReplicaMonitorHandler",
]

_LAZY = {"Monitor": "relict_callbacks.monitor", "StopReason": "relict_callbacks.monitor",
         "SamplerError": "relict_callbacks.monitor",
         "ReplicaMonitor": "relict_callbacks.integrations.lightning",
         "ReplicaMonitorHandler": "relict_callbacks.integrations.monai"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'relict_callbacks' has no attribute {name!r}")
