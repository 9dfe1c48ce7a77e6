"""Stopping between batches: the signal handling every launcher wraps around `runner.run`.

`Stop` is the runner's `should_stop`: it turns true at the first stop signal, so the batch in flight
finishes and is committed and no new one starts. A SLURM task also gets the scheduler's warning
(USR2, launcher.signal_delay_s before its time limit): then a watchdog gives the batch `grace_s`;
a second warning, or the grace running out, calls `now` (the task's checkpoint-and-requeue).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable, Optional

log = logging.getLogger(__name__)


class Stop:
    """Installs the handlers on enter (main thread only), restores them and stops the watchdog on exit."""

    def __init__(self, warning: Optional[int] = None, grace_s: float = 0.0,
                 now: Optional[Callable] = None) -> None:
        self.signals: list[str] = []  # names, in the order they came ("watchdog" for the grace running out)
        self.warning, self.grace_s, self.now = warning, grace_s, now
        self._previous: dict[int, object] = {}
        self._watchdog: Optional[threading.Timer] = None
        self._ignored = False

    def __call__(self) -> bool:
        return bool(self.signals)

    def warned(self) -> bool:
        return self.warning is not None and (signal.Signals(self.warning).name in self.signals
                                             or "watchdog" in self.signals)

    def __enter__(self) -> "Stop":
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_term)
            if self.warning is not None:
                self._previous[self.warning] = signal.signal(self.warning, self._on_warning)
        return self

    def __exit__(self, *exc) -> None:
        self.cancel_watchdog()
        for signum, handler in self._previous.items():
            if not (self._ignored and signum == self.warning):  # a late warning must not requeue a finished task
                signal.signal(signum, handler)

    def ignore_warnings(self) -> None:
        """From now on a warning changes nothing (the task is finishing or checkpointing already)."""
        if self.warning is not None and self.warning in self._previous:
            signal.signal(self.warning, signal.SIG_IGN)
            self._ignored = True

    def cancel_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _on_term(self, signum, frame) -> None:  # noqa: ARG002
        self.signals.append(signal.Signals(signum).name)
        log.warning("got SIGTERM: stopping after the batch in flight")

    def _on_warning(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name in self.signals or "watchdog" in self.signals:
            # A second warning, or the batch in flight outlived the grace: act now (the batch is
            # redone after the restart; committed parts are kept).
            log.warning("checkpointing now, in the middle of a batch")
            self.ignore_warnings()
            if self.now is not None:
                self.now(signum, frame)
            return
        self.signals.append(name)
        log.warning("got %s: stopping after the batch in flight (at most %.0f s)", name, self.grace_s)
        self._watchdog = threading.Timer(self.grace_s, self._grace_over, args=(signum,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _grace_over(self, signum: int) -> None:
        self.signals.append("watchdog")
        os.kill(os.getpid(), signum)
