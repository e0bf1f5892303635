"""The framework-free replica monitor, as parts: :mod:`.stop` (when to stop), :mod:`.ledger` (history and
checkpoints), :mod:`.sampling` (drawing samples), :mod:`.communicator` (processes of a distributed run),
:mod:`.presentation` (galleries and tables) and :mod:`.core` (``Monitor``, coordinating them)."""

from .core import Monitor
from .ledger import Check
from .sampling import SamplerError
from .stop import StopReason

__all__ = ["Monitor", "Check", "StopReason", "SamplerError"]
