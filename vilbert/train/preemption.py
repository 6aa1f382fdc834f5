"""Pre-emption: turn SIGTERM/SIGINT into a request to checkpoint and stop at the next step boundary.

Clusters pre-empt jobs with SIGTERM (Slurm, Kubernetes; `torchrun` forwards it to every rank) and a
user stops a run with Ctrl-C. Both set a flag that the loop checks after each optimizer step; it
then saves a checkpoint and returns. A second SIGINT raises `KeyboardInterrupt` at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

__all__ = ["StopRequest"]

log = logging.getLogger(__name__)


class StopRequest:
    """A context manager that catches `signals` while active; `.signum` is the first one caught.

    Handlers can only be installed from the main thread; elsewhere this is inert.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            log.warning(
                "received %s: saving a checkpoint at the end of this step, then stopping", signal.Signals(signum).name
            )
        self.signum = signum
