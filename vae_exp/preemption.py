"""Stopping cleanly on SIGTERM / SIGINT / SIGUSR2 (cluster preemption, Ctrl-C): the loop
finishes its current step, writes a checkpoint and exits non-zero; the final evaluation (and
`python -m vae_exp.evaluate`) stops between two chunks of samples, writing nothing; a second
Ctrl-C stops at once. SIGUSR2 is what submitit sends before a SLURM preemption or time-out:
after the checkpoint, submitit's own handler then requeues the job (which resumes with
`trainer.resume=auto`)."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopRequest:
    """While active (a `with` block in the main thread), records the first caught signal in
    `signal_name` instead of dying; the training loop checks it after every step, the
    evaluation before every chunk of importance samples."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.signal_number = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a signal asked to stop."""
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signal_name, self.signal_number = signal.Signals(signum).name, signum

    def hand_over(self) -> None:
        """Once the checkpoint is written: pass the caught signal on to the handler that was
        installed before ours, if it is a Python function (submitit's requeue handler)."""
        previous = self._previous.get(self.signal_number)
        if callable(previous) and previous is not signal.default_int_handler:
            self.__exit__()
            previous(self.signal_number, None)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
