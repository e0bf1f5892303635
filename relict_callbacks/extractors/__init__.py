"""Feature encoders for the feature level: a self-supervised copy encoder trained on the bank's own images,
user checkpoints of any network (MONAI's included) read safely, and Astra's pretrained 3D CT backbone."""

from .astra import CHEST_WINDOW, AstraEncoder
from .checkpoint import CheckpointEncoder, CheckpointError, load_into, load_weights
from .copy_encoder import CopyEncoder

__all__ = ["AstraEncoder", "CHEST_WINDOW", "CheckpointEncoder", "CheckpointError", "CopyEncoder", "load_into",
           "load_weights"]
