"""SIGTERM/SIGINT (a scheduler's preemption, ``scancel``) under ``--exit-signal-handler``: the run saves at
the end of the iteration it is in and exits 0, instead of dying mid-step with nothing saved since the
last ``--save-interval``."""

from __future__ import annotations

import signal


class ExitSignal:
    """SIGTERM/SIGINT (a scheduler's preemption) are recorded; the loop saves at the end of the iteration
    and exits (``--exit-signal-handler``)."""

    def __init__(self, enabled: bool):
        self.received = None
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signum
