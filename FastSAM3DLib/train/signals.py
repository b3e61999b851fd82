"""Ctrl-C (SIGINT) and SIGTERM during training: finish the step under way, write its checkpoint, exit.

A signal that raised at once could land inside ``optimizer.step()`` (half the weights updated) or
leave a rank waiting in a collective for one that has gone. So :class:`StopSignals` only notes the
signal; the training loop asks :attr:`StopSignals.signum` after each step (rank 0's answer is
broadcast, so every rank stops after the same step), writes its outputs and raises
:meth:`StopSignals.exception`: ``KeyboardInterrupt`` for SIGINT (the command line exits 130) and
``SystemExit(143)`` for SIGTERM. A second signal raises at once, without the step under way, for a
step that does not end.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Dict, Optional

logger = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM)


def stop_exception(signum: int) -> BaseException:
    """What a stop by signal ``signum`` raises: ``KeyboardInterrupt`` for SIGINT, else ``SystemExit(128 + signum)``."""
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)


class StopSignals:
    """While entered (in the main thread; elsewhere signals cannot be caught and nothing changes),
    SIGINT and SIGTERM set :attr:`signum` instead of stopping the process; the previous handlers
    are put back on exit."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:  # None: a handler installed from C, which Python cannot put back
                signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None:
            raise stop_exception(signum)
        self.signum = signum
        logger.warning("%s: stopping after the step under way with a checkpoint (send it again to stop at once, without that step)",
                       signal.Signals(signum).name)
