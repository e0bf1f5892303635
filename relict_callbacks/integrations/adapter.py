"""What every framework adapter (Lightning callback, MONAI handler) shares: the monitor's options in its
signature, the views of its ``Monitor``, the framework's other scalar metrics kept with each check, and handing
checks to sinks."""

from __future__ import annotations

import inspect
import logging
import numbers

import torch

from relict_callbacks.monitor import Check, Monitor, StopReason

log = logging.getLogger("relict_callbacks")


def with_monitor_options(*excluded: str):
    """Decorate an adapter's ``__init__(self, ..., **options)`` that passes ``options`` on to :class:`Monitor`:
    its signature becomes its own parameters plus Monitor's options (typed, with defaults), less ``excluded``, so
    ``help()``, IDEs and jsonargparse (LightningCLI) see every option while it is declared only on Monitor."""
    def decorate(init):
        own = inspect.signature(init, eval_str=True)
        kept = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        taken = {p.name for p in kept} | set(excluded)
        options = [p for p in inspect.signature(Monitor, eval_str=True).parameters.values() if p.name not in taken]
        init.__signature__ = own.replace(parameters=kept + options)
        return init

    return decorate


class MonitorAdapter:
    """The views of ``self.monitor`` that every framework adapter offers."""

    monitor: Monitor

    @property
    def history(self) -> list[dict]:
        """One entry per check: epoch (0-based), step, every metric then known, error, stop reason, checkpoint."""
        return self.monitor.history

    @property
    def stopping_reason(self) -> StopReason:
        return self.monitor.stop.reason

    @property
    def stopping_reason_message(self) -> str | None:
        return self.monitor.stop.message

    def safe_checkpoint(self, max_replica_rate: float | None = None, metric: str | None = None,
                        mode: str = "min") -> str | None:
        """The latest (or best by ``metric``) recorded checkpoint whose replica rate stayed <= the limit."""
        return self.monitor.safe_checkpoint(max_replica_rate, metric, mode)

    def state_dict(self) -> dict:
        """The monitor's state: history, patience counters, lowest rate, stop state, seed (plain Python values)."""
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.monitor.load_state_dict(state_dict)


def scalar_metrics(metrics) -> dict[str, float]:
    """The framework's other scalar metrics (losses, validation scores), kept with each check in the history."""
    def scalar(value) -> bool:
        if isinstance(value, torch.Tensor):
            return value.numel() == 1
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    return {key: float(value) for key, value in metrics.items() if not key.startswith("relict/") and scalar(value)}


def checked_sinks(sinks) -> list:
    """``sinks`` as a list, each with a callable ``log_check``; else ``ValueError`` naming the first that has none."""
    sinks = list(sinks)
    for position, sink in enumerate(sinks):
        if not callable(getattr(sink, "log_check", None)):
            raise ValueError(f"sinks[{position}] ({type(sink).__name__}) has no log_check(check, monitor, context) "
                             "method")
    return sinks


def notify_sinks(sinks, check: Check, monitor: Monitor, context, who: str, where: str, logger=log) -> None:
    """Hand a successful check to each sink; a failing sink (e.g. W&B without credentials) is logged, never raised."""
    for sink in sinks:
        try:
            sink.log_check(check, monitor, context)
        except Exception as error:
            logger.warning(f"{who}: {type(sink).__name__} failed to log the check at {where}: {error}")
