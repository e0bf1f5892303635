"""A hook that long work calls as it goes (each item read, each batch searched), so that a distributed run can
keep the processes waiting for its rank 0 from timing out.

In a distributed run rank 0 alone builds the bank and scores, while the other processes wait for its answer in a
collective. A collective waits only so long: NCCL's watchdog ends the run after 10 minutes under ``torchrun`` and 30
under Lightning, and building a bank of a few thousand CT volumes read from disk takes longer. The communicator
sets the hook on rank 0 (:meth:`~relict_callbacks.monitor.communicator.Communicator.from_rank_zero`) to tell the
others now and then that it is still working.

>>> calls = []
>>> with beating(lambda: calls.append(1)):
...     beat(); beat()
>>> beat()  # no hook here
>>> len(calls)
2
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextvars import ContextVar

_hook: ContextVar[Callable[[], None] | None] = ContextVar("relict_heartbeat", default=None)


def beat() -> None:
    """Call the hook :func:`beating` set, if any: a step of long work was done."""
    hook = _hook.get()
    if hook is not None:
        hook()


@contextlib.contextmanager
def beating(hook: Callable[[], None]):
    """Inside, :func:`beat` calls ``hook``."""
    token = _hook.set(hook)
    try:
        yield
    finally:
        _hook.reset(token)
