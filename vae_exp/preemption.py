"""Stopping cleanly on SIGTERM / SIGINT (cluster preemption, Ctrl-C): the loop finishes its
current step, writes a checkpoint and exits non-zero; a second Ctrl-C stops at once."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopRequest:
    """While active (a `with` block in the main thread), records the first SIGTERM or SIGINT
    in `signal_name` instead of dying; the training loop checks it after every step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.signal_number = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signal_name, self.signal_number = signal.Signals(signum).name, signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
