"""The framework-free replica monitor, as parts: :mod:`.options` (declared once), :mod:`.stop` (when to stop),
:mod:`.ledger` (history and checkpoints), :mod:`.sampling` (drawing samples), :mod:`.communicator` (processes of a
distributed run), :mod:`.checking` (the protocol of one check over them), :mod:`.checkpoints` (the step a file
holds), :mod:`.selection` and :mod:`.certification` (the checkpoint to ship), :mod:`.presentation` (galleries,
tables, files) and :mod:`.core` (``Monitor``, coordinating them)."""

from .core import Monitor
from .ledger import Check
from .sampling import SamplerError
from .stop import StopReason

__all__ = ["Monitor", "Check", "StopReason", "SamplerError"]
